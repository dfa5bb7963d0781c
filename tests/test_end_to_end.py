"""End to end on 2-D data through the command line: pretrain, tune, sample with 1 and 2 steps, and
check the samples' sliced Wasserstein distance to the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ectune.checkpoint import load_model
from ectune.cli import main
from ectune.data import sample_toy
from ectune.metrics.distances2d import sliced_wasserstein
from ectune.networks import build_network
from ectune.precond import Denoiser
from ectune.preview import generate

# Measured on this machine with these budgets: teacher (Heun, 35 NFE) SW ~0.06, ECM 1-step ~0.075 and
# 2-step ~0.10; an untrained network ~0.49, all samples at the origin ~0.50, an isotropic Gaussian of the
# data's scale ~0.10.
SW_BOUND = 0.2


def _sw_to_data(points: np.ndarray | torch.Tensor) -> float:
    truth = sample_toy("swissroll", 4000, torch.Generator().manual_seed(123))
    return sliced_wasserstein(torch.as_tensor(points, dtype=torch.float64), truth.double())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("e2e")
    common = ["--preset", "toy2d", "--no-progress", "--data.max_items", "20000"]
    assert main(["pretrain", *common, "--total_nimg", "614400", "--ema.beta", "0.995", "--run-dir", str(tmp / "pre")]) == 0
    assert main(["tune", *common, "--teacher", str(tmp / "pre"), "--total_nimg", "409600",
                 "--ect.stage_nimg", "102400", "--run-dir", str(tmp / "tune")]) == 0
    return tmp / "pre", tmp / "tune"


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2])
def test_tuned_consistency_model_samples_the_data(tuned, tmp_path, steps):
    out = tmp_path / f"s{steps}.npz"
    assert main(["sample", str(tuned[1]), "--steps", str(steps), "--num_images", "2000", "--out", str(out)]) == 0
    x = np.load(out)["x"]
    assert x.shape == (2000, 2) and np.isfinite(x).all()
    sw = _sw_to_data(x)
    assert sw < SW_BOUND, f"{steps}-step samples are too far from the data: SW {sw:.3f}"


@pytest.mark.slow
def test_teacher_and_untrained_bounds(tuned):
    """The bound means something: the teacher passes it, an untrained network of the same shape fails."""
    teacher, info = load_model(tuned[0])
    x = generate(teacher, info, method="heun", steps=18, seeds=list(range(2000)))
    assert _sw_to_data(x) < SW_BOUND
    torch.manual_seed(0)
    untrained = Denoiser(build_network(info.network, **info.kwargs), info.sigma_data, "cm").eval()
    y = generate(untrained, info, method="consistency", steps=1, seeds=list(range(2000)))
    assert _sw_to_data(y) > SW_BOUND


@pytest.mark.slow
def test_tune_outputs(tuned):
    run = tuned[1]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "ect" and cfg["teacher"].endswith("pre")
    model_cfg = json.loads((run / "model" / "config.json").read_text())
    assert model_cfg["method"] == "ect" and model_cfg["precond"]["scalings"] == "cm"
    stages = [json.loads(line)["stage"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stages == sorted(stages) and stages[-1] == 3  # of the last step: (409600 - batch) // 102400
    assert list((run / "samples").glob("preview-*.png"))
