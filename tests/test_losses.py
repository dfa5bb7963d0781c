"""ECT / iCT / EDM loss mechanics with small random networks: stop-gradient target, shared noise,
shared dropout masks, the r = 0 shortcut, distances and weightings (DESIGN.md sections 3-5).

The denoiser is wrapped in a spy that records every call (inputs, sigma, scalings, whether grad
was enabled, and the output with its graph); SharedDropout layers are observed with forward hooks,
so the tests read the masks the network actually used without relying on ectune's RNG order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ectune import losses, schedules
from ectune.errors import ConfigError
from ectune.networks import SharedDropout, SongUNet, build_network, record_dropout, replay_dropout
from ectune.precond import Denoiser

DIM = 8
STAGE1_NIMG = 3_200_000  # stage 1 with the default stage length: r = 0 for t < 0.51 (about 58%)


def randomise(net: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Random values in every parameter (ectune's backbones zero-initialise their output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def mlp(dropout: float = 0.3, label_dim: int = 0, seed: int = 0, dim: int = DIM) -> nn.Module:
    net = build_network("mlp", dim=dim, hidden_dim=32, num_blocks=2, noise_channels=16, label_dim=label_dim,
                        dropout=dropout)
    return randomise(net, seed)


def tiny_unet(dropout: float = 0.3, label_dim: int = 0, seed: int = 0) -> nn.Module:
    net = SongUNet(img_resolution=8, in_channels=2, out_channels=2, label_dim=label_dim, model_channels=8,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=dropout)
    return randomise(net, seed, std=0.15)


class Spy(nn.Module):
    """Wraps a denoiser and records every call. The inner module is not called ``module`` so that
    the losses' DDP unwrapping keeps the spy in the target pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[SimpleNamespace] = []

    def forward(self, x, sigma, labels=None, scalings=None):
        out = self.inner(x, sigma, labels, scalings=scalings)
        self.calls.append(SimpleNamespace(x=x.detach().clone(), sigma=sigma.detach().clone(), labels=labels,
                                          scalings=scalings, grad=torch.is_grad_enabled(), out=out))
        return out


class DropoutTape:
    """Forward hooks on every active SharedDropout: records (input, output, grad enabled) per call."""

    def __init__(self, net: nn.Module) -> None:
        self.modules = [m for m in net.modules() if isinstance(m, SharedDropout) and m.p > 0]
        assert self.modules, "the network has no active dropout"
        self.records: list[SimpleNamespace] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module, inputs, output):
        self.records.append(SimpleNamespace(p=module.p, inp=inputs[0].detach().clone(), out=output.detach().clone(),
                                            grad=torch.is_grad_enabled()))

    def student(self) -> list[SimpleNamespace]:
        return [r for r in self.records if r.grad]

    def target(self) -> list[SimpleNamespace]:
        return [r for r in self.records if not r.grad]

    def student_masks(self) -> list[torch.Tensor]:
        """Keep-masks of the student pass (dropout inputs are never exactly 0 in these networks)."""
        return [r.out != 0 for r in self.student()]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def explicit_masks(net: nn.Module, masks: list[torch.Tensor]):
    """Run ``net`` with the given keep-masks (in call order) in place of its own dropout draws."""
    it = iter(masks)

    def hook(module, inputs, output):
        keep = next(it)
        return inputs[0] * keep.to(inputs[0].dtype) * (1.0 / (1.0 - module.p))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, SharedDropout) and m.p > 0]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    assert next(it, None) is None, "not every mask was used"


def data(B: int = 64, shape=(DIM,), seed: int = 1) -> torch.Tensor:
    return 0.5 * torch.randn(B, *shape, generator=torch.Generator().manual_seed(seed))


def run_loss(loss_fn, net: nn.Module, x: torch.Tensor, nimg: int, seed: int = 2, labels=None):
    """Call the loss on a spied denoiser with a dropout tape; returns (loss, spy, tape)."""
    spy = Spy(Denoiser(net)).train()
    tape = DropoutTape(net) if any(isinstance(m, SharedDropout) and m.p > 0 for m in net.modules()) else None
    try:
        loss = loss_fn(spy, x, labels, nimg, torch.Generator().manual_seed(seed))
    finally:
        if tape is not None:
            tape.close()
    return loss, spy, tape


