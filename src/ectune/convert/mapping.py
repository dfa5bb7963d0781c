"""Map an unpickled EDM / EDM2 / ECT network record onto an ectune backbone and model description.

Supported (wrapper around network -> ectune network, model folder settings):

====================================  ===============  ======  ========  =================================
snapshot network                      ectune network   method  scalings  sigma_min
====================================  ===============  ======  ========  =================================
EDM ``EDMPrecond(SongUNet)``          ``songunet``     edm     edm       0.002 (ectune's default; unused)
ECT CIFAR-10 ``ECMPrecond(SongUNet)`` ``songunet``     ect     cm        the wrapper's (0.003)
EDM2 ``Precond(UNet)``, logvar head   ``edm2unet``     edm     edm       0.002 (unused)
ECT ImageNet 64 ``Precond(UNet)``     ``edm2unet``     ect     edm       0.002
====================================  ===============  ======  ========  =================================

The official ECT CIFAR-10 code trains with the "edm" scalings and samples with "cm" ones
(``ECMPrecond`` switches on ``module.training``); a converted ECT model is for sampling, so its folder
says "cm" with the wrapper's sigma_min (DESIGN.md section 2). ECT's ImageNet-64 ``Precond`` is EDM2's
without the learned-uncertainty head: that absence is how an ECT model is told from an EDM2
diffusion model (the class names are the same); pass ``method`` to override the guess.

EDM's VP / VE baselines (``VPPrecond``, ``VEPrecond``) and ADM networks (``DhariwalUNet``) are
refused: ectune's denoiser implements neither their preconditioning nor that architecture.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ectune.checkpoint import ModelInfo
from ectune.convert.safe_pickle import ModuleRecord, PersistentObject
from ectune.errors import CheckpointError, ConfigError
from ectune.networks import NETWORKS, build_network

__all__ = ["ConvertedNetwork", "convert_network", "module_tensors", "snapshot_network"]

#: Wrapper class -> (inner attribute, inner class, ectune network).
_SUPPORTED = {
    "EDMPrecond": ("model", "SongUNet", "songunet"),
    "ECMPrecond": ("model", "SongUNet", "songunet"),
    "Precond": ("unet", "UNet", "edm2unet"),
}
_REFUSED_PRECOND = ("VPPrecond", "VEPrecond", "iDDPMPrecond")
_SUPPORTED_TEXT = ("EDMPrecond or ECMPrecond around SongUNet (EDM, ECT CIFAR-10) and Precond around UNet "
                   "(EDM2, ECT ImageNet 64)")
#: The 2-step intermediate noise level the official ECT code uses (DESIGN.md section 6).
_MID_SIGMA = {"songunet": 0.821, "edm2unet": 1.526}


@dataclass(frozen=True)
class ConvertedNetwork:
    """An ectune backbone holding a snapshot's weights, with its model-folder description."""

    net: nn.Module
    info: ModelInfo
    source: str  # e.g. "EDMPrecond(SongUNet)"


def snapshot_network(obj: Any, name: str) -> PersistentObject:
    """The network record of an unpickled snapshot: ``obj['ema']`` of a snapshot dict, or ``obj`` itself."""
    if isinstance(obj, dict):
        if "ema" not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(f"{name} holds a dict without an 'ema' network (keys: {keys}): "
                                  f"pass an EDM / EDM2 / ECT network snapshot (network-snapshot-*.pkl)")
        obj = obj["ema"]
    if not isinstance(obj, PersistentObject):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not an EDM / EDM2 / ECT network: "
                              f"pass a network snapshot (network-snapshot-*.pkl)")
    return obj


