"""Inception-v3 (FID) feature extraction speed: channels_last (the default) against the plain layout,
interleaved in one run, with the largest feature difference between the two.

    python benchmarks/encoder_speed.py                  # 200 MNIST-sized images, batch 50, 3 repeats
    python benchmarks/encoder_speed.py --threads 1 --num_images 100

Prints one JSON line per layout (median images/s over the repeats) and one with the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ectune.metrics.encoders import InceptionV3Encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.num_images, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    encoders = {layout: InceptionV3Encoder(batch_size=args.batch, progress=False, channels_last=layout == "channels_last")
                for layout in ("plain", "channels_last")}
    for enc in encoders.values():  # warm-up (first-call graph optimisation)
        enc(images[: args.batch])
    times: dict[str, list[float]] = {k: [] for k in encoders}
    feats = {}
    for _ in range(args.repeats):
        for layout, enc in encoders.items():
            start = time.perf_counter()
            feats[layout] = enc(images)
            times[layout].append(time.perf_counter() - start)
    rate = {k: args.num_images / statistics.median(v) for k, v in times.items()}
    for layout in encoders:
        print(json.dumps({"layout": layout, "img_per_s": round(rate[layout], 2), "num_images": args.num_images,
                          "batch": args.batch, "threads": torch.get_num_threads(), "repeats": args.repeats}))
    diff = feats["channels_last"] - feats["plain"]
    print(json.dumps({"speedup_channels_last": round(rate["channels_last"] / rate["plain"], 3),
                      "max_abs_diff": diff.abs().max().item(), "rel_diff": (diff.norm() / feats["plain"].norm()).item()}))


if __name__ == "__main__":
    main()
