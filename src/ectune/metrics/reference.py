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
either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ectune
from ectune.errors import DataError
from ectune.metrics.encoders import Encoder, as_uint8_images, sha256_file
from ectune.metrics.frechet import FeatureStats

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1

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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(npz_path: Path, json_path: Path, expected: dict[str, Any]) -> ReferenceStats | None:
    """The cached entry if it exists, matches ``expected`` and is intact; else None (and why, in the log)."""
    if not npz_path.is_file() or not json_path.is_file():
        return None
    try:
        provenance = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("reference cache %s unreadable (%s): recomputing", json_path, exc)
        return None
    if not isinstance(provenance, dict):
        logger.warning("reference cache %s is not a JSON object: recomputing", json_path)
        return None
    mismatched = [k for k in _KEY_FIELDS if provenance.get(k) != expected[k]]
    if mismatched:
        logger.info("reference cache %s has other provenance (%s): recomputing", json_path, ", ".join(mismatched))
        return None
    if sha256_file(npz_path) != provenance.get("npz_sha256"):
        logger.warning("reference cache %s does not match its recorded sha256: recomputing", npz_path)
        return None
    n, d = expected["n"], expected["feature_dim"]
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            features, mu, sigma = z["features"], z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("reference cache %s unreadable (%s): recomputing", npz_path, exc)
        return None
    if features.shape != (n, d) or mu.shape != (d,) or sigma.shape != (d, d):
        logger.warning("reference cache %s has wrong array shapes: recomputing", npz_path)
        return None
    stats = FeatureStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n)
    return ReferenceStats(stats=stats, features=features.astype(np.float32), provenance=provenance, from_cache=True)


def reference_stats(
    dataset_id: str,
    dataset_hash: str,
    images_fn: Callable[[int], np.ndarray | torch.Tensor],
    n: int,
    encoder: Encoder,
    cache_dir: str | os.PathLike[str],
    resolution: int | None = None,
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
    features = torch.as_tensor(encoder(images)).float().numpy()
    stats = FeatureStats.from_features(features)

    buffer = io.BytesIO()
    np.savez(buffer, features=features, mu=stats.mu, sigma=stats.sigma)
    data = buffer.getvalue()
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(npz_path, data)
    provenance = dict(expected, image_shape=list(images.shape[1:]), npz_sha256=hashlib.sha256(data).hexdigest())
    _atomic_write(json_path, (json.dumps(provenance, indent=2) + "\n").encode())
    return ReferenceStats(stats=stats, features=features, provenance=provenance, from_cache=False)