def module_tensors(record: PersistentObject | ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a pickled module tree, with the usual dotted state-dict names."""
    state = record.state
    parts = {key: state.get(key) for key in ("_parameters", "_buffers", "_modules")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            raise CheckpointError(f"the pickled {record.class_name} {prefix.rstrip('.') or '(top level)'} "
                                  f"is not a torch module (its state has no {key} dict)")
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for key, value in parts[kind].items():
            if value is None or (kind == "_buffers" and key in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{key} in the pickle is a {type(value).__name__}, not a tensor")
            out[f"{prefix}{key}"] = value
    for key, child in parts["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, ModuleRecord)):
            raise CheckpointError(f"submodule {prefix}{key} in the pickle is a {type(child).__name__}, "
                                  f"which the converter does not know")
        out.update(module_tensors(child, f"{prefix}{key}."))
    return out


def _plain(value: Any, where: str) -> Any:
    """A JSON-ready copy of a recorded constructor argument."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise CheckpointError(f"the recorded constructor argument {where} is a {type(value).__name__}, "
                          f"which ectune cannot store")


def _init_kwargs(record: PersistentObject, name: str) -> dict[str, Any]:
    args = record.state.get("_init_args")
    kwargs = record.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise CheckpointError(f"{name}: the {record.class_name} has no recorded keyword constructor arguments "
                              f"(init_kwargs), so its architecture cannot be read")
    return {str(k): _plain(v, f"{record.class_name}.{k}") for k, v in kwargs.items()}


def _submodule(record: PersistentObject, attr: str) -> Any:
    modules = record.state.get("_modules")
    return modules.get(attr) if isinstance(modules, dict) else None


def _number(record: PersistentObject, key: str, default: float) -> float:
    """A float attribute of a wrapper: its stored value, else its init_kwargs entry, else ``default``."""
    for source in (record.state, record.state.get("_init_kwargs") or {}):
        value = source.get(key) if isinstance(source, dict) else None
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(float(value)):
            return float(value)
    return default


def _network_kwargs(network: str, recorded: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """The full ectune constructor arguments: the recorded ones, checked, plus ectune's defaults for the rest."""
    params = list(inspect.signature(NETWORKS[network].__init__).parameters.values())[1:]
    known = {p.name: p for p in params}
    unknown = [k for k in recorded if k not in known]
    if unknown:
        raise CheckpointError(f"{name}: the {source} was built with the option {unknown[0]}={recorded[unknown[0]]!r}, "
                              f"which ectune's {network} does not implement")
    kwargs = {}
    for p in params:
        if p.name in recorded:
            kwargs[p.name] = recorded[p.name]
        elif p.default is not inspect.Parameter.empty:
            kwargs[p.name] = _plain(p.default, p.name)
        else:
            raise CheckpointError(f"{name}: the {source} does not record its {p.name}, which ectune's {network} needs")
    return kwargs


def _check_tensors(source: dict[str, torch.Tensor], net: nn.Module, name: str, network: str) -> dict[str, torch.Tensor]:
    """Source tensors keyed and shaped exactly like ``net``'s state dict (floats as float32), or CheckpointError."""
    expected = net.state_dict()
    for key, ref in expected.items():
        if key not in source:
            raise CheckpointError(f"{name}: the network has no tensor {key!r}, which ectune's {network} expects "
                                  f"(the architecture does not match)")
        if tuple(source[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}: tensor {key!r} has shape {list(source[key].shape)} but ectune's {network} "
                                  f"expects {list(ref.shape)} (the architecture does not match)")
    extra = [key for key in source if key not in expected]
    if extra:
        raise CheckpointError(f"{name}: the network has a tensor {extra[0]!r} that ectune's {network} does not "
                              f"(the architecture does not match)")
    out = {}
    for key, ref in expected.items():
        value = source[key]
        if value.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {value.dtype} but ectune's {network} "
                                  f"expects {ref.dtype}")
        out[key] = value.to(ref.dtype)  # EDM2 publishes fp16 weights: ectune keeps float32
    return out


