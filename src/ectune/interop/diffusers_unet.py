"""A diffusers ``UNet2DModel`` trained with a discrete VP (DDPM) schedule, as an EDM backbone F.

DDPM (Ho et al. 2020) noises data as x_vp = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps at
integer timesteps t = 0..N-1. Dividing by sqrt(alpha_bar_t) gives EDM's variance-exploding form
x = x0 + sigma eps with (EDM Eq. 1, Table 1 "VP"):

    alpha_bar = 1 / (1 + sigma^2),   x_vp = x / sqrt(1 + sigma^2).

So the DDPM network defines the denoiser (for epsilon prediction)

    D(x, sigma) = x - sigma * eps_theta(x / sqrt(1 + sigma^2), t(sigma)),

and for v prediction (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0) and sample prediction the
x0 estimate the scheduler would form. :class:`DiffusersUNet` receives what every ectune backbone
receives, ``F(c_in x, c_noise)`` with c_in = 1/sqrt(sigma^2 + sd^2) and c_noise = ln(sigma)/4
(:mod:`ectune.precond`), recovers sigma = exp(4 c_noise) and x = x_in sqrt(sigma^2 + sd^2), and
returns the F for which the "edm" scalings give exactly that D:

    F = (sigma x_in - sqrt(sigma^2 + sd^2) eps) / sd                       (epsilon)
    F = (sqrt(sigma^2 + sd^2) x0_hat - sd^2 x_in) / (sigma sd)             (sample, v_prediction)

(from D = c_skip x + c_out F with c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2)).

**Noise level -> timestep.** The network only knows the N discrete levels
sigma_t = sqrt((1 - alpha_bar_t)/alpha_bar_t). ECT asks for any sigma > 0, so t(sigma) interpolates
ln(sigma_t) linearly in t (ln sigma_t increases strictly with t) and evaluates the network at that
fractional timestep; the sinusoidal embedding takes real t. At the N levels t(sigma_t) = t exactly.
Outside [sigma_0, sigma_{N-1}] t is clamped to 0 or N-1, while the input scaling and the
combination above keep the true sigma, so D(x, sigma) -> x as sigma -> 0.

Dropout: every ``nn.Dropout`` inside the UNet is replaced by :class:`ectune.networks.SharedDropout`
(same probability), so ECT's student and target passes share masks. ``dropout`` overrides the
UNet config's ``dropout`` (its ResNet blocks).

This module imports diffusers only when a network is built, so ectune imports without it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ectune.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers schedulers whose models are trained on DDPM's discrete VP schedule (integer timesteps
# 0..N-1, betas from beta_start / beta_end / beta_schedule / trained_betas): the scheduler only
# changes how a pipeline samples, not what the UNet means.
DISCRETE_VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def require_diffusers() -> Any:
    """Import diffusers, or raise a :class:`ConfigError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("this needs the optional package diffusers: pip install 'ectune[diffusers]' "
                          "(or pip install diffusers)") from None
    return diffusers


def alphas_cumprod(schedule: dict) -> torch.Tensor:
    """alpha_bar_t for t = 0..N-1 (float32, as diffusers computes it) from the scheduler fields in
    :data:`SCHEDULE_KEYS`, computed by diffusers' own DDPMScheduler so it equals what the UNet saw.

    Raises:
        ConfigError: an unknown ``beta_schedule`` or a schedule that is not a strictly decreasing
            alpha_bar in (0, 1).
    """
    diffusers = require_diffusers()
    kwargs = {k: schedule[k] for k in SCHEDULE_KEYS if schedule.get(k) is not None}
    try:
        ab = diffusers.DDPMScheduler(**kwargs).alphas_cumprod
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ConfigError(f"unsupported noise schedule {kwargs} ({type(e).__name__}: {e})") from None
    ab = ab.to(torch.float64)
    if ab.ndim != 1 or len(ab) < 2 or not bool(((ab > 0) & (ab < 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
        raise ConfigError(f"noise schedule {kwargs} does not give a strictly decreasing alpha_bar in (0, 1): "
                          f"ectune needs a discrete VP schedule with every beta in (0, 1)")
    return ab


def vp_log_sigmas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """ln sigma_t = 0.5 ln((1 - alpha_bar_t) / alpha_bar_t), float64, increasing in t."""
    ab = alpha_bar.to(torch.float64)
    return 0.5 * torch.log((1 - ab) / ab)


def sigma_to_timestep(log_sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep t(sigma): ln sigma interpolated linearly between the discrete levels
    ``log_sigmas`` (increasing, from :func:`vp_log_sigmas`), clamped to [0, N-1]. float64."""
    log_sigma = log_sigma.to(torch.float64)
    n = log_sigmas.shape[0]
    hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, n - 1)
    lo = hi - 1
    frac = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return (lo.to(torch.float64) + frac).clamp(0, n - 1)


def unsupported_reason(unet_config: dict, prediction_type: str) -> str | None:
    """Why a UNet2DModel config cannot be wrapped (one line), or None when it can."""
    if prediction_type not in PREDICTION_TYPES:
        return (f"prediction_type {prediction_type!r} is not supported: ectune wraps "
                f"{', '.join(PREDICTION_TYPES)} models")
    if unet_config.get("time_embedding_type", "positional") != "positional":
        return (f"time_embedding_type {unet_config.get('time_embedding_type')!r} is not supported: ectune wraps "
                f"UNets with the positional (sinusoidal) timestep embedding of DDPM, which takes fractional timesteps")
    if unet_config.get("class_embed_type") is not None:
        return (f"class_embed_type {unet_config['class_embed_type']!r} is not supported: ectune wraps "
                f"unconditional UNets and UNets with num_class_embeds (a class embedding table)")
    size = unet_config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            return f"sample_size {size} is not square: ectune's models need square images"
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        return f"sample_size {size!r} is not a positive integer: the UNet config must give the image size"
    c_in, c_out = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
    if c_out not in (c_in, 2 * c_in):
        return (f"the UNet maps {c_in} channels to {c_out}: ectune wraps UNets whose output has the input's "
                f"channels (or twice as many, a prediction plus a learned variance)")
    return None


def _share_dropout(module: nn.Module) -> None:
    from ectune.networks.dropout import SharedDropout  # not at module level: ectune.networks imports this module

    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, SharedDropout(child.p))
        else:
            _share_dropout(child)


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` (DDPM schedule) as the backbone F(c_in x, c_noise, class_labels).

    Args:
        unet_config: the UNet2DModel's config.json (keys starting with "_" are ignored).
        schedule: the scheduler's training schedule: num_train_timesteps, beta_start, beta_end,
            beta_schedule, trained_betas (as in diffusers' scheduler_config.json).
        prediction_type: "epsilon", "v_prediction" or "sample".
        sigma_data: the sigma_data of the "edm" scalings this backbone is combined with.
        dropout: overrides the UNet's dropout probability (None keeps the config's).

    The UNet's weights are the submodule ``unet`` (state-dict keys ``unet.<diffusers key>``).
    """

    def __init__(self, unet_config: dict, schedule: dict, prediction_type: str = "epsilon", sigma_data: float = 0.5,
                 dropout: float | None = None) -> None:
        super().__init__()
        diffusers = require_diffusers()
        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        reason = unsupported_reason(config, prediction_type)
        if reason:
            raise ConfigError(reason)
        if dropout is not None:
            config["dropout"] = float(dropout)
        try:
            self.unet = diffusers.UNet2DModel.from_config(config)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"diffusers cannot build a UNet2DModel from this config ({type(e).__name__}: {e})") \
                from None
        _share_dropout(self.unet)
        size = config["sample_size"]
        self.img_resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.img_channels = int(config.get("in_channels", 3))
        self.label_dim = int(config.get("num_class_embeds") or 0)
        self.prediction_type = prediction_type
        self.sigma_data = float(sigma_data)
        self.register_buffer("log_sigmas", vp_log_sigmas(alphas_cumprod(schedule)), persistent=False)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma) for the UNet (see the module docstring), float64."""
        return sigma_to_timestep(sigma.to(torch.float64).log(), self.log_sigmas)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x = c_in x_sigma (B, C, H, W), noise_labels = ln(sigma)/4 (B,), class_labels one-hot (B, label_dim) or
        None. Returns F (B, C, H, W) float32."""
        sd = self.sigma_data
        sigma64 = torch.exp(4 * noise_labels.to(torch.float64))
        t = sigma_to_timestep(4 * noise_labels.to(torch.float64), self.log_sigmas).to(torch.float32)
        s = sigma64.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        x = x.to(torch.float32)
        scale = (s * s + sd * sd).sqrt()   # x = scale * x_in
        vp = (1 + s * s).sqrt()            # 1 / sqrt(alpha_bar)
        labels = class_labels.argmax(dim=1) if (self.label_dim and class_labels is not None) else None
        out = self.unet(x * (scale / vp), t, class_labels=labels).sample[:, : self.img_channels].to(torch.float32)
        if self.prediction_type == "epsilon":
            return (s * x - scale * out) / sd
        x_vp = x * (scale / vp)
        x0 = out if self.prediction_type == "sample" else x_vp / vp - (s / vp) * out
        return (scale * x0 - sd * sd * x) / (s * sd)

    def extra_repr(self) -> str:
        return (f"prediction_type={self.prediction_type}, sigma_data={self.sigma_data}, "
                f"timesteps={self.log_sigmas.shape[0]}, sigma in [{math.exp(self.log_sigmas[0]):.4g}, "
                f"{math.exp(self.log_sigmas[-1]):.4g}]")
