"""Exponential moving averages of network weights.

Two kinds sharing one small interface (``update(net, nimg, batch)``, ``nets()``, ``state_dict()`` /
``load_state_dict()``), as in EDM2:

- :class:`FixedEMA`: p_ema = beta p_ema + (1 - beta) p_net every update (ECT CIFAR-10: 0.9999);
- :class:`PowerFunctionEMA`: EDM2's power-function EMA with several relative stds tracked at once,
  beta = (1 - batch/nimg)^(gamma + 1) (EDM2 Eq. 2-3), restartable (ECT ImageNet 64 restarts it at the
  first tuning step).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ectune import schedules


def power_ema_name(std: float) -> str:
    """The name of the power-function EMA of relative std ``std`` (in states, exports and --ema)."""
    return f"ema-std{std:.3f}"


def _copy_frozen(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def _lerp_into(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """p_ema <- beta p_ema + (1 - beta) p_net, for parameters; buffers are copied."""
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(ema_params, net_params)):
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)  # one fused call, not one per tensor
    else:
        for p_ema, p_net in zip(ema_params, net_params):
            p_ema.lerp_(p_net.to(p_ema.dtype), 1.0 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


class FixedEMA:
    """Fixed-decay EMA. ``beta`` is per update (one optimiser step)."""

    def __init__(self, net: nn.Module, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.ema = _copy_frozen(net)

    def update(self, net: nn.Module, nimg: int, batch: int) -> None:
        _lerp_into(self.ema, net, self.beta)

    def nets(self) -> dict[str, nn.Module]:
        return {f"ema-{self.beta:g}": self.ema}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: net.state_dict() for name, net in self.nets().items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, net in self.nets().items():
            net.load_state_dict(state[name])


class PowerFunctionEMA:
    """EDM2 power-function EMA tracking several relative stds (e.g. 0.010, 0.050, 0.100).

    ``nimg`` passed to :meth:`update` is the number of images seen after this update, counted from
    the last :meth:`restart`.
    """

    def __init__(self, net: nn.Module, stds: tuple[float, ...] = (0.010, 0.050, 0.100)) -> None:
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(schedules.power_ema_std_to_exp(s) for s in self.stds)
        self.emas = [_copy_frozen(net) for _ in self.stds]
        self.nimg_offset = 0

    def restart(self, net: nn.Module, nimg: int) -> None:
        """Reset every average to the current weights and count images from ``nimg``."""
        self.nimg_offset = int(nimg)
        for ema in self.emas:
            _lerp_into(ema, net, 0.0)

    def update(self, net: nn.Module, nimg: int, batch: int) -> None:
        for ema, gamma in zip(self.emas, self.gammas):
            _lerp_into(ema, net, schedules.power_ema_beta(nimg - self.nimg_offset, batch, gamma))

    def nets(self) -> dict[str, nn.Module]:
        return {power_ema_name(std): ema for std, ema in zip(self.stds, self.emas)}

    def state_dict(self) -> dict:
        state = {name: net.state_dict() for name, net in self.nets().items()}
        state["nimg_offset"] = torch.tensor(self.nimg_offset, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, net in self.nets().items():
            net.load_state_dict(state[name])
        self.nimg_offset = int(state["nimg_offset"])


class EMAGroup:
    """Several EMAs updated together (e.g. a fixed 0.9999 EMA beside power-function EMAs)."""

    def __init__(self, members: list[FixedEMA | PowerFunctionEMA]) -> None:
        self.members = members

    def update(self, net: nn.Module, nimg: int, batch: int) -> None:
        for m in self.members:
            m.update(net, nimg, batch)

    def nets(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for m in self.members:
            out.update(m.nets())
        return out

    def state_dict(self) -> dict:
        return {str(i): m.state_dict() for i, m in enumerate(self.members)}

    def load_state_dict(self, state: dict) -> None:
        for i, m in enumerate(self.members):
            m.load_state_dict(state[str(i)])
