"""Median time per training step of EDM pretraining, ECT tuning (stage 0 and a late stage) and iCT,
side by side in one run, for the mnist preset network and EDM's CIFAR-10 DDPM++ network.

Each configuration is one optimiser step (forward, backward, RAdam update) on random data with the
real loss classes. Configurations are interleaved round-robin so that machine noise hits them alike;
the script prints one JSON line per configuration and the ratio of each step to the EDM step of the
same network and precision. ``ect-stage0-fullbatch`` runs ECT's target pass on the whole batch, as
the official code does (it cannot skip the samples whose r = 0), for comparison; ``forward-nograd``
is one forward pass without gradients, so 1 + its ratio is the least any whole-batch ECT step costs.
Figures measured with it: docs/PERFORMANCE.md.

    python benchmarks/step_time.py                       # mnist net, fp32 and bf16, batch 128
    python benchmarks/step_time.py --nets cifar10 --repeats 3
    python benchmarks/step_time.py --channels-last       # the same with channels_last tensors
    python benchmarks/step_time.py --compile             # the student pass through torch.compile
    python benchmarks/step_time.py --memory              # peak memory per configuration instead

``--memory`` runs each configuration alone in a fresh process for two steps and reports its peak
resident memory (CPU: the process's high-water mark, less the same process's after building the
network; CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from ectune import config as C
from ectune import losses
from ectune.losses import ECTLoss, EDMLoss, ICTLoss
from ectune.networks import build_network
from ectune.precond import Denoiser

NETS = {"mnist": dict(C._MNIST_UNET, dropout=0.2), "cifar10": dict(C._CIFAR_DDPMPP, dropout=0.2)}


def full_batch_target(denoiser, x, eps, r, labels, masks, scalings):
    """The official code's target pass: the whole batch, r = 0 rows replaced by x afterwards."""
    from ectune.networks.dropout import replay_dropout

    net = losses._unwrap(denoiser)
    with torch.no_grad(), replay_dropout(masks):
        r_safe = r.clamp(min=1e-3)
        out = net(x + losses._per_sample(r_safe, x) * eps, r_safe, labels, scalings=scalings)
    return torch.where(losses._per_sample(r > 0, x), out, x)


