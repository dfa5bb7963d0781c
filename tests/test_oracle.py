"""Properties the maths guarantees (STYLE.md item 9), checked with Gaussian data x ~ N(0, sd^2 I).

For Gaussian data the ideal denoiser is D*(x, sigma) = sd^2/(sigma^2+sd^2) x, the probability-flow
ODE dx/dsigma = (x - D*)/sigma has the exact solution x(sigma) ∝ sqrt(sigma^2 + sd^2), and the exact
consistency function is f*(x, sigma) = x sd/sqrt(sigma^2+sd^2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ectune import losses, sampling, schedules
from ectune.precond import Denoiser, coefficients

SD = 0.5


class GaussianOracleF(nn.Module):
    """The backbone F whose preconditioned denoiser is the Gaussian oracle D*.

    From D = c_skip x + c_out F(c_in x, c_noise): F = (D*(x, sigma) - c_skip x) / c_out, with
    sigma = exp(4 c_noise) and x = y / c_in recovered from the backbone's own inputs. Computed in
    float64. With "edm" scalings c_skip = sd^2/(sigma^2+sd^2) is already D*'s coefficient, so
    F* = 0 there; with "cm" scalings F* is not zero (and undefined at sigma = sigma_min).
    """

    def __init__(self, scalings: str = "edm", sigma_min: float = 0.002, sigma_data: float = SD) -> None:
        super().__init__()
        self.scalings, self.sigma_min, self.sigma_data = scalings, sigma_min, sigma_data
        self.label_dim = 0

    def forward(self, y, noise_labels, class_labels=None):
        y64 = y.to(torch.float64)
        sigma = (4 * noise_labels.to(torch.float64)).exp().reshape(-1, *([1] * (y.ndim - 1)))
        c = coefficients(sigma, self.sigma_data, self.scalings, self.sigma_min)
        x = y64 / c.c_in
        d_star = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2) * x
        return ((d_star - c.c_skip * x) / c.c_out).to(y.dtype)


def oracle_denoiser(scalings: str = "edm", sigma_min: float = 0.002) -> Denoiser:
    return Denoiser(GaussianOracleF(scalings, sigma_min), sigma_data=SD, scalings=scalings, sigma_min=sigma_min)


def d_star(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return SD ** 2 / (sigma ** 2 + SD ** 2) * x.to(torch.float64)


def f_star(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return x.to(torch.float64) * SD / (sigma ** 2 + SD ** 2).sqrt()


# --------------------------------------------------------------------------------------------------
# The oracle itself.


@pytest.mark.parametrize("scalings", ["edm", "cm"])
def test_oracle_network_gives_the_ideal_denoiser(scalings):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    sigma = schedules.sample_lognormal(64, -1.2, 1.2, generator=g)
    D = oracle_denoiser(scalings)(x, sigma)
    torch.testing.assert_close(D.double(), d_star(x, sigma), rtol=1e-5, atol=1e-6)


def test_ideal_network_output_is_zero_under_edm_scalings():
    """EDM's c_skip equals the Gaussian posterior-mean coefficient, so F* = 0 with "edm" scalings
    (a zero-initialised output layer starts exactly at the Gaussian oracle); "cm" needs F* != 0."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(32, 4, generator=g)
    c_noise = schedules.sample_lognormal(32, -1.2, 1.2, generator=g).log() / 4
    assert GaussianOracleF("edm")(y, c_noise).abs().max().item() < 1e-6
    assert GaussianOracleF("cm")(y, c_noise).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------------
# EDM loss.


@pytest.mark.parametrize("scalings", ["edm", "cm"])
def test_edm_loss_of_the_ideal_denoiser_is_one_per_element(scalings):
    """E||D* - x||^2 per element = sigma^2 sd^2/(sigma^2+sd^2) (posterior variance), and lambda is
    its inverse: the expected loss is 1 per element at every sigma. Each element's loss is then
    chi-square(1), variance 2: compare the Monte-Carlo mean within 4 standard errors."""
    B, dim = 4096, 64
    g = torch.Generator().manual_seed(2)
    x = SD * torch.randn(B, dim, generator=g)
    loss = losses.EDMLoss(sigma_data=SD, scalings=scalings)(oracle_denoiser(scalings), x, None, 0, g)
    assert loss.shape == (B,)
    per_element = loss.double() / dim
    standard_error = math.sqrt(2.0 / (B * dim))
    assert abs(per_element.mean().item() - 1.0) < 4 * standard_error
    # Per-sample: sum of dim chi-square(1) / dim has variance 2/dim.
    assert per_element.var().item() == pytest.approx(2.0 / dim, rel=0.1)


