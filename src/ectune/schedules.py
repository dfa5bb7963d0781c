"""Pure schedule functions: noise-level sampling, the ECT mapping r(t) and its stage, the iCT grid,
curriculum and discrete lognormal, EMA and learning-rate schedules.

Every function here is a pure function of its arguments (randomness comes in as a
``torch.Generator``), so the training loop derives the curriculum from the number of images seen
and never has to remember to set it. Equations cite DESIGN.md and the papers:
ECT = Geng et al., arXiv 2406.14548; iCT = Song & Dhariwal, arXiv 2310.14189;
EDM = Karras et al., arXiv 2206.00364; EDM2 = Karras et al., arXiv 2312.02696.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ectune.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Continuous noise levels.


def sample_lognormal(n: int, P_mean: float, P_std: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """sigma = exp(P_mean + P_std * n), n ~ N(0, 1): the EDM training distribution (EDM Eq. 5 / Table 1),
    used by ECT for t (not clipped). Returns float32 (n,)."""
    z = torch.randn(n, generator=generator, device=device)
    return (P_mean + P_std * z).exp()


# ---------------------------------------------------------------------------------------------
# ECT: the mapping r(t) and its stage.


def ect_stage(nimg: int, stage_nimg: int) -> int:
    """The ECT stage s after ``nimg`` images: s = floor(nimg / stage_nimg) (DESIGN.md section 4.2).

    The official code raises the stage one iteration later (its first "tick" is one iteration), so its
    stage s starts at iteration s * stage_nimg / batch + 2 (1-indexed) where this one starts at
    + 1: a one-iteration shift, documented in the tests.
    """
    if stage_nimg <= 0:
        raise ConfigError(f"stage length must be a positive number of images, got {stage_nimg}")
    return int(nimg) // int(stage_nimg)


def ect_ratio(stage: int, q: float) -> float:
    """1 - q^-(s+1): the fraction r/t approaches at large t in stage s (the official code's ``ratio``)."""
    return 1.0 - float(q) ** -(stage + 1)


def ect_r_of_t(t: torch.Tensor, stage: int, *, q: float = 2.0, k: float = 8.0, b: float = 1.0,
               mapping: str = "sigmoid") -> torch.Tensor:
    """The ECT mapping r(t) (ECT paper section 3.2, DESIGN.md section 4.2).

    sigmoid: r = max(0, t * (1 - q^-(s+1) * (1 + k * sigmoid(-b t))))
    const:   r = max(0, t * (1 - q^-(s+1)))

    The exponent is s + 1 because stage -1 (r = 0 everywhere) is diffusion training. Returns r with
    t's dtype; 0 <= r < t for every t > 0.
    """
    if q <= 1:
        raise ConfigError(f"ECT q must be > 1 (got {q}): r(t) approaches t only when q^-(s+1) shrinks")
    decay = float(q) ** -(stage + 1)
    if mapping == "sigmoid":
        ratio = 1.0 - decay * (1.0 + k * torch.sigmoid(-b * t))
    elif mapping == "const":
        ratio = torch.full_like(t, 1.0 - decay)
    else:
        raise ConfigError(f"unknown ECT mapping {mapping!r}: use 'sigmoid' or 'const'")
    return (t * ratio).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# iCT: Karras grid, curriculum and discrete lognormal.


def karras_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras grid sigma_i = (smin^(1/rho) + (i-1)/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho, i = 1..N,
    increasing (EDM Eq. 5; iCT section 3). float64 (N,)."""
    if N < 2:
        raise ConfigError(f"a Karras grid needs N >= 2 levels, got {N}")
    i = torch.arange(N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (N - 1) * (hi - lo)) ** rho


def ict_num_levels(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT exponential curriculum N(k) = min(s0 * 2^floor(k/K'), s1) + 1,
    K' = floor(K / (log2(floor(s1/s0)) + 1)) (iCT Eq. 8). k = training iteration, K = total iterations."""
    K_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    if K_prime <= 0:
        raise ConfigError(f"iCT curriculum needs more total iterations (K={K}) than doublings")
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def ict_index_probs(sigmas: torch.Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> torch.Tensor:
    """Discrete lognormal over adjacent pairs (iCT Eq. 9):
    p(i) ~ erf((ln sigma_{i+1} - Pm)/(sqrt2 Ps)) - erf((ln sigma_i - Pm)/(sqrt2 Ps)), i = 1..N-1.
    float64 (N-1,), sums to 1."""
    s = sigmas.to(torch.float64).log()
    cdf = torch.erf((s - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ict_pseudo_huber_c(dim: int) -> float:
    """iCT pseudo-Huber constant c = 0.00054 * sqrt(d), d = C*H*W (iCT section 3.3)."""
    return 0.00054 * math.sqrt(dim)


# ---------------------------------------------------------------------------------------------
# Sampling schedules.


def edm_sampling_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM sampler time steps (EDM Eq. 5): decreasing t_0 = sigma_max .. t_{N-1} = sigma_min, then t_N = 0.
    float64 (num_steps + 1,)."""
    if num_steps < 1:
        raise ConfigError(f"the EDM sampler needs at least 1 step, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    return torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0), torch.zeros(1, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------
# EMA and learning-rate schedules.


def power_ema_std_to_exp(std: float) -> float:
    """EDM2 power-function EMA: the exponent gamma for a relative std (EDM2 Eq. 3 solved for gamma,
    largest real root of the cubic gamma^3 + 7 gamma^2 + (16 - 1/std^2) gamma + (12 - 1/std^2) = 0)."""
    tmp = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - tmp, 12.0 - tmp])
    return float(roots.real[np.abs(roots.imag) < 1e-8].max())


def power_ema_exp_to_std(gamma: float) -> float:
    """Relative std of a power-function EMA profile with exponent gamma (EDM2 Eq. 3)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def power_ema_beta(nimg_after: int, batch: int, gamma: float) -> float:
    """EDM2 power-function EMA decay for one update: beta = (1 - batch / nimg)^(gamma + 1),
    nimg = images seen after this update."""
    if nimg_after <= 0:
        return 0.0
    return (1.0 - batch / nimg_after) ** (gamma + 1)


def lr_inverse_sqrt(nimg: int, batch: int, lr: float, ref_batches: float) -> float:
    """EDM2 learning-rate decay (EDM2 Eq. 16): lr / sqrt(max(nimg / (ref_batches * batch), 1)), nimg before
    the update."""
    if ref_batches > 0:
        lr = lr / math.sqrt(max(nimg / (ref_batches * batch), 1.0))
    return lr


def ema_half_life_iters(beta: float) -> float:
    """Half-life, in updates, of a fixed-beta EMA: ln(0.5) / ln(beta)."""
    return math.log(0.5) / math.log(beta)
