"""Network backbones F(x, c_noise, labels): the EDM-compatible SongUNet and a small MLP.

Every backbone takes ``forward(x, noise_labels, class_labels=None, ...)`` and returns the raw output
F with the shape of ``x``; the preconditioning (c_skip, c_out, c_in, c_noise) lives in
:mod:`ectune.precond`. Each carries ``img_resolution``, ``img_channels`` and ``label_dim``.
"""

from __future__ import annotations

import inspect

from torch import nn

from ectune.errors import ConfigError
from ectune.interop.diffusers_unet import DiffusersUNet  # imports diffusers only when built (optional extra)
from ectune.networks.dropout import DropoutMasks, SharedDropout, record_dropout, replay_dropout
from ectune.networks.edm2unet import EDM2UNet
from ectune.networks.mlp import MLP
from ectune.networks.songunet import MNIST_CONFIG, SongUNet

__all__ = [
    "MLP",
    "MNIST_CONFIG",
    "NETWORKS",
    "DropoutMasks",
    "SharedDropout",
    "SongUNet",
    "build_network",
    "record_dropout",
    "replay_dropout",
]

NETWORKS: dict[str, type[nn.Module]] = {"songunet": SongUNet, "mlp": MLP, "edm2unet": EDM2UNet,
                                        "diffusers_unet": DiffusersUNet}


def build_network(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` in :data:`NETWORKS` with constructor ``kwargs``.

    Raises:
        ConfigError: unknown ``name``, an unknown keyword, a missing required keyword, or values the
            constructor refuses (e.g. a dropout of 1.5, a float channel count, 0 channels per head).
    """
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; valid names: {', '.join(sorted(NETWORKS))}")
    cls = NETWORKS[name]
    params = {p.name: p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"network {name!r} has no option {unknown[0]!r}; valid options: {', '.join(params)}")
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ConfigError(f"network {name!r} needs the option {missing[0]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, KeyError, IndexError) as e:
        why = str(e) or type(e).__name__
        raise ConfigError(f"network {name!r} cannot be built from its options ({why}): check the values of "
                          f"--network.kwargs (ectune {name} options: {', '.join(params)})") from None
