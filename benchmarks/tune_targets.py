"""Issue 4's quality targets for the default `ectune tune` run, measured at N images:
ECM 2-step FID <= 1.3x the teacher's 35-NFE FID, ECM 1-step FID <= 2.5x.

    python benchmarks/tune_targets.py RUN_DIR [--num_images 5000] [--out FOLDER] [--device auto]

RUN_DIR is the folder a finished `ectune tune` printed (its config names the teacher). This is the
run's own report at a larger N: the teacher (Heun, 35 NFE) and the tuned model (1 and 2 steps) on
seeds 0..N-1 against N MNIST training images, written with grids to FOLDER (default
RUN_DIR/targets-nN; an existing report there is not overwritten). Prints one JSON line per sampler
and a verdict line. The models and Inception-v3 run on --device (default: a GPU when there is one).

The teacher's row is the slow part the first time (38.5 minutes in all at N = 5,000 on 2 cores); like
the report's, it is cached in the metric cache and reused once its first 16 seeds, sampled and
encoded again, agree, so later runs on other tuned models cost only their own two rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ectune import config as C
from ectune.checkpoint import run_relative_path
from ectune.errors import ConfigError
from ectune.plots import read_stats
from ectune.report import write_tune_report
from ectune.training import resolve_device

TARGETS = {"ECM 2 steps": 1.3, "ECM 1 step": 2.5}
"""The largest FID ratio to the teacher's that meets issue 4's target."""


def fail(message: str) -> None:
    """Bad input: one line, exit code 2 (as the ectune CLI)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def measure(run_dir: Path, num_images: int, out: Path, **report_kw) -> dict:
    """Write the run's report at ``num_images`` into ``out`` and return its results object."""
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    if not isinstance(saved, dict) or saved.get("method") != "ect" or not isinstance(saved.get("teacher"), str):
        fail(f"{run_dir} is not an `ectune tune` run (its config.json names no ECT teacher): pass the folder of one")
    if num_images < 2:
        fail(f"--num_images must be at least 2, got {num_images}")
    teacher = run_relative_path(run_dir, saved.get("run_dir"), saved["teacher"])  # recorded from the start folder
    cfg = C.from_dict(C.TrainConfig, {**saved, "teacher": teacher, "report_num_images": num_images})
    if (out / "results.json").exists():
        fail(f"{out} already holds a measurement: pass another --out, or delete it to measure again")
    records = read_stats(run_dir)  # the last: images seen and training wall time at the end
    if not records:
        fail(f"{run_dir / 'stats.jsonl'} is missing or empty: pass the folder of a finished `ectune tune` run")
    stats = records[-1]
    out.mkdir(parents=True, exist_ok=True)
    write_tune_report(run_dir, cfg, train_wall_s=stats["wall_s"], nimg=stats["nimg"], out_dir=out,
                      right_after_training=False, **report_kw)
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def verdict(results: dict) -> list[str]:
    """One JSON line per sampler, then the targets met or missed."""
    rows = {r["name"]: r for r in results["rows"]}
    teacher = results["rows"][0]["fid"]
    lines = [json.dumps({"sampler": r["name"], "nfe": r["nfe"], "fid": r["fid"], "kid": r["kid"],
                         "ratio_to_teacher": r["fid"] / teacher, "num_images": results["num_images"]})
             for r in results["rows"]]
    parts = []
    for name, limit in TARGETS.items():
        ratio = rows[name]["fid"] / teacher
        parts.append(f"{name} {ratio:.2f}x (<= {limit}x: {'met' if ratio <= limit else 'missed'})")
    return lines + ["targets: " + ", ".join(parts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--num_images", type=int, default=5000)
    ap.add_argument("--out", help="folder for the report, grids and results.json (default RUN_DIR/targets-nN)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: a GPU if there is one)")
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        fail(str(e))
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        fail(f"{run_dir} has no config.json: pass the folder of a finished `ectune tune` run")
    out = Path(args.out) if args.out else run_dir / f"targets-n{args.num_images}"
    results = measure(run_dir, args.num_images, out, device=device)
    print("\n".join(verdict(results)))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