def target_full(spy: Spy, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """D_r assembled from the spy: the target pass's output at rows with r > 0, x elsewhere."""
    D_r = x.clone()
    if bool(keep.any()):
        assert len(spy.calls) == 2
        D_r[keep] = spy.calls[1].out.detach()
    else:
        assert len(spy.calls) == 1
    return D_r


def grads(scalar: torch.Tensor, net: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(scalar, list(net.parameters()), retain_graph=True, allow_unused=True))


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7, factor: float = 1.0):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, factor * gb, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# Stop-gradient target.


def test_target_pass_runs_without_gradients():
    loss, spy, _ = run_loss(losses.ECTLoss(), mlp(), data(), STAGE1_NIMG)
    assert len(spy.calls) == 2
    student, target = spy.calls
    assert student.grad and student.out.requires_grad
    assert not target.grad and not target.out.requires_grad
    assert loss.requires_grad


@pytest.mark.parametrize("c", [0.0, 0.06])
def test_loss_gradient_equals_gradient_with_a_constant_target(c):
    net, x = mlp(), data()
    loss_fn = losses.ECTLoss(c=c)
    loss, spy, tape = run_loss(loss_fn, net, x, STAGE1_NIMG)
    student = spy.calls[0]
    t = student.sigma
    r = loss_fn.r_of_t(t, STAGE1_NIMG)
    keep = r > 0
    assert 0 < int(keep.sum()) < len(x)
    D_r = target_full(spy, x, keep)
    delta = (student.out - D_r).square().flatten(1).sum(1)
    manual = (torch.sqrt(delta + c * c) - c) / (t - r)
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-7)
    g_loss = grads(loss.mean(), net)
    assert_grads_close(g_loss, grads(manual.mean(), net))

    # Sensitivity: the same target computed with gradients (same masks) gives another gradient.
    D_r_grad = x.clone()
    with explicit_masks(net, [m[keep] for m in tape.student_masks()]):
        D_r_grad[keep] = Denoiser(net).train()(spy.calls[1].x, spy.calls[1].sigma)
    assert D_r_grad.requires_grad
    torch.testing.assert_close(D_r_grad.detach(), D_r, rtol=1e-5, atol=1e-6)
    leaky = (torch.sqrt((student.out - D_r_grad).square().flatten(1).sum(1) + c * c) - c) / (t - r)
    g_leaky = grads(leaky.mean(), net)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g_loss, g_leaky) if a is not None)


# --------------------------------------------------------------------------------------------------
# Shared noise and shared dropout masks.


def test_student_and_target_share_the_noise():
    net, x = mlp(), data(B=128)
    loss_fn = losses.ECTLoss()
    _, spy, _ = run_loss(loss_fn, net, x, STAGE1_NIMG)
    student, target = spy.calls
    t = student.sigma
    r = loss_fn.r_of_t(t, STAGE1_NIMG)
    keep = r > 0
    torch.testing.assert_close(target.sigma, r[keep], rtol=0, atol=0)
    eps_t = (student.x - x) / t[:, None]
    eps_r = (target.x - x[keep]) / r[keep][:, None]
    # Allow the float32 rounding of x + sigma eps, amplified by 1/sigma.
    ulp = 2.0 ** -23
    err_t = ulp * (x[keep].abs() + student.x[keep].abs()) / t[keep][:, None]
    err_r = ulp * (x[keep].abs() + target.x.abs()) / r[keep][:, None]
    assert bool(((eps_t[keep] - eps_r).abs() <= 4 * (err_t + err_r)).all())
    # And eps is standard normal noise, not something degenerate.
    assert eps_t.std().item() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("arch", ["mlp", "songunet"])
