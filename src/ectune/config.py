"""Frozen configuration dataclasses, named presets, and their JSON / command-line round trip.

One :class:`TrainConfig` serves the three training commands (``pretrain`` = EDM, ``tune`` = ECT,
``train-ict`` = iCT), selected by ``method``; :class:`SampleConfig` serves ``sample`` and
:class:`EvalConfig` ``eval``. Presets are functions ``(method) -> TrainConfig`` so that e.g.
``cifar10`` carries the paper's settings for each method. Every leaf field has help text;
:func:`apply_overrides` takes dotted keys (``ect.q``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ectune import schedules
from ectune.data import TOY_DATASETS
from ectune.ema import power_ema_name
from ectune.errors import ConfigError
from ectune.sampling import SIGMA_MAX
from ectune.fields import opt
from ectune.losses import ECTLoss, EDMLoss, ICTLoss
from ectune.metric_names import IMAGE_METRICS, POINT_METRICS
from ectune.networks import MNIST_CONFIG

SCHEMA_VERSION = 1
ECT_MIN_LOG2_DECAY = 22
"""ECT stages stop where q^-(stage+1) would fall below 2^-22, near float32's resolution of r/t."""
METHODS = ("edm", "ect", "ict")


@dataclass(frozen=True)
class DataConfig:
    name: str = opt("mnist", "dataset: mnist, fashion-mnist, digits, swissroll, 8gaussians, moons, checkerboard, "
                             "or the path of a folder / .zip of PNGs / .npz file (a bare folder name as ./NAME)")
    path: str | None = opt(None, "path of a folder, .zip or .npz (when name is not a built-in dataset)")
    split: str = opt("train", "dataset split (train, val, test, all)")
    use_labels: bool = opt(False, "train class-conditional on the dataset's labels")
    xflip: bool = opt(False, "random horizontal flips")
    max_items: int | None = opt(None, "use at most this many items")


@dataclass(frozen=True)
class NetworkConfig:
    name: str = opt("songunet", "backbone: songunet, edm2unet or mlp (tune: the teacher's)")
    kwargs: dict = opt({}, "constructor arguments of the backbone (EDM's names for songunet); for tune, laid over "
                           "the teacher's (options that keep its weights, e.g. EDM2's dropout_res)")
    dropout: float | None = opt(None, "dropout probability; overrides kwargs and a teacher's value when set")


@dataclass(frozen=True)
class PrecondConfig:
    sigma_data: float = opt(0.5, "data standard deviation")
    train_scalings: str = opt("edm", "scalings while training: edm or cm")
    sample_scalings: str = opt("edm", "scalings while sampling: edm or cm")
    sigma_min: float = opt(0.002, "sigma_min of the cm scalings (official ECT CIFAR-10 samples with 0.003)")


@dataclass(frozen=True)
class OptimConfig:
    name: str = opt("radam", "optimizer: adam or radam")
    lr: float = opt(1e-4, "learning rate (the reference lr for inverse_sqrt)")
    betas: tuple = opt((0.9, 0.999), "Adam betas")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.0, "weight decay")
    schedule: str = opt("constant", "lr schedule: constant or inverse_sqrt (lr / sqrt(max(nimg / (ref_batches * batch), 1)))")
    ref_batches: float = opt(2000.0, "inverse_sqrt: iterations before the decay starts")
    warmup_nimg: int = opt(0, "linear learning-rate warm-up over this many images")
    grad_clip: float | None = opt(None, "clip the gradient norm to this value")


@dataclass(frozen=True)
class EMAConfig:
    beta: float | None = opt(0.9999, "fixed EMA decay per update (None = off)")
    stds: tuple = opt((), "EDM2 power-function EMA relative stds, e.g. [0.01, 0.05, 0.1]")
    export: str | None = opt(None, "which EMA the run exports as its model (default: the first)")


@dataclass(frozen=True)
class PreviewConfig:
    steps: int = opt(0, "Heun steps of pretrain's previews and training-time metrics (0 = 18); tune/ict always "
                        "preview 1 and 2 steps")
    mid_sigma: float = opt(0.821, "2-step intermediate noise level of consistency previews, the tune report and "
                                   "the exported model (its default for `ectune sample` / `eval`)")
    num_images: int = opt(64, "images per preview grid")


