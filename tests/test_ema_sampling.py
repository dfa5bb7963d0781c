"""EMA of network weights (fixed and EDM2 power-function) and the samplers: per-image noise,
consistency sampling (ECT / iCT re-noising) and EDM's Heun / Euler sampler with churn."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ectune import sampling, schedules
from ectune.ema import EMAGroup, FixedEMA, PowerFunctionEMA
from ectune.errors import ConfigError
from ectune.networks import build_network
from ectune.precond import Denoiser


class TinyNet(nn.Module):
    """float64 parameters and a buffer, for exact EMA arithmetic."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("count", torch.zeros(2, dtype=torch.float64))
        self.fill(value)

    @torch.no_grad()
    def fill(self, value: float) -> TinyNet:
        for p in self.parameters():
            p.fill_(value)
        self.count.fill_(value)
        return self


def params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


# --------------------------------------------------------------------------------------------------
# FixedEMA.


@pytest.mark.parametrize("beta,n", [(0.9, 25), (0.5, 7), (0.0, 3)])
def test_fixed_ema_closed_form_for_a_constant_net(beta, n):
    """p_ema <- beta p_ema + (1 - beta) p: after n updates toward a constant P from E0,
    p_ema = beta^n E0 + (1 - beta^n) P."""
    net = TinyNet(2.0)
    ema = FixedEMA(net, beta)
    net.fill(-1.0)
    for k in range(n):
        ema.update(net, nimg=(k + 1) * 128, batch=128)
    (avg,) = ema.nets().values()
    expected = beta ** n * 2.0 + (1 - beta ** n) * -1.0
    torch.testing.assert_close(params(avg), torch.full_like(params(avg), expected), rtol=1e-12, atol=1e-12)
    assert torch.equal(avg.count, net.count)  # buffers are copied, not averaged


