"""Cache of reference (real-data) features and statistics, keyed by full provenance.

Encoding 10k real images with Inception takes about 15 minutes on a CPU, so the features, their
mean and covariance are stored once per (dataset, n, encoder) in ``cache_dir``:

    <dataset_id>-<encoder>-n<n>.npz    features float32 (n, d), mu float64 (d,), sigma float64 (d, d)
    <dataset_id>-<encoder>-n<n>.json   provenance, and the sha256 of the .npz

The .npz is read with allow_pickle=False. A cache is reused only if every provenance field that
determines the features matches (dataset id and hash, n, encoder name and weights hash, feature
dimension, resolution, ectune version, cache format) and the .npz is intact (its sha256 matches
the sidecar and the arrays have the right shapes); otherwise it is recomputed and overwritten.
Both files are written to a temporary file and moved into place with os.replace, so a reader sees
either the old file or the new one, never a partial one (:mod:`ectune.metrics.store`).

On a miss, features shipped with the package (``shipped_dirs``: float16 features under the same
name, for a small default such as MNIST at N = 500) are used instead of encoding, once the first
``SHIPPED_CHECK`` images encoded again agree with them; they are then cached like computed ones.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ectune
from ectune.errors import DataError
from ectune.metrics.encoders import Encoder, as_uint8_images
from ectune.metrics.frechet import FeatureStats
from ectune.metrics.store import features_agree, read_entry, write_entry

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SHIPPED_CHECK = 16
"""Images encoded again to check shipped features before they are used."""

# Provenance fields that must all match for a cache to be reused.
_KEY_FIELDS = (
    "format",
    "dataset_id",
    "dataset_hash",
    "n",
    "encoder",
    "encoder_hash",
    "feature_dim",
    "resolution",
    "ectune_version",
)


@dataclass(frozen=True)
class ReferenceStats:
    """Reference features and their Gaussian fit.

    Attributes:
        stats: mean and covariance of ``features`` (for FID / FD).
        features: float32 (n, d), for KID and precision/recall.
        provenance: what the sidecar records (see module doc).
        from_cache: True if read from ``cache_dir`` rather than computed.
    """

    stats: FeatureStats
    features: np.ndarray
    provenance: dict[str, Any]
    from_cache: bool


def cache_paths(cache_dir: str | os.PathLike[str], dataset_id: str, encoder_name: str, n: int) -> tuple[Path, Path]:
    """The (.npz, .json) paths of one cache entry; unsafe characters in names become '_'."""

    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "_"

    stem = f"{safe(dataset_id)}-{safe(encoder_name)}-n{n}"
    directory = Path(cache_dir)
    return directory / f"{stem}.npz", directory / f"{stem}.json"


def _read_cache(npz_path: Path, json_path: Path, expected: dict[str, Any]) -> ReferenceStats | None:
    """The cached entry if it exists, matches ``expected`` and is intact; else None (and why, in the log)."""
    n, d = expected["n"], expected["feature_dim"]
    entry = read_entry(npz_path, json_path, expected, _KEY_FIELDS,
                       {"features": (n, d), "mu": (d,), "sigma": (d, d)})
    if entry is None:
        return None
    arrays, provenance = entry
    stats = FeatureStats(mu=arrays["mu"].astype(np.float64), sigma=arrays["sigma"].astype(np.float64), n=n)
    return ReferenceStats(stats=stats, features=arrays["features"].astype(np.float32), provenance=provenance,
                          from_cache=True)


def _read_shipped(shipped_dirs: Sequence[Path], stem: str, expected: dict[str, Any],
                  images: torch.Tensor, encoder: Encoder) -> tuple[np.ndarray, str] | None:
    """Features of a shipped entry (float16, no statistics) whose key fields other than the ectune
    version match, checked by encoding its first images again; else None."""
    n, d = expected["n"], expected["feature_dim"]
    keys = [k for k in _KEY_FIELDS if k not in ("format", "ectune_version")]
    for folder in shipped_dirs:
        npz_path, json_path = Path(folder) / f"{stem}.npz", Path(folder) / f"{stem}.json"
        entry = read_entry(npz_path, json_path, expected, keys, {"features": (n, d)})
        if entry is None:
            continue
        features = entry[0]["features"].astype(np.float32)
        k = min(SHIPPED_CHECK, n)
        if not features_agree(torch.as_tensor(encoder(images[:k])).float().numpy(), features[:k]):
            logger.warning("shipped reference features %s differ from this encoder's on their first %d images: "
                           "recomputing", npz_path, k)
            continue
        return features, f"{npz_path.name} (shipped; first {k} images encoded again and compared)"
    return None


def reference_stats(
    dataset_id: str,
    dataset_hash: str,
    images_fn: Callable[[int], np.ndarray | torch.Tensor],
    n: int,
    encoder: Encoder,
    cache_dir: str | os.PathLike[str],
    resolution: int | None = None,
    shipped_dirs: Sequence[str | os.PathLike[str]] = (),
) -> ReferenceStats:
    """Features and statistics of ``n`` reference images, from the cache or computed and cached.

    Args:
        dataset_id: a name for the dataset and split, e.g. "mnist-train".
        dataset_hash: a hash of the dataset's contents (from the data loader); a different hash
            invalidates the cache.
        images_fn: called only on a cache miss, as ``images_fn(n)``; returns at least ``n`` uint8
            images (N, C, H, W), of which the first ``n`` are used.
        n: number of reference images.
        encoder: the feature extractor (:class:`~ectune.metrics.encoders.Encoder`).
        cache_dir: folder for the cache files (created if missing).
        resolution: image side length the caller evaluates at; recorded, part of the cache key
            and checked against the images on a miss. None: not checked.
        shipped_dirs: folders of features shipped with the package (float16, same stem): on a cache
            miss a matching one is used, after its first images are encoded again and agree, and
            written to the cache.

    Raises:
        DataError: ``images_fn`` returned fewer than ``n`` images or images of another resolution.
    """
    if n < 2:
        raise ValueError(f"reference statistics need n >= 2 images, got {n}")
    expected: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "dataset_id": dataset_id,
        "dataset_hash": dataset_hash,
        "n": n,
        "encoder": encoder.name,
        "encoder_hash": encoder.file_hash,
        "feature_dim": encoder.feature_dim,
        "resolution": resolution,
        "ectune_version": ectune.__version__,
    }
    npz_path, json_path = cache_paths(cache_dir, dataset_id, encoder.name, n)
    cached = _read_cache(npz_path, json_path, expected)
    if cached is not None:
        return cached

    images = as_uint8_images(images_fn(n))
    if images.shape[0] < n:
        raise DataError(f"dataset {dataset_id!r} gave {images.shape[0]} images, fewer than the {n} asked for")
    images = images[:n]
    if resolution is not None and tuple(images.shape[2:]) != (resolution, resolution):
        raise DataError(
            f"dataset {dataset_id!r} gave images of size {tuple(images.shape[2:])}, expected {resolution}x{resolution}"
        )
    shipped = _read_shipped([Path(p) for p in shipped_dirs], npz_path.stem, expected, images, encoder)
    features = shipped[0] if shipped else torch.as_tensor(encoder(images)).float().numpy()
    stats = FeatureStats.from_features(features)
    extra = {"image_shape": list(images.shape[1:])}
    if shipped:
        extra["from_shipped"] = shipped[1]
    provenance = write_entry(npz_path, json_path, {"features": features, "mu": stats.mu, "sigma": stats.sigma},
                             dict(expected, **extra))
    return ReferenceStats(stats=stats, features=features, provenance=provenance, from_cache=shipped is not None)
