"""Evaluation metrics: FID / FD-DINOv2, KID, precision/recall, and distances for 2-D data.

The maths (frechet, kid, prdc, distances2d) works on feature matrices and knows nothing about
images; encoders turn uint8 images into features; reference caches the real-data side.
:func:`compute_metrics` ties them together for one pair of feature sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ectune.metric_names import IMAGE_METRICS, POINT_METRICS
from ectune.metrics._arrays import ArrayLike
from ectune.metrics.distances2d import mmd_rbf, sliced_wasserstein
from ectune.metrics.encoders import DINOv2Encoder, Encoder, InceptionV3Encoder, get_encoder
from ectune.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_from_stats
from ectune.metrics.kid import KIDResult, kernel_inception_distance
from ectune.metrics.prdc import PrecisionRecall, precision_recall
from ectune.metrics.reference import ReferenceStats, reference_stats

METRICS = IMAGE_METRICS

__all__ = [
    "IMAGE_METRICS",
    "METRICS",
    "POINT_METRICS",
    "DINOv2Encoder",
    "Encoder",
    "FeatureStats",
    "InceptionV3Encoder",
    "KIDResult",
    "PrecisionRecall",
    "ReferenceStats",
    "compute_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "get_encoder",
    "kernel_inception_distance",
    "mmd_rbf",
    "precision_recall",
    "reference_stats",
    "sliced_wasserstein",
]


def compute_metrics(
    gen_feats: ArrayLike,
    ref_feats: ArrayLike,
    metrics: Sequence[str] = METRICS,
    *,
    ref_stats: FeatureStats | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Feature-space metrics of generated vs reference features.

    Args:
        gen_feats: (N_gen, d) features of generated images.
        ref_feats: (N_ref, d) features of real images (same encoder).
        metrics: any of "fid", "kid", "precision", "recall". "fid" is the Frechet distance of the
            features given, so it is FD-DINOv2 for DINOv2 features.
        ref_stats: the reference Gaussian fit if already known (e.g. from the cache), to skip
            recomputing it.
        kid_subsets, kid_subset_size: KID averaging (Binkowski et al. 2018 defaults).
        pr_k: neighbourhood size for precision/recall.
        generator: randomness for the KID subsets; None = seeded with 0.

    Returns:
        {"fid": ..., "kid": mean, "kid_std": std, "precision": ..., "recall": ...}, only the keys
        asked for (kid brings kid_std along).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    out: dict[str, float] = {}
    if "fid" in metrics:
        gen_stats = FeatureStats.from_features(gen_feats)
        ref = ref_stats if ref_stats is not None else FeatureStats.from_features(ref_feats)
        out["fid"] = frechet_distance_from_stats(gen_stats, ref)
    if "kid" in metrics:
        kid = kernel_inception_distance(gen_feats, ref_feats, kid_subsets, kid_subset_size, generator)
        out["kid"], out["kid_std"] = kid.mean, kid.std
    if "precision" in metrics or "recall" in metrics:
        pr = precision_recall(gen_feats, ref_feats, k=pr_k)
        if "precision" in metrics:
            out["precision"] = pr.precision
        if "recall" in metrics:
            out["recall"] = pr.recall
    return out
