"""Checkpoints that never execute code.

- A **model folder** holds ``model.safetensors`` (the weights) and ``config.json`` (schema version,
  network name and constructor arguments, preconditioning, method, data shape): everything needed to
  rebuild and sample the denoiser. ``load_model(folder)`` is one call.
- A **training state** (``training-state-<nimg>.pt``) is a dict of tensors and plain Python values
  saved with ``torch.save`` and loaded with ``weights_only=True``: network, EMAs, optimizer, images
  seen. Every write goes to a temporary file, is fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ectune.errors import CheckpointError
from ectune.networks import build_network
from ectune.precond import Denoiser

MODEL_FORMAT = "ectune-model"
MODEL_SCHEMA_VERSION = 1
STATE_PATTERN = re.compile(r"^training-state-(\d{12})\.pt$")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file through ``write(tmp_path)`` into a temporary file beside ``path``, fsync it, and
    rename it over ``path``: readers see the old file or the complete new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that :func:`atomic_write` and :func:`write_folder_atomic`
    leave when their process is killed mid-write (``.<name>.<random>.tmp``) anywhere under ``folder``.
    Returns what was removed."""
    removed = []
    for p in sorted(Path(folder).rglob(".*.tmp")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_new_folder(dest: Path, what: str) -> None:
    """Refuse to write into ``dest`` unless it is absent or an empty folder (nothing is ever overwritten)."""
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} is a file: choose a new folder for the {what} (nothing was overwritten)")
    if dest.is_dir() and any(dest.iterdir()):
        raise CheckpointError(f"{dest} already exists and is not empty: choose a new folder for the {what} "
                              f"(nothing was overwritten)")
    parent = next(p for p in dest.absolute().parents if p.exists())  # the root always exists
    if not parent.is_dir():
        raise CheckpointError(f"{dest} cannot be created: {parent} is a file; choose another folder for the {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{dest} cannot be created: {parent} is not writable; choose another folder for "
                              f"the {what}")


def write_folder_atomic(dest: str | os.PathLike, what: str, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``dest`` and rename it into place: ``dest`` ends up
    complete or untouched (absent or empty)."""
    dest = Path(dest)
    check_new_folder(dest, what)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise CheckpointError(f"cannot create {dest} ({e.strerror}): choose another folder for the {what}") from None
    try:
        write(tmp)
        check_new_folder(dest, what)
        try:
            os.replace(tmp, dest)  # POSIX: also replaces an empty directory
        except OSError:
            dest.rmdir()
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_stats_rows(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a run's stats.jsonl that is a JSON object; others (a line cut by
    a kill) are left out. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            rows.append((line, record))
    return rows


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder's config.json says about its network."""

    network: str
    kwargs: dict
    sigma_data: float
    scalings: str
    sigma_min: float
    method: str
    data_shape: tuple
    label_dim: int
    mid_sigma: float
    extra: dict

    def to_json(self) -> dict:
        return {
            "format": MODEL_FORMAT, "schema_version": MODEL_SCHEMA_VERSION,
            "network": {"name": self.network, "kwargs": self.kwargs},
            "precond": {"sigma_data": self.sigma_data, "scalings": self.scalings, "sigma_min": self.sigma_min},
            "method": self.method, "data_shape": list(self.data_shape), "label_dim": self.label_dim,
            "mid_sigma": self.mid_sigma, **self.extra,
        }


def _read_model_info(folder: Path) -> ModelInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is not an ectune model folder (no config.json): pass the folder written by "
                              f"`ectune pretrain`/`tune` (its model/ subfolder) or convert the checkpoint with `ectune convert`")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): the model folder is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{cfg_path} is not an ectune model config (format != {MODEL_FORMAT!r})")
    if cfg.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise CheckpointError(f"{cfg_path} has schema_version {cfg.get('schema_version')}, this ectune reads "
                              f"{MODEL_SCHEMA_VERSION}: upgrade ectune")
    try:
        known = {"format", "schema_version", "network", "precond", "method", "data_shape", "label_dim", "mid_sigma"}
        return ModelInfo(
            network=cfg["network"]["name"], kwargs=dict(cfg["network"]["kwargs"]),
            sigma_data=float(cfg["precond"]["sigma_data"]), scalings=str(cfg["precond"]["scalings"]),
            sigma_min=float(cfg["precond"]["sigma_min"]), method=str(cfg["method"]),
            data_shape=tuple(int(s) for s in cfg["data_shape"]), label_dim=int(cfg["label_dim"]),
            mid_sigma=float(cfg.get("mid_sigma", 0.821)), extra={k: v for k, v in cfg.items() if k not in known})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is missing or has a bad field ({e}): the model folder is damaged") from None