@dataclass(frozen=True)
class TrainConfig:
    method: str = opt("ect", "training method: edm (diffusion pretraining), ect (consistency tuning), ict")
    preset: str = opt("custom", "the preset this config started from")
    teacher: str | None = opt(None, "tune: model folder of the pretrained diffusion teacher")
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    edm: EDMLoss = field(default_factory=EDMLoss)
    ect: ECTLoss = field(default_factory=ECTLoss)
    ict: ICTLoss = field(default_factory=ICTLoss)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    batch: int = opt(128, "global batch size (images per optimiser step, all processes)")
    batch_gpu: int | None = opt(None, "micro-batch per process (None = batch / world size); smaller values accumulate")
    total_nimg: int = opt(1_280_000, "training length in images (a multiple of batch)")
    seed: int = opt(0, "random seed: data order, noise and dropout are functions of (seed, images seen)")
    precision: str = opt("fp32", "fp32 or bf16 (autocast)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    compile: bool = opt(False, "torch.compile the student pass (static shapes; no faster on a CPU, see docs/PERFORMANCE.md)")
    channels_last: bool = opt(False, "keep the network and batches in channels_last memory format (image networks; "
                                     "slower with bf16 on a CPU, see docs/PERFORMANCE.md)")
    run_dir: str | None = opt(None, "run folder (default runs/<method>-<preset>-<time>)")
    log_every_nimg: int = opt(12_800, "log and write stats every this many images")
    checkpoint_every_nimg: int = opt(256_000, "save a training state every this many images (0 = only at the end)")
    preview_every_nimg: int = opt(0, "write a sample grid every this many images (0 = only at the end)")
    eval_every_nimg: int = opt(0, "compute metrics of the EMA model every this many images and at the end, into "
                                  "stats.jsonl and TensorBoard (0 = never)")
    eval_num_images: int = opt(1000, "images (or 2-D points) per training-time evaluation (FID at small N is biased "
                                     "upward: compare runs at equal N)")
    eval_metrics: str = opt("auto", "training-time metrics, comma-separated: fid, kid, precision, recall for images, "
                                    "sw, mmd for 2-D data (auto = fid,kid or sw,mmd)")
    report_num_images: int = opt(0, "tune: after training, compare the teacher (Heun, 35 NFE) with the 1- and 2-step "
                                    "model on this many images (FID/KID or SW/MMD at equal N) in report.md (0 = no report)")
    keep_checkpoints: int = opt(2, "keep the last K training states")
    max_nonfinite_steps: int = opt(20, "stop after this many consecutive steps with a non-finite loss")


@dataclass(frozen=True)
class SampleConfig:
    model: str = opt("", "model folder (or run folder) to sample from")
    method: str = opt("auto", "auto (consistency for ECT/iCT models, heun for diffusion), consistency, heun or euler")
    steps: int = opt(0, "sampler steps (0 = 2 for consistency, 18 for heun / euler)")
    sigmas: tuple = opt((), "consistency levels after sigma_max (default: the model's mid level for 2 steps)")
    num_images: int = opt(64, "number of images")
    seed: int = opt(0, "first seed: image j uses seed + j")
    batch: int = opt(256, "images per batch (results do not depend on it)")
    class_label: int | None = opt(None, "class for conditional models (None = seed mod the number of classes)")
    out: str = opt("samples.png", "output: .png grid or .npz of uint8 images (2-D models: a scatter plot, or "
                                  "float32 points)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    renoise: str = opt("ect", "consistency re-noising: ect (tau z) or ict (sqrt(tau^2 - sigma_min^2) z)")
    S_churn: float = opt(0.0, "EDM stochasticity S_churn (heun / euler)")


@dataclass(frozen=True)
class EvalConfig:
    source: str = opt("", "model folder (or run folder) to sample, or a folder / .zip / .npz of images to evaluate")
    data: str = opt("", "reference dataset: a name (mnist, swissroll, ...) or a path (default: the model's training data)")
    data_path: str | None = opt(None, "where a built-in dataset's files are, when not the default location")
    split: str = opt("train", "reference split (FID is conventionally reported against the training set)")
    num_images: int = opt(10_000, "images (or 2-D points) to generate and evaluate")
    ref_num_images: int = opt(0, "reference images (0 = as many as num_images, at most the split's size)")
    seed: int = opt(0, "first seed: generated image j uses seed + j")
    method: str = opt("auto", "sampler: auto (consistency for ECT/iCT models, heun for diffusion), consistency, heun, euler")
    steps: int = opt(0, "sampler steps (0 = 2 for consistency, 18 for heun / euler)")
    sigmas: tuple = opt((), "consistency levels after sigma_max (default: the model's mid level for 2 steps)")
    steps_sweep: tuple = opt((), "evaluate at each of these step counts, e.g. 1,2,4 (consistency: levels spaced "
                                 "geometrically from sigma_max down to the model's mid level)")
    search_mid: bool = opt(False, "scan 2-step intermediate levels (mid_grid) and report the best by search_metric")
    mid_grid: tuple = opt((0.1, 0.2, 0.4, 0.821, 1.2, 2.0, 4.0), "intermediate levels scanned by --search-mid")
    search_num_images: int = opt(1000, "images per level scanned by --search-mid")
    search_metric: str = opt("auto", "metric that ranks levels: fid, kid, precision, recall, sw, mmd (auto = fid or sw)")
    metrics: str = opt("auto", "comma-separated: fid, kid, precision, recall for images; sw, mmd for 2-D data (auto = all)")
    encoder: str = opt("inception_v3", "feature encoder: inception_v3 (FID) or dinov2 (FD-DINOv2, needs --encoder-path)")
    encoder_path: str | None = opt(None, "weights file of the encoder (TorchScript; default: the installed Inception)")
    cache_dir: str | None = opt(None, "reference statistics cache (default $XDG_CACHE_HOME/ectune or ~/.cache/ectune)")
    out: str | None = opt(None, "results JSON (default: <run>/eval/<name>.json when the model is in a run folder)")
    batch: int = opt(256, "images per sampling batch (results do not depend on it)")
    encoder_batch: int = opt(50, "images per encoder batch")
    class_label: int | None = opt(None, "class for conditional models (None = seed mod the number of classes)")
    renoise: str = opt("ect", "consistency re-noising: ect (tau z) or ict (sqrt(tau^2 - sigma_min^2) z)")
    S_churn: float = opt(0.0, "EDM stochasticity S_churn (heun / euler)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (metrics are computed in fp32)")


# ---------------------------------------------------------------------------------------------
# Presets.

_MNIST_UNET = {k: list(v) if isinstance(v, tuple) else v for k, v in MNIST_CONFIG.items()}
_CIFAR_DDPMPP = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2],
                     num_blocks=4, attn_resolutions=[16], dropout=0.13, embedding_type="positional",
                     encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], channel_mult_noise=1)
