"""``ectune sample``: N images from a model folder as a PNG grid or an .npz of uint8 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ectune.checkpoint import atomic_write, load_model
from ectune.config import SampleConfig
from ectune.errors import ConfigError, UserError
from ectune.images import grid, save_png, save_scatter
from ectune.preview import generate
from ectune.sampling import to_uint8
from ectune.training import resolve_device


def resolve_method(cfg: SampleConfig, model_method: str) -> tuple[str, int]:
    method = cfg.method
    if method == "auto":
        method = "heun" if model_method == "edm" else "consistency"
    if method not in ("consistency", "heun", "euler"):
        raise ConfigError(f"unknown sampling method {method!r}: use consistency, heun or euler")
    steps = cfg.steps or (len(cfg.sigmas) + 1 if cfg.sigmas else 2 if method == "consistency" else 18)
    if method == "consistency" and cfg.sigmas and steps != len(cfg.sigmas) + 1:
        raise ConfigError(f"{steps} consistency steps need {steps - 1} --sigmas levels, got {len(cfg.sigmas)}")
    return method, steps


@torch.no_grad()
def sample_images(cfg: SampleConfig) -> tuple[torch.Tensor, dict]:
    """float64 samples (N, ...) for seeds seed .. seed+N-1, generated in batches of cfg.batch."""
    if cfg.num_images <= 0:
        raise ConfigError(f"num_images must be positive, got {cfg.num_images}")
    device = resolve_device(cfg.device)
    denoiser, info = load_model(cfg.model, device=device)
    method, steps = resolve_method(cfg, info.method)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    out = []
    for i in range(0, len(seeds), max(cfg.batch, 1)):
        chunk = seeds[i:i + cfg.batch]
        labels = None
        if info.label_dim:
            if cfg.class_label is not None:
                if not 0 <= cfg.class_label < info.label_dim:
                    raise ConfigError(f"class_label {cfg.class_label} is out of range: the model has {info.label_dim} classes")
                ids = torch.full((len(chunk),), cfg.class_label)
            else:
                ids = torch.tensor([np.random.default_rng(s).integers(info.label_dim) for s in chunk])
            labels = torch.eye(info.label_dim)[ids].to(device)
        sigmas = list(cfg.sigmas) if cfg.sigmas else None
        out.append(generate(denoiser, info, method=method, steps=steps, seeds=chunk, sigmas=sigmas, labels=labels,
                            device=device, renoise=cfg.renoise, S_churn=cfg.S_churn).cpu())
    return torch.cat(out), {"method": method, "steps": steps, "info": info}


def run_sample(cfg: SampleConfig) -> Path:
    out = Path(cfg.out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (a grid) or .npz (uint8 images), got {out}")
    if out.exists():
        raise UserError(f"{out} already exists: choose another --out or delete it")
    x, meta = sample_images(cfg)
    info = meta["info"]
    if out.suffix == ".npz":
        arr = to_uint8(x).numpy() if len(info.data_shape) == 3 else x.float().numpy()
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, x=arr, seeds=np.arange(cfg.seed, cfg.seed + cfg.num_images))
        atomic_write(out, write)
    elif len(info.data_shape) == 1:
        save_scatter({f"{meta['method']} {meta['steps']} steps": x.float()}, out)
    else:
        save_png(grid(to_uint8(x)), out, scale=2 if info.data_shape[-1] <= 32 else 1)
    return out