def test_fixed_ema_recursion_for_a_changing_net():
    beta = 0.8
    net = TinyNet(0.0)
    ema = FixedEMA(net, beta)
    expected = 0.0
    for k in range(1, 11):
        net.fill(float(k * k))
        ema.update(net, nimg=k, batch=1)
        expected = beta * expected + (1 - beta) * k * k
    torch.testing.assert_close(params(ema.ema), torch.full((8,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_fixed_ema_is_a_frozen_copy():
    net = TinyNet(1.0)
    ema = FixedEMA(net, 0.9999)
    assert ema.ema is not net and not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    net.fill(5.0)
    assert bool((params(ema.ema) == 1.0).all())
    assert list(ema.nets()) == ["ema-0.9999"]


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_fixed_ema_rejects_bad_beta(beta):
    with pytest.raises(ValueError):
        FixedEMA(TinyNet(), beta)


def test_fixed_ema_of_a_net_in_another_dtype_takes_the_per_tensor_path():
    """The fused update needs matching dtypes; a float32 net averaged into a float64 copy still
    follows the recursion (the per-tensor fallback)."""
    beta = 0.75
    net = TinyNet(1.0)
    ema = FixedEMA(net, beta)
    net.float().fill(3.0)
    ema.update(net, nimg=1, batch=1)
    expected = beta * 1.0 + (1 - beta) * 3.0
    assert params(ema.ema).dtype == torch.float64
    torch.testing.assert_close(params(ema.ema), torch.full((8,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# PowerFunctionEMA.


def test_power_function_ema_betas_match_official(official_values):
    """One update from p_ema = 0 toward p = 1 leaves p_ema = 1 - beta: read beta back from the
    class for every reference row (cur_nimg = images seen after the update)."""
    block = official_values["ect_imagenet64"]["phema_power_function_ema"]
    for row in block["values"]:
        ema = PowerFunctionEMA(TinyNet(0.0), stds=(row["std"],))
        assert ema.gammas[0] == pytest.approx(row["gamma_exp"], rel=1e-10)
        ema.update(TinyNet(1.0), nimg=row["cur_nimg_after_update"], batch=row["batch"])
        (avg,) = ema.nets().values()
        beta = 1.0 - params(avg)
        torch.testing.assert_close(beta, torch.full_like(beta, row["beta"]), rtol=1e-9, atol=1e-15)


def test_power_function_ema_sequence_follows_the_recursion(official_values):
    stds = (0.01, 0.05, 0.1)
    gammas = [official_values["ect_imagenet64"]["phema_power_function_ema"]["std_to_exp"][str(s)] for s in stds]
    batch = 32
    net = TinyNet(0.0)
    ema = PowerFunctionEMA(net, stds)
    expected = [0.0] * 3
    for k in range(1, 40):
        net.fill(math.sin(k))
        nimg = k * batch
        ema.update(net, nimg, batch)
        for j, g in enumerate(gammas):
            beta = (1 - batch / nimg) ** (g + 1)
            expected[j] = beta * expected[j] + (1 - beta) * math.sin(k)
    for (name, avg), value in zip(ema.nets().items(), expected):
        torch.testing.assert_close(params(avg), torch.full((8,), value, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert list(ema.nets()) == ["ema-std0.010", "ema-std0.050", "ema-std0.100"]


def test_power_function_ema_restart_counts_images_from_the_restart():
    net = TinyNet(3.0)
    ema = PowerFunctionEMA(net, (0.05,))
    ema.update(net.fill(7.0), nimg=10_000, batch=100)
    net.fill(-2.0)
    ema.restart(net, nimg=50_000)
    assert bool((params(ema.emas[0]) == -2.0).all())
    ema.update(net.fill(4.0), nimg=50_100, batch=100)  # first update after restart: beta = 0
    assert bool((params(ema.emas[0]) == 4.0).all())
    ema.update(net.fill(0.0), nimg=50_200, batch=100)  # second: beta(200 images)
    beta = schedules.power_ema_beta(200, 100, ema.gammas[0])
    torch.testing.assert_close(params(ema.emas[0]), torch.full((8,), 4.0 * beta, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# state_dict round trips.


def _train_some(group, net: TinyNet, start: int, steps: int, batch: int = 64) -> None:
    for k in range(start, start + steps):
        net.fill(math.cos(k))
        group.update(net, (k + 1) * batch, batch)


@pytest.mark.parametrize("kind", ["fixed", "power", "group"])
def test_ema_state_dict_round_trip(kind):
    def make(net):
        if kind == "fixed":
            return FixedEMA(net, 0.9)
        if kind == "power":
            return PowerFunctionEMA(net, (0.05, 0.1))
        return EMAGroup([PowerFunctionEMA(net, (0.01,)), FixedEMA(net, 0.99)])

    net = TinyNet(1.0)
    a = make(net)
    if kind != "fixed":
        (a.members[0] if kind == "group" else a).restart(net, nimg=64)
    _train_some(a, net, 1, 12)
    state = a.state_dict()

    b = make(TinyNet(-5.0))
    b.load_state_dict(state)
    for (na, ea), (nb, eb) in zip(a.nets().items(), b.nets().items()):
        assert na == nb
        for (ka, va), (kb, vb) in zip(ea.state_dict().items(), eb.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    if kind == "power":
        assert b.nimg_offset == 64
    # Resumed averages continue identically.
    _train_some(a, net, 13, 5)
    _train_some(b, net, 13, 5)
    for ea, eb in zip(a.nets().values(), b.nets().values()):
        assert torch.equal(params(ea), params(eb))


# --------------------------------------------------------------------------------------------------
# Per-image noise and batch-size independence.


def rowwise_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An exactly row-independent stand-in for a network: elementwise in x and sigma."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + s)) * 0.7 + 0.1 * x.square() / (1 + s)


def test_per_image_noise_rows_are_their_seeds_streams():
    noise = sampling.PerImageNoise([3, 11, 3], (2, 4))
    first, second = noise.randn(), noise.randn()
    assert first.shape == (3, 2, 4) and len(noise) == 3
    g = torch.Generator().manual_seed(11)
    assert torch.equal(first[1], torch.randn((2, 4), generator=g))
    assert torch.equal(second[1], torch.randn((2, 4), generator=g))
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], second[0])


def _in_batches(sample, seeds, sizes, shape):
    out, i = [], 0
    for n in sizes:
        out.append(sample(sampling.PerImageNoise(seeds[i:i + n], shape)))
        i += n
    return torch.cat(out)


SAMPLERS = {
    "consistency-1": lambda den: lambda noise: sampling.consistency_sample(den, noise, [80.0]),
    "consistency-2": lambda den: lambda noise: sampling.consistency_sample(den, noise, [80.0, 0.821]),
    "consistency-3-ict": lambda den: lambda noise: sampling.consistency_sample(den, noise, [80.0, 2.0, 0.3],
                                                                               renoise="ict"),
    "heun": lambda den: lambda noise: sampling.edm_sample(den, noise, 6),
    "euler-churn": lambda den: lambda noise: sampling.edm_sample(den, noise, 6, solver="euler", S_churn=10.0),
    "heun-churn": lambda den: lambda noise: sampling.edm_sample(den, noise, 6, S_churn=40.0, S_min=0.05, S_max=50.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sample_is_independent_of_batch_size(name):
    seeds, shape = list(range(8)), (2, 3)
    sample = SAMPLERS[name](rowwise_denoiser)
    whole = sample(sampling.PerImageNoise(seeds, shape))
    assert whole.shape == (8, *shape) and whole.dtype == torch.float64
    assert torch.equal(whole, _in_batches(sample, seeds, [3, 3, 2], shape))
    assert torch.equal(whole[5:6], sample(sampling.PerImageNoise([5], shape)))


@pytest.mark.parametrize("name", ["consistency-2", "heun-churn"])
def test_network_sample_is_independent_of_batch_size(name):
    """With a real (random) network; batched matmuls may round differently per batch size."""
    torch.manual_seed(0)
    net = build_network("mlp", dim=6, hidden_dim=32, num_blocks=2, noise_channels=16)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.3)
    den = Denoiser(net, scalings="cm", sigma_min=0.002).eval()
    seeds, shape = list(range(8)), (6,)
    sample = SAMPLERS[name](den)
    whole = sample(sampling.PerImageNoise(seeds, shape))
    torch.testing.assert_close(whole, _in_batches(sample, seeds, [3, 3, 2], shape), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Consistency sampling.


class Recorder:
    def __init__(self, fn=None):
        self.inputs: list[torch.Tensor] = []
        self.sigmas: list[torch.Tensor] = []
        self.fn = fn or (lambda x, s: torch.zeros_like(x))

    def __call__(self, x, sigma):
        self.inputs.append(x.clone())
        self.sigmas.append(sigma.clone())
        return self.fn(x, sigma)


@pytest.mark.parametrize("levels", [[80.0], [80.0, 0.821], [80.0, 1.526], [80.0, 5.0, 0.5]])
def test_consistency_sampling_calls_the_denoiser_once_per_level(levels):
    rec = Recorder(rowwise_denoiser)
    out = sampling.consistency_sample(rec, sampling.PerImageNoise(range(4), (3,)), levels)
    assert len(rec.inputs) == len(levels) == sampling.nfe("consistency", len(levels))
    assert [s[0].item() for s in rec.sigmas] == pytest.approx(levels)
    assert all(s.shape == (4,) and s.dtype == torch.float32 for s in rec.sigmas)
    assert out.shape == (4, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("renoise", ["ect", "ict"])
def test_consistency_renoising_scale(renoise):
    """With D = 0 the input at the second level is pure re-noising noise: tau z' (ECT) or
    sqrt(tau^2 - sigma_min^2) z' (iCT). tau close to sigma_min tells them apart."""
    tau, sigma_min = 0.003, 0.002
    rec = Recorder()
    sampling.consistency_sample(rec, sampling.PerImageNoise(range(256), (64,)), [80.0, tau], sigma_min=sigma_min,
                                renoise=renoise)
    first, second = rec.inputs
    n = first.numel()
    assert first.double().std().item() == pytest.approx(80.0, rel=5 / math.sqrt(2 * n))
    expected = tau if renoise == "ect" else math.sqrt(tau ** 2 - sigma_min ** 2)
    assert second.double().std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * n))


def test_ect_and_ict_renoising_use_the_same_noise():
    tau, sigma_min = 0.5, 0.3
    inputs = {}
    for renoise in ("ect", "ict"):
        rec = Recorder()
        sampling.consistency_sample(rec, sampling.PerImageNoise(range(4), (5,)), [80.0, tau], sigma_min=sigma_min,
                                    renoise=renoise)
        inputs[renoise] = rec.inputs[1].double()
    ratio = math.sqrt(tau ** 2 - sigma_min ** 2) / tau  # 0.8
    torch.testing.assert_close(inputs["ict"], ratio * inputs["ect"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("levels", [[0.821, 80.0], [1.0, 1.0], [80.0, 0.5, 0.8], []])
def test_consistency_sampling_rejects_non_decreasing_levels(levels):
    with pytest.raises(ConfigError):
        sampling.consistency_sample(rowwise_denoiser, sampling.PerImageNoise([0], (2,)), levels)


def test_consistency_sampling_rejects_unknown_renoise():
    with pytest.raises(ConfigError):
        sampling.consistency_sample(rowwise_denoiser, sampling.PerImageNoise([0], (2,)), [80.0, 1.0], renoise="ddim")


# --------------------------------------------------------------------------------------------------
# EDM sampler.


@pytest.mark.parametrize("solver,steps", [("heun", 18), ("heun", 5), ("euler", 18), ("euler", 5), ("heun", 1)])
def test_edm_sampler_network_evaluations(solver, steps):
    rec = Recorder(rowwise_denoiser)
    sampling.edm_sample(rec, sampling.PerImageNoise(range(2), (3,)), steps, solver=solver)
    assert len(rec.inputs) == sampling.nfe(solver, steps)
    assert all(bool((s > 0).all()) for s in rec.sigmas)  # never evaluated at sigma = 0


def test_churn_adds_the_noise_that_lifts_the_level_to_t_hat():
    """EDM Algorithm 2: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps. With D(x) = x and one step the sample
    is x_hat itself (d = 0), so its std is sqrt(80^2 + S_noise^2 (t_hat^2 - 80^2)), t_hat = sqrt(2) 80
    (gamma = min(S_churn / 1, sqrt2 - 1)); outside [S_min, S_max] it stays 80."""
    identity = lambda x, s: x  # noqa: E731
    for S_noise in (1.0, 0.5):
        x = sampling.edm_sample(identity, sampling.PerImageNoise([0], (200_000,)), 1, S_churn=1.0, S_noise=S_noise)
        assert x.std().item() == pytest.approx(math.sqrt(80 ** 2 + S_noise ** 2 * 80 ** 2), rel=0.01)
    x = sampling.edm_sample(identity, sampling.PerImageNoise([0], (200_000,)), 1, S_churn=1.0, S_max=50.0)
    assert x.std().item() == pytest.approx(80.0, rel=0.01)


def test_edm_sampler_with_churn_runs_and_differs():
    noise = lambda: sampling.PerImageNoise(range(6), (4,))  # noqa: E731
    plain = sampling.edm_sample(rowwise_denoiser, noise(), 10)
    rec = Recorder(rowwise_denoiser)
    churn = sampling.edm_sample(rec, noise(), 10, S_churn=30.0, S_min=0.01, S_max=50.0, S_noise=1.007)
    assert torch.isfinite(churn).all()
    assert not torch.allclose(plain, churn)
    assert len(rec.inputs) == sampling.nfe("heun", 10)
    # Churn raises the evaluated level: t_hat = (1 + gamma) t_cur, gamma = min(S_churn/N, sqrt2 - 1).
    t = schedules.edm_sampling_sigmas(10)
    gamma = min(30.0 / 10, math.sqrt(2) - 1)
    t_hat = float(t[1]) * (1 + gamma)  # t[1] ~ 42 lies in [S_min, S_max]; t[0] = 80 does not
    assert rec.sigmas[0][0].item() == pytest.approx(80.0)
    assert rec.sigmas[2][0].item() == pytest.approx(t_hat, rel=1e-6)


def test_edm_sampler_churn_outside_its_window_changes_nothing():
    noise = lambda: sampling.PerImageNoise(range(6), (4,))  # noqa: E731
    plain = sampling.edm_sample(rowwise_denoiser, noise(), 8)
    idle = sampling.edm_sample(rowwise_denoiser, noise(), 8, S_churn=40.0, S_min=100.0, S_max=200.0)
    assert torch.equal(plain, idle)


def test_edm_sampler_rejects_unknown_solver():
    with pytest.raises(ConfigError):
        sampling.edm_sample(rowwise_denoiser, sampling.PerImageNoise([0], (2,)), 4, solver="rk4")


def test_nfe():
    assert [sampling.nfe("heun", n) for n in (1, 18, 40)] == [1, 35, 79]
    assert sampling.nfe("euler", 18) == 18 and sampling.nfe("consistency", 2) == 2


# --------------------------------------------------------------------------------------------------
# Gaps a mutation audit found (each test fails under the mutation named in it).


def test_an_ema_group_updates_every_member_as_alone():
    """EMAGroup.update reaching only its first member went unnoticed: each member of a group must end
    where the same EMA, updated on its own, ends."""
    net = TinyNet(0.0)
    group = EMAGroup([FixedEMA(net, 0.9), FixedEMA(net, 0.5), PowerFunctionEMA(net, (0.05, 0.1))])
    alone = [FixedEMA(net, 0.9), FixedEMA(net, 0.5), PowerFunctionEMA(net, (0.05, 0.1))]
    for step in range(1, 6):
        net.fill(float(step))
        group.update(net, step * 4, 4)
        for ema in alone:
            ema.update(net, step * 4, 4)
    expected = {name: params(m) for ema in alone for name, m in ema.nets().items()}
    got = {name: params(m) for name, m in group.nets().items()}
    assert got.keys() == expected.keys() and len(got) == 4
    for name in got:
        assert torch.equal(got[name], expected[name]), name
        assert not torch.equal(got[name], params(TinyNet(0.0))), name  # every member moved


def test_check_finite_catches_a_single_nan_or_inf():
    x = torch.zeros(3, 1, 2, 2)
    assert sampling.check_finite(x) is x
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 0, 1, 0] = bad
        with pytest.raises(Exception, match="NaN or inf"):
            sampling.check_finite(y)


def test_to_uint8_is_edms_quantisation():
    """-1, 0, 1 -> 0, 128, 255, and x * 127.5 + 127.5 rounded half up on a fine grid (a +127.5 offset
    in place of EDM's +128 survived every other test)."""
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(5, 1, 1, 1)
    assert sampling.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    grid = torch.linspace(-1, 1, 100_001, dtype=torch.float64).view(-1, 1, 1, 1)
    expected = torch.floor(grid * 127.5 + 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(sampling.to_uint8(grid), expected)


class _Spy:
    """A denoiser that records the noise levels it is called at and returns zeros."""

    def __init__(self) -> None:
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(sigma.flatten()[0]))
        return torch.zeros_like(x)


def test_consistency_sampling_starts_at_the_first_level_and_refuses_non_positive_ones():
    spy = _Spy()
    noise = sampling.PerImageNoise([0, 1], (2,))
    sampling.consistency_sample(spy, noise, [40.0, 0.5])
    assert spy.sigmas == [40.0, 0.5]
    for levels in ([80.0, 0.0], [80.0, -1.0], [0.0]):
        with pytest.raises(ConfigError, match="decrease and stay positive"):
            sampling.consistency_sample(spy, sampling.PerImageNoise([0], (2,)), levels)


def test_churn_applies_at_s_min_itself():
    """EDM's churn window is S_min <= t <= S_max, both ends included."""
    t = schedules.edm_sampling_sigmas(4).tolist()
    spy = _Spy()
    sampling.edm_sample(spy, sampling.PerImageNoise([0], (2,)), 4, S_churn=1.0, S_min=t[1], S_max=t[1])
    gamma = min(1.0 / 4, math.sqrt(2.0) - 1.0)
    assert spy.sigmas[0] == pytest.approx(t[0]) and spy.sigmas[2] == pytest.approx(t[1] * (1 + gamma))