def convert_network(obj: Any, name: str = "the file", method: str | None = None) -> ConvertedNetwork:
    """Build the ectune backbone for an unpickled snapshot and load its weights (strictly).

    Args:
        obj: what :func:`ectune.convert.safe_pickle.load_pickle` returned.
        name: the file name, for messages.
        method: "edm" or "ect" to label the model folder; ``None`` infers it (see the module docstring).

    Raises:
        CheckpointError: an unsupported network, unknown constructor options, or tensors whose
            names or shapes differ from the ectune network's (naming the first one).
    """
    if method not in (None, "edm", "ect"):
        raise CheckpointError(f"method must be 'edm' or 'ect', got {method!r}")
    wrapper = snapshot_network(obj, name)
    if wrapper.class_name in _REFUSED_PRECOND:
        raise CheckpointError(f"{name} holds a {wrapper.class_name} network, EDM's variance-preserving / -exploding "
                              f"baseline preconditioning, which ectune's denoiser does not implement: convert an "
                              f"EDMPrecond network (EDM's edm-*.pkl) instead")
    if wrapper.class_name not in _SUPPORTED:
        raise CheckpointError(f"{name} holds a {wrapper.class_name} network, which ectune cannot convert; "
                              f"supported: {_SUPPORTED_TEXT}")
    attr, inner_class, network = _SUPPORTED[wrapper.class_name]
    inner = _submodule(wrapper, attr)
    if not isinstance(inner, PersistentObject):
        raise CheckpointError(f"{name}: the {wrapper.class_name} has no {attr!r} network inside it")
    source = f"{wrapper.class_name}({inner.class_name})"
    if inner.class_name != inner_class:
        raise CheckpointError(f"{name} holds a {source} network, which ectune cannot convert; "
                              f"supported: {_SUPPORTED_TEXT}")

    recorded = _init_kwargs(inner, name)
    tensors = module_tensors(wrapper)
    if network == "songunet":
        if recorded.get("in_channels") != recorded.get("out_channels"):
            raise CheckpointError(f"{name}: the SongUNet maps {recorded.get('in_channels')} channels to "
                                  f"{recorded.get('out_channels')}; a denoiser needs equal counts")
        prefix = f"{attr}."
        outside = [k for k in tensors if not k.startswith(prefix)]
        if outside:
            raise CheckpointError(f"{name}: the {wrapper.class_name} has a tensor {outside[0]!r} outside its network, "
                                  f"which ectune's denoiser does not use")
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        channels = recorded.get("in_channels")
    else:
        fourier = _submodule(wrapper, "logvar_fourier")
        logvar_channels = 0
        if isinstance(fourier, PersistentObject):
            freqs = module_tensors(fourier).get("freqs")
            logvar_channels = int(freqs.shape[0]) if freqs is not None and freqs.ndim == 1 else -1
        recorded["logvar_channels"] = logvar_channels
        channels = recorded.get("img_channels")

    kwargs = _network_kwargs(network, recorded, name, source)
    try:
        net = build_network(network, **kwargs)
    except ConfigError as e:
        raise CheckpointError(f"{name}: ectune cannot build the recorded {source} architecture ({e})") from None
    net.load_state_dict(_check_tensors(tensors, net, name, network), strict=True)

    sigma_data = _number(wrapper, "sigma_data", 0.5)
    if not sigma_data > 0:
        raise CheckpointError(f"{name}: the {wrapper.class_name} records sigma_data={sigma_data}, "
                              f"which is not positive")
    if wrapper.class_name == "ECMPrecond":
        inferred, scalings, sigma_min = "ect", "cm", _number(wrapper, "sigma_min", 0.003)
    elif wrapper.class_name == "Precond" and kwargs["logvar_channels"] == 0:
        inferred, scalings, sigma_min = "ect", "edm", 0.002
    else:
        inferred, scalings, sigma_min = "edm", "edm", 0.002
    resolution = int(kwargs["img_resolution"])
    info = ModelInfo(
        network=network, kwargs=kwargs, sigma_data=sigma_data, scalings=scalings, sigma_min=sigma_min,
        method=method or inferred, data_shape=(int(channels), resolution, resolution),
        label_dim=int(kwargs.get("label_dim") or 0), mid_sigma=_MID_SIGMA[network],
        extra={"converted_from": {"file": Path(name).name, "network": source,
                                  "persistence_version": wrapper.version}},
    )
    return ConvertedNetwork(net=net, info=info, source=source)
