"""diffusers interop: a DDPM UNet2DModel as an ECT teacher, and consistency models exported to diffusers.

Every model here is a tiny UNet2DModel / SongUNet with random weights in every tensor, saved to a
temporary folder: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ectune import config as C  # noqa: E402
from ectune.checkpoint import ModelInfo, load_model, save_model  # noqa: E402
from ectune.errors import CheckpointError, ConfigError  # noqa: E402
from ectune.sampling import seed_labels  # noqa: E402
from ectune.interop.diffusers import (cli_convert_diffusers, cli_export_diffusers, convert_diffusers,  # noqa: E402
                                      export_diffusers, is_diffusers_folder, karras_rho, load_pipeline,
                                      pipeline_sample)
from ectune.interop.diffusers_unet import sigma_to_timestep, vp_log_sigmas  # noqa: E402
from ectune.networks import NETWORKS, build_network, record_dropout, replay_dropout  # noqa: E402
from ectune.preview import generate  # noqa: E402
from ectune.training import train  # noqa: E402

SIZE, CH = 8, 3
UNET = dict(sample_size=SIZE, in_channels=CH, out_channels=CH, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)
SONG = dict(img_resolution=SIZE, in_channels=CH, out_channels=CH, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.1)


def random_weights(net: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_unet(seed: int = 0, **over) -> diffusers.UNet2DModel:
    unet = diffusers.UNet2DModel(**{**UNET, **over})
    random_weights(unet, seed)
    return unet.eval()


def save_ddpm(folder: Path, unet, **sched) -> Path:
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**sched)).save_pretrained(folder)
    return folder


def nothing_written(dest: Path) -> bool:
    return not dest.exists() and not list(dest.parent.glob(f".{dest.name}.*"))


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory) -> tuple[Path, diffusers.UNet2DModel]:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with random weights."""
    unet = tiny_unet()
    return save_ddpm(tmp_path_factory.mktemp("ddpm") / "ddpm", unet), unet


@pytest.fixture(scope="module")
def teacher(ddpm, tmp_path_factory) -> Path:
    return convert_diffusers(ddpm[0], tmp_path_factory.mktemp("teacher") / "model")


# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel -> ectune teacher


def ddpm_x0(unet, scheduler, x: torch.Tensor, t: int, labels=None) -> torch.Tensor:
    """The diffusers model's x0 estimate at the exact discrete timestep t, in EDM scale (x = x0 + sigma eps)."""
    ab = scheduler.alphas_cumprod[t].double()
    x_vp = (x.double() * ab.sqrt()).float()
    out = unet(x_vp, torch.tensor(t), class_labels=labels).sample.double()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return x.double() - ((1 - ab) / ab).sqrt() * out
    if kind == "v_prediction":
        return ab.sqrt() * x_vp.double() - (1 - ab).sqrt() * out
    return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_equals_ddpm_at_discrete_timesteps(tmp_path, ddpm, prediction_type):
    """With "edm" scalings the converted denoiser is the DDPM denoiser, e.g. D = x - sigma eps(x/sqrt(1+sigma^2), t)."""
    src = ddpm[0]
    if prediction_type != "epsilon":
        src = save_ddpm(tmp_path / "src", ddpm[1], prediction_type=prediction_type)
    den, info = load_model(convert_diffusers(src, tmp_path / "model"))
    assert (info.network, info.method, info.scalings) == ("diffusers_unet", "edm", "edm")
    assert info.data_shape == (CH, SIZE, SIZE)
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    for t in (0, 7, 250, 500, 999):
        ab = scheduler.alphas_cumprod[t].double()
        sigma = float(((1 - ab) / ab).sqrt())
        x = torch.randn(3, CH, SIZE, SIZE, generator=g) * (0.5 + sigma)
        with torch.no_grad():
            got = den(x, torch.tensor(sigma, dtype=torch.float32))
            ref = ddpm_x0(ddpm[1], scheduler, x, t)
        assert (got.double() - ref).abs().max() <= 1e-5 * (1 + sigma), (t, sigma)


