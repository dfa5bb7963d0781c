"""Crash safety: kills at any moment, signals, unreadable states, relaunching the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ectune import config as C
from ectune.checkpoint import list_states
from ectune.training import resume_or_start, train

TINY = ["--preset", "toy2d", "--batch", "64", "--data.max_items", "2048", "--log_every_nimg", "128",
        "--checkpoint_every_nimg", "256", "--keep_checkpoints", "3", "--preview.num_images", "16",
        "--network.kwargs", '{"dim": 2, "hidden_dim": 32, "num_blocks": 1, "dropout": 0.1}', "--no-progress"]


def cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ectune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    p = cli("pretrain", *TINY, "--total_nimg", "12800", "--run-dir", str(tmp / "run"))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return tmp / "run"


@pytest.mark.slow
def test_sigkill_then_relaunch_same_command_is_exact(tmp_path, reference_run):
    run = tmp_path / "run"
    cmd = ("pretrain", *TINY, "--total_nimg", "12800", "--run-dir", str(run), "--resume", "auto")
    kills = 0
    for _ in range(3):
        p = cli(*cmd)
        wait_for(lambda: len(list_states(run)) > kills or p.poll() is not None)
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 1
    p = cli(*cmd)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert_same_weights(reference_run, run)
    nimgs = [json.loads(line)["nimg"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert nimgs == sorted(set(nimgs)), "stats replayed after a kill must not be duplicated"
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes_exactly(tmp_path, reference_run):
    run = tmp_path / "run"
    p = cli("pretrain", *TINY, "--total_nimg", "12800", "--run-dir", str(run))
    wait_for(lambda: (run / "stats.jsonl").is_file() or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert rc == 128 + signal.SIGTERM, err
    assert "resume with --resume" in err
    saved = [n for n, _ in list_states(run)]
    assert saved and saved[-1] < 12800
    p = cli("pretrain", "--resume", str(run), "--no-progress")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert_same_weights(reference_run, run)


def stats_lines(run: Path) -> list[dict]:
    """A run's stats.jsonl rows without their timings (which differ between any two runs)."""
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s", "eval_s")} for r in rows]


def _cfg(tmp: Path, **over) -> C.TrainConfig:
    base = {"batch": 64, "total_nimg": 1024, "data.max_items": 2048, "checkpoint_every_nimg": 256,
            "keep_checkpoints": 4, "log_every_nimg": 128, "run_dir": str(tmp / "run"), "preview.num_images": 16,
            "network.kwargs": json.dumps({"dim": 2, "hidden_dim": 32, "num_blocks": 1})}
    base.update(over)
    return C.apply_overrides(C.preset("toy2d", "edm"), base)


def test_unreadable_latest_state_falls_back_to_the_previous(tmp_path):
    full = train(_cfg(tmp_path / "a"), progress=False)
    part = train(_cfg(tmp_path / "b"), progress=False, stop_after_nimg=768)
    states = list_states(part.run_dir)
    assert [n for n, _ in states] == [256, 512, 768]
    states[-1][1].write_bytes(b"\x00garbage")  # e.g. a disk error
    resumed = train(C.TrainConfig(), resume=str(part.run_dir), progress=False)
    assert resumed.nimg == 1024
    assert "skipped unreadable training state" in (part.run_dir / "log.txt").read_text()
    assert_same_weights(full.run_dir, resumed.run_dir)


def test_resume_auto_starts_resumes_and_refuses_another_run(tmp_path):
    cfg = _cfg(tmp_path)
    first = resume_or_start(cfg, progress=False)  # nothing there: starts
    assert first.nimg == 1024
    again = resume_or_start(cfg, progress=False)  # finished: resumes at the end, no extra step
    assert again.nimg == 1024
    other = _cfg(tmp_path, **{"optim.lr": 5e-4})
    with pytest.raises(Exception, match=r"holds another run \(its config.json differs in optim.lr\)"):  # ignored
        resume_or_start(other, progress=False)
    (tmp_path / "run" / "checkpoints").rename(tmp_path / "moved")
    with pytest.raises(Exception, match="holds another run"):  # before the first state: they would be lost
        resume_or_start(other, progress=False)


