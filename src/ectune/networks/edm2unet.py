"""EDM2's magnitude-preserving U-Net (Karras et al., 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696), written for ectune.

Every layer keeps the expected magnitude (root mean square) of its activations at one: weights are
normalised on every use, additions and concatenations are weighted so that unit-magnitude inputs
give unit-magnitude outputs, and the SiLU is rescaled. The layer names, tensor shapes and formulas
follow EDM2's ``UNet`` so that published EDM2 networks (and the official ECT ImageNet-64 models built
on them) load with ``load_state_dict(strict=True)``: :class:`EDM2UNet`'s state dict has the keys and
shapes of EDM2's ``Precond`` (the ``unet.`` prefix and the learned-uncertainty head ``logvar_*``).

The preconditioning itself (c_skip, c_out, c_in, c_noise = ln(sigma)/4, sigma_data = 0.5) is the
"edm" scalings of :class:`ectune.precond.Denoiser`, exactly as EDM2's ``Precond`` computes it.

Shapes: N = batch, C = channels, H = W = resolution, E = embedding channels.

Configurations (EDM2 ImageNet-64, pixel space, 1000 classes)::

    EDM2UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192)  # "S", 280M
    EDM2UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=256)  # "M"
    EDM2UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=320)  # "L"

ECT tunes them with dropout 0.4 (S) or 0.5 (M and larger) at feature resolutions <= 16 only:
``dropout=0.4, dropout_res=16``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ectune.errors import ConfigError
from ectune.networks._checks import check_count_lists, check_counts
from ectune.networks.dropout import SharedDropout
from ectune.networks.songunet import _one_hot_labels

__all__ = [
    "EDM2UNet",
    "Block",
    "MPConv",
    "MPFourier",
    "UNet",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
]

#: The expected magnitude of silu(x) for x ~ N(0, 1): dividing by it keeps unit magnitude (EDM2 Eq. 81).
_SILU_MAGNITUDE = 0.596


# ----------------------------------------------------------------------------------------------
# Magnitude-preserving operations


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x / (eps + rms(x))``, the root mean square taken over ``dim`` (default: all but the first).

    With the default ``dim`` every row (output channel of a weight, sample of a batch) gets unit
    magnitude; ``dim=1`` is the pixel norm over channels.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    elif isinstance(dim, int):
        dim = (dim,)
    count = math.prod(x.shape[d] for d in dim)
    acc = torch.promote_types(x.dtype, torch.float32)  # at least float32, also for fp16/bf16 inputs
    rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc) / math.sqrt(count)
    return x / (rms + eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, ``silu(x) / 0.596`` (EDM2 Eq. 81)."""
    return F.silu(x) / _SILU_MAGNITUDE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend ``((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)`` (EDM2 Eq. 88).

    ``t`` = 0 keeps ``a``, 1 keeps ``b``; uncorrelated unit-magnitude inputs give a unit-magnitude output.
    """
    return torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along ``dim`` (EDM2 Eq. 103).

    ``a`` (``Na`` channels) and ``b`` (``Nb``) are weighted ``(1 - t)`` and ``t`` per tensor, whatever
    their channel counts, and the result keeps unit magnitude for unit-magnitude inputs.
    """
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


def _resample(x: torch.Tensor, fir: torch.Tensor | None, mode: str) -> torch.Tensor:
    """2x down- or upsampling of ``[N, C, H, W]`` with the separable filter ``fir [1, 1, K, K]`` (sums to one)."""
    if mode == "keep":
        return x
    channels = x.shape[1]
    pad = (fir.shape[-1] - 1) // 2
    fir = fir.to(x.dtype)
    if mode == "down":
        return F.conv2d(x, fir.expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)
    # Each output pixel receives a quarter of the taps: the factor 4 restores the mean.
    return F.conv_transpose2d(x, (fir * 4).expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)


# ----------------------------------------------------------------------------------------------
# Layers


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features of the noise level (EDM2 Eq. 75): ``[N] -> [N, num_channels]``.

    ``sqrt(2) cos(freqs * x + phases)`` with random ``freqs ~ 2 pi N(0, bandwidth^2)`` and
    ``phases ~ 2 pi U(0, 1)``, both buffers saved in the state dict.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel = [k, k]``) or fully connected layer (``kernel = []``)
    (EDM2 Eq. 47), with forced weight normalisation (EDM2 Eq. 66).

    The stored ``weight [out, in, *kernel]`` is used as ``normalize(weight) * gain / sqrt(fan_in)``:
    every output channel has unit norm per input element, so unit-magnitude inputs give outputs of
    magnitude ``gain``. In training, a forward pass that records gradients first projects the stored
    weight back onto that sphere (``weight <- normalize(weight)``, in place, outside autograd), as
    EDM2 does before every optimiser step. Passes without gradients (evaluation, the ECT target pass
    under ``torch.no_grad``) never touch the weight: a later in-place update would invalidate the
    autograd graph of a pass that ran before it, and the projection changes nothing a forward pass
    computes (the output uses the normalised weight either way). ``force_wn = False`` switches the
    projection off.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        kernel = [int(k) for k in kernel]
        if kernel and (len(kernel) != 2 or kernel[0] != kernel[1] or kernel[0] % 2 == 0):
            raise ConfigError(f"MPConv takes kernel=[] (fully connected) or a square odd kernel [k, k], got {kernel}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.force_wn = True
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training and self.force_wn and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        fan_in = w[0].numel()
        w = normalize(w) * (gain / math.sqrt(fan_in))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel={list(self.weight.shape[2:])}"


class Block(nn.Module):
    """EDM2 encoder or decoder block with optional self-attention (EDM2 Fig. 21):
    ``forward(x [N, C_in, H, W], emb [N, E]) -> [N, C_out, H', W']``.

    Main path: resample (``"keep"``, ``"down"``: ``H' = H / 2``, ``"up"``: ``H' = 2 H``); an encoder
    block then maps the channels with a 1x1 ``conv_skip`` (when they change) and pixel-normalises.
    Residual path: ``conv_res0(mp_silu(x))``, scaled per channel by ``1 + emb_linear(emb, gain=emb_gain)``,
    ``mp_silu``, dropout, ``conv_res1``. A decoder block applies ``conv_skip`` to the main path only
    now. The two meet in ``mp_sum(x, y, res_balance)``, then (optionally) multi-head self-attention
    with pixel-normalised q, k, v joins through ``mp_sum(x, attn, attn_balance)``; activations are
    finally clipped to ``[-clip_act, clip_act]``.

    The resampling filter is not a buffer (EDM2 does not store it), so it is not in the state dict.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ConfigError(f"block flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "down", "up"):
            raise ConfigError(f"resample_mode must be 'keep', 'down' or 'up', got {resample_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ConfigError(f"{out_channels} channels cannot be split into {self.num_heads} attention heads "
                              f"(channels_per_head={channels_per_head}); choose channels divisible by it")
        self.res_balance = float(res_balance)
        self.attn_balance = float(attn_balance)
        self.clip_act = clip_act

        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None
        self.drop = SharedDropout(dropout)
        if resample_mode == "keep":
            self.resample_filter = None
        else:
            self.register_buffer("resample_filter", _fir_kernel(resample_filter), persistent=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = _resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.drop(y))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self._attend(x)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over positions, ``[N, C, H, W] -> [N, C, H, W]`` (before ``attn_proj``).

        The ``attn_qkv`` output channels are laid out ``[head, channel, (q, k, v)]``; q, k and v are
        pixel-normalised over each head's channels before ``softmax(q^T k / sqrt(C / heads)) v``.
        """
        n, c, hgt, wid = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, hgt * wid)
        qkv = normalize(qkv, dim=2)
        q, k, v = (qkv[:, :, :, i].transpose(2, 3).float() for i in range(3))  # [N, heads, HW, C/heads]
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(n, c, hgt, wid).to(x.dtype)