def test_folder_holds_the_unet_weights_and_config(ddpm, teacher):
    from safetensors.torch import load_file

    state = load_file(str(teacher / "model.safetensors"))
    expect = ddpm[1].state_dict()
    assert set(state) == {f"unet.{k}" for k in expect}
    assert all(torch.equal(state[f"unet.{k}"], v) for k, v in expect.items())
    cfg = json.loads((teacher / "config.json").read_text())
    kwargs = cfg["network"]["kwargs"]
    assert kwargs["unet_config"]["block_out_channels"] == [16, 32] and kwargs["prediction_type"] == "epsilon"
    assert kwargs["schedule"]["num_train_timesteps"] == 1000 and cfg["source"]["scheduler"] == "DDPMScheduler"
    assert NETWORKS["diffusers_unet"].__name__ == "DiffusersUNet"


def test_timestep_interpolates_log_sigma():
    ab = diffusers.DDPMScheduler().alphas_cumprod
    table = vp_log_sigmas(ab)
    assert bool((table[1:] > table[:-1]).all())
    t = sigma_to_timestep(table, table)
    assert torch.allclose(t, torch.arange(1000, dtype=torch.float64), atol=1e-9)
    midpoints = sigma_to_timestep((table[1:] + table[:-1]) / 2, table)
    assert torch.allclose(midpoints, torch.arange(999, dtype=torch.float64) + 0.5, atol=1e-9)
    ends = sigma_to_timestep(torch.tensor([table[0] - 5, table[-1] + 5]), table)  # clamped outside the schedule
    assert ends.tolist() == [0.0, 999.0]


