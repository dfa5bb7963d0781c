"""The metric names, and what sets one eval result apart from another, in a module light enough for the
config and the plots to import (ectune.metrics loads the encoders and scipy)."""

from __future__ import annotations

from typing import Any

IMAGE_METRICS = ("fid", "kid", "precision", "recall")
"""Metrics of images, computed on encoder features (:func:`ectune.metrics.compute_metrics`)."""
POINT_METRICS = ("sw", "mmd")
"""Metrics of 2-D points, computed on the points themselves."""


def result_variant(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """(short name, value) of what sets an eval result apart from others of its setting, data, encoder
    and N, where away from the defaults: the re-noising, S_churn, the class label, the seed, and a
    reference size other than N. Results files are named by them, and plot lines told apart."""
    out: list[tuple[str, Any]] = []
    if results.get("renoise") not in (None, "ect"):
        out.append(("renoise", results["renoise"]))
    if results.get("S_churn"):
        out.append(("churn", results["S_churn"]))
    if results.get("class_label") is not None:
        out.append(("class", results["class_label"]))
    if results.get("seed"):
        out.append(("seed", results["seed"]))
    ref = (results.get("data") or {}).get("num_images")
    if ref not in (None, results.get("num_images")):
        out.append(("ref", ref))
    return out
