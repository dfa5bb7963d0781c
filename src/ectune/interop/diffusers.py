"""diffusers interop: a UNet2DModel (DDPM) as an ECT teacher, and consistency models out to diffusers.

- :func:`convert_diffusers` turns a diffusers ``UNet2DModel`` folder trained with a discrete VP
  schedule (e.g. a DDPM checkpoint: ``model_index.json`` + ``unet/`` + ``scheduler/``, or a bare UNet
  folder with ``scheduler_config.json`` beside it) into an ectune model folder whose network is
  :class:`~ectune.interop.diffusers_unet.DiffusersUNet`: with "edm" scalings the ectune denoiser is
  exactly the DDPM denoiser D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) (see that
  module for the timestep interpolation). The folder is an ordinary teacher for ``ectune tune``.
- :func:`export_diffusers` writes an ectune consistency model (method ect or ict, any backbone) as a
  stock diffusers ``ConsistencyModelPipeline`` with a ``CMStochasticIterativeScheduler``; the
  ``unet`` component is :class:`~ectune.interop.diffusers_model.ECTConsistencyUNet`. With per-image
  generators, ``pipe(num_inference_steps=1)`` and ``pipe(num_inference_steps=2)`` give ectune's 1- and
  2-step samples (``ectune sample``, re-noising "ect" by default).

How the scheduler is set so that 1 and 2 steps are ectune's sampler (checked at export):
- ``sigma_max`` is ectune's starting level (80): the scheduler's first level and initial noise scale;
- re-noising: the scheduler adds sqrt(tau^2 - sigma_min^2) z, so ``sigma_min = 0`` gives ECT's tau z
  (``renoise="ect"``), and ``sigma_min`` = the model's sigma_min gives iCT's (``renoise="ict"``);
  the model's own scalings are applied by ECTConsistencyUNet whatever the scheduler's sigma_min;
- the 2-step level: ``num_inference_steps=2`` evaluates at Karras level k = N//2 of N = 40, so
  rho is solved such that that level is exactly the model's mid_sigma (0.821 gives rho = 6.37);
- ``clip_denoised=False`` (ectune does not clip) and ``s_noise=1``.
Other step counts sample the scheduler's 40-level Karras grid with that rho.

Bad input raises :class:`~ectune.errors.CheckpointError` (one line) and writes nothing: each
folder is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ectune.checkpoint import check_new_folder, write_folder_atomic
from ectune.errors import CheckpointError, ConfigError
from ectune.interop.diffusers_unet import DISCRETE_VP_SCHEDULERS, PREDICTION_TYPES, SCHEDULE_KEYS, require_diffusers, \
    unsupported_reason

__all__ = [
    "EXPORT_TIMESTEPS",
    "cli_convert_diffusers",
    "cli_export_diffusers",
    "convert_diffusers",
    "export_diffusers",
    "is_diffusers_folder",
    "karras_rho",
    "load_pipeline",
    "pipeline_sample",
]

EXPORT_TIMESTEPS = 40  # the exported scheduler's num_train_timesteps (that of OpenAI's consistency models)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
# attention parameter names of diffusers checkpoints saved before 0.14 -> current names
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ---------------------------------------------------------------------------------------------
# Writing a folder all or nothing.


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the {what} is damaged") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: it is not a {what}")
    return data


# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel -> ectune model folder.


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a diffusers pipeline folder (model_index.json) or model folder (config.json written by
    diffusers): what ``ectune convert`` should hand to :func:`convert_diffusers`."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "_class_name" in cfg and "_diffusers_version" in cfg


def _locate(src: Path, scheduler: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler_config.json or None) of a pipeline folder or a UNet folder."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist: pass a diffusers pipeline folder (with model_index.json) or "
                              f"UNet2DModel folder (with config.json and diffusion_pytorch_model.safetensors)")
    if not src.is_dir():
        raise CheckpointError(f"{src} is a file, not a diffusers model folder: pass the folder that holds "
                              f"model_index.json or config.json")
    if (src / "model_index.json").is_file():
        index = _read_json(src / "model_index.json", "diffusers pipeline index")
        if "unet" not in index or not (src / "unet").is_dir():
            raise CheckpointError(f"{src} is a diffusers {index.get('_class_name', 'pipeline')} without a unet/ "
                                  f"component: ectune converts pipelines built on a UNet2DModel (e.g. DDPMPipeline)")
        unet_dir, candidates = src / "unet", [src / "scheduler" / "scheduler_config.json"]
    elif (src / "config.json").is_file():
        unet_dir = src
        candidates = [src / "scheduler_config.json", src.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(f"{src} is not a diffusers model folder (no model_index.json or config.json): pass a "
                              f"DDPM-style pipeline folder or a UNet2DModel folder")
    if scheduler is not None:
        s = Path(scheduler)
        candidates = [s / "scheduler_config.json" if s.is_dir() else s]
        if not candidates[0].is_file():
            raise CheckpointError(f"{scheduler} is not a scheduler_config.json (nor a folder holding one)")
    return unet_dir, next((c for c in candidates if c.is_file()), None)


def _read_unet_config(unet_dir: Path) -> dict:
    path = unet_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{unet_dir} has no config.json: it is not a diffusers model folder")
    cfg = _read_json(path, "diffusers model config")
    if cfg.get("format") == "ectune-model":
        raise CheckpointError(f"{unet_dir} is already an ectune model folder: use it directly (no conversion needed)")
    cls = cfg.get("_class_name")
    if cls is None:
        raise CheckpointError(f"{path} is not a diffusers model config (no _class_name): pass a folder written by "
                              f"diffusers' save_pretrained")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{path} describes a {cls}, not a UNet2DModel: ectune converts pixel-space "
                              f"UNet2DModel checkpoints (DDPM-style, unconditional or class-conditional)")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _read_schedule(path: Path | None, unet_dir: Path) -> tuple[dict, str, str]:
    """(schedule fields, prediction type, scheduler class) from scheduler_config.json."""
    if path is None:
        raise CheckpointError(f"no scheduler_config.json beside {unet_dir} (nor in ../scheduler/): ectune needs the "
                              f"noise schedule the UNet was trained with; pass the pipeline folder or scheduler=FILE")
    cfg = _read_json(path, "diffusers scheduler config")
    cls = cfg.get("_class_name")
    if cls not in DISCRETE_VP_SCHEDULERS:
        raise CheckpointError(f"{path}: scheduler {cls!r} is not supported: ectune converts UNets trained with a "
                              f"discrete VP (DDPM) schedule, e.g. DDPMScheduler or DDIMScheduler")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{path}: prediction_type {prediction!r} is not supported: ectune converts "
                              f"{', '.join(PREDICTION_TYPES)} models")
    if cfg.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{path}: rescale_betas_zero_snr=true (infinite noise at the last timestep) is not "
                              f"supported: ectune needs every timestep at a finite noise level")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise CheckpointError(f"{path}: timestep_type {cfg['timestep_type']!r} is not supported: ectune converts "
                              f"UNets trained on integer (discrete) timesteps")
    schedule = {k: cfg[k] for k in SCHEDULE_KEYS if k in cfg}
    from ectune.interop.diffusers_unet import alphas_cumprod
    try:
        alphas_cumprod(schedule)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return schedule, prediction, cls


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}): the download may be "
                                  f"truncated") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable state dict
        raise CheckpointError(f"{file} is not a readable weights file ({type(e).__name__}): the download may be "
                              f"truncated, or it holds more than tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return state


def _read_weights(unet_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in INDEX_FILES:
        index_path = unet_dir / name
        if index_path.is_file():
            weight_map = _read_json(index_path, "sharded checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no weight_map: the sharded checkpoint index is damaged")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or not (unet_dir / shard).is_file():
                    raise CheckpointError(f"{index_path} names the shard {shard!r}, which is not a file in {unet_dir}")
                state.update(_load_tensors(unet_dir / shard))
            return state, index_path
    for name in WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return _load_tensors(unet_dir / name), unet_dir / name
    raise CheckpointError(f"{unet_dir} has no weights ({' or '.join(WEIGHT_FILES[:2])}): the model folder is "
                          f"incomplete")


def _match_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Path) -> dict:
    """Rename pre-0.14 attention keys, check every key and shape, cast to float32."""
    state = dict(state)
    for key in list(state):
        if key in expected:
            continue
        prefix, _, rest = key.rpartition(".")
        head, _, name = prefix.rpartition(".")
        new = f"{head}.{_OLD_ATTENTION_NAMES.get(name, name)}.{rest}"
        if name in _OLD_ATTENTION_NAMES and new in expected and new not in state:
            state[new] = state.pop(key)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) that config.json describes, e.g. "
                              f"{missing[0]!r}: the weights do not belong to this config")
    if unexpected:
        raise CheckpointError(f"{where} holds {len(unexpected)} tensor(s) that config.json does not describe, e.g. "
                              f"{unexpected[0]!r}: the weights do not belong to this config")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(state[k].shape)} but config.json describes "
                                  f"{list(v.shape)}: the weights do not belong to this config")
        if not state[k].is_floating_point():
            raise CheckpointError(f"{where}: tensor {k!r} is {state[k].dtype}, not floating point")
    return {k: v.to(torch.float32) for k, v in state.items()}


def _convert(src: str | os.PathLike, dest: str | os.PathLike, scheduler: str | os.PathLike | None,
             sigma_data: float) -> tuple[Path, Any, Any, dict]:
    require_diffusers()
    from ectune.checkpoint import ModelInfo, save_model
    from ectune.networks import build_network

    src, dest = Path(src), Path(dest)
    check_new_folder(dest, "converted model")
    unet_dir, sched_path = _locate(src, scheduler)
    unet_config = _read_unet_config(unet_dir)
    schedule, prediction, sched_cls = _read_schedule(sched_path, unet_dir)
    reason = unsupported_reason(unet_config, prediction)
    if reason:
        raise CheckpointError(f"{unet_dir / 'config.json'}: {reason}")
    kwargs = {"unet_config": unet_config, "schedule": schedule, "prediction_type": prediction, "sigma_data": sigma_data}
    try:
        net = build_network("diffusers_unet", **kwargs)
    except ConfigError as e:
        raise CheckpointError(f"{unet_dir / 'config.json'}: {e}") from None
    state, weights_path = _read_weights(unet_dir)
    net.unet.load_state_dict(_match_weights(state, net.unet.state_dict(), weights_path), strict=True)
    size = net.img_resolution
    info = ModelInfo(network="diffusers_unet", kwargs=kwargs, sigma_data=sigma_data, scalings="edm", sigma_min=0.002,
                     method="edm", data_shape=(net.img_channels, size, size), label_dim=net.label_dim, mid_sigma=0.821,
                     extra={"source": {"format": "diffusers", "model": "UNet2DModel", "scheduler": sched_cls,
                                       "prediction_type": prediction, "path": str(src)}})
    path = write_folder_atomic(dest, "converted model", lambda tmp: save_model(tmp, net, info))
    return path, net, info, {"scheduler": sched_cls, "prediction": prediction}


def convert_diffusers(src: str | os.PathLike, dest: str | os.PathLike, *, scheduler: str | os.PathLike | None = None,
                      sigma_data: float = 0.5) -> Path:
    """Convert a diffusers UNet2DModel trained with a discrete VP schedule into the ectune model folder ``dest``.

    Args:
        src: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``, e.g. a DDPMPipeline) or a
            UNet2DModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``) with
            ``scheduler_config.json`` beside it or in ``../scheduler/``. Read from disk only; ``.bin``
            weights are loaded with ``weights_only=True``.
        dest: a new (or empty) folder; on any failure nothing is left there.
        scheduler: a ``scheduler_config.json`` (or its folder) to use instead of the one found with the UNet.
        sigma_data: sigma_data of the "edm" scalings (0.5 for images in [-1, 1], as DDPM's).

    Returns:
        ``dest``: a model folder (network ``diffusers_unet``, method ``edm``, "edm" scalings) whose
        denoiser equals the DDPM denoiser; the weights are the UNet's under the prefix ``unet.``.

    Raises:
        CheckpointError: not a diffusers UNet2DModel folder, an unsupported scheduler, prediction type
            or UNet option, weights that do not match the config, a non-empty ``dest``.
    """
    return _convert(src, dest, scheduler, sigma_data)[0]


def cli_convert_diffusers(src: str, dest: str, scheduler: str | None = None) -> int:
    """``ectune convert DIFFUSERS_FOLDER DEST``: convert and print where the model folder went (exit code 0)."""
    path, net, info, source = _convert(src, dest, scheduler, 0.5)
    params = sum(p.numel() for p in net.parameters())
    print(f"wrote {path}: diffusers UNet2DModel ({params / 1e6:.2f}M parameters, {source['prediction']} prediction, "
          f"{source['scheduler']} with {net.log_sigmas.shape[0]} timesteps) -> ectune diffusers_unet (method edm, "
          f"edm scalings, data {'x'.join(str(s) for s in info.data_shape)}, {info.label_dim} classes)")
    return 0


# ---------------------------------------------------------------------------------------------
# ectune consistency model -> diffusers ConsistencyModelPipeline.


def karras_rho(sigma_max: float, sigma_mid: float, sigma_min: float, num_timesteps: int = EXPORT_TIMESTEPS) -> float:
    """The rho for which level k = N//2 of the Karras grid
    sigma(k) = (sigma_max^(1/rho) + k/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM Eq. 5) is sigma_mid.

    For sigma_min = 0 this is ln(sigma_max/sigma_mid) / ln(1/(1-f)), f = k/(N-1); otherwise the level
    is a power mean of sigma_max and sigma_min of order 1/rho, solved by bisection; it exists when
    sigma_max^(1-f) sigma_min^f < sigma_mid < sigma_max.
    """
    f = (num_timesteps // 2) / (num_timesteps - 1)
    if not 0 < sigma_mid < sigma_max:
        raise ConfigError(f"the 2-step level {sigma_mid:g} must lie between 0 and sigma_max {sigma_max:g}")
    if sigma_min == 0:
        return math.log(sigma_max / sigma_mid) / math.log(1 / (1 - f))
    floor = math.exp((1 - f) * math.log(sigma_max) + f * math.log(sigma_min))
    if sigma_mid <= floor * (1 + 1e-9):
        raise ConfigError(f"with re-noising 'ict' (scheduler sigma_min {sigma_min:g}) the diffusers scheduler cannot "
                          f"place its 2-step level at {sigma_mid:g} (the lowest it can is {floor:.4g}): export with "
                          f"--renoise ect (renoise='ect')")

    def log_level(u: float) -> float:  # ln of the power mean of order u = 1/rho
        a, b = u * math.log(sigma_max) + math.log(1 - f), u * math.log(sigma_min) + math.log(f)
        m = max(a, b)
        return (m + math.log(math.exp(a - m) + math.exp(b - m))) / u

    lo, hi, target = 1e-9, 1e3, math.log(sigma_mid)  # log_level increases with u
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_level(mid) < target else (lo, mid)
    return 1 / (0.5 * (lo + hi))


def _export_checks(info: Any, model_folder: str | os.PathLike, mid: float, sigma_max: float, renoise: str) -> None:
    if info.method not in ("ect", "ict"):
        raise CheckpointError(f"{model_folder} is a diffusion model (method {info.method}): diffusers' "
                              f"ConsistencyModelPipeline needs a consistency model; tune it first with `ectune tune`")
    if len(info.data_shape) != 3 or info.data_shape[1] != info.data_shape[2]:
        raise CheckpointError(f"{model_folder} models data of shape {list(info.data_shape)}: diffusers' "
                              f"ConsistencyModelPipeline generates square images (channels, size, size)")
    if renoise not in ("ect", "ict"):
        raise ConfigError(f"unknown re-noising {renoise!r}: use 'ect' or 'ict'")
    if not (math.isfinite(sigma_max) and math.isfinite(mid)):
        raise ConfigError(f"mid_sigma ({mid:g}) and sigma_max ({sigma_max:g}) must be finite numbers, e.g. 0.15 and 80")
    if not (sigma_max > 0 and 0 < mid < sigma_max):
        raise ConfigError(f"need 0 < mid_sigma ({mid:g}) < sigma_max ({sigma_max:g})")


def _readme(info: Any, model_folder: str | os.PathLike, mid: float, sigma_max: float, renoise: str, rho: float) -> str:
    from ectune import __version__
    shape = "x".join(str(s) for s in info.data_shape)
    cond = (f"class-conditional ({info.label_dim} classes: pass class_labels; `ectune sample` gives seed s the "
            f"class s mod {info.label_dim}, so `class_labels=[s % {info.label_dim} for s in seeds]` matches it)"
            if info.label_dim else "unconditional")
    return f"""# ectune consistency model for diffusers

Exported by ectune {__version__} from `{model_folder}`: network `{info.network}`, method `{info.method}`,
"{info.scalings}" scalings (sigma_min {info.sigma_min:g}, sigma_data {info.sigma_data:g}), {shape} images, {cond}.
A stock `ConsistencyModelPipeline` with a `CMStochasticIterativeScheduler`; the `unet` component is
`ectune.interop.diffusers_model.ECTConsistencyUNet`, so ectune must be installed and imported first:

```python
import torch
import ectune.interop.diffusers_model  # noqa: F401  (lets diffusers find the unet class)
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")
seeds = range(16)
gens = [torch.Generator().manual_seed(s) for s in seeds]              # per-image seeds, as `ectune sample`
one = pipe(batch_size=16, num_inference_steps=1, generator=gens).images   # 1 step at sigma {sigma_max:g}
gens = [torch.Generator().manual_seed(s) for s in seeds]
two = pipe(batch_size=16, num_inference_steps=2, generator=gens).images   # 2 steps: {sigma_max:g}, then {mid:g}
```

With seeds s, s+1, ... these are the images of `ectune sample MODEL --steps 1` and `--steps 2` with
`--seed s` (mid level {mid:g}, re-noising "{renoise}"). The scheduler has 40 levels on a Karras grid with
rho = {rho:.6g}, chosen so that its 2-step level is {mid:g}; other step counts sample that grid. The
pipeline clamps its images to [0, 1]; `ectune.interop.diffusers.pipeline_sample(pipe, seeds, steps)`
returns the unclamped samples (data scale, [-1, 1]). diffusers logs "Expected types for unet:
UNet2DModel" when it loads the folder: expected, the unet is ectune's class.
"""


def _export(model_folder: str | os.PathLike, dest: str | os.PathLike, mid_sigma: float | None, sigma_max: float,
            renoise: str) -> tuple[Path, float, float]:
    require_diffusers()
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    from ectune.checkpoint import load_model
    from ectune.interop.diffusers_model import ECTConsistencyUNet

    dest, sigma_max = Path(dest), float(sigma_max)
    check_new_folder(dest, "exported pipeline")
    denoiser, info = load_model(model_folder)
    mid = float(info.mid_sigma if mid_sigma is None else mid_sigma)
    _export_checks(info, model_folder, mid, sigma_max, renoise)
    scheduler_min = 0.0 if renoise == "ect" else float(info.sigma_min)
    rho = karras_rho(sigma_max, mid, scheduler_min)
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=EXPORT_TIMESTEPS, sigma_min=scheduler_min,
                                               sigma_max=sigma_max, sigma_data=info.sigma_data, s_noise=1.0,
                                               rho=rho, clip_denoised=False)
    probe = CMStochasticIterativeScheduler.from_config(scheduler.config)
    probe.set_timesteps(2)
    levels = probe.sigmas[:2].double().tolist()
    if abs(levels[0] - sigma_max) > 1e-6 * sigma_max or abs(levels[1] - mid) > 1e-6 * mid:
        raise ConfigError(f"the diffusers scheduler's 2-step levels {levels} are not ({sigma_max:g}, {mid:g})")
    unet = ECTConsistencyUNet(network=info.network, network_kwargs=info.kwargs, sigma_data=info.sigma_data,
                              scalings=info.scalings, sigma_min=info.sigma_min, scheduler_sigma_min=scheduler_min,
                              sample_size=info.data_shape[-1], in_channels=info.data_shape[0],
                              num_class_embeds=info.label_dim or None)
    unet.net.load_state_dict(denoiser.net.state_dict())
    pipe = ConsistencyModelPipeline(unet=unet.eval(), scheduler=scheduler)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(_readme(info, model_folder, mid, sigma_max, renoise, rho), encoding="utf-8")

    return write_folder_atomic(dest, "exported pipeline", write), mid, rho


def export_diffusers(model_folder: str | os.PathLike, dest: str | os.PathLike, *, mid_sigma: float | None = None,
                     sigma_max: float = 80.0, renoise: str = "ect") -> Path:
    """Export an ectune consistency model as a diffusers ConsistencyModelPipeline folder.

    Args:
        model_folder: an ectune model folder (or run folder) of method ect or ict, image data.
        dest: a new (or empty) folder; on any failure nothing is left there.
        mid_sigma: the 2-step intermediate level (default: the model's ``mid_sigma``).
        sigma_max: the starting level (ectune's default 80).
        renoise: "ect" (add tau z before level tau, the official ECT sampler and ectune's default) or
            "ict" (sqrt(tau^2 - sigma_min^2) z).

    Returns:
        ``dest``. Load it with :func:`load_pipeline`; ``num_inference_steps`` 1 and 2 reproduce
        :func:`ectune.sampling.consistency_sample` for the same per-image noise.

    Raises:
        CheckpointError: not an ectune model folder, a diffusion (not consistency) model, non-image
            data, a non-empty ``dest``. ConfigError: bad levels or re-noising.
    """
    return _export(model_folder, dest, mid_sigma, sigma_max, renoise)[0]


def cli_export_diffusers(model: str, dest: str, mid_sigma: float | None = None, sigma_max: float = 80.0,
                         renoise: str = "ect") -> int:
    """``ectune export-diffusers MODEL DEST``: export and print where the pipeline went and how to load it (exit 0)."""
    path, mid, rho = _export(model, dest, mid_sigma, sigma_max, renoise)
    print(f"wrote {path}: diffusers ConsistencyModelPipeline + CMStochasticIterativeScheduler (levels {sigma_max:g} "
          f"and {mid:g} for 1 and 2 steps, rho {rho:.4g}, re-noising {renoise}); load it with `import "
          f"ectune.interop.diffusers_model` and DiffusionPipeline.from_pretrained({str(path)!r}) "
          f"(see {path / 'README.md'})")
    return 0


# ---------------------------------------------------------------------------------------------
# Loading and sampling an exported pipeline.


def load_pipeline(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """``DiffusionPipeline.from_pretrained(folder, **kwargs)`` of an exported folder, after importing the
    module diffusers needs for its unet. Local folders only (nothing is downloaded)."""
    require_diffusers()
    import ectune.interop.diffusers_model  # noqa: F401 - diffusers resolves the unet class from sys.modules
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no model_index.json): pass a folder "
                              f"written by export_diffusers")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "Expected types for unet: UNet2DModel" (expected here)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs)
    finally:
        diffusers_logging.set_verbosity(verbosity)


@torch.no_grad()
def pipeline_sample(pipe: Any, seeds: Sequence[int], steps: int,
                    class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run a ConsistencyModelPipeline with one generator per seed (ectune's per-image noise) and return the
    unclamped final samples (B, C, H, W) in data scale, float32."""
    last: list[torch.Tensor] = []
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    pipe(batch_size=len(gens), num_inference_steps=steps, generator=gens, class_labels=class_labels, output_type="pt",
         callback=lambda i, t, x: last.append(x), callback_steps=1)
    return last[-1].to(torch.float32)
