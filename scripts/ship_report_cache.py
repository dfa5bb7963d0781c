"""Write the feature files shipped for the default `ectune tune` report (run after changing the
shipped teacher, the report's N or sampler, or the Inception weights).

    python scripts/ship_report_cache.py [--num_images 500]

Writes, with float16 features:
  src/ectune/assets/mnist-teacher/report-cache/teacher-heun18-n500-inception_v3.{npz,json}
      the teacher's 35-NFE samples on seeds 0..N-1 (uint8) and their Inception features;
  src/ectune/assets/reference/mnist-train-inception_v3-n500.{npz,json}
      Inception features of the report's N MNIST training images.
A report uses them only after sampling and encoding their first 16 items again and finding
them equal (ectune.report, ectune.metrics.reference); tests/test_tune_default.py checks that
the shipped files still agree with the shipped teacher and encoder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from ectune import config as C
from ectune.checkpoint import load_model, resolve_model_folder
from ectune.evaluate import SHIPPED_FEATURES, build_evaluator
from ectune.metrics.reference import cache_paths
from ectune.metrics.store import write_entry
from ectune.report import _settings, _teacher_entry, sample_setting, save_teacher_row


def ship(n: int, features_dir: Path = SHIPPED_FEATURES, teacher_folder: Path | None = None) -> list[Path]:
    """Compute both files' contents at N, then write them (nothing is written if anything fails);
    returns the .npz files written. The defaults are the shipped places."""
    cfg = C.preset("mnist", "ect")
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = build_evaluator(cfg.data.name, cfg.data.path, "train", n, (1, 28, 28), "auto", cache_dir=tmp)
    ref = evaluator.reference
    folder = teacher_folder or resolve_model_folder(cfg.teacher)
    denoiser, info = load_model(folder)
    s = _settings(info.mid_sigma)["teacher, Heun 35 NFE"]
    with torch.no_grad():
        images = sample_setting(denoiser, info, s, n)
    expected, places = _teacher_entry(folder, s, n, evaluator.encoder, info.label_dim)
    features = evaluator.encode(images)

    keys = ("dataset_id", "dataset_hash", "n", "encoder", "encoder_hash", "feature_dim", "resolution")
    ref_npz, ref_json = cache_paths(features_dir, ref.provenance["dataset_id"], evaluator.encoder.name, n)
    write_entry(ref_npz, ref_json, {"features": ref.features.astype(np.float16)}, {k: ref.provenance[k] for k in keys})
    teacher_npz, teacher_json = places[0]
    save_teacher_row(teacher_npz, teacher_json, expected, cfg.teacher, images, features)  # logs a failure
    if not teacher_npz.is_file():
        raise SystemExit(f"error: could not write {teacher_npz} (see the warning above): make its folder writable")
    return [ref_npz, teacher_npz]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=C.preset("mnist", "ect").report_num_images)
    for path in ship(parser.parse_args().num_images):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