def test_a_saved_config_that_no_longer_validates_is_named(tmp_path):
    """Resuming a run whose config.json holds a value this version refuses names that file."""
    first = train(_cfg(tmp_path, total_nimg=512), progress=False, stop_after_nimg=256)
    saved = json.loads((first.run_dir / "config.json").read_text())
    saved["seed"] = 2 ** 32  # accepted before seeds were range-checked
    (first.run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(C.ConfigError, match=r"config\.json: seed must be in \[0, 2\^32\)"):
        train(C.TrainConfig(), resume=str(first.run_dir), progress=False)


def test_a_run_saved_with_disagreeing_scalings_still_resumes(tmp_path):
    """A loss's own scalings beside another precond.train_scalings is refused for a new run only: runs
    saved before the check trained with the loss's value, and resume (a review found them locked out)."""
    cfg = _cfg(tmp_path, total_nimg=512, **{"edm.scalings": "cm"})
    with pytest.raises(C.ConfigError, match="--precond.train_scalings cm, or --edm.scalings edm"):
        C.validate(cfg)
    first = train(C.apply_overrides(cfg, {"edm.scalings": "null"}), progress=False, stop_after_nimg=256)
    saved = json.loads((first.run_dir / "config.json").read_text())
    saved["edm"]["scalings"] = "cm"  # as an older ectune saved it
    (first.run_dir / "config.json").write_text(json.dumps(saved))
    assert train(C.TrainConfig(), resume=str(first.run_dir), progress=False).nimg == 512


def test_resume_auto_keeps_resuming_runs_that_new_run_checks_would_refuse(tmp_path, monkeypatch):
    """A pretrain run an older ectune started with --teacher (it ignored it) relaunches with its own command
    under --resume auto: the refusal of --teacher is for new runs (a review found elastic relaunches broken)."""
    from ectune.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["pretrain", *TINY, "--total_nimg", "512", "--run-dir", "run", "--resume", "auto"]
    assert main([*args, "--teacher", "builtin:mnist"]) == 2  # a new run: refused
    assert not (tmp_path / "run").exists()
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "teacher": "builtin:mnist"}))  # as saved before
    assert main([*args, "--teacher", "builtin:mnist"]) == 0


def test_resume_auto_takes_a_run_dir_spelled_another_way(tmp_path):
    """`--run-dir runs/a/` and `runs/a` are one run, and a config.json without an option added since is
    the same config: relaunching with the trailing slash resumes it."""
    cfg = _cfg(tmp_path, total_nimg=512)
    first = train(cfg, progress=False, stop_after_nimg=256)
    saved = json.loads((first.run_dir / "config.json").read_text())
    del saved["compile"]  # as written by a version before the option: it reads as its default
    (first.run_dir / "config.json").write_text(json.dumps(saved))
    again = resume_or_start(_cfg(tmp_path, total_nimg=512, run_dir=str(tmp_path / "run") + "/"), progress=False)
    assert first.nimg == 256 and again.nimg == 512 and again.run_dir == first.run_dir


def test_resumed_run_logs_the_lines_of_an_uninterrupted_one(tmp_path):
    """The loss averaged between log lines and the non-finite tally are in the training state: a run
    stopped between two log lines (checkpoint every 192 images, a log line every 128) and resumed logs
    the uninterrupted run's lines, the curriculum of the step just taken included."""
    over = {"checkpoint_every_nimg": 192, "total_nimg": 768}
    full = train(_cfg(tmp_path / "a", **over), progress=False)
    train(_cfg(tmp_path / "b", **over), progress=False, stop_after_nimg=192)
    resumed = train(C.TrainConfig(), resume=str(tmp_path / "b" / "run"), progress=False)

    assert [r["nimg"] for r in stats_lines(full.run_dir)] == [128, 256, 384, 512, 640, 768]
    assert stats_lines(resumed.run_dir) == stats_lines(full.run_dir)


def test_logged_ect_stage_is_the_stage_trained(tmp_path):
    """Each stats line names the ECT stage of the step just taken: the last is (total - batch) // stage_nimg."""
    teacher = train(_cfg(tmp_path / "t", total_nimg=256), progress=False)
    cfg = C.apply_overrides(C.preset("toy2d", "ect"), {
        "batch": 64, "total_nimg": 512, "data.max_items": 2048, "log_every_nimg": 64, "checkpoint_every_nimg": 0,
        "run_dir": str(tmp_path / "ect"), "preview.num_images": 16, "teacher": str(teacher.model_dir),
        "ect.stage_nimg": 128})
    run = train(cfg, progress=False)
    stages = [json.loads(x)["stage"] for x in (run.run_dir / "stats.jsonl").read_text().splitlines()]
    assert stages == [0, 0, 1, 1, 2, 2, 3, 3]


def test_stale_temporary_files_and_folders_are_removed_and_nothing_else(tmp_path):
    """What a killed atomic_write (a file) or write_folder_atomic (a folder, e.g. from export-ema)
    leaves behind is removed on resume; finished files and folders stay."""
    from ectune.checkpoint import remove_stale_temp_files

    (tmp_path / "checkpoints").mkdir()
    stale_file = tmp_path / "checkpoints" / ".training-state-000000000256.pt.ab12.tmp"
    stale_dir = tmp_path / ".model-ema-std0.100.cd34.tmp"
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    (stale_dir / ".config.json.ef56.tmp").write_text("{")  # a temporary file inside a temporary folder
    keep = [tmp_path / "checkpoints" / "training-state-000000000256.pt", tmp_path / "model" / "config.json",
            tmp_path / "notes.tmp"]
    for k in keep:
        k.parent.mkdir(exist_ok=True)
        k.write_text("x")
    removed = remove_stale_temp_files(tmp_path)
    assert stale_file in removed and stale_dir in removed
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(k.read_text() == "x" for k in keep)


