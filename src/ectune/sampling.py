"""Samplers: consistency (1-step, 2-step, multistep) and EDM's Heun / Euler ODE solvers with churn.

Samplers are stateless functions of (denoiser, noise source, levels). ``denoiser`` is any callable
``D(x, sigma) -> x0_hat`` (bind class labels and scalings with a lambda). Noise comes from a
:class:`PerImageNoise`, whose image j draws from its own generator seeded with ``seeds[j]``, so a
sample is the same whatever the batch size it is generated in (as EDM's generate.py does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ectune import schedules
from ectune.errors import ConfigError, DataError

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SIGMA_MAX = 80.0
"""The first noise level of every sampler here (EDM's sigma_max)."""


def consistency_levels(steps: int, mid_sigma: float, sigma_max: float = SIGMA_MAX) -> list[float]:
    """Levels after sigma_max for ``steps``-step consistency sampling, spaced geometrically from
    sigma_max down to ``mid_sigma``: [] for 1 step, [mid_sigma] for 2, [sqrt(80 mid), mid] for 3.

    A default for step sweeps only (the CM papers tune multistep levels per model); give explicit
    levels with ``--sigmas`` for one setting.
    """
    if steps < 1:
        raise ConfigError(f"consistency sampling needs at least 1 step, got {steps}")
    return [sigma_max * (mid_sigma / sigma_max) ** (i / (steps - 1)) for i in range(1, steps)]


def seed_labels(seeds: Sequence[int], label_dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """One-hot class labels for the images of ``seeds``: seed s gets class s mod label_dim, so a
    sample's label does not depend on its batch and any run of consecutive seeds is class-balanced.
    None for an unconditional model (label_dim 0)."""
    if not label_dim:
        return None
    ids = torch.tensor([int(s) % label_dim for s in seeds], dtype=torch.long)
    return torch.eye(label_dim)[ids].to(device)


class PerImageNoise:
    """Independent Gaussian noise streams, one per image: ``randn()`` returns (B, *shape) whose row j
    comes from ``torch.Generator().manual_seed(seeds[j])``. Generated on the CPU (identical on every
    device), then moved to ``device``."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def _as_sigma(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)


def _denoise(denoiser: DenoiseFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Run D in float32 on a float64 state and return float64 (samplers keep the state in float64)."""
    return denoiser(x.to(torch.float32), _as_sigma(sigma, x)).to(torch.float64)


@torch.no_grad()
def consistency_sample(denoiser: DenoiseFn, noise: PerImageNoise, sigmas: Sequence[float], *,
                       sigma_min: float = 0.002, renoise: str = "ect") -> torch.Tensor:
    """Multistep consistency sampling (CM Algorithm 1).

    x = sigmas[0] z; x = D(x, sigmas[0]); then for each next level tau: x = D(x + s(tau) z', tau), with
    s(tau) = tau (``renoise="ect"``, the official ECT sampler) or sqrt(tau^2 - sigma_min^2)
    (``renoise="ict"``). One network evaluation per level. Returns float64 (B, *shape).
    """
    if len(sigmas) < 1:
        raise ConfigError("consistency sampling needs at least one noise level")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or float(sigmas[-1]) <= 0:
        raise ConfigError(f"consistency sampling levels must decrease and stay positive, got {list(sigmas)}")
    if renoise not in ("ect", "ict"):
        raise ConfigError(f"unknown re-noising {renoise!r}: use 'ect' or 'ict'")
    x = noise.randn().to(torch.float64) * float(sigmas[0])
    x = _denoise(denoiser, x, sigmas[0])
    for tau in sigmas[1:]:
        tau = float(tau)
        scale = tau if renoise == "ect" else math.sqrt(max(tau * tau - sigma_min * sigma_min, 0.0))
        x = x + scale * noise.randn().to(torch.float64)
        x = _denoise(denoiser, x, tau)
    return x


@torch.no_grad()
def edm_sample(denoiser: DenoiseFn, noise: PerImageNoise, num_steps: int = 18, *, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0,
               S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM's stochastic sampler (EDM Algorithm 2) on the probability-flow ODE dx/dsigma = (x - D(x, sigma))/sigma.

    Levels t_i from :func:`schedules.edm_sampling_sigmas`, t_N = 0. Heun: an Euler step then a
    second-order correction, except on the last step: 2N - 1 evaluations (N = 18 gives 35). Euler: N.
    S_churn > 0 adds noise gamma = min(S_churn/N, sqrt2 - 1) for t in [S_min, S_max]. float64 state.
    """
    if solver not in ("heun", "euler"):
        raise ConfigError(f"unknown ODE solver {solver!r}: use 'heun' or 'euler'")
    t_steps = schedules.edm_sampling_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x_next = noise.randn().to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_cur = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * noise.randn().to(torch.float64)
        d_cur = (x_cur - _denoise(denoiser, x_cur, t_hat)) / t_hat
        x_next = x_cur + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - _denoise(denoiser, x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def nfe(method: str, steps: int) -> int:
    """Network evaluations per image: consistency = steps, heun = 2 steps - 1, euler = steps."""
    return {"consistency": steps, "heun": 2 * steps - 1, "euler": steps}[method]


def check_finite(x: torch.Tensor) -> torch.Tensor:
    """Samples ``x`` themselves, if every value is finite; a DataError otherwise (to_uint8 would turn NaN
    into black pixels, and a diverged model would get a finite FID)."""
    if not torch.isfinite(x).all():
        raise DataError("the model's samples contain NaN or inf: the model has diverged (retrain it, e.g. with a "
                        "lower learning rate)")
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, C, H, W), as EDM saves them: x * 127.5 + 128 clipped to
    [0, 255] and truncated, which is x * 127.5 + 127.5 rounded half up (-1, 0, 1 -> 0, 128, 255)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
