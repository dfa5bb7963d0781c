"""Input checking shared by the metric modules: turn features into a float64 matrix."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_matrix(x: ArrayLike, name: str = "features", min_rows: int = 1) -> torch.Tensor:
    """Return ``x`` as a CPU float64 tensor of shape (N, d), after checking it.

    Args:
        x: array or tensor of shape (N, d) (any real dtype, any device).
        name: what ``x`` is, for the error message.
        min_rows: the fewest rows the caller's formula can use.

    Raises:
        ValueError: ``x`` is not 2-D, has fewer than ``min_rows`` rows, or holds NaN/inf.
    """
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def check_same_dim(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise ValueError unless two (N, d) matrices share the feature dimension d."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
