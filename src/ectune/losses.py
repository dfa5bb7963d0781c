"""Training objectives: EDM diffusion, ECT consistency tuning and iCT consistency training.

Each loss is a small frozen dataclass with no hidden state. Calling it with
``(denoiser, x, labels, nimg, generator)`` draws its own noise from ``generator`` and returns the
per-sample loss (B,), a sum over each sample's elements; the training loop averages over the global
batch. The curriculum (ECT stage, iCT number of levels) is a pure function of ``nimg``, the number
of images seen before this step.

ECT = Geng et al., arXiv 2406.14548; iCT = Song & Dhariwal, arXiv 2310.14189; EDM = Karras et al.,
arXiv 2206.00364. DESIGN.md sections 3-5 give every formula used here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ectune import schedules
from ectune.errors import ConfigError
from ectune.fields import opt
from ectune.networks.dropout import record_dropout, replay_dropout

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper (used for no-grad target passes)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """delta = ||a - b||^2 summed over each sample: (B, ...) x2 -> (B,)."""
    return (a - b).square().flatten(1).sum(1)


def adaptive_distance(delta: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """The ECT paper's adaptive loss: w_phi * delta with w_phi = 1 / (delta + c^2)^p detached
    (ECT section 3.3). p = 0 gives the squared L2 distance; p = 1/2 has the gradient of the
    pseudo-Huber distance sqrt(delta + c^2) - c up to a factor 2."""
    if p == 0:
        return delta
    return delta / (delta.detach() + c * c).clamp(min=1e-30).pow(p)


def pseudo_huber(delta: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(delta + c^2) - c (iCT section 3.3); c = 0 gives the L2 norm (not squared)."""
    if c == 0:
        # sqrt has an infinite derivative at 0; the official code's finite-gradient guard hides it,
        # here the clamp keeps the gradient finite for identical outputs.
        return delta.clamp(min=1e-30).sqrt()
    return (delta + c * c).sqrt() - c


ECT_WEIGHTINGS: dict[str, Weighting] = {
    # 1/(t - r): ECT CIFAR-10 (the paper's "regular" weighting for the consistency gap).
    "inv_dt": lambda t, r: 1.0 / (t - r),
    # 1/t^2 + 1/sigma_data^2: ECT ImageNet 64 (EDM's lambda(t)); ECTLoss uses its own sigma_data,
    # this entry is the sigma_data = 0.5 case.
    "edm": lambda t, r: 1.0 / t.square() + 4.0,
    "uniform": lambda t, r: torch.ones_like(t),
}