_TOY_MLP = dict(dim=2, hidden_dim=256, num_blocks=4, dropout=0.0)


def _small(dataset: str, method: str, net: dict, *, pre_nimg: int, tune_nimg: int, name: str) -> TrainConfig:
    """Shared shape of the small-data presets (MNIST-like images)."""
    data = DataConfig(name=dataset)
    network = NetworkConfig(name="songunet", kwargs=dict(net))
    if method == "edm":
        return TrainConfig(method="edm", preset=name, data=data, network=network, batch=128, total_nimg=pre_nimg,
                           optim=OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), warmup_nimg=200_000),
                           ema=EMAConfig(beta=0.999, stds=(0.05, 0.1)),
                           precision="bf16")
    if method == "ect":
        return TrainConfig(method="ect", preset=name, data=data, network=NetworkConfig(name="songunet", dropout=0.2),
                           batch=128, total_nimg=tune_nimg,
                           ect=ECTLoss(q=4.0, stage_nimg=max(tune_nimg // 4, 128), c=0.0, weighting="inv_dt"),
                           precond=PrecondConfig(train_scalings="edm", sample_scalings="cm", sigma_min=0.002),
                           optim=OptimConfig(name="radam", lr=2e-4), ema=EMAConfig(beta=0.999),
                           preview=PreviewConfig(mid_sigma=0.821), precision="bf16")
    return TrainConfig(method="ict", preset=name, data=data, network=NetworkConfig(name="songunet", kwargs=dict(net), dropout=0.3),
                       batch=128, total_nimg=pre_nimg, precond=PrecondConfig(train_scalings="cm", sample_scalings="cm"),
                       optim=OptimConfig(name="radam", lr=1e-4), ema=EMAConfig(beta=0.9993), precision="bf16")


def _mnist(method: str) -> TrainConfig:
    cfg = _small("mnist", method, _MNIST_UNET, pre_nimg=5_120_000, tune_nimg=64_000, name="mnist")
    # `ectune tune` with no arguments tunes the teacher shipped in the package (its model card: ectune/assets/).
    if method != "ect":
        return cfg
    # Sized to finish, report included, within 10 minutes on 2 CPU cores: 900 steps of 32 images
    # (~70-80 img/s, ~6.5 min) and the report (~2 min: Inception-v3 on the 1,000 tuned samples; the
    # teacher's row and the reference come from the files shipped for N = 500, checked on 16 seeds).
    # 32,000 images took 9 min 48 s in all, too close to the limit.
    # fp32, as bf16 autocast is no faster for this network on a CPU. Batch 32, 16 stages, EMA 0.995
    # and the 2-step level 0.15 were chosen by two sweeps (docs/TUNE_DEFAULT.md): more, smaller steps
    # and quick stages make a better 1-step model here, EMA 0.995 scored best of 0.95 / 0.99 / 0.995,
    # and the 2-step sample is best with its second step from 0.1-0.2 rather than the image recipe's 0.821.
    return dataclasses.replace(
        cfg, teacher="builtin:mnist", batch=32, total_nimg=28_800, precision="fp32",
        network=NetworkConfig(name="songunet", dropout=0.1),
        ect=dataclasses.replace(cfg.ect, q=2.0, stage_nimg=1_800),
        optim=OptimConfig(name="radam", lr=2.8e-4), ema=EMAConfig(beta=0.995),
        preview=PreviewConfig(mid_sigma=0.15),
        checkpoint_every_nimg=14_400, report_num_images=500)


def _fashion(method: str) -> TrainConfig:
    return _small("fashion-mnist", method, _MNIST_UNET, pre_nimg=5_120_000, tune_nimg=64_000, name="fashion-mnist")


def _toy2d(method: str) -> TrainConfig:
    data = DataConfig(name="swissroll")
    common = dict(preset="toy2d", data=data, batch=512, log_every_nimg=51_200, checkpoint_every_nimg=0,
                  preview=PreviewConfig(mid_sigma=0.821, num_images=2048))
    if method == "edm":
        return TrainConfig(method="edm", network=NetworkConfig(name="mlp", kwargs=dict(_TOY_MLP)), total_nimg=2_048_000,
                           optim=OptimConfig(name="adam", lr=1e-3), ema=EMAConfig(beta=0.999), **common)
    if method == "ect":
        return TrainConfig(method="ect", network=NetworkConfig(name="mlp"), total_nimg=1_024_000,
                           ect=ECTLoss(q=4.0, stage_nimg=256_000),
                           precond=PrecondConfig(train_scalings="edm", sample_scalings="cm"),
                           optim=OptimConfig(name="radam", lr=1e-3), ema=EMAConfig(beta=0.99), **common)
    return TrainConfig(method="ict", network=NetworkConfig(name="mlp", kwargs=dict(_TOY_MLP)), total_nimg=2_048_000,
                       precond=PrecondConfig(train_scalings="cm", sample_scalings="cm"),
                       optim=OptimConfig(name="radam", lr=1e-3), ema=EMAConfig(beta=0.999), **common)


def _cifar10(method: str) -> TrainConfig:
    """CIFAR-10 32x32, DDPM++: EDM's pretraining, official ECT (ECT Table 1 / run_ecm.sh) and iCT settings."""
    data = DataConfig(name="cifar10", path="datasets/cifar10-32x32.zip", xflip=False)
    if method == "edm":
        return TrainConfig(method="edm", preset="cifar10", data=data, batch=512, total_nimg=200_000_000,
                           network=NetworkConfig(kwargs=dict(_CIFAR_DDPMPP)),
                           optim=OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, warmup_nimg=10_000_000),
                           # EDM's EMA half-life of 500k images at batch 512: 0.5 ** (512 / 500_000)
                           ema=EMAConfig(beta=0.99929), checkpoint_every_nimg=2_560_000)
    if method == "ect":
        return TrainConfig(method="ect", preset="cifar10", data=data, batch=128, total_nimg=51_200_000,
                           network=NetworkConfig(dropout=0.2),
                           ect=ECTLoss(P_mean=-1.1, P_std=2.0, q=2.0, k=8.0, b=1.0, mapping="sigmoid",
                                       stage_nimg=3_200_000, distance="huber", c=0.0, weighting="inv_dt"),
                           precond=PrecondConfig(train_scalings="edm", sample_scalings="cm", sigma_min=0.003),
                           optim=OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.999)), ema=EMAConfig(beta=0.9999),
                           preview=PreviewConfig(mid_sigma=0.821), checkpoint_every_nimg=1_280_000)
    return TrainConfig(method="ict", preset="cifar10", data=data, batch=1024, total_nimg=409_600_000,
                       network=NetworkConfig(kwargs=dict(_CIFAR_DDPMPP), dropout=0.3),
                       precond=PrecondConfig(train_scalings="cm", sample_scalings="cm", sigma_min=0.002),
                       optim=OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.999)), ema=EMAConfig(beta=0.99993),
                       checkpoint_every_nimg=10_240_000)