# Models shipped inside the package, named ``builtin:NAME`` wherever a model folder is expected.
BUILTIN_MODELS = {"mnist": "mnist-teacher"}
BUILTIN_PREFIX = "builtin:"


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The description (config.json) of a model folder, run folder or ``builtin:NAME``, without its weights."""
    return _read_model_info(resolve_model_folder(path))


def builtin_model(name: str) -> Path:
    """The folder of the shipped model ``name`` (see BUILTIN_MODELS and its model card, README.md)."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"no built-in model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")
    return Path(__file__).resolve().parent / "assets" / BUILTIN_MODELS[name]


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """Accept a model folder, a run folder (whose model/ subfolder is used) or ``builtin:NAME``."""
    if str(path).startswith(BUILTIN_PREFIX):
        return builtin_model(str(path)[len(BUILTIN_PREFIX):])
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a model folder (with config.json and model.safetensors)")
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return p / "model"
    if p.is_dir() and (p / "config.json").is_file():
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = {}
        if isinstance(cfg, dict) and cfg.get("format") != MODEL_FORMAT and "method" in cfg:
            if (p / "model" / "config.json").is_file():
                return p / "model"
            raise CheckpointError(f"{p} is a run folder with no exported model yet (no model/): let the run reach its "
                                  f"first checkpoint, or resume it with --resume {p}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a model folder: pass the folder holding config.json and "
                              f"model.safetensors (convert foreign checkpoints with `ectune convert`)")
    return p


def run_relative_path(run_dir: str | os.PathLike, recorded_run_dir: str | None, path: str) -> str:
    """A path a run's config.json records (its teacher, say), made usable from the current folder.

    Relative paths are recorded as given, relative to the folder the run was started from. If ``path``
    does not exist from here but the run's recorded ``run_dir`` is relative too, the start folder is
    ``run_dir`` without the recorded run_dir's parts, and ``path`` is taken from there; otherwise
    ``path`` comes back unchanged (``builtin:`` names and absolute paths always do).
    """
    if (path.startswith(BUILTIN_PREFIX) or Path(path).is_absolute() or Path(path).exists()
            or not isinstance(recorded_run_dir, str) or not recorded_run_dir):
        return path
    recorded, here = Path(recorded_run_dir), Path(run_dir).absolute()
    parts = recorded.parts
    if recorded.is_absolute() or len(parts) > len(here.parts) or here.parts[len(here.parts) - len(parts):] != parts:
        return path
    start = Path(*here.parts[:len(here.parts) - len(parts)])
    return str(start / path) if (start / path).exists() else path


def save_model(folder: str | os.PathLike, net: nn.Module, info: ModelInfo) -> None:
    """Write ``model.safetensors`` and ``config.json`` (weights first, so a config never points at missing weights)."""
    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_text_atomic(folder / "config.json", json.dumps(info.to_json(), indent=2))


def network_kwargs(base: dict, overrides: dict | None = None, dropout: float | None = None) -> dict:
    """Network options: ``base`` with ``overrides`` laid over it, and ``dropout`` over both when set."""
    kwargs = {**base, **(overrides or {})}
    if dropout is not None:
        kwargs["dropout"] = dropout
    return kwargs


def build_from_info(info: ModelInfo, *, dropout: float | None = None, overrides: dict | None = None) -> nn.Module:
    return build_network(info.network, **network_kwargs(info.kwargs, overrides, dropout))


def _mismatch(e: RuntimeError) -> str:
    """The first offending key of torch's load_state_dict error (its first line is only a header)."""
    lines = str(e).strip().splitlines()
    return (lines[1] if len(lines) > 1 else lines[0]).strip()