def test_unet_folder_with_bin_weights_and_old_attention_names(tmp_path, ddpm, teacher):
    """A bare UNet folder (config.json + .bin with pre-0.14 attention names) and scheduler_config.json beside it."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in ddpm[1].state_dict().items():
        for new, name in old.items():
            k = k.replace(f".{new}.", f".{name}.")
        state[k] = v
    src = tmp_path / "unet"
    src.mkdir()
    cfg = json.loads((ddpm[0] / "unet" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg))
    torch.save(state, src / "diffusion_pytorch_model.bin")
    (src / "scheduler_config.json").write_text((ddpm[0] / "scheduler" / "scheduler_config.json").read_text())
    assert is_diffusers_folder(src) and is_diffusers_folder(ddpm[0]) and not is_diffusers_folder(teacher)
    from safetensors.torch import load_file
    out = convert_diffusers(src, tmp_path / "model")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(teacher / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_conditional_unet(tmp_path):
    unet = tiny_unet(seed=3, num_class_embeds=3)
    den, info = load_model(convert_diffusers(save_ddpm(tmp_path / "src", unet), tmp_path / "model"))
    assert info.label_dim == 3
    scheduler = diffusers.DDPMScheduler()
    ab = scheduler.alphas_cumprod[300].double()
    sigma = float(((1 - ab) / ab).sqrt())
    x = torch.randn(3, CH, SIZE, SIZE) * (0.5 + sigma)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        got = den(x, torch.tensor(sigma, dtype=torch.float32), torch.eye(3)[labels])
        ref = ddpm_x0(unet, scheduler, x, 300, labels)
    assert (got.double() - ref).abs().max() <= 1e-5 * (1 + sigma)


def test_dropout_masks_are_shared(teacher):
    """The UNet's dropout layers record and replay masks like ectune's own networks (ECT's target pass)."""
    den, _ = load_model(teacher, dropout=0.5)
    den.train()
    x, sigma = torch.randn(4, CH, SIZE, SIZE), torch.full((4,), 2.0)
    with record_dropout(torch.Generator().manual_seed(0)) as masks:
        a = den(x, sigma)
    assert len(masks) > 0
    with torch.no_grad(), replay_dropout(masks, torch.tensor([1, 3])):
        b = den(x[[1, 3]], sigma[[1, 3]])
    assert torch.allclose(a[[1, 3]].detach(), b, atol=1e-5)
    assert not torch.allclose(a.detach(), den.eval()(x, sigma), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# ECT on a diffusers teacher, export to diffusers


def tune_cfg(tmp: Path, teacher: Path) -> C.TrainConfig:
    images = np.random.default_rng(0).integers(0, 256, size=(256, CH, SIZE, SIZE), dtype=np.uint8)
    np.savez(tmp / "data.npz", x=images)
    return C.apply_overrides(C.preset("mnist", "ect"), {
        "teacher": str(teacher), "data.name": str(tmp / "data.npz"), "batch": 32, "total_nimg": 64,
        "log_every_nimg": 32, "checkpoint_every_nimg": 0, "ect.stage_nimg": 32, "network.dropout": 0.1,
        "preview.num_images": 4, "precision": "fp32", "device": "cpu", "run_dir": str(tmp / "run")})


@pytest.fixture(scope="module")
def tuned(teacher, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tune")
    result = train(tune_cfg(tmp, teacher), progress=False)
    assert result.nimg == 64 and result.nonfinite_steps == 0
    return result.model_dir


def assert_pipeline_matches(model: Path, export: Path, renoise: str = "ect", labels: torch.Tensor | None = None,
                            sigma_max: float = 80.0):
    """diffusers' 1- and 2-step samples equal ectune's consistency sampler for the same per-image seeds."""
    den, info = load_model(model)
    pipe = load_pipeline(export)
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    assert type(pipe.scheduler).__name__ == "CMStochasticIterativeScheduler"
    seeds = [0, 1, 5, 11]
    onehot = None if labels is None else torch.eye(info.label_dim)[labels]
    refs = {}
    for steps in (1, 2):
        refs[steps] = ref = generate(den, info, method="consistency", steps=steps, seeds=seeds, labels=onehot,
                                     renoise=renoise, sigma_max=sigma_max)
        got = pipeline_sample(pipe, seeds, steps, class_labels=labels)
        assert got.shape == ref.shape == (len(seeds), *info.data_shape)
        assert (got.double() - ref).abs().max() <= 1e-4, (steps, (got.double() - ref).abs().max())
    # the pipeline's own images are those samples mapped to [0, 1] and clamped
    images = pipe(batch_size=2, num_inference_steps=1, generator=[torch.Generator().manual_seed(s) for s in seeds[:2]],
                  class_labels=None if labels is None else labels[:2], output_type="pt").images
    assert torch.allclose(images.double(), (refs[1][:2] / 2 + 0.5).clamp(0, 1), atol=1e-4)


def test_tune_diffusers_teacher_and_export(tuned, teacher, tmp_path):
    den, info = load_model(tuned)
    assert (info.network, info.method, info.scalings) == ("diffusers_unet", "ect", "cm")
    assert info.kwargs["dropout"] == 0.1
    before = load_model(teacher)[0].net.unet.conv_in.weight
    assert not torch.equal(den.net.unet.conv_in.weight, before)  # tuning changed the weights
    out = export_diffusers(tuned, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert index["unet"] == ["ectune.interop.diffusers_model", "ECTConsistencyUNet"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["sigma_min"], sched["sigma_max"], sched["clip_denoised"]) == (0.0, 80.0, False)
    assert_pipeline_matches(tuned, out)


@pytest.mark.parametrize("scalings,renoise", [("cm", "ect"), ("cm", "ict"), ("edm", "ect"), ("edm", "ict")])
def test_export_songunet(tmp_path, scalings, renoise):
    """Any ectune backbone, both scalings and both re-noisings, class-conditional. sigma_min = 0.5 and the
    levels (10, 2.5) make the two re-noisings and the model's and scheduler's scalings differ by far more
    than the tolerance, so each convention is really checked."""
    net = build_network("songunet", **SONG, label_dim=3)
    random_weights(net, 5, 0.1)
    info = ModelInfo(network="songunet", kwargs={**SONG, "label_dim": 3}, sigma_data=0.5, scalings=scalings,
                     sigma_min=0.5, method="ect", data_shape=(CH, SIZE, SIZE), label_dim=3, mid_sigma=2.5, extra={})
    save_model(tmp_path / "model", net, info)
    out = export_diffusers(tmp_path / "model", tmp_path / "export", renoise=renoise, sigma_max=10.0)
    labels = torch.tensor([0, 2, 1, 2])
    assert_pipeline_matches(tmp_path / "model", out, renoise, labels=labels, sigma_max=10.0)
    # the exported README's labels for seeds are the ones `ectune sample` uses (sampling.seed_labels)
    assert "class_labels=[s % 3 for s in seeds]" in (out / "README.md").read_text()
    assert seed_labels([0, 1, 5, 11], 3, "cpu").argmax(1).tolist() == [s % 3 for s in [0, 1, 5, 11]]
    den, _ = load_model(tmp_path / "model")
    other = generate(den, info, method="consistency", steps=2, seeds=[0, 1, 5, 11], labels=torch.eye(3)[labels],
                     renoise="ict" if renoise == "ect" else "ect", sigma_max=10.0)
    assert (pipeline_sample(load_pipeline(out), [0, 1, 5, 11], 2, labels).double() - other).abs().max() > 1e-3
    if (scalings, renoise) == ("edm", "ect"):  # every step count of the 40-level grid stays finite
        pipe = load_pipeline(out)
        for steps in (3, 40):
            assert torch.isfinite(pipeline_sample(pipe, [0, 1], steps, class_labels=torch.tensor([0, 1]))).all()


def test_karras_rho_places_the_two_step_level():
    sched = diffusers.CMStochasticIterativeScheduler
    for s_min, mid in ((0.0, 0.821), (0.0, 1.526), (0.003, 0.821), (0.002, 5.0)):
        s = sched(num_train_timesteps=40, sigma_min=s_min, sigma_max=80.0, rho=karras_rho(80.0, mid, s_min))
        s.set_timesteps(2)
        assert s.sigmas[:2].tolist() == pytest.approx([80.0, mid], rel=1e-6)
    assert karras_rho(80.0, 0.821, 0.0) == pytest.approx(6.3678, abs=1e-4)
    with pytest.raises(ConfigError, match="--renoise ect"):
        karras_rho(80.0, 0.05, 0.003)  # below the lowest level the iCT grid can place


def test_cli_functions_print_where_they_wrote(ddpm, tuned, tmp_path, capsys):
    assert cli_convert_diffusers(str(ddpm[0]), str(tmp_path / "model")) == 0
    assert cli_export_diffusers(str(tuned), str(tmp_path / "export"), mid_sigma=1.0) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"wrote {tmp_path / 'model'}: diffusers UNet2DModel") and "epsilon prediction" in out[0]
    assert out[1].startswith(f"wrote {tmp_path / 'export'}: diffusers ConsistencyModelPipeline")
    assert "levels 80 and 1 for 1 and 2 steps" in out[1]


def test_ectune_command_line_routes_folders_to_diffusers(ddpm, tuned, tmp_path, capsys):
    from ectune.cli import main

    assert main(["convert", str(ddpm[0]), str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert main(["export-diffusers", str(tuned), str(tmp_path / "export"), "--mid-sigma", "1.0"]) == 0
    assert (tmp_path / "export" / "model_index.json").is_file()
    assert main(["convert", str(ddpm[0]), str(tmp_path / "m2"), "--method", "ect"]) == 2
    assert main(["export-diffusers", str(tmp_path / "model"), str(tmp_path / "e2")]) == 2  # a diffusion model
    err = capsys.readouterr().err
    assert "diffusion model" in err and not (tmp_path / "m2").exists() and not (tmp_path / "e2").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing written


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


UNET_EDITS = {"conditional unet": {"_class_name": "UNet2DConditionModel"},
              "fourier time": {"time_embedding_type": "fourier"},
              "shapes": {"block_out_channels": [16, 48]},
              "channels": {"in_channels": 3, "out_channels": 4}}
SCHEDULER_EDITS = {"ve scheduler": {"_class_name": "ScoreSdeVeScheduler"},
                   "prediction type": {"prediction_type": "flow"},
                   "beta schedule": {"beta_schedule": "zigzag"}}
BAD_SOURCES = {  # case -> what the one-line error says
    "missing": "does not exist", "file": "is a file", "empty folder": "not a diffusers model folder",
    "conditional unet": "not a UNet2DModel", "fourier time": "time_embedding_type 'fourier'",
    "shapes": "the weights do not belong to this config", "channels": "maps 3 channels to 4",
    "ve scheduler": "'ScoreSdeVeScheduler' is not supported",
    "prediction type": "prediction_type 'flow' is not supported",
    "beta schedule": "unsupported noise schedule", "no scheduler": "no scheduler_config.json",
    "truncated": "not a readable safetensors file", "not json": "is not valid JSON",
}


def spoil(case: str, d: Path, tmp: Path) -> Path:
    """Spoil ``d``, a copy of the DDPM folder, as ``case`` says; returns the path to convert."""
    unet_cfg, sched_cfg = d / "unet" / "config.json", d / "scheduler" / "scheduler_config.json"
    if case == "missing":
        return tmp / "nope"
    if case == "file":
        return d / "model_index.json"
    if case == "empty folder":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if case in UNET_EDITS:
        edit_json(unet_cfg, **UNET_EDITS[case])
    elif case in SCHEDULER_EDITS:
        edit_json(sched_cfg, **SCHEDULER_EDITS[case])
    elif case == "no scheduler":
        sched_cfg.unlink()
    elif case == "truncated":
        weights = d / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif case == "not json":
        unet_cfg.write_text("{oops")
    return d


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_diffusers_source(tmp_path, ddpm, case):
    src = spoil(case, Path(shutil.copytree(ddpm[0], tmp_path / "src")), tmp_path)
    dest = tmp_path / "out" / "model"
    with pytest.raises(CheckpointError, match=BAD_SOURCES[case]) as info:
        convert_diffusers(src, dest)
    assert "\n" not in str(info.value)
    assert nothing_written(dest)


def test_bad_convert_and_export_targets(tmp_path, teacher, tuned):
    with pytest.raises(CheckpointError, match="already an ectune model folder"):
        convert_diffusers(teacher, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        export_diffusers(tuned, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(CheckpointError, match="is a diffusion model"):
        export_diffusers(teacher, tmp_path / "e1")
    mlp = build_network("mlp", dim=2, hidden_dim=16)
    save_model(tmp_path / "mlp", mlp, ModelInfo(network="mlp", kwargs={"dim": 2, "hidden_dim": 16}, sigma_data=0.5,
                                                scalings="cm", sigma_min=0.002, method="ect", data_shape=(2,),
                                                label_dim=0, mid_sigma=0.821, extra={}))
    with pytest.raises(CheckpointError, match="square images"):
        export_diffusers(tmp_path / "mlp", tmp_path / "e2")
    with pytest.raises(CheckpointError, match="not an ectune model folder|does not exist"):
        export_diffusers(tmp_path / "nothing", tmp_path / "e3")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="must be finite numbers"):  # not "levels [1.0, 1.0] are not (inf, 0.15)"
        export_diffusers(tuned, tmp_path / "e4", sigma_max=math.inf)
    assert all(nothing_written(tmp_path / name) for name in ("x", "e1", "e2", "e3", "e4"))
