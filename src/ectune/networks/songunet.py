"""The DDPM++ / NCSN++ U-Net of Song et al. (2021), in the form EDM (Karras et al., 2022) trains it.

Everything here is written for ectune; the layer names, tensor shapes and formulas follow EDM's
``SongUNet`` so that the state dict of a published EDM network (the CIFAR-10 DDPM++ checkpoints
that ECT tunes) loads into :class:`SongUNet` with ``load_state_dict(strict=True)`` after dropping
the ``model.`` prefix of EDM's preconditioning wrapper.

Shapes: N = batch, C = channels, H = W = resolution, E = embedding channels.

Configurations
--------------
DDPM++ CIFAR-10 (EDM ``--arch=ddpmpp``, 55.7M parameters)::

    SongUNet(img_resolution=32, in_channels=3, out_channels=3, label_dim=0 or 10, augment_dim=9,
             model_channels=128, channel_mult=[2, 2, 2], dropout=0.13)

NCSN++ CIFAR-10 (EDM ``--arch=ncsnpp``)::

    SongUNet(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9, model_channels=128,
             channel_mult=[2, 2, 2], embedding_type="fourier", channel_mult_noise=2,
             encoder_type="residual", resample_filter=[1, 3, 3, 1], dropout=0.13)

MNIST 28x28 (28 -> 14 -> 7; recommended for CPU work, 3,280,209 parameters, see :data:`MNIST_CONFIG`)::

    SongUNet(img_resolution=28, in_channels=1, out_channels=1, model_channels=16,
             channel_mult=[1, 2, 8], num_blocks=2, attn_resolutions=[7], dropout=0.1)

The compute sits at 28x28 and 14x14, so the 128 channels at 7x7 add parameters almost for free
(0.27 GMAC per image forward; twice the training images/s of model_channels=32, channel_mult=[1, 2, 4],
4.1M parameters, on this project's 2-core CPU). The resolution must halve exactly at every level: 28 allows at
most three levels (7 cannot be halved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ectune.errors import ConfigError
from ectune.networks._checks import check_count_lists, check_counts
from ectune.networks.dropout import SharedDropout

__all__ = [
    "MNIST_CONFIG",
    "Conv2d",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "SongUNet",
    "UNetBlock",
]

#: Suggested small configuration for 1x28x28 images (MNIST, Fashion-MNIST): 3,280,209 parameters.
MNIST_CONFIG: Mapping[str, Any] = MappingProxyType(dict(
    img_resolution=28, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2, 8),
    num_blocks=2, attn_resolutions=(7,), dropout=0.1,
))


# ----------------------------------------------------------------------------------------------
# Initialisation


def _random_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of ``shape`` drawn by one of the usual variance-scaling rules (Glorot / He)."""
    if mode == "xavier_uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "xavier_normal":
        return torch.randn(shape) * math.sqrt(2.0 / (fan_in + fan_out))
    if mode == "kaiming_uniform":
        bound = math.sqrt(3.0 / fan_in)
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return torch.randn(shape) * math.sqrt(1.0 / fan_in)
    raise ConfigError(f"unknown init_mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform "
                      "or kaiming_normal")


def _init_parameter(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, gain: float) -> nn.Parameter:
    if gain == 0:
        return nn.Parameter(torch.zeros(shape))
    return nn.Parameter(_random_init(shape, mode, fan_in, fan_out) * gain)


# ----------------------------------------------------------------------------------------------
# Layers


