"""Median time per training step of EDM pretraining, ECT tuning (stage 0 and a late stage) and iCT,
side by side in one run, for the mnist preset network and EDM's CIFAR-10 DDPM++ network.

Each configuration is one optimiser step (forward, backward, RAdam update) on random data with the
real loss classes. Configurations are interleaved round-robin so that machine noise hits them alike;
the script prints one JSON line per configuration and the ratio of each step to the EDM step of the
same network and precision. ``ect-fullbatch`` runs ECT's target pass on the whole batch, as the
official code does (it cannot skip the samples whose r = 0), for comparison.

    python benchmarks/step_time.py                       # mnist net, fp32 and bf16, batch 128
    python benchmarks/step_time.py --nets cifar10 --batch 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = []
    for net_name in args.nets.split(","):
        net = build_network("songunet", **NETS[net_name]).to(device).train()
        params = sum(p.numel() for p in net.parameters())
        denoiser = Denoiser(net).to(device)
        opt = torch.optim.RAdam(net.parameters(), lr=1e-5)
        c, h = NETS[net_name]["in_channels"], NETS[net_name]["img_resolution"]
        x = torch.rand(args.batch, c, h, h, device=device) * 2 - 1
        for prec in args.precisions.split(","):
            for name, spec in make_losses(args.batch).items():
                configs.append(dict(net=net_name, params=params, precision=prec, method=name, spec=spec,
                                    denoiser=denoiser, opt=opt, x=x, times=[]))

    def step(cfg: dict, seed: int) -> float:
        spec = cfg["spec"]
        nimg, full = 0, False
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
            t0 = time.perf_counter()
            cfg["opt"].zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16"):
                loss = spec(cfg["denoiser"], cfg["x"], None, nimg, gen)
            loss.mean().backward()
            cfg["opt"].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        finally:
            losses.consistency_target = original

    for rep in range(args.warmup + args.repeats):
        for i, cfg in enumerate(configs):
            dt = step(cfg, seed=rep * 1000 + i)
            if rep >= args.warmup:
                cfg["times"].append(dt)

    base = {(c["net"], c["precision"]): statistics.median(c["times"]) for c in configs if c["method"] == "edm"}
    fp32 = {(c["net"], c["method"]): statistics.median(c["times"]) for c in configs if c["precision"] == "fp32"}
    for cfg in configs:
        med = statistics.median(cfg["times"])
        row = {"net": cfg["net"], "params_M": round(cfg["params"] / 1e6, 2), "precision": cfg["precision"],
               "method": cfg["method"], "batch": args.batch, "median_s": round(med, 4),
               "img_per_s": round(args.batch / med, 1), "ratio_to_edm": round(med / base[(cfg["net"], cfg["precision"])], 3),
               "ratio_to_fp32": round(med / fp32[(cfg["net"], cfg["method"])], 3) if (cfg["net"], cfg["method"]) in fp32 else None,
               "repeats": len(cfg["times"]), "device": str(device), "threads": torch.get_num_threads(),
               "machine": platform.machine(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
