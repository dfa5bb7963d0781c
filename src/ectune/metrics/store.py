"""Feature files: an .npz of arrays beside a .json of its provenance.

The reference cache (:mod:`ectune.metrics.reference`), the tune report's teacher cache
(:mod:`ectune.report`) and the entries shipped with the package share this format:

    <stem>.npz    arrays, read with allow_pickle=False
    <stem>.json   provenance, and the sha256 of the .npz

An entry is read back only if every key field of its provenance matches what the caller expects,
the .npz bytes match the recorded sha256 and the arrays have the expected shapes; otherwise the
reader gets None (and the reason in the log) and recomputes. Both files are written through a
temporary file and os.replace, so a reader sees the old entry or the new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ectune.metrics.encoders import sha256_file

logger = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes) -> None:
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


def write_entry(npz_path: Path, json_path: Path, arrays: Mapping[str, np.ndarray],
                provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Write the arrays, then the provenance with the .npz's sha256 (folders created); returns that provenance."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(npz_path, data)
    full = dict(provenance, npz_sha256=hashlib.sha256(data).hexdigest())
    atomic_write(json_path, (json.dumps(full, indent=2) + "\n").encode())
    return full


def read_entry(npz_path: Path, json_path: Path, expected: Mapping[str, Any], key_fields: Sequence[str],
               shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, provenance) of an intact entry whose ``key_fields`` equal ``expected``'s, else None.

    ``shapes`` names the arrays to read and the shape each must have.
    """
    if not npz_path.is_file() or not json_path.is_file():
        return None
    try:
        provenance = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("feature file %s unreadable (%s): recomputing", json_path, exc)
        return None
    if not isinstance(provenance, dict):
        logger.warning("feature file %s is not a JSON object: recomputing", json_path)
        return None
    mismatched = [k for k in key_fields if provenance.get(k) != expected[k]]
    if mismatched:
        logger.info("feature file %s has other provenance (%s): recomputing", json_path, ", ".join(mismatched))
        return None
    if sha256_file(npz_path) != provenance.get("npz_sha256"):
        logger.warning("feature file %s does not match its recorded sha256: recomputing", npz_path)
        return None
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in shapes}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("feature file %s unreadable (%s): recomputing", npz_path, exc)
        return None
    wrong = [name for name, shape in shapes.items() if arrays[name].shape != tuple(shape)]
    if wrong:
        logger.warning("feature file %s has wrong array shapes (%s): recomputing", npz_path, ", ".join(wrong))
        return None
    return arrays, provenance


def features_agree(computed: np.ndarray, stored: np.ndarray, rtol: float = 2e-3) -> bool:
    """True if every row of ``computed`` is within ``rtol`` (relative L2) of the same row of ``stored``.

    The tolerance admits float16 storage (relative rounding <= 4.9e-4 per element) and the
    encoder's run-to-run differences across thread counts and CPUs (~1e-6), not different images.
    """
    a = np.asarray(computed, dtype=np.float64)
    b = np.asarray(stored, dtype=np.float64)
    if a.shape != b.shape:
        return False
    err = np.linalg.norm(a - b, axis=1)
    scale = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return bool(np.all(err <= rtol * scale))
