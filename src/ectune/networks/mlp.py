"""A small residual MLP denoiser backbone for low-dimensional data (2-D toy distributions, flat vectors).

Shapes: N = batch, D = ``dim`` (data dimension), W = ``hidden_dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ectune.errors import ConfigError
from ectune.networks.dropout import SharedDropout
from ectune.networks.songunet import FourierEmbedding, PositionalEmbedding

__all__ = ["MLP", "MLPBlock"]


class MLPBlock(nn.Module):
    """Pre-norm residual block conditioned on an embedding: ``[N, W], [N, W] -> [N, W]``::

        h = silu(fc0(silu(norm(x))) + affine(emb))
        y = x + fc1(dropout(h))
    """

    def __init__(self, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc0 = nn.Linear(width, width)
        self.affine = nn.Linear(width, width)
        self.drop = SharedDropout(dropout)
        self.fc1 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc0(F.silu(self.norm(x))) + self.affine(emb))
        return x + self.fc1(self.drop(h))


class MLP(nn.Module):
    """Residual MLP: ``forward(x [N, D], noise_labels [N], class_labels [N, label_dim]) -> F [N, D]``.

    Args:
        dim: Data dimension D (2 for 2-D toy data). ``x`` may also be ``[N, *shape]`` with
            ``prod(shape) == D``; the output then has the same shape.
        hidden_dim: Width W of the residual stream and of the conditioning vector.
        num_blocks: Number of residual blocks.
        noise_channels: Channels of the sinusoidal / Fourier embedding of ``noise_labels``.
        label_dim: Number of classes, 0 = unconditional.
        dropout: Dropout probability inside every block (a :class:`SharedDropout`, so the ECT /
            iCT student and target passes can share masks).
        embedding_type: ``"positional"`` or ``"fourier"``.

    The output layer starts at zero, so ``F = 0`` at initialisation (the denoiser starts as
    ``c_skip * x``).
    """

    def __init__(self, dim: int = 2, hidden_dim: int = 256, num_blocks: int = 4, noise_channels: int = 64,
                 label_dim: int = 0, dropout: float = 0.0, embedding_type: str = "positional") -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1 or num_blocks < 0:
            raise ConfigError(f"MLP needs dim >= 1, hidden_dim >= 1 and num_blocks >= 0, got "
                              f"dim={dim}, hidden_dim={hidden_dim}, num_blocks={num_blocks}")
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        elif embedding_type == "fourier":
            self.map_noise = FourierEmbedding(noise_channels)
        else:
            raise ConfigError(f"embedding_type={embedding_type!r} is not one of positional, fourier")
        self.img_resolution = 0
        self.img_channels = dim
        self.dim = dim
        self.label_dim = label_dim

        self.map_label = nn.Linear(label_dim, noise_channels, bias=False) if label_dim else None
        self.map_layer0 = nn.Linear(noise_channels, hidden_dim)
        self.map_layer1 = nn.Linear(hidden_dim, hidden_dim)
        self.inp = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList([MLPBlock(hidden_dim, dropout) for _ in range(num_blocks)])
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output ``F`` with the shape of ``x``.

        Args:
            x: ``[N, D]`` or ``[N, *shape]`` with ``prod(shape) == D``.
            noise_labels: ``[N]`` (or a scalar, broadcast) c_noise values.
            class_labels: ``[N, label_dim]`` one-hot (or ``[N]`` integer indices); ``None`` means
                the all-zero label. Ignored when ``label_dim == 0``.
        """
        n = x.shape[0]
        flat = x.reshape(n, -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"MLP built for dim={self.dim} got input of shape {tuple(x.shape)}")
        noise_labels = noise_labels.reshape(-1).to(flat.dtype)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(n)
        emb = self.map_noise(noise_labels)
        if self.map_label is not None and class_labels is not None:
            if not class_labels.is_floating_point():
                class_labels = F.one_hot(class_labels.long().reshape(-1), self.label_dim)
            emb = emb + self.map_label(class_labels.to(flat.dtype) * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = self.inp(flat)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)
