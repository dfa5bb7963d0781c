"""Fault injection: kill -9 a short toy2d training run at random points, relaunch the same command
(``--resume auto``) until it finishes, and compare the result with an uninterrupted run.

For every run the script launches ``ectune pretrain --preset toy2d ... --resume auto`` as a subprocess
and sends it SIGKILL at a random point (seeded), of one of three kinds:

- ``training`` (the rest): once the launch logs that it starts or resumes training, after a delay
  drawn uniformly from 0 to twice the training time left divided by the kills still planned plus
  one (so the kills of a run spread over it);
- ``write`` (``--write-kill-fraction``): during a checkpoint write (training state or model export):
  within 5 ms of the moment the temporary ``.*.tmp`` file of an atomic write shows up in
  ``checkpoints/`` or ``model/``, at a write drawn the same way over the writes left;
- ``anytime`` (``--anytime-kill-fraction``): after a delay drawn the same way plus the start-up time,
  counted from the launch (so start-up, imports and the final export are hit too).

The kinds are dealt in these proportions and shuffled (seeded).

After each kill it records what the relaunch will find: stray temporary files and their bytes (the
relaunch deletes them), the images trained so far (``stats.jsonl`` is written every step) and the
newest complete training state; their difference is the work the relaunch redoes. A finished run
counts as identical when its exported EMA model, its final training state (network, every EMA,
optimizer) and its stats lines (loss per step) equal the uninterrupted reference bit for bit.

Prints one JSON line:

    python benchmarks/fault_injection.py                 # 5 runs x 4 kills, 25,600 images each
    python benchmarks/fault_injection.py --quick         # 3 runs x 3 kills, 12,800 images (~1 min)
    python benchmarks/fault_injection.py --runs 10 --kills-per-run 5 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ectune.checkpoint import list_states

def command(run: Path, total_nimg: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "ectune", "pretrain", "--preset", "toy2d", "--batch", "64", "--data.max_items", "2048",
            "--network.kwargs.dropout", "0.1", "--total_nimg", str(total_nimg), "--log_every_nimg", "64",
            "--checkpoint_every_nimg", str(checkpoint_every), "--keep_checkpoints", "3", "--preview.num_images", "16",
            "--device", "cpu", "--no-progress", "--run-dir", str(run), "--resume", "auto"]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp") if p.is_file()] if run.is_dir() else []


def progress(run: Path) -> int:
    """Images trained so far: the last complete line of stats.jsonl (written every step)."""
    nimg = 0
    path = run / "stats.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                nimg = max(nimg, int(json.loads(line)["nimg"]))
            except (ValueError, KeyError, TypeError):
                continue
    return nimg


def flat_state(path: Path) -> dict[str, object]:
    """A training state as {dotted key: tensor or plain value}."""
    out: dict[str, object] = {}

    def walk(prefix: str, v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            out[prefix] = v

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return out


def same_values(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def stats_lines(run: Path) -> list[tuple[int, float]]:
    return [(s["nimg"], s["loss"]) for s in map(json.loads, (run / "stats.jsonl").read_text().splitlines())]


def identical(run: Path, ref: Path) -> dict[str, bool]:
    model = same_values(load_file(str(run / "model" / "model.safetensors")), load_file(str(ref / "model" / "model.safetensors")))
    state = same_values(flat_state(list_states(run)[-1][1]), flat_state(list_states(ref)[-1][1]))
    return {"model": model, "state": state, "stats": stats_lines(run) == stats_lines(ref)}


def started_lines(run: Path) -> int:
    log = run / "log.txt"
    if not log.is_file():
        return 0
    return sum(line.startswith(("starting ", "resuming ")) for line in log.read_text(errors="replace").splitlines())


def kill_after(p: subprocess.Popen, delay: float) -> bool:
    """SIGKILL after ``delay`` seconds unless the process ends first."""
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        return True


def kill_in_training(p: subprocess.Popen, run: Path, before: int, train_s: float, rng: random.Random) -> bool:
    """Wait for this launch's "starting"/"resuming" line, then SIGKILL after U(0, train_s) seconds."""
    while started_lines(run) <= before:
        if p.poll() is not None:
            return False
        time.sleep(0.005)
    return kill_after(p, rng.uniform(0.0, train_s))


