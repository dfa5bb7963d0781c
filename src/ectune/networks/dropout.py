"""Dropout whose masks are shared between two passes of the same network, on any device.

ECT (DESIGN.md section 4, step 4) evaluates the student D(x_t, t) with gradients and the target
D(x_r, r) without, and the two passes must use the same dropout masks. The official code replays
the CUDA RNG state; here the masks are explicit: the student pass records every mask it draws
(from a torch.Generator that the caller passes in), and the target pass replays them, indexed by
the subset of samples it runs on, so samples with r = 0 need not be run at all.

Usage::

    with record_dropout(generator) as masks:
        d_t = denoiser(x_t, t)                       # draws and stores masks
    with torch.no_grad(), replay_dropout(masks, index):
        d_r = denoiser(x_r[index], r[index])         # reuses masks[index]

Outside these contexts :class:`SharedDropout` behaves like ``torch.nn.Dropout`` (global RNG in
training mode, identity in eval mode).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ectune.errors import ConfigError

_ACTIVE: contextvars.ContextVar[DropoutMasks | None] = contextvars.ContextVar("ectune_dropout", default=None)


class DropoutMasks:
    """The masks drawn in one recorded pass, in call order, ready to be replayed.

    Each entry is a boolean "keep" tensor with the shape of the activation it was drawn for
    (batch first). Masks are keyed by call order, so a pass that calls a layer twice still replays.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self.masks: list[torch.Tensor] = []
        self._mode = "record"
        self._index: torch.Tensor | None = None
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.masks)

    def _apply(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if self._mode == "record":
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= p
            self.masks.append(keep)
        else:
            if self._cursor >= len(self.masks):
                raise RuntimeError("replay pass reached more dropout layers than the recorded pass; "
                                   "the two passes must run the same network")
            keep = self.masks[self._cursor]
            self._cursor += 1
            if self._index is not None:
                keep = keep[self._index]
            if keep.shape != x.shape:
                raise RuntimeError(f"recorded dropout mask {tuple(keep.shape)} does not match the replayed "
                                   f"activation {tuple(x.shape)}")
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class SharedDropout(nn.Module):
    """``nn.Dropout`` that records or replays its masks inside :func:`record_dropout` / :func:`replay_dropout`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        ctx = _ACTIVE.get()
        if ctx is None:
            return F.dropout(x, self.p, training=True)
        return ctx._apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextlib.contextmanager
def record_dropout(generator: torch.Generator | None = None) -> Iterator[DropoutMasks]:
    """Record every dropout mask drawn inside the block, drawing them from ``generator``."""
    masks = DropoutMasks(generator)
    token = _ACTIVE.set(masks)
    try:
        yield masks
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def replay_dropout(masks: DropoutMasks, index: torch.Tensor | None = None) -> Iterator[DropoutMasks]:
    """Replay ``masks`` inside the block; ``index`` selects the samples (rows) the pass runs on."""
    replay = DropoutMasks(masks.generator)
    replay.masks = masks.masks
    replay._mode = "replay"
    replay._index = index
    token = _ACTIVE.set(replay)
    try:
        yield replay
    finally:
        _ACTIVE.reset(token)
    if replay._cursor not in (0, len(masks.masks)):
        raise RuntimeError(f"replay pass used {replay._cursor} of {len(masks.masks)} recorded dropout masks")