def _imagenet64_s(method: str) -> TrainConfig:
    """ImageNet 64 with EDM2-S (ECT imgnet branch): q = 4, c = 0.06, w = 1/t^2 + 1/sd^2, Adam 1e-3
    with inverse-sqrt decay, power-function EMA restarted at the first tuning step."""
    if method != "ect":
        raise ConfigError("preset imagenet64-s is defined for `ectune tune` only: pretrain with EDM2's code and convert")
    return TrainConfig(method="ect", preset="imagenet64-s", data=DataConfig(name="imagenet64", path="datasets/imagenet-64x64.zip",
                                                                          use_labels=True),
                       network=NetworkConfig(name="edm2unet", kwargs={"dropout_res": 16}, dropout=0.4), batch=128,
                       total_nimg=12_800_000,
                       ect=ECTLoss(P_mean=-0.8, P_std=1.6, q=4.0, k=8.0, b=1.0, mapping="sigmoid", stage_nimg=3_200_000,
                                   distance="huber", c=0.06, weighting="edm"),
                       precond=PrecondConfig(train_scalings="edm", sample_scalings="edm"),
                       optim=OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.99), schedule="inverse_sqrt", ref_batches=2000),
                       ema=EMAConfig(beta=0.9999, stds=(0.01, 0.05, 0.1)),
                       preview=PreviewConfig(mid_sigma=1.526), checkpoint_every_nimg=1_280_000)