def _fir_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D resampling filter ``[1, 1, K, K]`` from an even number of 1-D taps, summing to one."""
    values = [float(v) for v in taps]
    if not values or len(values) % 2 or sum(values) == 0.0:
        raise ConfigError(f"resample_filter must be an even number of taps with a non-zero sum, got {list(taps)}")
    t = torch.tensor(values, dtype=torch.float32) / sum(values)
    return torch.outer(t, t)[None, None]


# ----------------------------------------------------------------------------------------------
# The U-Net


class UNet(nn.Module):
    """EDM2's U-Net (EDM2 Fig. 21): ``forward(x, noise_labels, class_labels) -> F``.

    Args:
        img_resolution: Input and output resolution H = W; must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        img_channels: Channels of ``x`` and of the output (a constant-one channel is appended inside).
        label_dim: Number of classes, 0 = unconditional.
        model_channels: Base channel count.
        channel_mult: Channel multiplier per resolution level; the resolution halves per level.
        channel_mult_noise: Fourier-feature channels = ``model_channels * channel_mult_noise``
            (``None``: ``model_channels * channel_mult[0]``).
        channel_mult_emb: Embedding channels E = ``model_channels * channel_mult_emb``
            (``None``: ``model_channels * max(channel_mult)``).
        num_blocks: Blocks per level in the encoder (the decoder has one more).
        attn_resolutions: Resolutions whose blocks carry self-attention (the lowest resolution's
            first decoder block always has it).
        label_balance: Blend of noise (0) and class (1) embedding.
        concat_balance: Blend of skip connection (0) and main path (1) at every decoder concatenation.
        dropout: Dropout probability inside every block (a :class:`SharedDropout`).
        dropout_res: Apply dropout only at levels of resolution <= ``dropout_res`` (official ECT
            ImageNet 64 uses 16); ``None`` = every level.
        channels_per_head, res_balance, attn_balance, clip_act, resample_filter: passed to every
            :class:`Block` (EDM2's ``block_kwargs``).

    Module names (``emb_fourier``, ``emb_noise``, ``emb_label``, ``enc`` and ``dec`` with keys such as
    ``"64x64_block0"``, ``out_conv``, ``out_gain``) and every shape follow EDM2.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        dropout_res: int | None = None,
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        check_counts(img_resolution=img_resolution, img_channels=img_channels, model_channels=model_channels,
                     num_blocks=num_blocks, channels_per_head=channels_per_head,
                     **{k: v for k, v in [("channel_mult_noise", channel_mult_noise),
                                          ("channel_mult_emb", channel_mult_emb)] if v is not None})
        check_counts(0, label_dim=label_dim)
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
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")

        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = float(label_balance)
        self.concat_balance = float(concat_balance)

        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        def block(cin: int, cout: int, res: int, **kw) -> Block:
            p = dropout if dropout_res is None or res <= dropout_res else 0.0
            return Block(cin, cout, emb_channels, resample_filter=resample_filter, channels_per_head=channels_per_head,
                         dropout=p, res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act, **kw)

        # Encoder: every output is a skip connection.
        self.enc = nn.ModuleDict()
        width = img_channels + 1
        for level, channels in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(width, channels, kernel=[3, 3])
                width = channels
            else:
                self.enc[f"{res}x{res}_down"] = block(width, width, res, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(width, channels, res, flavor="enc",
                                                            attention=res in attn_resolutions)
                width = channels

        # Decoder: every "block" entry first concatenates the most recent unused skip.
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        self._dec_concat: dict[str, bool] = {}
        for level in reversed(range(levels)):
            channels = widths[level]
            res = img_resolution >> level
            if level == levels - 1:
                self._add_dec(f"{res}x{res}_in0", block(width, width, res, flavor="dec", attention=True), False)
                self._add_dec(f"{res}x{res}_in1", block(width, width, res, flavor="dec"), False)
            else:
                self._add_dec(f"{res}x{res}_up", block(width, width, res, flavor="dec", resample_mode="up"), False)
            for idx in range(num_blocks + 1):
                cat = block(width + skips.pop(), channels, res, flavor="dec", attention=res in attn_resolutions)
                self._add_dec(f"{res}x{res}_block{idx}", cat, True)
                width = channels
        assert not skips, "every encoder output must be consumed by the decoder"
        self.out_conv = MPConv(width, img_channels, kernel=[3, 3])

    def _add_dec(self, name: str, module: Block, concat: bool) -> None:
        self.dec[name] = module
        self._dec_concat[name] = concat

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector ``[N, E]`` from ``noise_labels [N]`` and one-hot ``class_labels [N, label_dim]``,
        in float32 whatever the precision of the image path (as EDM2 computes it)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels.to(torch.float32)))
        if self.emb_label is not None:
            labels = class_labels.to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output.

        Args:
            x: ``[N, img_channels, H, W]`` (already multiplied by c_in).
            noise_labels: ``[N]`` (or a scalar, broadcast) c_noise values.
            class_labels: ``[N, label_dim]`` one-hot (or ``[N]`` integer class indices); ``None``
                means the all-zero label. Ignored when ``label_dim == 0``.

        Returns:
            ``[N, img_channels, H, W]``.
        """
        n = x.shape[0]
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(n)
        if self.label_dim:
            class_labels = _one_hot_labels(class_labels, n, self.label_dim, x)
        emb = self.embed(noise_labels, class_labels)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if self._dec_concat[name]:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2UNet(nn.Module):
    """The backbone ectune registers as ``"edm2unet"``: :class:`UNet` plus EDM2's learned-uncertainty head.

    Its state dict equals that of EDM2's ``Precond`` (keys ``unet.*``, ``logvar_fourier.*``,
    ``logvar_linear.weight``), so a published EDM2 network loads with ``strict=True``; the
    preconditioning itself is :class:`ectune.precond.Denoiser` with the "edm" scalings.

    Args:
        img_resolution, img_channels, label_dim, and every other keyword: see :class:`UNet`.
        logvar_channels: Fourier channels of the uncertainty head u(sigma) (EDM2 Eq. 21; 128 in EDM2),
            0 = no head (the official ECT ImageNet-64 models have none).

    ``forward(x, noise_labels, class_labels) -> F`` is the U-Net's; :meth:`logvar` evaluates the head.
    Note that the head takes no part in ``forward``: ectune's training loop freezes it
    (``requires_grad=False`` on ``logvar_*``), so data-parallel training does not wait for its gradients.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        dropout_res: int | None = None,
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        resample_filter: Sequence[float] = (1, 1),
        logvar_channels: int = 128,
    ) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.unet = UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            model_channels=model_channels, channel_mult=channel_mult, channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            label_balance=label_balance, concat_balance=concat_balance, dropout=dropout, dropout_res=dropout_res,
            channels_per_head=channels_per_head, res_balance=res_balance, attn_balance=attn_balance,
            clip_act=clip_act, resample_filter=resample_filter,
        )
        if logvar_channels < 0:
            raise ConfigError(f"logvar_channels must be >= 0, got {logvar_channels}")
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels else None
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[]) if logvar_channels else None

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``F(x, c_noise, class_labels)``: ``[N, img_channels, H, W]``; see :meth:`UNet.forward`."""
        return self.unet(x, noise_labels, class_labels)

    def logvar(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """The learned log-variance u(sigma) ``[N]`` for ``noise_labels = c_noise = ln(sigma) / 4`` ``[N]``
        (EDM2 Eq. 21: the loss weight is ``exp(-u) * loss + u``)."""
        if self.logvar_fourier is None:
            raise ConfigError("this EDM2 network has no uncertainty head (logvar_channels=0)")
        return self.logvar_linear(self.logvar_fourier(noise_labels.reshape(-1))).reshape(-1)