def test_target_pass_replays_the_student_dropout_masks(arch):
    if arch == "mlp":
        net, x = mlp(dropout=0.4), data(B=48)
    else:
        net, x = tiny_unet(dropout=0.4), data(B=12, shape=(2, 8, 8))
    loss_fn = losses.ECTLoss()
    _, spy, tape = run_loss(loss_fn, net, x, STAGE1_NIMG)
    keep = loss_fn.r_of_t(spy.calls[0].sigma, STAGE1_NIMG) > 0
    assert 0 < int(keep.sum()) < len(x)
    student, target = tape.student(), tape.target()
    assert len(student) == len(target) == len(tape.modules)
    for s, tr in zip(student, target):
        # The target pass's kept units are the student's, at the rows the target pass runs on ...
        assert torch.equal(tr.out != 0, (s.out != 0)[keep])
        # ... and it applies exactly dropout with those masks.
        torch.testing.assert_close(tr.out, tr.inp * (s.out != 0)[keep] / (1 - tr.p), rtol=1e-6, atol=1e-7)
        assert 0.3 < (s.out == 0).float().mean().item() < 0.5  # the masks really drop ~40%

    # Calling the network with the student's masks explicitly reproduces the target output.
    target_call = spy.calls[1]
    den = Denoiser(net).train()
    with torch.no_grad(), explicit_masks(net, [m[keep] for m in tape.student_masks()]):
        replay = den(target_call.x, target_call.sigma)
    torch.testing.assert_close(replay, target_call.out, rtol=1e-5, atol=1e-6)
    # Fresh masks give another output: dropout is active in these passes.
    with torch.no_grad():
        fresh = den(target_call.x, target_call.sigma)
    assert not torch.allclose(fresh, target_call.out, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# The r = 0 shortcut and the subset target pass.


def test_r_zero_samples_never_reach_the_network():
    net, x = mlp(), data(B=96)
    loss_fn = losses.ECTLoss()
    _, spy, _ = run_loss(loss_fn, net, x, STAGE1_NIMG)
    r = loss_fn.r_of_t(spy.calls[0].sigma, STAGE1_NIMG)
    n_pos = int((r > 0).sum())
    assert 0 < n_pos < len(x)
    assert [c.x.shape[0] for c in spy.calls] == [len(x), n_pos]
    assert bool((spy.calls[1].sigma > 0).all())


def test_all_r_zero_runs_only_the_student():
    """Tiny t at stage 0: r = 0 everywhere, the target is x and the network runs once."""
    net, x = mlp(), data(B=16)
    loss_fn = losses.ECTLoss(P_mean=-6.0, P_std=0.1, c=0.01)
    loss, spy, _ = run_loss(loss_fn, net, x, 0)
    assert len(spy.calls) == 1
    t = spy.calls[0].sigma
    assert bool((loss_fn.r_of_t(t, 0) == 0).all())
    delta = (spy.calls[0].out - x).square().sum(1)
    torch.testing.assert_close(loss, (torch.sqrt(delta + 1e-4) - 0.01) / t, rtol=1e-5, atol=1e-7)


def test_all_r_positive_runs_the_target_on_the_whole_batch():
    net, x = mlp(), data(B=16)
    loss_fn = losses.ECTLoss()
    nimg = 6 * loss_fn.stage_nimg  # stage 6: r > 0 for every t > 0
    _, spy, _ = run_loss(loss_fn, net, x, nimg)
    assert [c.x.shape[0] for c in spy.calls] == [16, 16]


@pytest.mark.parametrize("arch", ["mlp", "songunet"])
def test_subset_target_pass_equals_full_batch_replay(arch):
    label_dim = 3
    if arch == "mlp":
        net, x = mlp(dropout=0.3, label_dim=label_dim), data(B=32)
    else:
        net, x = tiny_unet(dropout=0.3, label_dim=label_dim), data(B=10, shape=(2, 8, 8))
    B = len(x)
    g = torch.Generator().manual_seed(5)
    labels = torch.eye(label_dim)[torch.randint(0, label_dim, (B,), generator=g)]
    eps = torch.randn(x.shape, generator=g)
    t = schedules.sample_lognormal(B, -1.1, 2.0, generator=g)
    r = schedules.ect_r_of_t(t, 1, q=2)
    keep = r > 0
    assert 0 < int(keep.sum()) < B
    shape = (-1, *([1] * (x.ndim - 1)))
    den = Denoiser(net).train()
    with record_dropout(g) as masks:
        den(x + t.reshape(shape) * eps, t, labels)
    D_r = losses.consistency_target(den, x, eps, r, labels, masks, None)
    assert D_r.shape == x.shape and not D_r.requires_grad
    assert torch.equal(D_r[~keep], x[~keep])  # the boundary condition, exactly
    r_safe = torch.where(keep, r, torch.ones_like(r))  # never run the network at sigma = 0
    with torch.no_grad(), replay_dropout(masks):
        full = den(x + r_safe.reshape(shape) * eps, r_safe, labels)
    torch.testing.assert_close(D_r[keep], full[keep], rtol=1e-5, atol=1e-6)

    # With every r > 0 the target is the full replay itself.
    D_all = losses.consistency_target(den, x, eps, r_safe, labels, masks, None)
    torch.testing.assert_close(D_all, full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scalings", [None, "edm", "cm"])
def test_ect_loss_passes_its_scalings_to_both_passes(scalings):
    _, spy, _ = run_loss(losses.ECTLoss(scalings=scalings), mlp(), data(), STAGE1_NIMG)
    assert [c.scalings for c in spy.calls] == [scalings, scalings]


# --------------------------------------------------------------------------------------------------
# Per-sample outputs.


@pytest.mark.parametrize("name", ["edm", "ect", "ict"])
def test_losses_return_one_finite_value_per_sample(name):
    shape = (2, 3, 3)
    net = mlp(dim=18, dropout=0.2)
    x = data(B=12, shape=shape)
    loss_fn = {"edm": losses.EDMLoss(), "ect": losses.ECTLoss(c=0.03),
               "ict": losses.ICTLoss(total_nimg=12 * 1000, batch=12)}[name]
    loss, _, _ = run_loss(loss_fn, net, x, 12 * 10)
    assert loss.shape == (12,) and loss.dtype == torch.float32
    assert bool(torch.isfinite(loss).all()) and bool((loss >= 0).all())
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_losses_draw_randomness_only_from_the_generator():
    """Same generator seed -> same loss; the global RNG is not consumed."""
    net, x = mlp(), data(B=16)
    for loss_fn in (losses.EDMLoss(), losses.ECTLoss(), losses.ICTLoss(total_nimg=16 * 10**6, batch=16)):
        state = torch.random.get_rng_state()
        a, _, _ = run_loss(loss_fn, net, x, STAGE1_NIMG, seed=7)
        b, _, _ = run_loss(loss_fn, net, x, STAGE1_NIMG, seed=7)
        assert torch.equal(torch.random.get_rng_state(), state), type(loss_fn).__name__
        assert torch.equal(a, b)
        c, _, _ = run_loss(loss_fn, net, x, STAGE1_NIMG, seed=8)
        assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# Distances.


def test_pseudo_huber_with_c_zero_is_the_l2_norm():
    delta = torch.tensor([0.0, 1e-6, 0.25, 4.0, 100.0])
    torch.testing.assert_close(losses.pseudo_huber(delta, 0.0), delta.sqrt(), rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(losses.pseudo_huber(delta, 0.5), (delta + 0.25).sqrt() - 0.5)
    # Finite gradient at delta = 0 (identical student and target).
    d = torch.zeros(3, requires_grad=True)
    losses.pseudo_huber(d, 0.0).sum().backward()
    assert torch.isfinite(d.grad).all()


def test_squared_distance_sums_over_each_sample():
    a = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    b = torch.zeros_like(a)
    torch.testing.assert_close(losses.squared_distance(a, b), (a ** 2).sum((1, 2, 3)))


def test_adaptive_distance_forms():
    delta = torch.tensor([0.01, 0.3, 2.0], requires_grad=True)
    assert torch.equal(losses.adaptive_distance(delta, 0.0, 0.7), delta)
    value = losses.adaptive_distance(delta, 0.5, 0.1)
    torch.testing.assert_close(value, delta / (delta + 0.01).sqrt())
    # The weight is detached: d value / d delta = 1 / (delta + c^2)^p.
    value.sum().backward()
    torch.testing.assert_close(delta.grad, 1 / (delta.detach() + 0.01).sqrt())


def test_ect_huber_with_c_zero_is_the_l2_norm_over_t_minus_r():
    net, x = mlp(), data()
    loss_fn = losses.ECTLoss(c=0.0)
    loss, spy, _ = run_loss(loss_fn, net, x, STAGE1_NIMG)
    t = spy.calls[0].sigma
    r = loss_fn.r_of_t(t, STAGE1_NIMG)
    D_r = target_full(spy, x, r > 0)
    norm = (spy.calls[0].out.detach() - D_r).flatten(1).norm(dim=1)
    torch.testing.assert_close(loss.detach(), norm / (t - r), rtol=1e-5, atol=1e-7)


def test_ect_adaptive_p0_is_the_squared_distance():
    net, x = mlp(), data()
    loss_fn = losses.ECTLoss(distance="adaptive", p=0.0, c=0.3, weighting="uniform")
    loss, spy, _ = run_loss(loss_fn, net, x, STAGE1_NIMG)
    r = loss_fn.r_of_t(spy.calls[0].sigma, STAGE1_NIMG)
    D_r = target_full(spy, x, r > 0)
    torch.testing.assert_close(loss.detach(), (spy.calls[0].out.detach() - D_r).square().sum(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c", [0.0, 0.06])
def test_adaptive_p_half_has_twice_the_huber_gradient(c):
    """ECT section 3.3: w_phi = 1/(delta + c^2)^(1/2) (detached) times delta has gradient
    grad(delta)/sqrt(delta + c^2), twice that of sqrt(delta + c^2) - c."""
    net, x = mlp(), data()
    adaptive, spy_a, _ = run_loss(losses.ECTLoss(distance="adaptive", p=0.5, c=c), net, x, STAGE1_NIMG, seed=3)
    huber, spy_h, _ = run_loss(losses.ECTLoss(distance="huber", c=c), net, x, STAGE1_NIMG, seed=3)
    assert torch.equal(spy_a.calls[0].x, spy_h.calls[0].x)  # same draws
    assert_grads_close(grads(adaptive.mean(), net), grads(huber.mean(), net), factor=2.0, rtol=1e-4, atol=1e-6)
    # Values: delta / sqrt(delta + c^2) vs sqrt(delta + c^2) - c, equal only for c = 0.
    assert torch.allclose(adaptive, huber, rtol=1e-5) == (c == 0)


# --------------------------------------------------------------------------------------------------
# Weightings.


def test_ect_weightings():
    t = torch.tensor([0.01, 0.5, 2.0, 80.0])
    r = torch.tensor([0.0, 0.2, 1.5, 79.0])
    W = losses.ECT_WEIGHTINGS
    torch.testing.assert_close(W["inv_dt"](t, r), 1 / (t - r))
    torch.testing.assert_close(W["edm"](t, r), 1 / t ** 2 + 1 / 0.5 ** 2)
    torch.testing.assert_close(W["uniform"](t, r), torch.ones(4))


@pytest.mark.parametrize("weighting", ["inv_dt", "edm", "custom"])
def test_ect_loss_multiplies_the_distance_by_the_weight(weighting):
    net, x = mlp(), data()
    custom = lambda t, r: t.sqrt() + r  # noqa: E731
    loss_fn = losses.ECTLoss(weighting=custom if weighting == "custom" else weighting, c=0.06)
    loss, spy, _ = run_loss(loss_fn, net, x, STAGE1_NIMG, seed=4)
    base, _, _ = run_loss(losses.ECTLoss(weighting="uniform", c=0.06), net, x, STAGE1_NIMG, seed=4)
    t = spy.calls[0].sigma
    r = loss_fn.r_of_t(t, STAGE1_NIMG)
    w = custom(t, r) if weighting == "custom" else losses.ECT_WEIGHTINGS[weighting](t, r)
    torch.testing.assert_close(loss, base * w, rtol=1e-5, atol=1e-7)


def test_ect_edm_weighting_follows_sigma_data():
    """The "edm" weighting is 1/t^2 + 1/sigma_data^2 (DESIGN.md section 4.5); ECTLoss has a
    sigma_data option, so the weight must use it rather than the constant 1/0.5^2 = 4."""
    t = torch.tensor([0.1, 1.0, 10.0])
    r = torch.zeros(3)
    loss_fn = losses.ECTLoss(sigma_data=1.0, weighting="edm")
    torch.testing.assert_close(loss_fn.weight(t, r), 1 / t ** 2 + 1.0)


# --------------------------------------------------------------------------------------------------
# EDM loss.


@pytest.mark.parametrize("p,c", [(0.0, 0.0), (0.5, 0.03), (0.25, 0.1)])
def test_edm_loss_value_and_adaptive_weight(p, c):
    net, x = mlp(), data()
    loss, spy, _ = run_loss(losses.EDMLoss(adaptive_p=p, adaptive_c=c), net, x, 0)
    (call,) = spy.calls
    sigma = call.sigma
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    delta = (call.out - x).square().sum(1)
    manual = lam * delta / (delta.detach() + c * c) ** p
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(loss.mean(), net), grads(manual.mean(), net), rtol=1e-4, atol=1e-6)
    # Noise: x_sigma = x + sigma eps with standard normal eps.
    eps = (call.x - x) / sigma[:, None]
    assert eps.std().item() == pytest.approx(1.0, abs=0.15)


def test_edm_loss_adaptive_p0_is_the_plain_edm_loss():
    net, x = mlp(), data()
    plain, _, _ = run_loss(losses.EDMLoss(), net, x, 0, seed=9)
    p0, _, _ = run_loss(losses.EDMLoss(adaptive_p=0.0, adaptive_c=0.5), net, x, 0, seed=9)
    assert torch.equal(plain, p0)


# --------------------------------------------------------------------------------------------------
# iCT loss.

ICT_B = 64
ICT_K = 400_000


def _ict(**kw) -> losses.ICTLoss:
    return losses.ICTLoss(total_nimg=ICT_K * ICT_B, batch=ICT_B, **kw)


@pytest.mark.parametrize("k,N", [(0, 11), (60_000, 21), (350_000, 1281)])
def test_ict_loss_pairs_adjacent_levels_of_the_curriculum_grid(k, N):
    loss_fn = _ict()
    nimg = k * ICT_B
    assert loss_fn.num_levels(nimg) == N
    net, x = mlp(), data(B=ICT_B)
    loss, spy, _ = run_loss(loss_fn, net, x, nimg)
    student, target = spy.calls
    grid = schedules.karras_sigmas(N).to(torch.float32)
    i = torch.searchsorted(grid, student.sigma)
    assert bool((i >= 1).all()) and torch.equal(grid[i], student.sigma)
    assert torch.equal(target.sigma, grid[i - 1])  # (r, t) = (sigma_i, sigma_{i+1}), r >= 0.002 > 0
    assert target.x.shape[0] == ICT_B
    # iCT uses "cm" scalings (sigma_min 0.002) in both passes, whatever the denoiser's default.
    assert student.scalings == target.scalings == "cm"
    assert bool(torch.isfinite(loss).all())


def test_ict_loss_value_and_boundary():
    loss_fn = _ict()
    net, x = mlp(), data(B=ICT_B)
    loss, spy, _ = run_loss(loss_fn, net, x, 0, seed=11)
    student, target = spy.calls
    t, r = student.sigma, target.sigma
    c = 0.00054 * math.sqrt(DIM)
    delta = (student.out - target.out).square().sum(1)
    torch.testing.assert_close(loss, (torch.sqrt(delta + c * c) - c) / (t - r), rtol=1e-5, atol=1e-6)
    # At r = sigma_min the "cm" target is the identity: D(x_r, 0.002) = x_r.
    at_min = r == schedules.karras_sigmas(11).to(torch.float32)[0]
    assert bool(at_min.any())
    torch.testing.assert_close(target.out[at_min], target.x[at_min], rtol=0, atol=0)
    # An explicit c is used as given.
    loss_c, spy_c, _ = run_loss(_ict(c=0.5), net, x, 0, seed=11)
    delta_c = (spy_c.calls[0].out - spy_c.calls[1].out).square().sum(1)
    torch.testing.assert_close(loss_c, (torch.sqrt(delta_c + 0.25) - 0.5) / (t - r), rtol=1e-5, atol=1e-6)


def test_ict_grid_follows_the_options_of_a_replaced_loss():
    """Config overrides build losses with dataclasses.replace. A copy with another sigma_max must
    sample from its own grid, not from a grid cached by the loss it was copied from."""
    net, x = mlp(), data(B=ICT_B)
    original = _ict()
    run_loss(original, net, x, 0)  # uses (and may cache) the N = 11 grid up to sigma_max = 80
    copy = dataclasses.replace(original, sigma_max=40.0)
    _, spy, _ = run_loss(copy, net, x, 0)
    grid = schedules.karras_sigmas(11, sigma_max=40.0).to(torch.float32)
    t = spy.calls[0].sigma
    assert bool(torch.isin(t, grid[1:]).all()), f"t up to {t.max().item():.4g} is not on the sigma_max = 40 grid"


def test_ict_curriculum_changes_with_images_seen():
    loss_fn = _ict()
    levels = [loss_fn.num_levels(k * ICT_B) for k in range(0, ICT_K, 10_000)]
    assert levels[0] == 11 and levels[-1] == 1281
    assert all(b >= a for a, b in zip(levels, levels[1:]))
    assert len(set(levels)) == 8


def test_ict_loss_needs_batch_and_total():
    with pytest.raises(ConfigError):
        losses.ICTLoss().num_levels(0)
    with pytest.raises(ConfigError):
        losses.ICTLoss(total_nimg=10, batch=64).num_levels(0)


# --------------------------------------------------------------------------------------------------
# ECTLoss validation.


@pytest.mark.parametrize("kwargs", [
    dict(q=1.0), dict(q=0.5), dict(q=-2.0), dict(c=-0.01), dict(distance="l2"), dict(mapping="linear"),
    dict(weighting="snr"), dict(stage_nimg=0),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_ect_loss_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError) as info:
        losses.ECTLoss(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert any(str(v) in message for v in kwargs.values()), message


def test_ect_loss_accepts_the_published_settings():
    losses.ECTLoss(q=2, c=0.0, weighting="inv_dt")  # CIFAR-10
    losses.ECTLoss(P_mean=-0.8, P_std=1.6, q=4, c=0.06, weighting="edm")  # ImageNet 64
    losses.ECTLoss(q=256)  # 1-hour recipe
    losses.ECTLoss(distance="adaptive", p=0.5)


@pytest.mark.parametrize("q", [2.0, 4.0, 256.0])
def test_ect_stage_limit_keeps_r_below_t_in_float32(q):
    """validate() stops ECT at the last stage where r(t) < t for every float32 t; beyond it (two
    halvings more at q = 2) r rounds to t and the loss would be 0/0."""
    from ectune import config as C

    t = schedules.sample_lognormal(200_000, -1.1, 2.0, generator=torch.Generator().manual_seed(0))
    stages = int(C.ECT_MIN_LOG2_DECAY // math.log2(q))
    r = schedules.ect_r_of_t(t, stages - 1, q=q)
    assert bool((r < t).all())
    cfg = C.apply_overrides(C.preset("mnist", "ect"), {"total_nimg": 32 * stages * 10, "ect.stage_nimg": 320,
                                                       "ect.q": q})
    C.validate(cfg)
    with pytest.raises(ConfigError, match="float32's resolution"):
        C.validate(C.apply_overrides(cfg, {"total_nimg": 32 * (stages * 10 + 1)}))
    if q == 2.0:
        assert bool((schedules.ect_r_of_t(t, stages + 2, q=q) >= t).any())