def load_model(path: str | os.PathLike, *, dropout: float | None = None, overrides: dict | None = None,
               device: torch.device | str = "cpu") -> tuple[Denoiser, ModelInfo]:
    """Rebuild a denoiser from a model folder (or run folder). ``dropout`` overrides the stored value, and
    ``overrides`` other network options (e.g. EDM2's ``dropout_res``); the weights must still fit."""
    folder = resolve_model_folder(path)
    info = _read_model_info(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors: the model folder is incomplete")
    net = build_from_info(info, dropout=dropout, overrides=overrides)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}): the model folder is damaged") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        why = _mismatch(e).rstrip(".")
        if overrides:
            raise CheckpointError(f"{weights} does not fit its network with --network.kwargs "
                                  f"{', '.join(sorted(overrides))} laid over its config.json ({why}): drop those that "
                                  f"change the architecture (ones that keep the weights, such as EDM2's dropout_res, "
                                  f"are fine)"
                                  ) from None
        raise CheckpointError(f"{weights} does not match the network in config.json ({why})") from None
    denoiser = Denoiser(net, sigma_data=info.sigma_data, scalings=info.scalings, sigma_min=info.sigma_min)
    return denoiser.to(device).eval(), info


# ---------------------------------------------------------------------------------------------
# Training states.


def state_path(run_dir: str | os.PathLike, nimg: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"training-state-{nimg:012d}.pt"


def list_states(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete training states in a run folder, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = STATE_PATTERN.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_state(run_dir: str | os.PathLike, nimg: int, state: dict[str, Any], keep: int) -> Path:
    path = state_path(run_dir, nimg)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if keep > 0:
        for _, old in list_states(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable state
        raise CheckpointError(f"{path} is not a readable training state ({type(e).__name__}): delete it to resume "
                              f"from the previous one") from None


def state_emas(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA networks' weights held by a training state, by name (``ema-0.995``, ``ema-std0.100``, ...),
    in the order the run keeps them (its fixed EMA first)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for member in state.get("ema", {}).values():
        out.update({name: sd for name, sd in member.items() if isinstance(sd, dict)})
    return out


def _run_state(run_dir: Path, nimg: int | None) -> tuple[int, Path]:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist or is not a folder: pass the folder of an `ectune pretrain` / "
                              f"`tune` / `train-ict` run")
    states = list_states(run_dir)
    if not states:
        raise CheckpointError(f"{run_dir} holds no training state (checkpoints/training-state-*.pt): pass the folder "
                              f"of an `ectune pretrain` / `tune` / `train-ict` run")
    if nimg is None:
        return states[-1]
    for n, path in states:
        if n == nimg:
            return n, path
    raise CheckpointError(f"{run_dir} has no training state at {nimg} images: it has "
                          f"{', '.join(str(n) for n, _ in states)}")


def run_emas(run_dir: str | os.PathLike, nimg: int | None = None) -> tuple[int, list[str], str]:
    """Images seen, EMA names and the name the run exports (its model/) for a run's training state at
    ``nimg`` (default: the latest)."""
    run_dir = Path(run_dir)
    n, path = _run_state(run_dir, nimg)
    names = list(state_emas(load_state(path)))
    try:
        exported = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["ema"]["export"]
    except (OSError, ValueError, KeyError, TypeError):
        exported = None
    return n, names, exported or (names[0] if names else "")


def export_ema(run_dir: str | os.PathLike, name: str, dest: str | os.PathLike | None = None,
               nimg: int | None = None) -> Path:
    """Write the EMA ``name`` of a run's training state at ``nimg`` (default: the latest) as a model folder
    ``dest`` (default ``RUN/model-NAME``), e.g. one of the power-function EMAs of ``--ema.stds``.

    The network description comes from the run's exported model (RUN/model/config.json), with ``nimg``
    and ``ema`` recording where the weights come from. The weights are checked against that network
    before anything is written; ``dest`` must be new or empty, and ends up complete or untouched.
    """
    run_dir = Path(run_dir)
    n, path = _run_state(run_dir, nimg)
    if not (run_dir / "model" / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has a training state but no exported model (model/config.json), which "
                              f"describes the network: resume the run (--resume {run_dir}) to write it")
    info = _read_model_info(run_dir / "model")
    emas = state_emas(load_state(path))
    if name not in emas:
        raise CheckpointError(f"the training state at {n} images has no EMA {name!r}: choose one of "
                              f"{', '.join(emas) or '(none)'}")
    net = build_from_info(info)
    try:
        net.load_state_dict(emas[name], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"EMA {name!r} does not match the network in {run_dir / 'model' / 'config.json'} "
                              f"({_mismatch(e)}): model/ is not from this run's training; resume the run "
                              f"(--resume {run_dir}) to export it again") from None
    info = replace(info, extra={**info.extra, "nimg": n, "ema": name})
    dest = Path(dest) if dest is not None else run_dir / f"model-{name}"
    return write_folder_atomic(dest, "model", lambda tmp: save_model(tmp, net, info))