PRESETS: dict[str, Callable[[str], TrainConfig]] = {
    "mnist": _mnist,
    "fashion-mnist": _fashion,
    "toy2d": _toy2d,
    "cifar10": _cifar10,
    "imagenet64-s": _imagenet64_s,
}


def preset(name: str, method: str) -> TrainConfig:
    """The named preset's config for ``method`` (edm, ect or ict)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return PRESETS[name](method)


# ---------------------------------------------------------------------------------------------
# Serialisation and overrides.


def to_dict(cfg: Any) -> dict:
    """A config as plain JSON-able data (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name.startswith("_"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif callable(v):
            raise ConfigError(f"config field {f.name} holds a callable, which cannot be saved: use a named option")
        out[f.name] = v
    return out


def to_json(cfg: Any) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, **to_dict(cfg)}, indent=2, sort_keys=False)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON / command-line value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be an object of options, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact, also beyond float's range
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact: "9007199254740993" is not rounded through a float
            except ValueError:
                pass  # "1e6", "2.0"
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
            except (json.JSONDecodeError, RecursionError):
                raise ConfigError(f"{key} must be a list such as [0.9, 0.999], got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        out = []
        for v in value:
            try:
                out.append(float(v) if not isinstance(v, (int, float)) else v)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must be a list of numbers, got {value!r}") from None
        return tuple(out)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise ConfigError(f"{key} must be a JSON object, got {value[:80]!r}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be an object, got {value!r}")
        return dict(value)
    if callable(value) and not isinstance(value, str):
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from a (possibly partial) mapping on top of ``base`` (or the defaults).
    Unknown keys raise a ConfigError naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a JSON object of options, got {type(data).__name__} {str(data)[:80]}")
    types_ = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    base = base if base is not None else cls()
    kwargs = {}
    for k, v in data.items():
        if k == "schema_version" and not prefix:
            if v != SCHEMA_VERSION:
                raise ConfigError(f"config schema_version {v} is not supported (this ectune reads {SCHEMA_VERSION})")
            continue
        if k not in names:
            raise ConfigError(f"unknown config option {prefix}{k!r}: see --help for the valid options")
        tp = types_[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, Mapping):
            kwargs[k] = from_dict(tp, v, prefix=f"{prefix}{k}.", base=getattr(base, k))
        elif tp is dict and isinstance(v, Mapping):
            kwargs[k] = {**getattr(base, k), **v} if prefix + k != "network.kwargs" else dict(v)
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: {e}") from None


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Apply dotted-key overrides such as {"ect.q": "4", "network.kwargs.model_channels": "32"}.

    ``network.kwargs`` (a JSON object) replaces the backbone arguments; ``network.kwargs.NAME`` sets one
    of them (its value parsed as JSON when it is JSON, e.g. ``[1, 2, 2]``)."""
    nested: dict[str, Any] = {}
    kw_replace: dict | None = None
    kw_merge: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "network.kwargs":
            kw_replace = _coerce(value, dict, key)
            continue
        if key.startswith("network.kwargs."):
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
                except RecursionError:
                    raise ConfigError(f"option {key!r}: its value is nested too deeply") from None
            kw_merge[key[len("network.kwargs."):]] = value
            continue
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option {key!r} does not exist: see --help for the valid options")
        node[parts[-1]] = value
    if kw_replace is not None or kw_merge:
        base_kwargs = kw_replace if kw_replace is not None else cfg.network.kwargs
        nested.setdefault("network", {})["kwargs"] = {**base_kwargs, **kw_merge}
    return from_dict(type(cfg), nested, base=cfg)


def iter_options(cls: Any, prefix: str = "") -> list[tuple[str, Any, str, Any]]:
    """Every leaf option as (dotted key, type, help, default) for building --help. ``cls`` is a config
    class (defaults: the class's) or a config (defaults: its values, e.g. a preset's)."""
    out = []
    default = cls() if isinstance(cls, type) else cls
    types_ = _field_types(type(default))
    for f in dataclasses.fields(default):
        if f.name.startswith("_"):
            continue
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(iter_options(getattr(default, f.name), prefix + f.name + "."))
        else:
            out.append((prefix + f.name, tp, f.metadata.get("help", ""), getattr(default, f.name)))
    return out


def _numbers(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float option (and float inside a list option) as (dotted key, value); backbone kwargs aside."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name.startswith("_"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.extend(_numbers(v, prefix + f.name + "."))
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, float):
                out.append((prefix + f.name, x))
    return out


def validate(cfg: TrainConfig, *, new_run: bool = True) -> None:
    """Checks that need several fields at once. Raises ConfigError with the fix. ``new_run=False`` (a
    run's saved config, being resumed) skips checks added after runs were saved that trained fine."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if cfg.batch <= 0:
        raise ConfigError(f"batch must be positive, got {cfg.batch}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"seed must be in [0, 2^32), got {cfg.seed}: every step's noise is drawn from 32 bits of it")
    if cfg.total_nimg <= 0 or cfg.total_nimg % cfg.batch:
        raise ConfigError(f"total_nimg ({cfg.total_nimg}) must be a positive multiple of batch ({cfg.batch}): "
                          f"use e.g. {max(1, round(cfg.total_nimg / cfg.batch)) * cfg.batch}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {cfg.optim.lr}: set --optim.lr to e.g. 1e-4")
    if cfg.optim.name not in ("adam", "radam"):
        raise ConfigError(f"unknown optimizer {cfg.optim.name!r}: use adam or radam")
    if cfg.optim.schedule not in ("constant", "inverse_sqrt"):
        raise ConfigError(f"unknown lr schedule {cfg.optim.schedule!r}: use constant or inverse_sqrt")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"unknown precision {cfg.precision!r}: use fp32 or bf16")
    if cfg.ema.beta is not None and not 0 <= cfg.ema.beta < 1:
        raise ConfigError(f"ema.beta must be in [0, 1), got {cfg.ema.beta}")
    if cfg.ema.beta is None and not cfg.ema.stds:
        raise ConfigError("no EMA configured: set ema.beta (e.g. 0.9999) or ema.stds")
    for std in cfg.ema.stds:
        # EDM2 Eq. 3 gives no exponent gamma > -1 (an average that converges) above a std of about 0.3
        if not 0 < std <= 0.3 or schedules.power_ema_std_to_exp(std) <= -1:
            raise ConfigError(f"ema.stds must lie in (0, 0.3], got {std}: EDM2 uses e.g. 0.05-0.1")
    ema_names = [power_ema_name(std) for std in cfg.ema.stds]
    twice = next((n for n in ema_names if ema_names.count(n) > 1), None)
    if twice is not None:
        same = [f"{std:g}" for std, n in zip(cfg.ema.stds, ema_names) if n == twice]
        raise ConfigError(f"ema.stds {' and '.join(same)} would share the name {twice}: give stds that differ in "
                          f"the first 3 decimals")
    o = cfg.optim
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}: e.g. 0.9,0.999")
    if o.eps < 0 or o.weight_decay < 0 or o.warmup_nimg < 0 or o.ref_batches <= 0:
        raise ConfigError("optim.eps, optim.weight_decay and optim.warmup_nimg must be >= 0 and optim.ref_batches > 0")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be positive (or unset), got {o.grad_clip}")
    if cfg.network.dropout is not None and not 0 <= cfg.network.dropout < 1:
        raise ConfigError(f"network.dropout must be in [0, 1), got {cfg.network.dropout}")
    if cfg.log_every_nimg <= 0 or cfg.checkpoint_every_nimg < 0 or cfg.keep_checkpoints < 1:
        raise ConfigError("log_every_nimg must be > 0, checkpoint_every_nimg >= 0 (0 = only at the end) and "
                          "keep_checkpoints >= 1")
    if cfg.preview.num_images < 1:
        raise ConfigError(f"preview.num_images must be >= 1, got {cfg.preview.num_images}")
    if cfg.batch_gpu is not None and (cfg.batch_gpu <= 0 or cfg.batch % cfg.batch_gpu):
        raise ConfigError(f"batch_gpu ({cfg.batch_gpu}) must divide batch ({cfg.batch})")
    own = {"edm": cfg.edm, "ect": cfg.ect, "ict": cfg.ict}.get(cfg.method)
    if new_run and own is not None and own.scalings is not None and own.scalings != cfg.precond.train_scalings:
        # not for a run being resumed: older ectune accepted this, and its loss used {method}.scalings
        raise ConfigError(f"{cfg.method}.scalings ({own.scalings}) and precond.train_scalings "
                          f"({cfg.precond.train_scalings}) disagree, and the loss uses {cfg.method}.scalings: pass "
                          f"--precond.train_scalings {own.scalings}, or --{cfg.method}.scalings "
                          f"{cfg.precond.train_scalings} to train with {cfg.precond.train_scalings}")
    for name in ("train_scalings", "sample_scalings"):
        if getattr(cfg.precond, name) not in ("edm", "cm"):
            raise ConfigError(f"precond.{name} must be edm or cm, got {getattr(cfg.precond, name)!r}")
    if cfg.report_num_images != 0 and (cfg.method != "ect" or cfg.report_num_images < 2):
        raise ConfigError("report_num_images compares an ECT model with its teacher: use it with `ectune tune`, "
                          "at 2 or more images (0 = no report)")
    if cfg.eval_every_nimg < 0 or cfg.eval_num_images < 2:
        raise ConfigError("eval_every_nimg must be >= 0 and eval_num_images >= 2")
    if cfg.preview.steps < 0:
        raise ConfigError(f"preview.steps must be >= 0 (0 = the method's default), got {cfg.preview.steps}")
    if cfg.method != "edm" and not 0 < cfg.preview.mid_sigma < SIGMA_MAX:
        raise ConfigError(f"preview.mid_sigma must lie in (0, {SIGMA_MAX:g}), got {cfg.preview.mid_sigma}: e.g. 0.821")
    names = set(cfg.eval_metrics.replace(" ", "").split(","))
    image, point = ", ".join(IMAGE_METRICS), ", ".join(POINT_METRICS)
    bad = names - {"auto", *IMAGE_METRICS, *POINT_METRICS}
    if bad:
        raise ConfigError(f"unknown eval_metrics {sorted(bad)}: use {image} (images) or {point} (2-D)")
    if cfg.eval_every_nimg > 0 and cfg.data.path is None:  # a named dataset: its kind is known
        points = cfg.data.name in TOY_DATASETS
        wrong = names & set(IMAGE_METRICS if points else POINT_METRICS)
        if wrong:
            raise ConfigError(f"eval_metrics {sorted(wrong)} do not apply to {cfg.data.name}: use "
                              + (f"{point} (2-D points)" if points else f"{image} (images)"))
    if new_run and cfg.method != "ect" and cfg.teacher:  # trained from random weights, yet recorded
        raise ConfigError(f"{cfg.method} training starts from random weights and ignores a teacher: drop --teacher "
                          f"(or the config file's teacher; ECT tuning from a teacher is `ectune tune`)")
    if cfg.method == "ect":
        if not cfg.teacher:
            raise ConfigError("ECT tuning needs a teacher: pass --teacher MODEL_DIR (a folder written by `ectune pretrain`)")
        # r = t (1 - q^-(s+1) ...) is within a float32 step of t as q^-(s+1) nears 2^-24 (r = t, a 0/0
        # loss, for some t from stage 24 at q = 2).
        stages = max(1, math.floor(ECT_MIN_LOG2_DECAY / math.log2(cfg.ect.q)))
        last = (cfg.total_nimg - cfg.batch) // cfg.ect.stage_nimg  # the stage of the last step
        if last >= stages:
            raise ConfigError(f"ECT would reach stage {last}, where t - r(t) falls to float32's resolution of t "
                              f"(q^-(stage+1) < 2^-{ECT_MIN_LOG2_DECAY}; the loss is 0/0 once r rounds to t): use ect.stage_nimg >= "
                              f"{(cfg.total_nimg - cfg.batch) // stages + 1} ({stages} stages at q = "
                              f"{cfg.ect.q:g}) or a smaller q")
    if cfg.method == "ict":
        c = cfg.ict
        if not 1 <= c.s0 <= c.s1:
            raise ConfigError(f"ict.s0 and ict.s1 must satisfy 1 <= s0 <= s1, got {c.s0} and {c.s1}")
        if c.total_nimg < 0 or c.batch < 0:
            raise ConfigError("ict.total_nimg and ict.batch must be >= 0 (0 = the run's own)")
        batch = c.batch or cfg.batch
        K = (c.total_nimg or cfg.total_nimg) // batch
        phases = math.log2(c.s1 // c.s0) + 1  # iCT Eq. 8: K' = floor(K / phases) iterations per phase
        if math.floor(K / phases) < 1:
            field = "ict.total_nimg" if c.total_nimg else "total_nimg"
            raise ConfigError(f"the iCT curriculum has {phases:g} phases but counts only {K} iterations: raise {field} "
                              f"to at least {math.ceil(phases) * batch}")