@dataclass(frozen=True)
class EDMLoss:
    """EDM denoising loss (EDM Eq. 2 and Table 1), optionally with the ECT adaptive weight
    ("pretraining with ECT", ECT section 4.3):

        sigma = exp(P_mean + P_std n),  loss = lambda(sigma) * w_phi(delta) * delta,
        delta = ||D(x + sigma eps, sigma) - x||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2,

    with w_phi = 1/(delta + c^2)^p detached (p = 0: plain EDM).
    """

    P_mean: float = opt(-1.2, "mean of ln(sigma) for training noise levels")
    P_std: float = opt(1.2, "std of ln(sigma) for training noise levels")
    sigma_data: float = opt(0.5, "data standard deviation")
    adaptive_p: float = opt(0.0, "ECT adaptive weight exponent p (0 = plain EDM loss, 0.5 = pseudo-Huber-like)")
    adaptive_c: float = opt(0.0, "ECT adaptive weight constant c in 1/(delta + c^2)^p")
    scalings: str | None = opt(None, "preconditioning scalings for training: edm or cm (None = precond.train_scalings)")

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, nimg: int,
                 generator: torch.Generator | None) -> torch.Tensor:
        sigma = schedules.sample_lognormal(x.shape[0], self.P_mean, self.P_std, generator=generator, device=x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        with record_dropout(generator):
            D = denoiser(x + _per_sample(sigma, x) * eps, sigma, labels, scalings=self.scalings)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return weight * adaptive_distance(squared_distance(D, x), self.adaptive_p, self.adaptive_c)

    def stats(self, nimg: int) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ECTLoss:
    """Easy Consistency Tuning (ECT Algorithm 1, DESIGN.md section 4).

    t ~ exp(P_mean + P_std n); r = r(t, stage) with stage = floor(nimg / stage_nimg); one noise
    draw eps for both points; student D(x + t eps, t) with gradients; target D(x + r eps, r)
    without, same dropout masks, run only where r > 0 (D_r = x where r = 0, the boundary condition).
    delta = ||D_t - D_r||^2 per sample, and

        distance = "huber":    (sqrt(delta + c^2) - c) * w(t, r)
        distance = "adaptive": delta / stopgrad(delta + c^2)^p * w(t, r)

    with w one of :data:`ECT_WEIGHTINGS` or a callable w(t, r).
    """

    P_mean: float = opt(-1.1, "mean of ln(t) (CIFAR-10 -1.1, ImageNet 64 -0.8)")
    P_std: float = opt(2.0, "std of ln(t) (CIFAR-10 2.0, ImageNet 64 1.6)")
    sigma_data: float = opt(0.5, "data standard deviation")
    q: float = opt(2.0, "mapping base q > 1: r/t -> 1 - q^-(stage+1) (CIFAR-10 2, ImageNet 64 4, 1-hour recipe "
                        "256: at most 2 stages)")
    k: float = opt(8.0, "mapping sigmoid scale k")
    b: float = opt(1.0, "mapping sigmoid slope b")
    mapping: str = opt("sigmoid", "r(t) mapping: sigmoid or const")
    stage_nimg: int = opt(3_200_000, "images per ECT stage (official: 25k iterations x batch 128 = 3.2M)")
    distance: str = opt("huber", "huber: sqrt(delta + c^2) - c; adaptive: delta / stopgrad(delta + c^2)^p")
    c: float = opt(0.0, "distance constant c >= 0 (CIFAR-10 0, ImageNet 64 0.06)")
    p: float = opt(0.5, "adaptive weight exponent p (distance=adaptive only)")
    weighting: str | Weighting = opt("inv_dt", "w(t, r): inv_dt = 1/(t-r), edm = 1/t^2 + 1/sigma_data^2, uniform")
    scalings: str | None = opt(None, "preconditioning scalings for training: edm or cm (None = precond.train_scalings)")

    def __post_init__(self) -> None:
        if self.q <= 1:
            raise ConfigError(f"ECT q must be > 1, got {self.q}: use e.g. 2 (CIFAR-10) or 4 (ImageNet 64)")
        if self.c < 0:
            raise ConfigError(f"ECT distance constant c must be >= 0, got {self.c}")
        if self.distance not in ("huber", "adaptive"):
            raise ConfigError(f"unknown ECT distance {self.distance!r}: use 'huber' or 'adaptive'")
        if self.mapping not in ("sigmoid", "const"):
            raise ConfigError(f"unknown ECT mapping {self.mapping!r}: use 'sigmoid' or 'const'")
        if isinstance(self.weighting, str) and self.weighting not in ECT_WEIGHTINGS:
            raise ConfigError(f"unknown ECT weighting {self.weighting!r}: use one of {', '.join(ECT_WEIGHTINGS)}")
        if self.stage_nimg <= 0:
            raise ConfigError(f"ECT stage_nimg must be positive, got {self.stage_nimg}")

    def stage(self, nimg: int) -> int:
        return schedules.ect_stage(nimg, self.stage_nimg)

    def r_of_t(self, t: torch.Tensor, nimg: int) -> torch.Tensor:
        return schedules.ect_r_of_t(t, self.stage(nimg), q=self.q, k=self.k, b=self.b, mapping=self.mapping)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "edm":
            return 1.0 / t.square() + 1.0 / self.sigma_data ** 2
        fn = ECT_WEIGHTINGS[self.weighting] if isinstance(self.weighting, str) else self.weighting
        return fn(t, r)

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, nimg: int,
                 generator: torch.Generator | None) -> torch.Tensor:
        t = schedules.sample_lognormal(x.shape[0], self.P_mean, self.P_std, generator=generator, device=x.device)
        r = self.r_of_t(t, nimg)
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        # which samples need the target pass: known before the student pass, so that on a GPU the host's
        # wait for it overlaps nothing but the sampling of t and r
        kept = (r > 0).nonzero().squeeze(1)
        with record_dropout(generator) as masks:
            D_t = denoiser(x + _per_sample(t, x) * eps, t, labels, scalings=self.scalings)
        D_r = consistency_target(denoiser, x, eps, r, labels, masks, self.scalings, kept=kept)
        delta = squared_distance(D_t, D_r)
        if self.distance == "huber":
            dist = pseudo_huber(delta, self.c)
        else:
            dist = adaptive_distance(delta, self.p, self.c)
        return dist * self.weight(t, r)

    def stats(self, nimg: int) -> dict[str, Any]:
        s = self.stage(nimg)
        return {"stage": s, "ratio": schedules.ect_ratio(s, self.q)}