class Linear(nn.Module):
    """Fully connected layer, ``[N, in_features] -> [N, out_features]``.

    Parameters ``weight [out_features, in_features]`` and (optionally) ``bias [out_features]``,
    scaled at initialisation by ``init_weight`` and ``init_bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _init_parameter([out_features, in_features], gain=init_weight, **fans)
        self.bias = _init_parameter([out_features], gain=init_bias, **fans) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _fir_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR kernel ``[1, 1, K, K]`` from 1-D taps, normalised to sum to one."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    if t.ndim != 1 or t.numel() < 1 or float(t.sum()) == 0.0:
        raise ConfigError(f"resample_filter must be a non-empty list of taps with a non-zero sum, got {list(taps)}")
    k = torch.outer(t, t) / t.sum() ** 2
    return k[None, None]


class Conv2d(nn.Module):
    """2-D convolution ``[N, in_channels, H, W] -> [N, out_channels, H', W']`` with optional 2x resampling.

    ``kernel = 0`` gives a pure resampling layer (no weights). With ``up`` (``down``) the input is
    first upsampled (downsampled) by 2 with the separable FIR filter ``resample_filter``, then
    convolved (``H' = 2H`` or ``H // 2``, "same" padding otherwise). With ``down``,
    ``fused_resample`` instead convolves at the input resolution and then downsamples, as NCSN++'s
    residual encoder path does. The normalised filter is the buffer ``resample_filter [1, 1, K, K]``,
    present (and saved in the state dict) only when the layer resamples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        if up and down:
            raise ConfigError("a Conv2d layer cannot both upsample and downsample")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        k2 = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * k2, fan_out=out_channels * k2)
        self.weight = self.bias = None
        if kernel:
            self.weight = _init_parameter([out_channels, in_channels, kernel, kernel], gain=init_weight, **fans)
            if bias:
                self.bias = _init_parameter([out_channels], gain=init_bias, **fans)
        if up or down:
            self.register_buffer("resample_filter", _fir_kernel(resample_filter))
        else:
            self.resample_filter = None

    def _upsample(self, x: torch.Tensor, fir: torch.Tensor, padding: int) -> torch.Tensor:
        channels = x.shape[1]
        # Transposed depthwise convolution with stride 2; the factor 4 restores the mean (the
        # filter sums to one, but only a quarter of the taps land on each output pixel).
        return F.conv_transpose2d(x, (fir * 4).expand(channels, 1, -1, -1), stride=2, padding=padding, groups=channels)

    def _downsample(self, x: torch.Tensor, fir: torch.Tensor, padding: int) -> torch.Tensor:
        channels = x.shape[1]
        return F.conv2d(x, fir.expand(channels, 1, -1, -1), stride=2, padding=padding, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        fir = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        half_w = 0 if w is None else w.shape[-1] // 2
        half_f = 0 if fir is None else (fir.shape[-1] - 1) // 2

        # Upsampling always filters first and convolves at the high resolution, so a "fused" up
        # layer is the plain one. (EDM's fused-up branch has the same output size; with a 4-tap
        # filter it convolves the uncropped upsampled border where this pads with zeros, so border
        # values differ. No EDM network builds a fused up layer: NCSN++ fuses only downsampling.)
        if w is not None and self.fused_resample and self.down:
            x = self._downsample(F.conv2d(x, w, padding=half_w + half_f), fir, padding=0)
        else:
            if self.up:
                x = self._upsample(x, fir, padding=half_f)
            elif self.down:
                x = self._downsample(x, fir, padding=half_f)
            if w is not None:
                x = F.conv2d(x, w, padding=half_w)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[:, None, None]
        return x

    def extra_repr(self) -> str:
        flags = "".join([", up" if self.up else "", ", down" if self.down else "",
                         ", fused" if self.fused_resample else ""])
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}{flags}"


class GroupNorm(nn.Module):
    """Group normalisation of ``[N, C, H, W]`` with ``min(num_groups, C // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        if num_channels % self.num_groups:
            raise ConfigError(f"GroupNorm: {num_channels} channels do not split into {self.num_groups} groups; "
                              "use a channel count that is a multiple of 4 (at most 128) or of 32")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}"


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al., 2017): ``[N] -> [N, num_channels]``.

    Output ``[cos(x * f_0..f_{h-1}), sin(x * f_0..f_{h-1})]`` with ``h = num_channels // 2`` and
    frequencies ``f_i = max_positions ** (-i / (h - endpoint))``, so ``endpoint=True`` makes the
    last frequency exactly ``1 / max_positions``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ConfigError(f"the noise embedding needs an even number of channels >= 2, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        denom = max(half - int(self.endpoint), 1)
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / denom
        freqs = torch.pow(1.0 / self.max_positions, exponent).to(x.dtype)
        angles = x[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar per sample (NCSN++): ``[N] -> [N, num_channels]``.

    Output ``[cos(2 pi x f), sin(2 pi x f)]`` with the buffer ``freqs [num_channels // 2]`` drawn
    once from ``N(0, scale^2)`` and saved in the state dict.
    """

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ConfigError(f"the noise embedding needs an even number of channels >= 2, got {num_channels}")
        self.num_channels = num_channels
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x[:, None] * (2 * math.pi * self.freqs).to(x.dtype)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ----------------------------------------------------------------------------------------------
# Residual block


