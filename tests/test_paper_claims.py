"""Fast checks of benchmarks/paper_claims.py (issue 5): the power-law fit, the flow-matching toy and the
command line. The benchmark itself takes minutes to hours; these pieces take seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def pc(benchmark_module):
    return benchmark_module("paper_claims")


@pytest.mark.parametrize("b", [-0.5, -0.13, 0.7])
def test_power_law_fit_recovers_the_exponent(pc, b):
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e6, 6)
    exact = pc.fit_power_law(x, 3.0 * x ** b)
    assert exact["b"] == pytest.approx(b, abs=1e-9)
    assert exact["a"] == pytest.approx(math.log(3.0), abs=1e-9)
    assert exact["r2"] == pytest.approx(1.0)
    noisy = pc.fit_power_law(x, 3.0 * x ** b * np.exp(rng.normal(0, 0.05, x.size)))
    assert abs(noisy["b"] - b) < 4 * noisy["b_stderr"] + 1e-3
    assert 0 < noisy["b_stderr"] < 0.1


def test_power_law_fit_rejects_bad_input(pc):
    with pytest.raises(ValueError):
        pc.fit_power_law([1.0], [2.0])
    with pytest.raises(ValueError):
        pc.fit_power_law([1.0, 2.0], [0.0, 1.0])  # log 0


def test_adaptive_weight_normalises_the_per_sample_loss(pc):
    """With p = 1 and c -> 0 every sample's loss delta / stopgrad(delta) is 1, whatever its error;
    with p = 0 it is the squared error itself; the gradient of p = 0.5 is that of sqrt(delta) times 2."""
    torch.manual_seed(0)
    model = pc.FlowMLP(hidden=16, depth=2)
    x0 = torch.randn(64, 2)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert pc.flow_matching_loss(model, x0, 1.0, 0.0, gen()).item() == pytest.approx(1.0, rel=1e-5)
    plain = pc.flow_matching_loss(model, x0, 0.0, 0.0, gen())
    assert plain.item() > 0.1
    model.zero_grad()
    pc.flow_matching_loss(model, x0, 0.5, 0.0, gen()).backward()
    g_half = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    g = gen()  # the loss's own draws, in its order
    z = torch.randn(x0.shape, generator=g)
    t = torch.rand(x0.shape[0], generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * z
    (2 * (model(xt, t) - (z - x0)).square().sum(1).sqrt().mean()).backward()
    for a, p in zip(g_half, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_flow_toy_learns_and_more_euler_steps_help(pc):
    torch.set_num_threads(1)
    untrained = pc.flow_sw_curve(pc.FlowMLP(hidden=64), (8,), n=1000)[8]
    model = pc.train_flow_toy(0.5, steps=300, hidden=64, batch=256)
    sw = pc.flow_sw_curve(model, (1, 2, 8), n=1000)
    assert sw[8] < 0.5 * untrained  # it learned something
    assert sw[8] < sw[1]  # 1-step Euler collapses towards the conditional mean; 8 steps follow the flow


def test_euler_sampler_integrates_a_known_flow(pc):
    """v(x, t) = x gives x(0) = x(1) e^-1 exactly; Euler with k steps gives x(1) (1 - 1/k)^k."""

    class Identity(torch.nn.Module):
        def forward(self, x, t):
            return x

    z = torch.randn(5, 2)
    for k in (1, 4, 64):
        torch.testing.assert_close(pc.euler_sample(Identity(), z, k), z * (1 - 1 / k) ** k)


def test_command_line(pc, capsys):
    with pytest.raises(SystemExit) as e:
        pc.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert pc.main(["--sections", "teacher,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert set(pc.PLANS) == {"quick", "full"}
    for plan in pc.PLANS.values():  # every MNIST budget is whole steps of batch 64, scoring points inside the run
        assert all(n % 64 == 0 for n in (plan.ect_nimg, *plan.ect_points, *plan.ict_nimg, *plan.scaling_nimg,
                                         plan.ablation_nimg))
        assert max(plan.ect_points) == plan.ect_nimg


def test_the_study_keeps_its_own_recipe_when_the_preset_moves(pc, tmp_path):
    """results/paper_claims/ were measured with the mnist preset of 2026-12-01; the preset has moved
    since (the 10-minute default), so the study pins what it ran: a rerun trains the same recipe."""
    from ectune import config as C

    preset = C.preset("mnist", "ect")
    ect = pc.mnist_ect_cfg(4096, tmp_path / "a", 8)
    ict = pc.mnist_ict_cfg(4096, tmp_path / "b")
    assert (ect.batch, ect.optim.lr, ect.ema.beta, ect.preview.mid_sigma) == (64, 4e-4, 0.99, 0.821)
    assert (preset.batch, preset.optim.lr, preset.ema.beta) != (ect.batch, ect.optim.lr, ect.ema.beta)
    assert (ict.batch, ict.optim, ict.ema) == (ect.batch, ect.optim, ect.ema)  # iCT gets ECT's optimiser


def test_q256_over_8_stages_is_refused_and_tabled_as_such(pc, tmp_path):
    """q = 256 over the ablations' 8 stages passes float32's resolution of r(t) (from stage 2): the run
    is refused at start, and the table says so rather than 'diverged'."""
    from ectune.errors import ConfigError

    with pytest.raises(ConfigError, match="reach stage 7"):
        pc.mnist_ect_cfg(4096, tmp_path / "run", 8, pc.ABLATIONS["q=256"])
    pc.mnist_ect_cfg(4096, tmp_path / "run", 8, pc.ABLATIONS["q=4"])  # q = 4: 8 stages fit
    row = {"variant": "q=256", "nfe": 2, "steps": 2, "fid": None, "kid": None, "n": 50, "nimg": 4096,
           "refused": "ECT would reach stage 7, where t - r(t) falls to float32's resolution of t"}
    md = pc.write_tables({"mode": "quick", "ablations": {"nimg": 4096, "rows": [row]}}, tmp_path)
    assert "| q=256 | - | refused: r(t) = t in float32 by stage 7 | - | - |" in md
