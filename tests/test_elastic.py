"""Elastic restarts under torchrun on CPU: 2 worker processes (gloo), one killed with SIGKILL.

- With ``--max-restarts=1`` torchrun restarts the workers; ``--resume auto`` makes them resume from the
  last complete training state, and the run ends with the weights of an uninterrupted single-process
  run at the same global batch (2 processes x 32 == 1 process x 2 accumulation rounds x 32): bitwise.
- With ``--max-restarts=0`` the job stops with a non-zero exit code within seconds (no hang in a
  collective), and relaunching the same command resumes.
- The start-up check that all ranks hold identical parameters catches ranks that differ.
- A relaunch of a run killed after its last training state but before its model export exports it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from ectune import config as C
from ectune.checkpoint import list_states
from ectune.errors import UserError
from ectune.training import resume_or_start, train

pytestmark = pytest.mark.slow

TOTAL = 12_800
ARGS = ["pretrain", "--preset", "toy2d", "--network.kwargs", '{"dim": 2, "hidden_dim": 32, "num_blocks": 1, "dropout": 0.1}',
        "--batch", "64", "--batch_gpu", "32", "--data.max_items", "2048", "--total_nimg", str(TOTAL),
        "--log_every_nimg", "640", "--checkpoint_every_nimg", "640", "--keep_checkpoints", "3",
        "--preview.num_images", "16", "--device", "cpu", "--no-progress", "--resume", "auto"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def torchrun(run: Path, max_restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "ectune", *ARGS, "--run-dir", str(run)]
    out = open(run.parent / f"{run.name}-torchrun-{time.monotonic_ns()}.txt", "w")
    # its own session, so that a failing test can end the launcher and its workers together
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (its children that carry a RANK)."""
    out = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            except (OSError, UnicodeDecodeError):
                continue
            if "RANK" in env:
                out[int(env["RANK"])] = pid
    return out


def kill_worker_after_first_state(p: subprocess.Popen, run: Path, rank: int, timeout: float = 60.0) -> int:
    """SIGKILL the worker of ``rank`` as soon as a training state exists; returns the newest state's images."""
    t0 = time.monotonic()
    while not list_states(run):
        assert p.poll() is None, f"torchrun ended before the first checkpoint:\n{read(p)}"
        assert time.monotonic() - t0 < timeout, "no checkpoint written"
        time.sleep(0.01)
    pid = workers(p.pid)[rank]
    saved = list_states(run)[-1][0]
    os.kill(pid, signal.SIGKILL)
    assert saved < TOTAL, "the run finished before the kill: make it longer"
    return saved


def read(p: subprocess.Popen) -> str:
    """The end of torchrun's output (workers' tracebacks included)."""
    return Path(p.stdout.name).read_text()[-6000:]


def wait(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"torchrun still running after {timeout} s (a hang?):\n{read(p)}")


def resumed_at(run: Path) -> list[int]:
    return [int(line.split(" at ")[1].split()[0]) for line in (run / "log.txt").read_text().splitlines()
            if line.startswith("resuming")]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(wa[k], wb[k]), f"{k}: close but not bitwise equal"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The uninterrupted reference: one process, 2 accumulation rounds of 32."""
    run = tmp_path_factory.mktemp("single") / "run"
    p = subprocess.run([sys.executable, "-m", "ectune", *ARGS, "--run-dir", str(run)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "x 2 accumulation rounds" in (run / "log.txt").read_text()
    return run


def test_torchrun_restarts_a_killed_worker_which_resumes_exactly(tmp_path, single_process):
    run = tmp_path / "run"
    p = torchrun(run, max_restarts=1)
    try:
        saved = kill_worker_after_first_state(p, run, rank=1)
        rc = wait(p, timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == 0, read(p)
    resumes = resumed_at(run)
    assert len(resumes) == 1 and saved <= resumes[0] < TOTAL, (resumes, saved)
    log = (run / "log.txt").read_text()
    assert "x 2, batch 64 = 32 x 2 processes x 1 accumulation rounds" in log
    assert f"stopped at {TOTAL} images" in log
    assert not list(run.rglob("*.tmp"))
    assert_same_weights(single_process, run)


def test_killed_worker_without_restarts_stops_the_job_and_the_relaunch_resumes(tmp_path, single_process):
    run = tmp_path / "run"
    p = torchrun(run, max_restarts=0)
    try:
        kill_worker_after_first_state(p, run, rank=0)
        t_kill = time.monotonic()
        rc = wait(p, timeout=60)
        stopped_after = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc != 0, read(p)
    assert stopped_after < 45, f"the job took {stopped_after:.0f} s to stop after a worker died"
    p = torchrun(run, max_restarts=0)  # the same command again
    rc = wait(p, timeout=120)
    assert rc == 0, read(p)
    resumes = resumed_at(run)
    assert len(resumes) == 1 and 0 < resumes[0] < TOTAL, resumes
    assert_same_weights(single_process, run)


# ---------------------------------------------------------------------------------------------
# The start-up check itself: ranks with different parameters are refused.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_worker(rank: int, port: int, differ: bool, out: str) -> None:
    from ectune.training import _check_same_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = nn.Linear(4, 4)
        if differ and rank == 1:
            with torch.no_grad():
                net.weight[0, 0] += 1e-3
        try:
            _check_same_parameters(net)
            Path(out, f"rank{rank}").write_text("same")
        except UserError as e:
            Path(out, f"rank{rank}").write_text(f"error: {e}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_start_check_catches_ranks_with_different_parameters(tmp_path, differ):
    mp.spawn(_check_worker, args=(_free_port(), differ, str(tmp_path)), nprocs=2, join=True)
    results = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    if differ:
        assert all(r.startswith("error: processes hold different parameters") for r in results), results
    else:
        assert results == {"same"}


# ---------------------------------------------------------------------------------------------
# A kill in the last checkpoint's window between the training state and the model export.


def test_relaunch_after_the_last_state_exports_the_model_again(tmp_path):
    over = {"batch": 64, "total_nimg": 512, "checkpoint_every_nimg": 256, "keep_checkpoints": 3, "log_every_nimg": 128,
            "preview.num_images": 16, "data.max_items": 2048,
            "network.kwargs": json.dumps({"dim": 2, "hidden_dim": 32, "num_blocks": 1})}
    full = resume_or_start(C.apply_overrides(C.preset("toy2d", "edm"), {**over, "run_dir": str(tmp_path / "full")}),
                           progress=False)
    cfg = C.apply_overrides(C.preset("toy2d", "edm"), {**over, "run_dir": str(tmp_path / "run")})
    train(cfg, progress=False, stop_after_nimg=256)
    shutil.copytree(tmp_path / "run" / "model", tmp_path / "model-256")
    resume_or_start(cfg, progress=False)
    # as if killed after training-state-512 was renamed into place, before model/ was rewritten
    shutil.rmtree(tmp_path / "run" / "model")
    shutil.copytree(tmp_path / "model-256", tmp_path / "run" / "model")
    res = resume_or_start(cfg, progress=False)  # the same command again
    assert res.nimg == 512
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["nimg"] == 512
    assert_same_weights(full.run_dir, tmp_path / "run")