def test_edm_loss_of_a_wrong_denoiser_is_larger():
    B, dim = 2048, 32
    g = torch.Generator().manual_seed(3)
    x = SD * torch.randn(B, dim, generator=g)

    def shrunk(x_noisy, sigma, labels, scalings=None):
        return 0.8 * oracle_denoiser()(x_noisy, sigma)

    loss = losses.EDMLoss(sigma_data=SD)(shrunk, x, None, 0, g)
    assert (loss.double() / dim).mean().item() > 1.05


# --------------------------------------------------------------------------------------------------
# Probability-flow ODE samplers.


def _sampler_error(solver: str, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> float:
    """Relative error of edm_sample with the oracle against the exact flow map to sigma = 0:
    x(0) = x(sigma_max) sd / sqrt(sigma_max^2 + sd^2)."""
    seeds = range(32)
    noise = sampling.PerImageNoise(seeds, (8,))
    x_max = sampling.PerImageNoise(seeds, (8,)).randn().double() * sigma_max
    exact = x_max * SD / math.sqrt(sigma_max ** 2 + SD ** 2)
    den = oracle_denoiser()
    out = sampling.edm_sample(den, noise, steps, sigma_min=sigma_min, sigma_max=sigma_max, solver=solver)
    assert out.dtype == torch.float64
    return ((out - exact).norm() / exact.norm()).item()


def _observed_orders(solver: str, steps=(8, 16, 32, 64)) -> list[float]:
    errors = [_sampler_error(solver, n) for n in steps]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    return [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]


def test_heun_converges_to_the_exact_flow_map_with_order_two():
    """The rho = 7 grid is uniform in sigma^(1/rho), so halving the step of that grid shows the
    method's order empirically; the final Euler step to sigma = 0 adds a fixed error of about
    sigma_min^2 / (2 sd^2) = 8e-6, far below these errors."""
    orders = _observed_orders("heun")
    assert all(p > 1.7 for p in orders), orders
    assert _sampler_error("heun", 128) < 2e-3


def test_euler_converges_to_the_exact_flow_map_with_order_one():
    orders = _observed_orders("euler")
    assert all(0.7 < p < 1.3 for p in orders), orders


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    assert _sampler_error("heun", 32) < 0.5 * _sampler_error("euler", 32)


def test_heun_with_cm_oracle_matches_edm_oracle():
    """The two scalings give the same ideal denoiser, so the samplers agree (sigma_min of the cm
    scalings below the grid's smallest level, where F* is defined)."""
    seeds = range(8)
    a = sampling.edm_sample(oracle_denoiser("edm"), sampling.PerImageNoise(seeds, (4,)), 12)
    b = sampling.edm_sample(oracle_denoiser("cm", sigma_min=0.001), sampling.PerImageNoise(seeds, (4,)), 12)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Consistency sampling with the exact consistency function.


def _std_check(samples: torch.Tensor, sd: float, sigmas: int = 5) -> None:
    n = samples.numel()
    # std of a sample std of n Gaussians ~ sd / sqrt(2 n).
    assert abs(samples.std().item() - sd) < sigmas * sd / math.sqrt(2 * n)
    assert abs(samples.mean().item()) < sigmas * sd / math.sqrt(n)


def test_one_step_sampling_with_the_exact_consistency_function_has_data_std():
    noise = sampling.PerImageNoise(range(512), (16,))
    x = sampling.consistency_sample(f_star, noise, [80.0])
    assert x.dtype == torch.float64 and x.shape == (512, 16)
    _std_check(x, SD)
    # And it is the exact map of its noise: f*(80 z, 80).
    z = sampling.PerImageNoise(range(512), (16,)).randn()
    torch.testing.assert_close(x, f_star(80.0 * z, torch.full((512,), 80.0)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("renoise", ["ect", "ict"])
def test_two_step_sampling_with_the_exact_consistency_function_has_data_std(renoise):
    """x1 ~ N(0, sd^2); x1 + tau z' has std sqrt(sd^2 + tau^2) (ect), and f* maps it back to sd.
    The iCT re-noising sqrt(tau^2 - smin^2) differs by a relative 1e-6 at tau = 0.821."""
    noise = sampling.PerImageNoise(range(512), (16,))
    x = sampling.consistency_sample(f_star, noise, [80.0, 0.821], renoise=renoise)
    _std_check(x, SD)


def test_one_step_sampling_with_the_ideal_denoiser_collapses_to_the_mean():
    """The denoiser is not a consistency function: one step of D* from sigma = 80 gives std
    sd^2 * 80 / (80^2 + sd^2) ~ 0.003, far below sd (the std checks above have teeth)."""
    noise = sampling.PerImageNoise(range(256), (16,))
    x = sampling.consistency_sample(lambda x, s: d_star(x, s).float(), noise, [80.0])
    assert x.std().item() < 0.1 * SD


# --------------------------------------------------------------------------------------------------
# "cm" boundary condition with a random network.


def _random_mlp(dim: int, seed: int) -> nn.Module:
    from ectune.networks import build_network

    torch.manual_seed(seed)
    net = build_network("mlp", dim=dim, hidden_dim=32, num_blocks=2, noise_channels=16)
    with torch.no_grad():
        for p in net.parameters():  # the output layer starts at zero: randomise everything
            p.normal_(0.0, 0.3)
    return net


@pytest.mark.parametrize("sigma_min", [0.002, 0.003])
def test_cm_boundary_condition_for_a_random_network(sigma_min):
    net = _random_mlp(6, seed=4)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    den = Denoiser(net, sigma_data=SD, scalings="cm", sigma_min=sigma_min)
    assert torch.equal(den(x, sigma_min), x)
    assert torch.equal(den(x, torch.full((16,), sigma_min)), x)
    # The same network with "edm" scalings is not the identity there, nor is "cm" above sigma_min.
    assert not torch.allclose(den(x, sigma_min, scalings="edm"), x, atol=1e-4)
    assert not torch.allclose(den(x, 0.1), x, atol=1e-3)
    # Continuity: D -> x as sigma -> sigma_min.
    assert (den(x, sigma_min * (1 + 1e-4)) - x).abs().max().item() < 1e-3


def test_cm_boundary_condition_for_a_random_unet():
    from ectune.networks import SongUNet

    torch.manual_seed(6)
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    den = Denoiser(net, sigma_data=SD, scalings="cm", sigma_min=0.002).eval()
    assert torch.equal(den(x, 0.002), x)
    assert not torch.allclose(den(x, 1.0), x, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# ECT mapping and iCT distribution.

T_GRID = torch.logspace(-4, 3, 2001, dtype=torch.float64)


def test_r_of_t_uses_k_and_b():
    """r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t)))) worked by hand for k and b other than the reference
    values' 8 and 1 (which every official case uses), through ECTLoss as well."""
    t = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    for k, b, q, stage in [(4.0, 2.0, 2.0, 0), (2.0, 0.5, 4.0, 1)]:
        expected = [max(0.0, x * (1 - q ** -(stage + 1) * (1 + k / (1 + math.exp(b * x))))) for x in t.tolist()]
        got = schedules.ect_r_of_t(t, stage, q=q, k=k, b=b)
        assert got.tolist() == pytest.approx(expected, rel=1e-12)
        loss = losses.ECTLoss(q=q, k=k, b=b, stage_nimg=1000)
        assert loss.r_of_t(t, nimg=stage * 1000).tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("q,stages", [(2, range(0, 30)), (4, range(0, 15)), (256, range(0, 4))])
@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
def test_r_is_below_t_and_approaches_it_with_the_stage(q, stages, mapping):
    previous = None
    for stage in stages:
        r = schedules.ect_r_of_t(T_GRID, stage, q=q, mapping=mapping)
        assert r.dtype == torch.float64
        assert bool((r >= 0).all()) and bool((r < T_GRID).all()), (q, stage)
        ratio = r / T_GRID
        if previous is not None:
            assert bool((ratio >= previous).all()), (q, stage)
            assert bool((ratio > previous)[r > 0].all())  # strictly, where r > 0
        # r/t is non-decreasing in t too (the sigmoid term decays with t), up to the rounding of r/t.
        assert bool((ratio[1:] >= ratio[:-1] - 1e-15).all())
        assert ratio.max().item() <= schedules.ect_ratio(stage, q) + 1e-15
        previous = ratio
    assert previous.min().item() > 1 - 10 * float(q) ** -(stages[-1] + 1)  # -> 1


@pytest.mark.parametrize("q,max_stage", [(2, 15), (4, 7), (256, 1)])
def test_r_is_below_t_in_float32_over_realistic_runs(q, max_stage):
    """float32 t as in training: r < t strictly (so 1/(t - r) is finite) up to the stages official
    runs reach (CIFAR-10 400k iterations -> stage 15; ImageNet 64 -> 3; the 1-hour q=256 run -> 0)."""
    t = torch.logspace(-3, math.log10(80.0), 500, dtype=torch.float32)
    for stage in range(max_stage + 1):
        r = schedules.ect_r_of_t(t, stage, q=q)
        assert bool((r >= 0).all()) and bool((r < t).all()), (q, stage)
        assert torch.isfinite(losses.ECT_WEIGHTINGS["inv_dt"](t, r)).all()


def test_stage_minus_one_is_diffusion_training():
    """The exponent is s + 1: at s = -1, q^0 = 1 and r = 0 everywhere."""
    r = schedules.ect_r_of_t(T_GRID, -1, q=2)
    assert bool((r == 0).all())


@pytest.mark.parametrize("N", [11, 21, 1281])
def test_ict_probabilities_are_a_distribution(N):
    sigmas = schedules.karras_sigmas(N)
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(80.0)
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    p = schedules.ict_index_probs(sigmas)
    assert p.shape == (N - 1,)
    assert bool((p > 0).all())
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
