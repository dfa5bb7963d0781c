"""The metric names, in a module light enough for the config to import (ectune.metrics loads the
encoders and scipy)."""

from __future__ import annotations

IMAGE_METRICS = ("fid", "kid", "precision", "recall")
"""Metrics of images, computed on encoder features (:func:`ectune.metrics.compute_metrics`)."""
POINT_METRICS = ("sw", "mmd")
"""Metrics of 2-D points, computed on the points themselves."""
