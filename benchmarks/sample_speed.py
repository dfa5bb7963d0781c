"""Sampling throughput: a consistency model's 1 and 2 steps against the teacher's Heun sampler at 35
network evaluations (18 steps), on the same network, side by side in one run.

Each configuration generates one batch with the library's samplers (per-image noise streams, float64
state, the network in fp32 or under bf16 autocast), the way `ectune sample` does; configurations are
interleaved round-robin so that machine noise hits them alike. One JSON line per configuration with
the median images/s, the speed-up over Heun 35 NFE (goal: 1 step >= 30x) and, on CUDA, the peak
memory; the share of the time spent drawing the per-image noise is printed too.

    python benchmarks/sample_speed.py                          # mnist net, fp32, batch 128
    python benchmarks/sample_speed.py --nets mnist,cifar10 --precisions fp32,bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from ectune.networks import build_network
from ectune.precond import Denoiser
from ectune.sampling import PerImageNoise, consistency_sample, edm_sample
from step_time import NETS  # the same networks (their dropout is idle here: sampling runs in eval mode)

SAMPLERS = {
    "ecm-1step": dict(nfe=1, run=lambda fn, noise: consistency_sample(fn, noise, [80.0])),
    "ecm-2step": dict(nfe=2, run=lambda fn, noise: consistency_sample(fn, noise, [80.0, 0.821])),
    "heun-18": dict(nfe=35, run=lambda fn, noise: edm_sample(fn, noise, 18, solver="heun")),
}


class TimedNoise(PerImageNoise):
    """PerImageNoise that adds up the time spent drawing noise."""

    seconds = 0.0

    def randn(self) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().randn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="mnist", help="comma list of: mnist, cifar10")
    ap.add_argument("--precisions", default="fp32", help="comma list of: fp32, bf16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = []
    for net_name in args.nets.split(","):
        net = build_network("songunet", **NETS[net_name]).to(device).eval()
        denoiser = Denoiser(net).to(device)
        shape = (NETS[net_name]["in_channels"], NETS[net_name]["img_resolution"], NETS[net_name]["img_resolution"])
        for prec in args.precisions.split(","):
            for name, spec in SAMPLERS.items():
                configs.append(dict(net=net_name, precision=prec, sampler=name, spec=spec, denoiser=denoiser,
                                    shape=shape, times=[], noise_s=[], peak=0.0))

    @torch.no_grad()
    def run(cfg: dict, rep: int) -> tuple[float, float]:
        seeds = list(range(rep * args.batch, (rep + 1) * args.batch))
        noise = TimedNoise(seeds, cfg["shape"], device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg["precision"] == "bf16"
                    else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with autocast:
            cfg["spec"]["run"](lambda x, s: cfg["denoiser"](x, s), noise)
        if device.type == "cuda":
            torch.cuda.synchronize()
            cfg["peak"] = max(cfg["peak"], torch.cuda.max_memory_allocated(device) / 2**20)
        return time.perf_counter() - t0, noise.seconds

    for rep in range(args.warmup + args.repeats):
        for cfg in configs:
            dt, noise_s = run(cfg, rep)
            if rep >= args.warmup:
                cfg["times"].append(dt)
                cfg["noise_s"].append(noise_s)

    heun = {(c["net"], c["precision"]): statistics.median(c["times"]) for c in configs if c["sampler"] == "heun-18"}
    for cfg in configs:
        med = statistics.median(cfg["times"])
        row = {"net": cfg["net"], "precision": cfg["precision"], "sampler": cfg["sampler"], "nfe": cfg["spec"]["nfe"],
               "batch": args.batch, "median_s": round(med, 4), "img_per_s": round(args.batch / med, 2),
               "speedup_vs_heun35": round(heun[(cfg["net"], cfg["precision"])] / med, 2),
               "noise_share": round(statistics.median(cfg["noise_s"]) / med, 4),
               "peak_mb": round(cfg["peak"], 1) if device.type == "cuda" else None, "repeats": len(cfg["times"]),
               "device": str(device), "threads": torch.get_num_threads(), "machine": platform.machine(),
               "torch": torch.__version__}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