class UNetBlock(nn.Module):
    """Residual block conditioned on an embedding, with optional 2x resampling and self-attention.

    ``forward(x [N, in_channels, H, W], emb [N, emb_channels]) -> [N, out_channels, H', W']``::

        h = conv0(silu(norm0(x)))                            # resamples when up / down
        h = silu(norm1(h + affine(emb)))                     # adaptive_scale=False (DDPM++)
        h = silu(norm1(h) * (1 + scale) + shift)             # adaptive_scale=True
        y = (conv1(dropout(h)) + skip(x)) * skip_scale
        y = (proj(attention(norm2(y))) + y) * skip_scale     # when attention

    ``skip`` is a 1x1 convolution (or a pure resampling when ``resample_proj`` is off and the
    channel count is unchanged) and exists only where the shapes change. ``conv1`` and ``proj``
    are initialised with the tiny gain ``zero_init_weight`` so that a new block starts close to
    its skip path. Attention uses ``num_heads`` heads over the H*W positions, softmax in fp32.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init_mode: str = "kaiming_normal", zero_init_weight: float = 0.0,
                 attn_init_weight: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if attention:
            self.num_heads = num_heads if num_heads is not None else max(out_channels // channels_per_head, 1)
            if out_channels % self.num_heads:
                raise ConfigError(f"{out_channels} channels do not split into {self.num_heads} attention heads")
        else:
            self.num_heads = 0
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        dense = dict(init_mode=init_mode)
        tiny = dict(init_mode=init_mode, init_weight=zero_init_weight)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **dense)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **dense)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.drop = SharedDropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **tiny)
        self.skip = None
        if in_channels != out_channels or up or down:
            project = resample_proj or in_channels != out_channels
            self.skip = Conv2d(in_channels, out_channels, kernel=1 if project else 0, **resample, **dense)
        if self.num_heads:
            attn_gain = 1.0 if attn_init_weight is None else attn_init_weight
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init_mode=init_mode, init_weight=attn_gain)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **tiny)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        film = self.affine(emb).to(h.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = film.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + film))
        h = self.conv1(self.drop(h))
        shortcut = x if self.skip is None else self.skip(x)
        y = (h + shortcut) * self.skip_scale
        if self.num_heads:
            y = (self.proj(self._attend(self.norm2(y))) + y) * self.skip_scale
        return y

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over positions: ``[N, C, H, W] -> [N, C, H, W]`` (before ``proj``).

        The ``qkv`` output channels are laid out as ``[head, channel, (q, k, v)]`` (q, k and v of
        one channel are adjacent), which is what published checkpoints expect.
        """
        n, c, hgt, wid = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(n, heads, c // heads, 3, hgt * wid)
        q, k, v = (qkv[:, :, :, i].transpose(2, 3).float() for i in range(3))  # [N, heads, HW, C/heads]
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        return out.transpose(2, 3).reshape(n, c, hgt, wid).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The U-Net


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net: ``forward(x, noise_labels, class_labels, augment_labels) -> F``.

    Args:
        img_resolution: Input and output resolution H = W; must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        in_channels: Channels of ``x``.
        out_channels: Channels of the output.
        label_dim: Number of classes, 0 = unconditional.
        augment_dim: Size of the augmentation-label vector (9 for EDM's CIFAR-10 runs), 0 = none.
        model_channels: Base channel count.
        channel_mult: Channel multiplier per resolution level; the resolution halves per level.
        channel_mult_emb: Embedding channels E = ``model_channels * channel_mult_emb``.
        num_blocks: Residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: Resolutions whose blocks carry self-attention (in the decoder, only the
            last block of the level). The lowest resolution always has one attention block.
        dropout: Dropout probability inside every residual block (a :class:`SharedDropout`).
        label_dropout: Probability of zeroing a sample's class label in training (for
            classifier-free guidance); its masks are shared-dropout masks too.
        embedding_type: ``"positional"`` (DDPM++) or ``"fourier"`` (NCSN++) noise embedding.
        channel_mult_noise: Noise-embedding channels = ``model_channels * channel_mult_noise``.
        encoder_type: ``"standard"`` (DDPM++), ``"skip"`` or ``"residual"`` (NCSN++): how the
            input image is fed to the lower resolutions.
        decoder_type: ``"standard"`` or ``"skip"`` (an output head at every resolution, summed
            after upsampling).
        resample_filter: FIR taps of the 2x resampling: ``[1, 1]`` (DDPM++) or ``[1, 3, 3, 1]`` (NCSN++).

    Module names (``map_noise``, ``map_label``, ``map_augment``, ``map_layer0/1``, ``enc``, ``dec``
    with keys such as ``"32x32_block0"``) and every parameter and buffer shape follow EDM, so
    EDM checkpoints load with ``strict=True``.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        label_dim, augment_dim = label_dim or 0, augment_dim or 0  # None = 0, as some recorded configs have it
        check_counts(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                     model_channels=model_channels, channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                     channel_mult_noise=channel_mult_noise)
        check_counts(0, label_dim=label_dim, augment_dim=augment_dim)
        check_count_lists(channel_mult=channel_mult)
        check_count_lists(0, attn_resolutions=attn_resolutions)
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        levels = len(channel_mult)
        if levels < 1:
            raise ConfigError("channel_mult needs at least one level")
        if img_resolution % (1 << (levels - 1)):
            raise ConfigError(f"img_resolution={img_resolution} cannot be halved {levels - 1} times exactly "
                              f"(channel_mult has {levels} levels); use fewer levels or another resolution")
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout}")

        self.img_resolution = img_resolution
        self.img_channels = in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = float(label_dropout)

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        dense = dict(init_mode="xavier_uniform")
        tiny = dict(init_mode="xavier_uniform", init_weight=1e-5)
        block_args = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init_mode="xavier_uniform", zero_init_weight=1e-5, attn_init_weight=math.sqrt(0.2),
        )

        # Noise, class and augmentation embeddings -> [N, emb_channels].
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **dense) if label_dim else None
        self.label_drop = SharedDropout(label_dropout)
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **dense) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **dense)
        self.map_layer1 = Linear(emb_channels, emb_channels, **dense)

        # Encoder. Each entry of `enc_plan` is (module name, role); block outputs become skips.
        self.enc = nn.ModuleDict()
        self._enc_plan: list[tuple[str, str]] = []
        skip_channels: list[int] = []
        width = in_channels        # channels of the main path
        aux_width = in_channels    # channels of the auxiliary image path (skip / residual encoders)
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self._add(self.enc, self._enc_plan, f"{res}x{res}_conv", "conv",
                          Conv2d(width, model_channels, kernel=3, **dense))
                width = model_channels
                skip_channels.append(width)
            else:
                self._add(self.enc, self._enc_plan, f"{res}x{res}_down", "block",
                          UNetBlock(width, width, down=True, **block_args))
                skip_channels.append(width)
                if encoder_type == "skip":
                    self._add(self.enc, self._enc_plan, f"{res}x{res}_aux_down", "aux_down",
                              Conv2d(aux_width, aux_width, kernel=0, down=True, resample_filter=resample_filter))
                    self._add(self.enc, self._enc_plan, f"{res}x{res}_aux_skip", "aux_skip",
                              Conv2d(aux_width, width, kernel=1, **dense))
                elif encoder_type == "residual":
                    self._add(self.enc, self._enc_plan, f"{res}x{res}_aux_residual", "aux_residual",
                              Conv2d(aux_width, width, kernel=3, down=True, resample_filter=resample_filter,
                                     fused_resample=True, **dense))
                    aux_width = width
            for idx in range(num_blocks):
                new_width = model_channels * mult
                self._add(self.enc, self._enc_plan, f"{res}x{res}_block{idx}", "block",
                          UNetBlock(width, new_width, attention=res in attn_resolutions, **block_args))
                width = new_width
                skip_channels.append(width)

        # Decoder: every "block_cat" entry first concatenates the most recent unused skip.
        self.dec = nn.ModuleDict()
        self._dec_plan: list[tuple[str, str]] = []
        for level in reversed(range(levels)):
            mult = channel_mult[level]
            res = img_resolution >> level
            if level == levels - 1:
                self._add(self.dec, self._dec_plan, f"{res}x{res}_in0", "block",
                          UNetBlock(width, width, attention=True, **block_args))
                self._add(self.dec, self._dec_plan, f"{res}x{res}_in1", "block",
                          UNetBlock(width, width, **block_args))
            else:
                self._add(self.dec, self._dec_plan, f"{res}x{res}_up", "block",
                          UNetBlock(width, width, up=True, **block_args))
            for idx in range(num_blocks + 1):
                new_width = model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self._add(self.dec, self._dec_plan, f"{res}x{res}_block{idx}", "block_cat",
                          UNetBlock(width + skip_channels.pop(), new_width, attention=attention, **block_args))
                width = new_width
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self._add(self.dec, self._dec_plan, f"{res}x{res}_aux_up", "aux_up",
                              Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter))
                self._add(self.dec, self._dec_plan, f"{res}x{res}_aux_norm", "aux_norm", GroupNorm(width, eps=1e-6))
                self._add(self.dec, self._dec_plan, f"{res}x{res}_aux_conv", "aux_conv",
                          Conv2d(width, out_channels, kernel=3, **tiny))
        assert not skip_channels, "every encoder skip must be consumed by the decoder"

    @staticmethod
    def _add(modules: nn.ModuleDict, plan: list[tuple[str, str]], name: str, role: str, module: nn.Module) -> None:
        modules[name] = module
        plan.append((name, role))

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
              augment_labels: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The conditioning vector ``[N, E]`` from ``noise_labels [N]``, one-hot ``class_labels [N, label_dim]``
        and ``augment_labels [N, augment_dim]``."""
        emb = self.map_noise(noise_labels.to(dtype))
        emb = emb.roll(emb.shape[1] // 2, dims=1)  # [sin, cos]: the order DDPM++ checkpoints were trained with
        if self.map_label is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = self.label_drop(torch.ones(labels.shape[0], 1, dtype=emb.dtype, device=emb.device)) > 0
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output.

        Args:
            x: ``[N, in_channels, H, W]`` (already multiplied by c_in).
            noise_labels: ``[N]`` (or a scalar, broadcast) c_noise values.
            class_labels: ``[N, label_dim]`` one-hot (or ``[N]`` integer class indices); ``None``
                means the all-zero (unconditional) label. Ignored when ``label_dim == 0``.
            augment_labels: ``[N, augment_dim]`` or ``None`` (no augmentation).

        Returns:
            ``[N, out_channels, H, W]``.
        """
        n = x.shape[0]
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(n)
        if self.label_dim:
            class_labels = _one_hot_labels(class_labels, n, self.label_dim, x)
        emb = self.embed(noise_labels, class_labels, augment_labels, dtype=x.dtype)

        skips: list[torch.Tensor] = []
        aux = x
        for name, role in self._enc_plan:
            layer = self.enc[name]
            if role == "conv":
                x = layer(x)
                skips.append(x)
            elif role == "block":
                x = layer(x, emb)
                skips.append(x)
            elif role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = x + layer(aux)
                skips[-1] = x
            else:  # aux_residual
                x = (x + layer(aux)) * math.sqrt(0.5)
                skips[-1] = aux = x

        out = None
        head = None
        for name, role in self._dec_plan:
            layer = self.dec[name]
            if role == "block":
                x = layer(x, emb)
            elif role == "block_cat":
                x = layer(torch.cat([x, skips.pop()], dim=1), emb)
            elif role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                head = layer(x)
            else:  # aux_conv
                head = layer(F.silu(head))
                out = head if out is None else out + head
        return out


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _one_hot_labels(labels: torch.Tensor | None, n: int, label_dim: int, like: torch.Tensor) -> torch.Tensor:
    """``[N, label_dim]`` float labels from one-hot/soft labels, integer indices or ``None`` (zeros)."""
    if labels is None:
        return torch.zeros(n, label_dim, dtype=like.dtype, device=like.device)
    if not labels.is_floating_point():
        if labels.ndim != 1:
            raise ValueError(f"integer class labels must have shape [N], got {tuple(labels.shape)}")
        labels = F.one_hot(labels.long(), label_dim)
    labels = labels.to(like.dtype).reshape(-1, label_dim)
    return labels.expand(n, label_dim) if labels.shape[0] == 1 else labels
