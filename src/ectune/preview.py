"""Sample previews written during and at the end of training: image grids or 2-D scatter plots."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ectune.checkpoint import ModelInfo
from ectune.images import grid, save_png, save_scatter, side_by_side
from ectune.precond import Denoiser
from ectune.sampling import SIGMA_MAX, PerImageNoise, consistency_sample, edm_sample, seed_labels, to_uint8


def preview_name(nimg: int) -> str:
    """The file name of the preview at ``nimg`` images seen, exact to the image, e.g.
    ``preview-000028.800kimg.png``: names of one run sort by images seen."""
    return f"preview-{nimg // 1000:06d}.{nimg % 1000:03d}kimg.png"


def legacy_preview_name(nimg: int) -> str:
    """The name runs written before 2026-12-02 gave that preview (thousands only: preview-000028kimg.png)."""
    return f"preview-{nimg // 1000:06d}kimg.png"


_PREVIEW = re.compile(r"preview-(\d+)(?:\.(\d{3}))?kimg\.png")


def preview_nimg(name: str) -> int | None:
    """Images seen of a preview file name (a legacy name gives its thousands), None for another file."""
    m = _PREVIEW.fullmatch(name)
    return int(m[1]) * 1000 + int(m[2] or 0) if m else None


def generate(denoiser: Denoiser, info: ModelInfo, *, method: str, steps: int, seeds: list[int], sigmas=None,
             labels: torch.Tensor | None = None, device: torch.device | str = "cpu", renoise: str = "ect",
             S_churn: float = 0.0, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Samples (float64, data scale) for ``seeds`` from a denoiser, with the model's own scalings."""
    fn = lambda x, s: denoiser(x, s, labels, scalings=info.scalings)  # noqa: E731
    noise = PerImageNoise(seeds, info.data_shape, device)
    if method == "consistency":
        levels = [sigma_max, *sigmas] if sigmas is not None else [sigma_max, *([info.mid_sigma] if steps == 2 else [])]
        if sigmas is None and steps > 2:
            raise ValueError("consistency sampling with more than 2 steps needs explicit sigmas")
        return consistency_sample(fn, noise, levels, sigma_min=info.sigma_min, renoise=renoise)
    return edm_sample(fn, noise, steps, solver=method, S_churn=S_churn, sigma_max=sigma_max)


@torch.no_grad()
def write_preview(path: Path, net: nn.Module, info: ModelInfo, preview, device: torch.device) -> None:
    """Write the preview of an EMA network: Heun 35 NFE for diffusion models, 1- and 2-step for
    consistency models (same seeds, side by side)."""
    denoiser = Denoiser(net, info.sigma_data, info.scalings, info.sigma_min).to(device).eval()
    seeds = list(range(preview.num_images))
    labels = seed_labels(seeds, info.label_dim, device)
    if info.method == "edm":
        runs = {f"Heun {2 * (preview.steps or 18) - 1} NFE": dict(method="heun", steps=preview.steps or 18)}
    else:
        runs = {"1 step": dict(method="consistency", steps=1),
                f"2 steps (mid {preview.mid_sigma:g})": dict(method="consistency", steps=2, sigmas=[preview.mid_sigma])}
    outputs = {title: generate(denoiser, info, seeds=seeds, labels=labels, device=device, **kw) for title, kw in runs.items()}
    if len(info.data_shape) == 1:
        save_scatter({t: o.float() for t, o in outputs.items()}, path)
    else:
        panels = [grid(to_uint8(o)) for o in outputs.values()]
        save_png(side_by_side(panels), path, scale=2 if info.data_shape[-1] <= 32 else 1)
