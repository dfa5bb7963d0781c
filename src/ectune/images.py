"""Image grids and 2-D scatter plots written as PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ectune.checkpoint import atomic_write


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C) grid with a white border."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        raise TypeError(f"grid expects uint8 images, got {images.dtype}")
    n, c, h, w = images.shape
    cols = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    return out


def save_png(array: np.ndarray, path: str | os.PathLike, scale: int = 1) -> None:
    """Write an (H, W, C) uint8 array (C = 1 or 3) as PNG, atomically, optionally upscaled."""
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def side_by_side(panels: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Concatenate grids horizontally with a white gap (all the same height and channels)."""
    h = max(p.shape[0] for p in panels)
    c = panels[0].shape[2]
    parts = []
    for i, p in enumerate(panels):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], p.shape[1], c), 255, np.uint8)], 0)
        parts.append(p)
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, c), 255, np.uint8))
    return np.concatenate(parts, 1)


def save_scatter(panels: dict[str, torch.Tensor], path: str | os.PathLike, lim: float = 3.0) -> None:
    """One scatter plot per 2-D point set, side by side, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        p = pts.detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
