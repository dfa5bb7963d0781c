"""Where a training step's time goes: the real training loop under cProfile, summarised.

Runs ``ectune.training.train`` for a short stretch of a preset (default: the `ectune tune` default,
ECT on the shipped MNIST teacher) and prints the share of the wall time spent in the loss's forward
passes, the backward pass, the optimiser, the EMA, the input pipeline (index stream + batch
assembly), checkpoints and previews, and everything else (the loop's own Python overhead), one
JSON line per part (an import made inside another part counts in both), then the 15 functions
with the most own time.

    python benchmarks/profile_train.py                     # ectune tune default, 1,280 images
    python benchmarks/profile_train.py --method edm --nimg 2560 --set batch=128
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import tempfile
import time

import torch

from ectune import config as C
from ectune.errors import UserError
from ectune.training import train

# (part, predicate on (file, line, function name)) — cumulative time of the first matching frames.
PARTS = [
    ("loss forward passes (student + target)", lambda f, n: f.endswith("ectune/losses.py") and n == "__call__"),
    ("backward", lambda f, n: f.endswith("torch/_tensor.py") and n == "backward"),
    ("optimizer step", lambda f, n: f.endswith(("torch/optim/adam.py", "torch/optim/radam.py")) and n == "step"),
    ("EMA update", lambda f, n: f.endswith("ectune/ema.py") and n == "update"),
    ("input pipeline (stream_indices + batch)", lambda f, n: f.endswith("ectune/data.py")
        and n in ("stream_indices", "batch")),
    ("checkpoints + model export", lambda f, n: f.endswith("ectune/training.py") and n == "_save"),
    ("preview grid", lambda f, n: f.endswith("ectune/preview.py") and n == "write_preview"),
    ("set-up (dataset, network, teacher)", lambda f, n: (f.endswith("ectune/data.py") and n == "load_dataset")
        or (f.endswith("ectune/training.py") and n == "network_info")),
    ("imports on first use (tqdm, safetensors, ...)", lambda f, n: "importlib._bootstrap" in f and n == "_find_and_load"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--method", default="ect", choices=C.METHODS)
    ap.add_argument("--nimg", type=int, default=1280, help="images to train for (whole steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. batch=128 or ect.q=4 (as on the ectune command line)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = C.preset(args.preset, args.method)
        cfg = C.apply_overrides(cfg, dict(item.partition("=")[::2] for item in args.set))  # coerced per key type
        cfg = dataclasses.replace(cfg, total_nimg=args.nimg, report_num_images=0, checkpoint_every_nimg=0,
                                  preview_every_nimg=0, eval_every_nimg=0)
        C.validate(cfg)
    except UserError as e:
        ap.exit(2, f"error: {e}\n")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, run_dir=f"{tmp}/run")
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        result = train(cfg, progress=False)
        profiler.disable()
        wall = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    found = {}
    for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for part, match in PARTS:
            if match(file, name):
                found[part] = found.get(part, 0.0) + ct
    steps = result.nimg // cfg.batch
    accounted = sum(found.values())
    print(json.dumps({"preset": args.preset, "method": args.method, "batch": cfg.batch, "steps": steps,
                      "wall_s": round(wall, 2), "s_per_step": round(wall / max(steps, 1), 4),
                      "threads": torch.get_num_threads()}))
    for part, _ in PARTS:
        s = found.get(part, 0.0)
        print(json.dumps({"part": part, "s": round(s, 3), "share": round(s / wall, 4)}))
    other = wall - accounted
    print(json.dumps({"part": "everything else (the loop's own Python, logging, learning rate, seeds)", "s": round(other, 3),
                      "share": round(other / wall, 4), "ms_per_step": round(1000 * other / max(steps, 1), 1)}))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    main()
