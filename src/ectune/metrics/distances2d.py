"""Distances between point sets for low-dimensional (2-D) data: sliced Wasserstein and RBF MMD.

For toy data the target distribution can be sampled exactly, so these compare generated points
with fresh samples of the truth instead of going through an image encoder.

- Sliced Wasserstein (Rabin, Peyre, Delon, Bernot 2011; Bonneel et al. 2015):
  SW_p(P, Q)^p = E_theta[ W_p^p(theta#P, theta#Q) ], theta uniform on the unit sphere, estimated
  with random directions; each 1-D W_p is exact, from the quantile functions:
  W_p^p(mu, nu) = int_0^1 |F_mu^-1(u) - F_nu^-1(u)|^p du.
- MMD with a sum of Gaussian RBF kernels k(x, y) = sum_h exp(-||x - y||^2 / (2 h^2)), unbiased
  estimator (Gretton et al. 2012, JMLR, Lemma 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ectune.metrics._arrays import ArrayLike, as_matrix, check_same_dim

DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def wasserstein_1d_pow(u: torch.Tensor, v: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Exact W_p^p between empirical measures with uniform weights, row by row.

    Args:
        u: (L, n) samples, one 1-D point set per row (any order).
        v: (L, m) samples; m may differ from n.
        p: order, >= 1.

    Returns:
        (L,) W_p^p. Both quantile functions are step functions, constant between the breakpoints
        {i/n} and {j/m}; on the merged breakpoints the integral is an exact finite sum.
    """
    n, m = u.shape[1], v.shape[1]
    u_sorted = u.sort(dim=1).values
    v_sorted = v.sort(dim=1).values
    if n == m:
        return (u_sorted - v_sorted).abs().pow(p).mean(dim=1)
    # Breakpoints in units of 1/(n m): multiples of m (for u) and of n (for v).
    ticks = torch.unique(torch.cat([torch.arange(0, n + 1) * m, torch.arange(0, m + 1) * n]))
    left, width = ticks[:-1], (ticks[1:] - ticks[:-1]).to(u.dtype) / (n * m)
    iu = torch.div(left, m, rounding_mode="floor")
    iv = torch.div(left, n, rounding_mode="floor")
    return ((u_sorted[:, iu] - v_sorted[:, iv]).abs().pow(p) * width).sum(dim=1)


def sliced_wasserstein(
    x: ArrayLike,
    y: ArrayLike,
    num_projections: int = 512,
    p: float = 2.0,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein distance SW_p between point sets x (n, d) and y (m, d).

    Args:
        x, y: point sets; sizes may differ.
        num_projections: random directions, uniform on the unit sphere S^(d-1).
        p: order of the Wasserstein distance.
        generator: source of the directions; None means a fresh generator seeded with 0.

    Returns:
        (mean over directions of W_p^p)^(1/p). For N(0, I) vs N(m, I) in d dimensions the exact
        value of SW_2 is ||m|| / sqrt(d); in 1-D it is the shift |m|.
    """
    a = as_matrix(x, "x")
    b = as_matrix(y, "y")
    check_same_dim(a, b)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(num_projections, a.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    w = wasserstein_1d_pow(theta @ a.T, theta @ b.T, p)
    return float(w.mean() ** (1.0 / p))


def _rbf_kernel_sum(
    a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float], skip_diagonal: bool, batch_size: int
) -> float:
    """sum_{i, j} k(a_i, b_j) for the summed RBF kernel, optionally without the i == j terms (a is b)."""
    inv = torch.tensor([1.0 / (2.0 * h * h) for h in bandwidths], dtype=torch.float64)
    b_sq = (b * b).sum(dim=1)
    total = 0.0
    for start in range(0, a.shape[0], batch_size):
        stop = min(start + batch_size, a.shape[0])
        ab = a[start:stop]
        d2 = ((ab * ab).sum(dim=1)[:, None] + b_sq[None, :] - 2.0 * ab @ b.T).clamp_min_(0.0)
        k = torch.exp(-d2[..., None] * inv).sum(dim=-1)
        if skip_diagonal:
            rows = torch.arange(stop - start)
            k[rows, rows + start] = 0.0
        total += float(k.sum())
    return total


def mmd_rbf(
    x: ArrayLike,
    y: ArrayLike,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    batch_size: int = 1024,
) -> float:
    """Unbiased MMD^2 between x (n, d) and y (m, d) with k(x, y) = sum_h exp(-||x - y||^2 / (2 h^2)).

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (n m)   (Gretton et al. 2012, Lemma 6).

    Zero in expectation when x and y come from the same distribution (so it can be negative);
    memory is batch_size * max(n, m) * len(bandwidths) doubles.
    """
    a = as_matrix(x, "x", min_rows=2)
    b = as_matrix(y, "y", min_rows=2)
    check_same_dim(a, b)
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths}")
    n, m = a.shape[0], b.shape[0]
    k_xx = _rbf_kernel_sum(a, a, bandwidths, True, batch_size) / (n * (n - 1))
    k_yy = _rbf_kernel_sum(b, b, bandwidths, True, batch_size) / (m * (m - 1))
    k_xy = _rbf_kernel_sum(a, b, bandwidths, False, batch_size) / (n * m)
    return k_xx + k_yy - 2.0 * k_xy