def make_losses(batch: int) -> dict:
    stage_nimg = 3_200_000
    return {
        "edm": EDMLoss(),
        "ect-stage0": ("ect", ECTLoss(stage_nimg=stage_nimg), 0),
        "ect-stage0-fullbatch": ("ect-full", ECTLoss(stage_nimg=stage_nimg), 0),
        "ect-stage5": ("ect", ECTLoss(stage_nimg=stage_nimg), 5 * stage_nimg),
        "ict": ICTLoss(total_nimg=400_000 * batch, batch=batch),
        # One forward pass without gradients, as ECT's target pass on the whole batch: 1 + its ratio to
        # the EDM step is the least a full-batch ECT step can cost on this machine.
        "forward-nograd": ("fwd", None, 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="mnist", help="comma list of: mnist, cifar10")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--methods", default="", help="comma list of methods to run (default: all)")
    ap.add_argument("--channels-last", action="store_true", help="network and batch in channels_last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser (static shapes)")
    ap.add_argument("--memory", action="store_true", help="peak memory per configuration, each in its own process")
    args = ap.parse_args()
    if args.memory:
        return memory_mode(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    wanted = set(args.methods.split(",")) if args.methods else None
    configs = []
    for net_name in args.nets.split(","):
        net = build_network("songunet", **NETS[net_name]).to(device, memory_format=fmt).train()
        params = sum(p.numel() for p in net.parameters())
        denoiser = Denoiser(net).to(device)
        model = torch.compile(denoiser, dynamic=False) if args.compile else denoiser
        opt = torch.optim.RAdam(net.parameters(), lr=1e-5)
        c, h = NETS[net_name]["in_channels"], NETS[net_name]["img_resolution"]
        x = (torch.rand(args.batch, c, h, h, device=device) * 2 - 1).contiguous(memory_format=fmt)
        for prec in args.precisions.split(","):
            for name, spec in make_losses(args.batch).items():
                if wanted is None or name in wanted:
                    configs.append(dict(net=net_name, params=params, precision=prec, method=name, spec=spec,
                                        denoiser=model, opt=opt, x=x, times=[], peak=0))
    base_rss = _peak_rss_mb()

    def step(cfg: dict, seed: int) -> float:
        spec = cfg["spec"]
        nimg, full, kind = 0, False, "loss"
        if isinstance(spec, tuple):
            kind, spec, nimg = spec
            full = kind == "ect-full"
        gen = torch.Generator(device=device).manual_seed(seed)
        original = losses.consistency_target
        if full:
            losses.consistency_target = full_batch_target
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            if kind == "fwd":
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
                    sigma = torch.rand(cfg["x"].shape[0], generator=gen, device=device) * 10
                    losses._unwrap(cfg["denoiser"])(cfg["x"] + losses._per_sample(sigma, cfg["x"]), sigma)
            else:
                cfg["opt"].zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
                    loss = spec(cfg["denoiser"], cfg["x"], None, nimg, gen)
                loss.mean().backward()
                cfg["opt"].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                cfg["peak"] = max(cfg["peak"], torch.cuda.max_memory_allocated(device) / 2**20)
            return time.perf_counter() - t0
        finally:
            losses.consistency_target = original

    for rep in range(args.warmup + args.repeats):
        for i, cfg in enumerate(configs):
            dt = step(cfg, seed=rep * 1000 + i)
            if rep >= args.warmup:
                cfg["times"].append(dt)

    if args.repeats == 0:  # memory mode's child: the growth of the high-water mark over the set-up
        for cfg in configs:
            cfg["peak"] = cfg["peak"] if device.type == "cuda" else _peak_rss_mb() - base_rss
        print(json.dumps({"peak_mb": round(max(c["peak"] for c in configs), 1)}))
        return
    base = {(c["net"], c["precision"]): statistics.median(c["times"]) for c in configs if c["method"] == "edm"}
    if not base:
        raise SystemExit("error: the ratios need the edm configuration: include edm in --methods")
    fp32 = {(c["net"], c["method"]): statistics.median(c["times"]) for c in configs if c["precision"] == "fp32"}
    for cfg in configs:
        med = statistics.median(cfg["times"])
        row = {"net": cfg["net"], "params_M": round(cfg["params"] / 1e6, 2), "precision": cfg["precision"],
               "method": cfg["method"], "batch": args.batch, "median_s": round(med, 4),
               "img_per_s": round(args.batch / med, 1), "ratio_to_edm": round(med / base[(cfg["net"], cfg["precision"])], 3),
               "ratio_to_fp32": round(med / fp32[(cfg["net"], cfg["method"])], 3) if (cfg["net"], cfg["method"]) in fp32 else None,
               "channels_last": args.channels_last, "compile": args.compile,
               "peak_mb": round(cfg["peak"], 1) if device.type == "cuda" else None, "repeats": len(cfg["times"]), "device": str(device), "threads": torch.get_num_threads(),
               "machine": platform.machine(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_mode(args: argparse.Namespace) -> None:
    """One child process per configuration: two untimed steps, then its peak memory."""
    methods = args.methods.split(",") if args.methods else list(make_losses(args.batch))
    for net_name in args.nets.split(","):
        for prec in args.precisions.split(","):
            for method in methods:
                cmd = [sys.executable, __file__, "--nets", net_name, "--precisions", prec, "--methods", method,
                       "--batch", str(args.batch), "--repeats", "0", "--warmup", "2", "--device", args.device,
                       "--threads", str(args.threads)]
                cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row = {"net": net_name, "precision": prec, "method": method, "batch": args.batch,
                       "device": args.device, **json.loads(out), "channels_last": args.channels_last,
                       "compile": args.compile}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