def is_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def kill_at_write(p: subprocess.Popen, run: Path, skip: int, deadline: float, rng: random.Random) -> bool:
    """Poll for temporary files of atomic writes in progress; at the ``skip``-th one seen (0-based),
    SIGKILL within U(0, 5 ms) of it (writing a state of this run and fsyncing it takes about that long
    here). False if the process ended first."""
    folders = [run / "checkpoints", run / "model"]  # training states and the model export (not config / stats)
    seen: set[str] = set()
    while time.monotonic() < deadline and p.poll() is None:
        for folder in folders:
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            seen.update(n for n in names if n.startswith(".") and n.endswith(".tmp"))
        if len(seen) > skip:
            time.sleep(rng.uniform(0.0, 0.005))
            p.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kills-per-run", type=int, default=4)
    ap.add_argument("--total-nimg", type=int, default=25_600, help="images per run (batch 64, the toy2d preset's MLP)")
    ap.add_argument("--checkpoint-every-nimg", type=int, default=1024, help="16 steps of 64")
    ap.add_argument("--write-kill-fraction", type=float, default=0.25,
                    help="share of kills aimed at a checkpoint write in progress")
    ap.add_argument("--anytime-kill-fraction", type=float, default=0.25,
                    help="share of kills at a uniformly random time of the process's life (start-up included)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    ap.add_argument("--quick", action="store_true", help="3 runs x 3 kills of 12,800 images")
    ap.add_argument("--keep", metavar="DIR", help="keep the run folders in DIR (default: a deleted temporary folder)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.kills_per_run, args.total_nimg = 3, 3, 12_800
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ectune-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below ends the child too
    p: subprocess.Popen | None = None
    try:
        ref = root / "reference"
        t0 = time.perf_counter()
        p = launch(command(ref, args.total_nimg, args.checkpoint_every_nimg), root / "reference.log")
        if p.wait(timeout=900) != 0:
            sys.exit(f"the reference run failed: see {root / 'reference.log'}")
        ref_wall = time.perf_counter() - t0
        train_wall = json.loads((ref / "stats.jsonl").read_text().splitlines()[-1])["wall_s"]
        startup = max(ref_wall - train_wall, 0.5)
        print(f"reference: {ref_wall:.1f} s ({startup:.1f} s start-up)", file=sys.stderr)

        total_kills = args.runs * args.kills_per_run
        n_write, n_any = round(args.write_kill_fraction * total_kills), round(args.anytime_kill_fraction * total_kills)
        kinds = ["write"] * n_write + ["anytime"] * n_any + ["training"] * (total_kills - n_write - n_any)
        rng.shuffle(kinds)
        kills, records, runs = 0, [], []
        seen_temp: set[Path] = set()
        for r in range(args.runs):
            run = root / f"run{r}"
            cmd = command(run, args.total_nimg, args.checkpoint_every_nimg)
            planned = args.kills_per_run
            launches, start_point = 0, 0
            while True:
                p = launch(cmd, root / f"run{r}.log")
                launches += 1
                if planned == 0:
                    if p.wait(timeout=900) != 0:
                        print(f"run {r}: the final launch failed (see {root / f'run{r}.log'})", file=sys.stderr)
                    break
                before = started_lines(run)
                span = min(1.0, 2 / (planned + 1)) * train_wall * (1 - progress(run) / args.total_nimg)
                kind = kinds[r * args.kills_per_run + args.kills_per_run - planned]
                if kind == "write":
                    # a checkpoint writes a state, model.safetensors and model/config.json (the polling sees the big two)
                    writes_left = 2 * (args.total_nimg - progress(run)) // args.checkpoint_every_nimg
                    skip = rng.randrange(max(1, writes_left * 2 // (planned + 1)))
                    killed = kill_at_write(p, run, skip, time.monotonic() + ref_wall + 60, rng)
                elif kind == "anytime":
                    killed = kill_after(p, rng.uniform(0.0, startup + span))
                else:
                    killed = kill_in_training(p, run, before, span, rng)
                p.wait(timeout=60)
                if not killed or p.returncode != -signal.SIGKILL:
                    # the run ended before the kill: it is finished (no more kills possible)
                    print(f"run {r}: finished before kill {args.kills_per_run - planned + 1}", file=sys.stderr)
                    break
                planned -= 1
                kills += 1
                tmp = [f for f in temp_files(run) if f not in seen_temp]  # each stray file once
                seen_temp.update(tmp)
                states = [n for n, _ in list_states(run)]
                resume_from = states[-1] if states else 0
                trained = started_lines(run) > before  # else it died in start-up: stats.jsonl is the last launch's
                done = progress(run) if trained else start_point
                start_point = resume_from
                records.append({"run": r, "kind": kind, "in_training": trained, "progress": done,
                                "resume_from": resume_from, "lost": max(done - resume_from, 0), "temp_files": len(tmp),
                                "temp_bytes": sum(f.stat().st_size for f in tmp), "states": len(states)})
                print(f"run {r}: kill {kills} at {done} images ({kind}), "
                      f"resumes from {resume_from}, {len(tmp)} temp file(s)", file=sys.stderr)
            finished = (run / "model" / "model.safetensors").is_file() and bool(list_states(run)) \
                and list_states(run)[-1][0] == args.total_nimg
            same = identical(run, ref) if finished else {"model": False, "state": False, "stats": False}
            resumed = [int(line.split(" at ")[1].split()[0]) for line in (run / "log.txt").read_text().splitlines()
                       if line.startswith("resuming")] if (run / "log.txt").is_file() else []
            # a relaunch killed before it logged does not show: the logged resume points are a subsequence
            expected = [rec["resume_from"] for rec in records if rec["run"] == r and rec["resume_from"] > 0]
            runs.append({"run": r, "kills": sum(rec["run"] == r for rec in records), "launches": launches,
                         "finished": finished, **same, "resume_points_as_expected": is_subsequence(resumed, expected),
                         "temp_files_left": len(temp_files(run))})
            print(f"run {r}: {runs[-1]}", file=sys.stderr)

        lost = [rec["lost"] for rec in records] or [0]
        ok = [x for x in runs if x["finished"] and x["model"] and x["state"] and x["stats"]]
        result = {
            "kills": kills,
            "kills_survived": sum(x["kills"] for x in ok),
            "runs": len(runs),
            "runs_identical": len(ok),
            "runs_resumed_where_expected": sum(x["resume_points_as_expected"] for x in runs),
            "kills_by_kind": {k: sum(rec["kind"] == k for rec in records) for k in ("training", "write", "anytime")},
            "kills_with_temp_files": sum(rec["temp_files"] > 0 for rec in records),
            "stray_temp_files": sum(rec["temp_files"] for rec in records),
            "stray_temp_bytes": sum(rec["temp_bytes"] for rec in records),
            "temp_files_left_after_resume": sum(x["temp_files_left"] for x in runs),
            "kills_before_first_state": sum(rec["states"] == 0 for rec in records),
            "kills_in_start_up": sum(not rec["in_training"] for rec in records),
            "images_lost_per_kill": {"mean": round(statistics.fmean(lost), 1), "max": max(lost), "min": min(lost)},
            "images_lost_per_training_kill": {
                "mean": round(statistics.fmean(tl), 1) if (tl := [rec["lost"] for rec in records if rec["kind"] == "training"]) else None,
                "max": max(tl) if tl else None},
            "checkpoint_every_nimg": args.checkpoint_every_nimg,
            "total_nimg": args.total_nimg,
            "reference_wall_s": round(ref_wall, 1),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "seed": args.seed,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result))
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
