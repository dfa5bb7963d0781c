"""Kernel Inception Distance (KID).

Binkowski, Sutherland, Arbel, Gretton 2018, "Demystifying MMD GANs" (ICLR), Sec. "Kernel Inception
Distance": the squared MMD between feature distributions with the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,

estimated without bias (Gretton et al. 2012, JMLR, Lemma 6) on random subsets of both feature
sets and averaged over the subsets. Unlike FID it has an unbiased estimator, so values taken at
different N compare; it can be slightly negative when the two distributions match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ectune.metrics._arrays import ArrayLike, as_matrix, check_same_dim


@dataclass(frozen=True)
class KIDResult:
    """KID estimate: ``mean`` over subsets and the (population) ``std`` of the subset estimates."""

    mean: float
    std: float


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3 for x (m, d), y (n, d); returns the (m, n) kernel matrix."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """Unbiased MMD^2 from kernel matrices (Gretton et al. 2012, Lemma 6).

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n),

    with k_xx (m, m), k_yy (n, n), k_xy (m, n); m, n >= 2.
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    term_xy = k_xy.sum() / (m * n)
    return float(term_xx + term_yy - 2.0 * term_xy)


def kernel_inception_distance(
    gen_features: ArrayLike,
    ref_features: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> KIDResult:
    """KID between two feature sets, averaged over random subsets.

    Args:
        gen_features: (N_gen, d) features of generated images.
        ref_features: (N_ref, d) features of real images.
        num_subsets: how many subset pairs to average over.
        subset_size: rows per subset, capped at min(N_gen, N_ref). Each subset is drawn without
            replacement (subsets may overlap each other).
        generator: source of the subset indices; None means a fresh generator seeded with 0, so
            the result is reproducible.

    Returns:
        :class:`KIDResult` with the mean and std of the ``num_subsets`` MMD^2_u estimates.
    """
    x = as_matrix(gen_features, "gen_features", min_rows=2)
    y = as_matrix(ref_features, "ref_features", min_rows=2)
    check_same_dim(x, y)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    estimates = torch.empty(num_subsets, dtype=torch.float64)
    for s in range(num_subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:m]]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:m]]
        estimates[s] = mmd2_unbiased(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys))
    return KIDResult(mean=float(estimates.mean()), std=float(estimates.std(correction=0)))
