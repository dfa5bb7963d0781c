"""Frechet distance between two Gaussians fitted to feature sets (FID, FD-DINOv2).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Sec. "Frechet Inception Distance") is the Frechet (Wasserstein-2) distance between
N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982):

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The same formula on DINOv2 features gives FD-DINOv2 (Stein et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ectune.metrics._arrays import ArrayLike, as_matrix


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set.

    Attributes:
        mu: float64 (d,), the mean feature.
        sigma: float64 (d, d), the unbiased sample covariance (divides by n - 1, as np.cov and
            the TF-FID code do).
        n: the number of feature vectors they were computed from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(
                f"FeatureStats needs mu (d,) and sigma (d, d), got {self.mu.shape} and {self.sigma.shape}"
            )

    @classmethod
    def from_features(cls, features: ArrayLike) -> FeatureStats:
        """Fit the Gaussian to features of shape (N, d), N >= 2."""
        x = as_matrix(features, "features", min_rows=2).numpy()
        mu = x.mean(axis=0)
        sigma = np.cov(x, rowvar=False)
        return cls(mu=mu, sigma=np.atleast_2d(sigma), n=x.shape[0])

    @property
    def dim(self) -> int:
        """The feature dimension d."""
        return int(self.mu.shape[0])


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2 of shape (d, d).

    S1 S2 has the same eigenvalues as the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace
    is the sum of square roots of the latter's eigenvalues: two symmetric eigendecompositions,
    real arithmetic throughout, and exact for singular (rank < d) covariances, where
    scipy.linalg.sqrtm(S1 @ S2) can return complex parts or fail to converge.
    """
    s1 = 0.5 * (sigma1 + sigma1.T)
    s2 = 0.5 * (sigma2 + sigma2.T)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2)
    m = root1 @ s2 @ root1
    eig = scipy.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID value).

    Args:
        mu1, mu2: means, shape (d,).
        sigma1, sigma2: covariances, shape (d, d), symmetric PSD.

    Returns:
        ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), clipped at 0 (round-off can make
        it a tiny negative number for identical inputs).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` between two fitted :class:`FeatureStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