def test_preview_and_metrics_a_kill_skipped_are_written_on_resume(tmp_path):
    """A kill between a training state and the preview / training-time metrics due at it (here: both
    removed after a stop at that state) leaves them out no longer: the resume writes them first, and
    stats.jsonl ends with the uninterrupted run's lines."""
    over = {"total_nimg": 2048, "preview_every_nimg": 1024, "eval_every_nimg": 1024, "eval_num_images": 300}
    full = train(_cfg(tmp_path / "a", **over), progress=False)
    part = train(_cfg(tmp_path / "b", **over), progress=False, stop_after_nimg=1024)
    preview = part.run_dir / "samples" / "preview-000001.024kimg.png"
    stats = part.run_dir / "stats.jsonl"
    assert preview.is_file() and '"eval_s"' in stats.read_text()
    preview.unlink()
    stats.write_text("".join(line + "\n" for line in stats.read_text().splitlines() if '"eval_s"' not in line))
    resumed = train(C.TrainConfig(), resume=str(part.run_dir), progress=False)
    assert preview.is_file()

    assert stats_lines(resumed.run_dir) == stats_lines(full.run_dir)
    assert sum("sw" in r for r in stats_lines(full.run_dir)) == 2
    again = train(C.TrainConfig(), resume=str(part.run_dir), progress=False)  # finished: nothing is redone
    assert stats_lines(again.run_dir) == stats_lines(full.run_dir)
    final = part.run_dir / "samples" / "preview-000002.048kimg.png"  # a kill after the model export, before it
    final.unlink()
    train(C.TrainConfig(), resume=str(part.run_dir), progress=False)
    assert final.is_file() and stats_lines(part.run_dir) == stats_lines(full.run_dir)
    final.rename(final.with_name("preview-000002kimg.png"))  # as runs before the exact names called it
    train(C.TrainConfig(), resume=str(part.run_dir), progress=False)
    assert not final.exists()  # the preview is there under its old name: not written again


# ---------------------------------------------------------------------------------------------
# Checkpoint files (gaps a mutation audit found; each test fails under the mutation it names).


def test_only_the_last_keep_states_remain(tmp_path):
    """keep_checkpoints K prunes to the newest K states (pruning one too many or too few went unnoticed)."""
    from ectune.checkpoint import save_state

    for nimg in range(1, 6):
        save_state(tmp_path, nimg * 64, {"nimg": nimg * 64}, keep=3)
    assert [n for n, _ in list_states(tmp_path)] == [192, 256, 320]
    save_state(tmp_path, 384, {"nimg": 384}, keep=0)  # 0 keeps all
    assert [n for n, _ in list_states(tmp_path)] == [192, 256, 320, 384]
    (tmp_path / "checkpoints" / "training-state-000000000448.pt.bak").write_bytes(b"")  # not a state
    assert [n for n, _ in list_states(tmp_path)] == [192, 256, 320, 384]


def test_a_model_folder_loads_only_when_its_weights_and_schema_fit(tmp_path):
    """load_model is strict: a missing or an extra tensor, or a config of a newer schema, is refused with
    a CheckpointError (strict=False and a dropped schema check survived every test)."""
    from safetensors.torch import save_file

    from ectune.checkpoint import ModelInfo, load_model, save_model
    from ectune.errors import CheckpointError
    from ectune.networks import build_network

    kw = {"dim": 2, "hidden_dim": 8, "num_blocks": 1}
    save_model(tmp_path / "m", build_network("mlp", **kw), ModelInfo("mlp", kw, 0.5, "edm", 0.002, "edm", (2,), 0,
                                                                      0.821, {}))
    load_model(tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    for broken in ({k: v for k, v in weights.items() if k != next(iter(weights))}, {**weights, "extra": torch.ones(1)}):
        save_file(broken, str(tmp_path / "m" / "model.safetensors"))
        with pytest.raises(CheckpointError, match="does not match the network in config.json"):
            load_model(tmp_path / "m")
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "schema_version": 2}))
    with pytest.raises(CheckpointError, match="schema_version 2, this ectune reads 1: upgrade ectune"):
        load_model(tmp_path / "m")


def test_run_relative_paths_come_back_unchanged_unless_found_from_the_start_folder(tmp_path, monkeypatch):
    """A teacher recorded relative to the folder a run started in is found from elsewhere, and only
    when the run folder ends in the recorded run_dir and the rebuilt path exists."""
    from ectune.checkpoint import run_relative_path

    (tmp_path / "proj" / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "proj" / "teachers" / "t").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "proj" / "runs" / "r1"
    assert run_relative_path(run, "runs/r1", "teachers/t") == str(tmp_path / "proj" / "teachers" / "t")
    assert run_relative_path(run, "other/r1", "teachers/t") == "teachers/t"  # the run folder is not runs/r1
    assert run_relative_path(run, "runs/r1", "teachers/none") == "teachers/none"  # not there either
    assert run_relative_path(run, "runs/r1", "builtin:mnist") == "builtin:mnist"
    assert run_relative_path(run, None, "teachers/t") == "teachers/t"