def consistency_target(denoiser: nn.Module, x: torch.Tensor, eps: torch.Tensor, r: torch.Tensor,
                       labels: torch.Tensor | None, masks, scalings: str | None,
                       kept: torch.Tensor | None = None) -> torch.Tensor:
    """stopgrad(D(x + r eps, r)) with the student's dropout masks, computed only for samples with r > 0;
    samples with r = 0 get the clean image x (the boundary condition D(x, 0) = x). ``kept``: the
    positions of r > 0, when the caller has them already."""
    target_net = _unwrap(denoiser)
    idx = (r > 0).nonzero().squeeze(1) if kept is None else kept
    with torch.no_grad():
        if idx.numel() == r.numel():
            with replay_dropout(masks):
                return target_net(x + _per_sample(r, x) * eps, r, labels, scalings=scalings).detach()
        D_r = x.detach().clone()
        if idx.numel() > 0:
            r_i = r[idx]
            with replay_dropout(masks, idx):
                out = target_net(x[idx] + _per_sample(r_i, x) * eps[idx], r_i,
                                 None if labels is None else labels[idx], scalings=scalings)
            D_r[idx] = out.to(D_r.dtype)
        return D_r


@dataclass(frozen=True)
class ICTLoss:
    """Improved Consistency Training (iCT, DESIGN.md section 5).

    N = N(k) levels on the Karras grid (k = nimg // batch iterations of K = total_nimg // batch);
    i ~ discrete lognormal; (r, t) = (sigma_i, sigma_{i+1}); shared noise and dropout masks; target
    from the online network without gradients; loss = (sqrt(delta + c^2) - c) / (t - r),
    c = 0.00054 sqrt(d) unless given; "cm" scalings with sigma_min = 0.002.
    """

    total_nimg: int = opt(0, "total training images K*batch for the curriculum (0 = the run's total)")
    batch: int = opt(0, "batch size for counting iterations (0 = the run's batch)")
    sigma_min: float = opt(0.002, "smallest noise level of the Karras grid")
    sigma_max: float = opt(80.0, "largest noise level of the Karras grid")
    rho: float = opt(7.0, "Karras grid exponent rho")
    P_mean: float = opt(-1.1, "discrete lognormal mean of ln(sigma)")
    P_std: float = opt(2.0, "discrete lognormal std of ln(sigma)")
    s0: int = opt(10, "initial number of discretisation steps s0")
    s1: int = opt(1280, "final number of discretisation steps s1")
    c: float | None = opt(None, "pseudo-Huber c (None = 0.00054 sqrt(C*H*W))")
    scalings: str | None = opt("cm", "preconditioning scalings (iCT: cm with sigma_min = 0.002)")
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def num_levels(self, nimg: int) -> int:
        if self.batch <= 0 or self.total_nimg < self.batch:
            raise ConfigError(f"iCT needs batch > 0 and total_nimg >= batch, got batch={self.batch}, total_nimg={self.total_nimg}")
        return schedules.ict_num_levels(nimg // self.batch, self.total_nimg // self.batch, self.s0, self.s1)

    def _grid(self, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        if N not in self._cache:
            sigmas = schedules.karras_sigmas(N, self.sigma_min, self.sigma_max, self.rho)
            self._cache[N] = (sigmas, schedules.ict_index_probs(sigmas, self.P_mean, self.P_std))
        return self._cache[N]

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, nimg: int,
                 generator: torch.Generator | None) -> torch.Tensor:
        sigmas, probs = self._grid(self.num_levels(nimg))
        dev = x.device
        i = torch.multinomial(probs.to(dev), x.shape[0], replacement=True, generator=generator)
        sigmas = sigmas.to(dev, torch.float32)
        t, r = sigmas[i + 1], sigmas[i]
        eps = torch.randn(x.shape, generator=generator, device=dev)
        kept = (r > 0).nonzero().squeeze(1)  # all of them (r >= sigma_min); before the student pass, as in ECT
        with record_dropout(generator) as masks:
            D_t = denoiser(x + _per_sample(t, x) * eps, t, labels, scalings=self.scalings)
        D_r = consistency_target(denoiser, x, eps, r, labels, masks, self.scalings, kept=kept)
        c = self.c if self.c is not None else schedules.ict_pseudo_huber_c(x[0].numel())
        return pseudo_huber(squared_distance(D_t, D_r), c) / (t - r)

    def stats(self, nimg: int) -> dict[str, Any]:
        return {"num_levels": self.num_levels(nimg)}
