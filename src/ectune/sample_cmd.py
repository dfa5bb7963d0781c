"""``ectune sample``: N images from a model folder as a PNG grid or an .npz of uint8 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ectune.checkpoint import ModelInfo, atomic_write, load_model
from ectune.config import SampleConfig
from ectune.errors import ConfigError, UserError
from ectune.images import grid, save_png, save_scatter
from ectune.precond import Denoiser
from ectune.preview import generate
from ectune.sampling import SIGMA_MAX, consistency_levels, seed_labels, to_uint8
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
    if method != "consistency" and cfg.sigmas:
        raise ConfigError(f"--sigmas applies to consistency sampling, not {method}")
    return method, steps


def checked_levels(sigmas, steps: int, mid_sigma: float) -> list[float]:
    """The consistency levels after sigma_max of one setting: ``sigmas`` (checked to decrease from
    sigma_max and stay positive), else the model's default for 1 or 2 steps."""
    if sigmas:
        levels = [float(s) for s in sigmas]
        chain = [SIGMA_MAX, *levels]
        if any(not 0 < b < a for a, b in zip(chain, chain[1:])):
            raise ConfigError(f"--sigmas must decrease from {SIGMA_MAX:g} and stay positive, got {levels}")
        return levels
    if steps <= 2:
        return consistency_levels(steps, mid_sigma)
    raise ConfigError(f"{steps}-step consistency sampling needs {steps - 1} levels: pass --sigmas, e.g. "
                      f"{','.join(f'{s:.3g}' for s in consistency_levels(steps, mid_sigma))}")


@torch.no_grad()
def sample_images(cfg: SampleConfig, loaded: tuple[Denoiser, ModelInfo] | None = None) -> tuple[torch.Tensor, dict]:
    """float64 samples (N, ...) for seeds seed .. seed+N-1, generated in batches of cfg.batch.
    ``loaded``: cfg.model already loaded on cfg.device (callers that sample it batch by batch)."""
    if cfg.num_images <= 0:
        raise ConfigError(f"num_images must be positive, got {cfg.num_images}")
    if cfg.batch <= 0:
        raise ConfigError(f"batch must be positive, got {cfg.batch}")
    device = resolve_device(cfg.device)
    denoiser, info = loaded if loaded is not None else load_model(cfg.model, device=device)
    method, steps = resolve_method(cfg, info.method)
    sigmas = checked_levels(cfg.sigmas, steps, info.mid_sigma) if method == "consistency" else None
    if info.label_dim and cfg.class_label is not None and not 0 <= cfg.class_label < info.label_dim:
        raise ConfigError(f"class_label {cfg.class_label} is out of range: the model has {info.label_dim} classes")
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    out = []
    for i in range(0, len(seeds), cfg.batch):
        chunk = seeds[i:i + cfg.batch]
        if info.label_dim and cfg.class_label is not None:
            labels = torch.eye(info.label_dim, device=device)[[cfg.class_label] * len(chunk)]
        else:
            labels = seed_labels(chunk, info.label_dim, device)
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
