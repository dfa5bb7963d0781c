"""Improved precision and recall with k-nearest-neighbour manifolds.

Kynkaanniemi, Karras, Laine, Lehtinen, Aila 2019, "Improved Precision and Recall Metric for
Assessing Generative Models" (NeurIPS), Sec. 2: the manifold of a feature set Phi is the union of
balls around each phi' in Phi with radius NND_k(phi'), the distance to its k-th nearest neighbour
in Phi (itself excluded). With f(phi, Phi) = 1 if ||phi - phi'|| <= NND_k(phi') for some phi' in Phi:

    precision = mean over phi_g in Phi_gen of f(phi_g, Phi_ref)   (k = 3 in the paper)
    recall    = mean over phi_r in Phi_ref of f(phi_r, Phi_gen)

Distances are computed in row blocks of ``batch_size``, so memory stays at batch_size * N
doubles: 10k x 10k features need 80 MB per block at the default block of 1,000 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ectune.metrics._arrays import ArrayLike, as_matrix, check_same_dim


@dataclass(frozen=True)
class PrecisionRecall:
    """Fractions in [0, 1]: generated samples on the real manifold, real samples on the generated one."""

    precision: float
    recall: float


def squared_distances(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 as an (m, n) matrix, from a (m, d), b (n, d) and their squared row norms."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii_squared(features: torch.Tensor, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """Squared distance from each row of ``features`` (N, d) to its k-th nearest other row; shape (N,).

    The point itself (distance 0) is counted as the first neighbour and skipped, as in the paper.
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points, got {n}")
    sq = (features * features).sum(dim=1)
    radii = torch.empty(n, dtype=features.dtype)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        d2 = squared_distances(features[start:stop], features, sq[start:stop], sq)
        rows = torch.arange(stop - start)
        d2[rows, rows + start] = 0.0  # exact self-distance, whatever the round-off
        radii[start:stop] = torch.kthvalue(d2, k + 1, dim=1).values
    return radii


def precision_recall(
    gen_features: ArrayLike,
    ref_features: ArrayLike,
    k: int = 3,
    batch_size: int = 1000,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated vs real features.

    Args:
        gen_features: (N_gen, d) features of generated images, N_gen > k.
        ref_features: (N_ref, d) features of real images, N_ref > k.
        k: neighbourhood size of the manifold estimate (3 in the paper).
        batch_size: rows per distance block (memory is batch_size * max(N) doubles).
    """
    x_gen = as_matrix(gen_features, "gen_features")
    x_ref = as_matrix(ref_features, "ref_features")
    check_same_dim(x_gen, x_ref)
    r_gen = knn_radii_squared(x_gen, k, batch_size)
    r_ref = knn_radii_squared(x_ref, k, batch_size)
    sq_gen = (x_gen * x_gen).sum(dim=1)
    sq_ref = (x_ref * x_ref).sum(dim=1)
    gen_on_ref = torch.zeros(x_gen.shape[0], dtype=torch.bool)  # f(phi_g, Phi_ref)
    ref_on_gen = torch.zeros(x_ref.shape[0], dtype=torch.bool)  # f(phi_r, Phi_gen)
    for start in range(0, x_gen.shape[0], batch_size):
        stop = min(start + batch_size, x_gen.shape[0])
        d2 = squared_distances(x_gen[start:stop], x_ref, sq_gen[start:stop], sq_ref)  # (B, N_ref)
        gen_on_ref[start:stop] = (d2 <= r_ref[None, :]).any(dim=1)
        ref_on_gen |= (d2 <= r_gen[start:stop, None]).any(dim=0)
    return PrecisionRecall(precision=float(gen_on_ref.double().mean()), recall=float(ref_on_gen.double().mean()))
