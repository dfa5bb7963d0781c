"""Issue 5: the ECT paper's claims (Geng et al., arXiv 2406.14548) checked at small scale, on 2 CPU cores.

    python benchmarks/paper_claims.py --quick          # the whole pipeline at toy sizes (< 15 min)
    python benchmarks/paper_claims.py                  # full mode (about an hour on 2 idle cores)
    python benchmarks/paper_claims.py --sections flow,toy2d --out /tmp/pc   # a subset

Sections (in the order they run; results are written after each one, so a stopped run keeps what
finished, and ``--resume`` skips the sections already in the output's results.json):

- ``teacher``   the shipped MNIST EDM teacher (``builtin:mnist``), Heun 18 steps = 35 NFE.
- ``ect``       ECT from the teacher, one run at the ECT budget; its EMA model is exported at
                several points ("as tuning goes on") and scored with 1 and 2 steps.
- ``ict``       iCT from scratch on the same network and optimiser, at each iCT budget, 1 and 2 steps.
- ``toy2d``     the same comparison on the 2-D swiss roll (SongUNet replaced by the toy MLP), where
                iCT can be given the teacher's pretraining budget plus ECT's: sliced Wasserstein.
- ``flow``      the appendix toy: flow matching with the adaptive weight 1/(delta + c^2)^p on the
                swiss roll (small MLP, plain torch), SW against Euler steps for p = 0, 0.5, 1.
- ``scaling``   separate ECT runs at several budgets (stage length scaled with the budget), a least
                squares fit of log FID = a + b log(images).
- ``ablations`` mapping, weighting, adaptive weight, dropout and q, each changed alone from the
                baseline at the ablation budget.

Outputs in ``--out`` (default results/paper_claims for full mode, results/paper_claims/quick for
--quick): results.json (every number and the plan), one CSV per table, tables.md, and PNG figures.
Run folders (checkpoints, models) go to ``--work-dir`` (default /tmp/paper_claims_runs/<mode>).
FID/KID use Inception-v3 against N MNIST training images at N generated images: FID at small N is
biased upward, so only rows at the same N compare (every image table here uses one N).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TEACHER = "builtin:mnist"
TEACHER_PRETRAIN_NIMG = 1_627_904  # src/ectune/assets/mnist-teacher/README.md
SECTIONS = ("teacher", "ect", "ict", "toy2d", "flow", "scaling", "ablations", "ict_long", "noise")


# ---------------------------------------------------------------------------------------------
# The plan of each mode.


@dataclass(frozen=True)
class Plan:
    """Sizes of one mode. Image budgets are multiples of the MNIST batch (64); toy budgets of 512."""

    n_eval: int                      # generated = reference images per FID/KID
    ect_nimg: int                    # ECT tuning budget (MNIST)
    ect_points: tuple[int, ...]      # where the ECT run is scored on its way
    ict_nimg: tuple[int, ...]        # iCT budgets on MNIST (section ict)
    ict_long_nimg: tuple[int, ...]   # larger iCT budgets on MNIST (section ict_long, run last)
    scaling_nimg: tuple[int, ...]    # separate ECT runs for the power-law fit
    ablation_nimg: int               # budget of each ablation run
    toy_pretrain_nimg: int           # 2-D: EDM pretraining points
    toy_ect_nimg: int                # 2-D: ECT tuning points
    toy_points: int                  # 2-D: curve points per run
    toy_n_eval: int                  # 2-D: points per SW/MMD
    flow_steps: int                  # flow toy: optimiser steps per p
    flow_seeds: tuple[int, ...] = (0,)
    flow_sample_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    stages: int = 8                  # ECT stages per run (stage_nimg = budget / stages)


# Sized for 2 CPU cores shared with another job: Inception-v3 ran at ~2-4 images/s on one thread, so
# every FID at N = 200 costs about a minute; ECT trained at ~45 images/s on one thread.
PLANS = {
    "full": Plan(n_eval=200, ect_nimg=16_384, ect_points=(4_096, 8_192, 16_384), ict_nimg=(16_384,),
                 ict_long_nimg=(49_152,), scaling_nimg=(2_048, 4_096, 8_192, 16_384, 32_768), ablation_nimg=4_096,
                 toy_pretrain_nimg=1_024_000, toy_ect_nimg=256_000, toy_points=4, toy_n_eval=4_000,
                 flow_steps=3_000, flow_seeds=(0, 1, 2)),
    "quick": Plan(n_eval=50, ect_nimg=2_048, ect_points=(1_024, 2_048), ict_nimg=(2_048,), ict_long_nimg=(),
                  scaling_nimg=(512, 1_024, 2_048), ablation_nimg=512,
                  toy_pretrain_nimg=102_400, toy_ect_nimg=25_600, toy_points=2, toy_n_eval=2_000,
                  flow_steps=300, flow_seeds=(0,), flow_sample_steps=(1, 2, 4, 8, 16)),
}

# ECT ablations: each changes one thing from the baseline (the mnist preset with its stage length
# scaled to the budget). Keys are config overrides (dotted keys as on the command line).
ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline (sigmoid, 1/(t-r), p=0.5 c=0, dropout 0.1, q=2)": {},
    "mapping const": {"ect.mapping": "const"},
    "weighting 1/t^2 + 4": {"ect.weighting": "edm"},
    "weighting uniform": {"ect.weighting": "uniform"},
    "adaptive weight off (p=0, squared L2)": {"ect.distance": "adaptive", "ect.p": 0.0, "ect.c": 0.0},
    "pseudo-Huber c=0.03 (p=0.5)": {"ect.c": 0.03},
    "dropout off": {"network.dropout": 0.0},
    "q=4": {"ect.q": 4.0},
    "q=256": {"ect.q": 256.0},
}


# ---------------------------------------------------------------------------------------------
# Small helpers (pure; the test imports them).


def fit_power_law(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> dict[str, float]:
    """Least squares fit of log y = a + b log x. Returns a, b, r2 and the exponent's standard error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if lx.size < 2 or not np.all(np.isfinite(lx)) or not np.all(np.isfinite(ly)):
        raise ValueError("a power-law fit needs at least 2 positive, finite points")
    A = np.stack([np.ones_like(lx), lx], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - (a + b * lx)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    dof = lx.size - 2
    se = math.sqrt(float((resid ** 2).sum()) / dof / float(((lx - lx.mean()) ** 2).sum())) if dof > 0 else float("nan")
    return {"a": float(a), "b": float(b), "r2": r2, "b_stderr": se, "n": int(lx.size)}


class FlowMLP(nn.Module):
    """v(x, t) for 2-D flow matching: an MLP on [x, sin/cos features of t]."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / 2 ** (freqs // 2))
        layers: list[nn.Module] = [nn.Linear(dim + 2 * freqs + 1, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ft = t[:, None] * self.freqs
        return self.net(torch.cat([x, t[:, None], ft.sin(), ft.cos()], dim=1))


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, p: float, c: float, gen: torch.Generator) -> torch.Tensor:
    """Flow matching with the ECT adaptive weight (ECT section 3.3 applied to FM, as in its appendix toy):
    x_t = (1 - t) x0 + t z, target velocity z - x0, delta = ||v - (z - x0)||^2 per sample,
    loss = delta / stopgrad(delta + c^2)^p (p = 0: plain FM). Returns the batch mean."""
    z = torch.randn(x0.shape, generator=gen)
    t = torch.rand(x0.shape[0], generator=gen)
    xt = (1 - t[:, None]) * x0 + t[:, None] * z
    delta = (model(xt, t) - (z - x0)).square().sum(1)
    w = 1.0 / (delta.detach() + c * c).pow(p) if p else torch.ones_like(delta)
    return (w * delta).mean()


@torch.no_grad()
def euler_sample(model: nn.Module, z: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise z) to t = 0 with ``steps`` equal Euler steps."""
    x = z.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * model(x, torch.full((x.shape[0],), float(t0)))
    return x


def train_flow_toy(p: float, *, steps: int, seed: int = 0, c: float = 1e-3, batch: int = 512, lr: float = 2e-3,
                   hidden: int = 128, data: str = "swissroll") -> nn.Module:
    """Train :class:`FlowMLP` on a 2-D toy with the adaptive weight exponent ``p`` (Adam, cosine lr)."""
    from ectune.data import sample_toy

    torch.manual_seed(seed)
    model = FlowMLP(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        loss = flow_matching_loss(model, sample_toy(data, batch, gen), p, c, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def flow_sw_curve(model: nn.Module, sample_steps: tuple[int, ...], *, n: int = 4000, data: str = "swissroll",
                  seed: int = 123) -> dict[int, float]:
    """SW_2 between ``n`` Euler samples and ``n`` fresh points of the toy, per number of Euler steps
    (the same noise for every step count)."""
    from ectune.data import sample_toy
    from ectune.evaluate import TOY_REFERENCE_SEED
    from ectune.metrics import sliced_wasserstein

    ref = sample_toy(data, n, torch.Generator().manual_seed(TOY_REFERENCE_SEED)).double()
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return {k: sliced_wasserstein(euler_sample(model, z, k).double(), ref) for k in sample_steps}


def truth_sw_floor(n: int, *, data: str = "swissroll", draws: int = 5) -> dict[str, float]:
    """SW_2 between ``n`` fresh points of the true distribution and the ``n`` reference points that
    models are scored against: the value a perfect sampler would get (mean and std over draws)."""
    from ectune.data import sample_toy
    from ectune.evaluate import TOY_REFERENCE_SEED
    from ectune.metrics import sliced_wasserstein

    ref = sample_toy(data, n, torch.Generator().manual_seed(TOY_REFERENCE_SEED)).double()
    vals = [sliced_wasserstein(sample_toy(data, n, torch.Generator().manual_seed(7 + i)).double(), ref)
            for i in range(draws)]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": n, "draws": draws}


# ---------------------------------------------------------------------------------------------
# Training and scoring with the library.


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_points(cfg, points: tuple[int, ...], score) -> tuple[list[dict[str, Any]], float]:
    """Train ``cfg`` to cfg.total_nimg, stopping at each of ``points`` (a resumed run replays exactly the
    uninterrupted stream) to score the exported EMA model: ``score(model_dir, nimg) -> list of rows``.
    Returns (rows, training wall seconds)."""
    from ectune.config import TrainConfig
    from ectune.training import train

    from ectune import config as C

    run_dir = Path(cfg.run_dir)
    done = _finished_run(run_dir, C.to_json(cfg), cfg.total_nimg)
    if done is not None and len(points) == 1:  # the same run, finished earlier (e.g. by a process that then died)
        _log(f"  {run_dir.name}: reusing the finished run ({done:.0f} s of training)")
        return [{**row, "nimg": cfg.total_nimg, "train_wall_s": done} for row in score(run_dir / "model", cfg.total_nimg)], done
    if run_dir.exists():
        shutil.rmtree(run_dir)
    rows, wall = [], 0.0
    for i, stop in enumerate(sorted(points)):
        res = train(cfg, progress=False, stop_after_nimg=stop) if i == 0 else \
            train(TrainConfig(), resume=str(run_dir), progress=False, stop_after_nimg=stop)
        wall += res.wall_s
        if res.interrupted:
            raise SystemExit(f"training stopped by signal {res.interrupted}: {run_dir}")
        _log(f"  {run_dir.name}: {res.nimg} images, {wall:.0f} s of training ({res.nimg / max(wall, 1e-9):.1f} img/s)")
        for row in score(res.model_dir, res.nimg):
            rows.append({**row, "nimg": res.nimg, "train_wall_s": wall})
    return rows, wall


def _finished_run(run_dir: Path, cfg_json: str, total_nimg: int) -> float | None:
    """Training seconds of a run folder that holds this exact config and its final model, else None."""
    try:
        same = json.loads((run_dir / "config.json").read_text(encoding="utf-8")) == json.loads(cfg_json)
        nimg = json.loads((run_dir / "model" / "config.json").read_text(encoding="utf-8")).get("nimg")
        stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return None
    if not same or nimg != total_nimg or not stats or stats[-1].get("nimg") != total_nimg:
        return None
    return float(stats[-1].get("wall_s", float("nan")))


class ImageScorer:
    """FID/KID of a model folder at N images (seeds 0..N-1) against N MNIST training images."""

    def __init__(self, n: int) -> None:
        from ectune.evaluate import build_evaluator

        self.n = n
        self.evaluator = build_evaluator("mnist", None, "train", n, (1, 28, 28), "fid,kid")

    @torch.no_grad()
    def __call__(self, model_dir: str | Path, method: str, steps: int, sigmas=None, seed: int = 0) -> dict[str, Any]:
        from ectune.config import EvalConfig
        from ectune.evaluate import Setting, sample_model
        from ectune.sampling import nfe

        t0 = time.perf_counter()
        images, _ = sample_model(str(model_dir), Setting(method, steps, tuple(sigmas or ())),
                                 EvalConfig(seed=seed, batch=250), self.n, progress=False)
        sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = self.evaluator(images)
        return {"nfe": nfe(method, steps), "steps": steps, "fid": m["fid"], "kid": m["kid"], "kid_std": m["kid_std"],
                "n": self.n, "sample_s": sample_s, "eval_s": time.perf_counter() - t0}

    def cm(self, model_dir: str | Path, nimg: int) -> list[dict[str, Any]]:
        """1-step and 2-step (intermediate level: the model's mid_sigma, the study's 0.821)."""
        out = [self(model_dir, "consistency", 1), self(model_dir, "consistency", 2)]
        _log(f"    {nimg} images: FID 1-step {out[0]['fid']:.2f}, 2-step {out[1]['fid']:.2f} (N = {self.n})")
        return out

    def two(self, model_dir: str | Path, nimg: int) -> list[dict[str, Any]]:
        """2-step only (scaling and ablation runs: Inception time is the budget)."""
        out = [self(model_dir, "consistency", 2)]
        _log(f"    {nimg} images: FID 2-step {out[0]['fid']:.2f} (N = {self.n})")
        return out


STUDY_RECIPE: dict[str, Any] = {"batch": 64, "optim.lr": 4e-4, "ema.beta": 0.99, "preview.mid_sigma": 0.821}
"""The mnist preset's ECT settings when the study ran (2026-12-01), kept so that a rerun reproduces
results/paper_claims/: the preset has since moved to batch 32, lr 2.8e-4, EMA 0.995 and the 2-step
level 0.15 for the 10-minute default (docs/TUNE_DEFAULT.md)."""


def mnist_ect_cfg(nimg: int, run_dir: Path, stages: int, overrides: dict[str, Any] | None = None):
    """The study's ECT recipe (the mnist preset with :data:`STUDY_RECIPE`, teacher builtin:mnist) at a
    budget of ``nimg`` images with ``stages`` stages."""
    from ectune import config as C

    cfg = C.apply_overrides(C.preset("mnist", "ect"), STUDY_RECIPE)
    cfg = dataclasses.replace(cfg, total_nimg=nimg, run_dir=str(run_dir), checkpoint_every_nimg=0,
                              report_num_images=0, log_every_nimg=1024, keep_checkpoints=1,
                              ect=dataclasses.replace(cfg.ect, stage_nimg=max(nimg // stages, 64)))
    cfg = C.apply_overrides(cfg, overrides or {})
    C.validate(cfg)
    return cfg


def mnist_ict_cfg(nimg: int, run_dir: Path):
    """iCT from scratch on the teacher's network (SongUNet, 3.3M parameters) with ECT's optimiser, batch,
    EMA and dropout: only the objective (iCT curriculum, pseudo-Huber c, cm scalings) and the start differ."""
    from ectune import config as C

    ect = C.apply_overrides(C.preset("mnist", "ect"), STUDY_RECIPE)
    cfg = C.preset("mnist", "ict")
    cfg = dataclasses.replace(cfg, total_nimg=nimg, run_dir=str(run_dir), batch=ect.batch, precision=ect.precision,
                              optim=ect.optim, ema=ect.ema, checkpoint_every_nimg=0, log_every_nimg=1024,
                              keep_checkpoints=1, network=dataclasses.replace(cfg.network, dropout=0.1))
    C.validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Sections.


class Bench:
    def __init__(self, plan: Plan, mode: str, out: Path, work: Path) -> None:
        self.plan, self.mode, self.out, self.work = plan, mode, out, work
        self._scorer: ImageScorer | None = None
        self.results: dict[str, Any] = {}

    @property
    def scorer(self) -> ImageScorer:
        if self._scorer is None:
            self._scorer = ImageScorer(self.plan.n_eval)
        return self._scorer

    # -- 1. teacher, ECT, iCT on MNIST ----------------------------------------------------------

    def teacher(self) -> dict[str, Any]:
        row = self.scorer(TEACHER, "heun", 18)
        _log(f"  teacher Heun 35 NFE: FID {row['fid']:.2f}")
        return {"rows": [{"method": "EDM teacher (Heun)", **row, "nimg": 0, "pretrain_nimg": TEACHER_PRETRAIN_NIMG}]}

    def ect(self) -> dict[str, Any]:
        p = self.plan
        cfg = mnist_ect_cfg(p.ect_nimg, self.work / "ect-main", p.stages)
        rows, wall = train_points(cfg, p.ect_points, self.scorer.cm)
        return {"rows": [{"method": "ECT", **r, "pretrain_nimg": TEACHER_PRETRAIN_NIMG} for r in rows],
                "train_wall_s": wall, "img_per_s": p.ect_nimg / wall, "stage_nimg": cfg.ect.stage_nimg}

    def ict(self, budgets: tuple[int, ...] | None = None) -> dict[str, Any]:
        rows, walls = [], {}
        for nimg in self.plan.ict_nimg if budgets is None else budgets:
            cfg = mnist_ict_cfg(nimg, self.work / f"ict-{nimg}")
            r, wall = train_points(cfg, (nimg,), self.scorer.cm)
            walls[nimg] = wall
            rows += [{"method": "iCT", "budget": nimg, **x, "pretrain_nimg": 0} for x in r]
        return {"rows": rows, "train_wall_s": walls}

    def ict_long(self) -> dict[str, Any]:
        return self.ict(self.plan.ict_long_nimg)

    def noise(self) -> dict[str, Any]:
        """How much FID at this N moves with the sampling seeds alone: the final main ECT model, 2 steps,
        on seed sets 0.., 10000.., 20000.. (the reference images stay the same)."""
        model = self.work / "ect-main"
        if not (model / "model").is_dir():
            raise SystemExit(f"section noise scores the main ECT run: run section ect first ({model})")
        rows = [{**self.scorer(model, "consistency", 2, seed=seed), "seed": seed} for seed in (0, 10_000, 20_000)]
        fids = [r["fid"] for r in rows]
        _log(f"  FID of one model over 3 seed sets: {', '.join(f'{f:.2f}' for f in fids)}")
        return {"rows": rows, "fid_mean": float(np.mean(fids)), "fid_std": float(np.std(fids, ddof=1))}

    # -- 2-D comparison -------------------------------------------------------------------------

    def toy2d(self) -> dict[str, Any]:
        from ectune import config as C
        from ectune.checkpoint import load_model
        from ectune.evaluate import build_evaluator
        from ectune.preview import generate

        p = self.plan
        ev = build_evaluator("swissroll", None, "train", p.toy_n_eval, (2,), "sw,mmd")
        seeds = list(range(p.toy_n_eval))

        def score_with(method: str, steps: int):
            def score(model_dir, nimg):
                d, info = load_model(model_dir)
                with torch.no_grad():
                    x = generate(d, info, method=method, steps=steps, seeds=seeds).float()
                return [{"nfe": 2 * steps - 1 if method == "heun" else steps, "steps": steps, **ev(x)}]
            return score

        def cm(model_dir, nimg):
            return score_with("consistency", 1)(model_dir, nimg) + score_with("consistency", 2)(model_dir, nimg)

        def pts(total: int) -> tuple[int, ...]:
            k = p.toy_points
            return tuple(sorted({max(512, round(total * (i + 1) / k / 512) * 512) for i in range(k)}))

        rows = []
        edm = dataclasses.replace(C.preset("toy2d", "edm"), total_nimg=p.toy_pretrain_nimg,
                                  run_dir=str(self.work / "toy-edm"))
        r, wall_edm = train_points(edm, pts(p.toy_pretrain_nimg), score_with("heun", 18))
        rows += [{"method": "EDM (Heun)", "budget": p.toy_pretrain_nimg, **x} for x in r]
        _log(f"  2-D EDM teacher: SW {rows[-1]['sw']:.4f}")
        ect = C.preset("toy2d", "ect")
        ect = dataclasses.replace(ect, teacher=str(self.work / "toy-edm"), total_nimg=p.toy_ect_nimg,
                                  run_dir=str(self.work / "toy-ect"),
                                  ect=dataclasses.replace(ect.ect, stage_nimg=max(p.toy_ect_nimg // 4, 512)))
        r, wall_ect = train_points(ect, pts(p.toy_ect_nimg), cm)
        rows += [{"method": "ECT", "budget": p.toy_ect_nimg, "pretrain_nimg": p.toy_pretrain_nimg, **x} for x in r]
        walls = {"edm": wall_edm, "ect": wall_ect}
        for budget in (p.toy_ect_nimg, p.toy_pretrain_nimg + p.toy_ect_nimg):
            budget = round(budget / 512) * 512
            ict = dataclasses.replace(C.preset("toy2d", "ict"), total_nimg=budget, run_dir=str(self.work / f"toy-ict-{budget}"))
            r, walls[f"ict-{budget}"] = train_points(ict, pts(budget), cm)
            rows += [{"method": "iCT", "budget": budget, "pretrain_nimg": 0, **x} for x in r]
        for row in rows:
            _log(f"    {row['method']} budget {row['budget']} at {row['nimg']}: {row['nfe']} NFE SW {row['sw']:.4f}")
        return {"rows": rows, "train_wall_s": walls, "n": p.toy_n_eval, "truth_sw": truth_sw_floor(p.toy_n_eval)}

    # -- appendix toy: flow matching with adaptive weights --------------------------------------

    def flow(self) -> dict[str, Any]:
        p = self.plan
        rows = []
        for pw in (0.0, 0.5, 1.0):
            for seed in p.flow_seeds:
                t0 = time.perf_counter()
                model = train_flow_toy(pw, steps=p.flow_steps, seed=seed)
                curve = flow_sw_curve(model, p.flow_sample_steps)
                rows += [{"p": pw, "seed": seed, "euler_steps": k, "sw": v, "train_s": time.perf_counter() - t0}
                         for k, v in curve.items()]
                _log(f"  flow p={pw} seed {seed}: " + ", ".join(f"{k}:{v:.3f}" for k, v in curve.items()))
        return {"rows": rows, "train_steps": p.flow_steps, "c": 1e-3, "n": 4000, "truth_sw": truth_sw_floor(4000)}

    # -- scaling and ablations ------------------------------------------------------------------

    def _ect_run(self, name: str, nimg: int, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        from ectune.errors import ConfigError, UserError

        try:
            cfg = mnist_ect_cfg(nimg, self.work / name, self.plan.stages, overrides)
            rows, _ = train_points(cfg, (nimg,), self.scorer.two)
        except UserError as e:  # a result, not a crash of the benchmark: refused at start (a ConfigError, e.g.
            # q = 256 over 8 stages, where r(t) rounds to t in float32) or diverged (20 non-finite steps in a row)
            outcome = "refused" if isinstance(e, ConfigError) else "diverged"
            _log(f"    {outcome}: {e}")
            return [{"nfe": 2, "steps": 2, "fid": None, "kid": None, "n": self.scorer.n,
                     "nimg": nimg, outcome: str(e)}]
        return rows

    def _reuse(self, nimg: int) -> list[dict[str, Any]] | None:
        """The scaling/ablation baseline run at ``nimg`` is the same run as the main ECT run when the budgets
        agree (same config: stage_nimg = budget / stages), as the scaling run at that budget, or as the
        ablation baseline (whichever process finished it first)."""
        known = {**read_results(self.out / "results.json").get("sections", {}), **self.results}
        base = [r for r in known.get("ablations", {}).get("rows", []) if not r["overrides"] and not r["reused"]]
        if base and known["ablations"]["nimg"] == nimg:
            return [{k: v for k, v in r.items() if k not in ("variant", "overrides", "reused")} for r in base]
        for sec in ("ect", "scaling"):  # the file's scaling rows: an earlier scaling pass with the same plan
            rows = [r for r in known.get(sec, {}).get("rows", []) if r["nimg"] == nimg
                    and r.get("budget", self.plan.ect_nimg if sec == "ect" else None) == nimg]
            if rows:
                return [{k: v for k, v in r.items() if k not in ("method", "budget", "pretrain_nimg", "reused")}
                        for r in rows]
        return None

    def scaling(self) -> dict[str, Any]:
        rows = []
        for nimg in self.plan.scaling_nimg:
            r = self._reuse(nimg)
            reused = r is not None
            if r is None:
                r = self._ect_run(f"ect-scale-{nimg}", nimg)
            rows += [{"budget": nimg, "reused": reused, **x} for x in r]
        fits = {}
        for steps in (2,):
            pts = [(r["budget"], r["fid"]) for r in rows if r["steps"] == steps]
            fits[f"{steps}-step"] = fit_power_law(*zip(*pts))
            _log(f"  scaling {steps}-step: FID ~ images^{fits[f'{steps}-step']['b']:.3f}")
            pts = [(r["budget"], r["kid"]) for r in rows if r["steps"] == steps]
            if all(v > 0 for _, v in pts):
                fits[f"{steps}-step KID"] = fit_power_law(*zip(*pts))
        return {"rows": rows, "fit": fits}

    def ablations(self) -> dict[str, Any]:
        nimg = self.plan.ablation_nimg
        rows = []
        for name, overrides in ABLATIONS.items():
            r = self._reuse(nimg) if not overrides else None
            reused = r is not None
            if r is None:
                slug = "abl-" + "".join(ch if ch.isalnum() else "-" for ch in name)[:40]
                r = self._ect_run(slug, nimg, overrides)
            rows += [{"variant": name, "overrides": overrides, "reused": reused, **x} for x in r]
        return {"rows": rows, "nimg": nimg}


# ---------------------------------------------------------------------------------------------
# Outputs: CSV, markdown tables, figures.


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ict_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    return res.get("ict", {}).get("rows", []) + res.get("ict_long", {}).get("rows", [])


def table1_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 1 (like the paper's): method, NFE, images seen (tuning / total incl. pretraining), FID, KID."""
    out = []
    for r in res.get("teacher", {}).get("rows", []):
        out.append({"method": "EDM teacher, Heun 18 steps", "nfe": r["nfe"], "train_nimg": 0,
                    "total_nimg": r["pretrain_nimg"], "fid": r["fid"], "kid": r["kid"], "n": r["n"]})
    ect = res.get("ect", {}).get("rows", [])
    for r in ect:
        if r["nimg"] == max(x["nimg"] for x in ect):
            out.append({"method": f"ECT (from the teacher), {r['steps']} step{'s' * (r['steps'] > 1)}", "nfe": r["nfe"],
                        "train_nimg": r["nimg"], "total_nimg": r["nimg"] + r["pretrain_nimg"], "fid": r["fid"],
                        "kid": r["kid"], "n": r["n"]})
    top = max((x["nimg"] for x in ect), default=0)
    for r in res.get("scaling", {}).get("rows", []):  # longer ECT runs of the scaling section
        if r["budget"] > top:
            out.append({"method": f"ECT (from the teacher, scaling run), {r['steps']} step{'s' * (r['steps'] > 1)}",
                        "nfe": r["nfe"], "train_nimg": r["nimg"], "total_nimg": r["nimg"] + TEACHER_PRETRAIN_NIMG,
                        "fid": r["fid"], "kid": r["kid"], "n": r["n"]})
    for r in ict_rows(res):
        out.append({"method": f"iCT (from scratch), {r['steps']} step{'s' * (r['steps'] > 1)}", "nfe": r["nfe"],
                    "train_nimg": r["nimg"], "total_nimg": r["nimg"], "fid": r["fid"], "kid": r["kid"], "n": r["n"]})
    return out


def write_tables(res: dict[str, Any], out: Path) -> str:
    md = [f"<!-- written by benchmarks/paper_claims.py ({res['mode']} mode); do not edit by hand -->", ""]
    t1 = table1_rows(res)
    if t1:
        _write_csv(out / "table1.csv", t1)
        n = t1[0]["n"]
        md += [f"### Table 1: MNIST, quality against training images (FID/KID at N = {n:,})", "",
               "| method | NFE | images seen (training) | images seen (incl. pretraining) | FID | KID |",
               "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {r['method']} | {r['nfe']} | {_fmt(r['train_nimg'])} | {_fmt(r['total_nimg'])} | {_fmt(r['fid'])} | "
               f"{_fmt(r['kid'], 4)} |" for r in t1]
        md.append("")
    if "ect" in res:
        rows = res["ect"]["rows"]
        _write_csv(out / "ect_curve.csv", rows)
        md += [f"### ECT as tuning goes on (one run of {_fmt(max(r['nimg'] for r in rows))} images, "
               f"{_fmt(res['ect']['stage_nimg'])} images per stage)", "",
               "| tuning images | total images | training wall (s) | FID 1-step | FID 2-step | KID 1-step | KID 2-step |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        for nimg in sorted({r["nimg"] for r in rows}):
            one = next(r for r in rows if r["nimg"] == nimg and r["steps"] == 1)
            two = next(r for r in rows if r["nimg"] == nimg and r["steps"] == 2)
            md.append(f"| {_fmt(nimg)} | {_fmt(nimg + TEACHER_PRETRAIN_NIMG)} | {one['train_wall_s']:.0f} | {_fmt(one['fid'])} | "
                      f"{_fmt(two['fid'])} | {_fmt(one['kid'], 4)} | {_fmt(two['kid'], 4)} |")
        md.append("")
    if ict_rows(res):
        _write_csv(out / "ict.csv", ict_rows(res))
    if "toy2d" in res:
        rows = res["toy2d"]["rows"]
        _write_csv(out / "toy2d.csv", rows)
        md += [f"### 2-D swiss roll: EDM teacher, ECT and iCT (sliced Wasserstein-2, {res['toy2d']['n']:,} points; "
               "lower is better)", "",
               *([f"A perfect sampler (fresh draws of the truth) scores SW {res['toy2d']['truth_sw']['mean']:.4f} "
                  f"(std {res['toy2d']['truth_sw']['std']:.4f}) at this N.", ""] if "truth_sw" in res["toy2d"] else []),
               "| method | budget (points) | points seen | incl. pretraining | NFE | SW | MMD |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            total = r["nimg"] + r.get("pretrain_nimg", 0)
            md.append(f"| {r['method']} | {_fmt(r['budget'])} | {_fmt(r['nimg'])} | {_fmt(total)} | {r['nfe']} | "
                      f"{r['sw']:.4f} | {r['mmd']:.2e} |")
        md.append("")
    if "flow" in res:
        rows = res["flow"]["rows"]
        _write_csv(out / "flow_toy.csv", rows)
        steps = sorted({r["euler_steps"] for r in rows})
        md += [f"### Flow matching on the swiss roll with the adaptive weight 1/(delta + c^2)^p "
               f"(c = {res['flow']['c']:g}, {res['flow']['train_steps']:,} Adam steps; SW-2 against "
               f"{res['flow']['n']:,} true points, mean over seeds)", "",
               *([f"A perfect sampler (fresh draws of the truth) scores SW {res['flow']['truth_sw']['mean']:.4f}.", ""]
                 if "truth_sw" in res["flow"] else []),
               "| p | " + " | ".join(f"{k} Euler step{'s' * (k > 1)}" for k in steps) + " |",
               "|---|" + "---:|" * len(steps)]
        for pw in sorted({r["p"] for r in rows}):
            vals = [float(np.mean([r["sw"] for r in rows if r["p"] == pw and r["euler_steps"] == k])) for k in steps]
            md.append(f"| {pw:g} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        md.append("")
    if "scaling" in res:
        rows = res["scaling"]["rows"]
        _write_csv(out / "scaling.csv", rows)
        fit = res["scaling"]["fit"]
        md += [f"### Scaling: separate ECT runs per budget (stage length = budget / 8), FID at N = {rows[0]['n']:,}", "",
               "| tuning images | FID 1-step | FID 2-step | KID 2-step |", "|---:|---:|---:|---:|"]
        for nimg in sorted({r["budget"] for r in rows}):
            one = next((r for r in rows if r["budget"] == nimg and r["steps"] == 1), {})
            two = next(r for r in rows if r["budget"] == nimg and r["steps"] == 2)
            md.append(f"| {_fmt(nimg)} | {_fmt(one.get('fid'))} | {_fmt(two['fid'])} | {_fmt(two['kid'], 4)} |")
        md += ["", "| metric | fitted exponent b (metric ~ images^b) | std. error | R^2 | points |", "|---|---:|---:|---:|---:|"]
        md += [f"| {k} | {v['b']:.3f} | {v['b_stderr']:.3f} | {v['r2']:.3f} | {v['n']} |" for k, v in fit.items()]
        md.append("")
    if "ablations" in res:
        rows = res["ablations"]["rows"]
        _write_csv(out / "ablations.csv", rows)
        md += [f"### Ablations: ECT on MNIST, {_fmt(res['ablations']['nimg'])} tuning images each "
               f"(FID/KID at N = {rows[0]['n']:,}; each row changes one thing from the baseline)", "",
               "| variant | FID 1-step | FID 2-step | KID 1-step | KID 2-step |", "|---|---:|---:|---:|---:|"]
        for name in dict.fromkeys(r["variant"] for r in rows):
            one = next((r for r in rows if r["variant"] == name and r["steps"] == 1), {})
            two = next(r for r in rows if r["variant"] == name and r["steps"] == 2)
            if two.get("refused"):
                stage = re.search(r"reach stage (\d+)", two["refused"])
                md.append(f"| {name} | - | refused: r(t) = t in float32{f' by stage {stage.group(1)}' if stage else ''} "
                          f"| - | - |")
                continue
            if two.get("diverged"):
                at = re.search(r"at (\d+) images", two["diverged"])
                md.append(f"| {name} | - | diverged{f' at {int(at.group(1)):,} images' if at else ''} | - | - |")
                continue
            md.append(f"| {name} | {_fmt(one.get('fid'))} | {_fmt(two['fid'])} | {_fmt(one.get('kid'), 4)} | "
                      f"{_fmt(two['kid'], 4)} |")
        md.append("")
    if "noise" in res:
        rows = res["noise"]["rows"]
        md += [f"### Seed noise: one model (the main ECT run, 2 steps) scored on 3 sets of sampling seeds, N = {rows[0]['n']:,}",
               "", "| first seed | FID | KID |", "|---:|---:|---:|"]
        md += [f"| {r['seed']:,} | {_fmt(r['fid'])} | {_fmt(r['kid'], 4)} |" for r in rows]
        md += ["", f"Standard deviation of FID over seed sets: {res['noise']['fid_std']:.2f}.", ""]
    text = "\n".join(md)
    (out / "tables.md").write_text(text, encoding="utf-8")
    return text


def write_figures(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    if "ect" in res or ict_rows(res):  # like the paper's Figure 2: FID against images seen
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, total in zip(axes, (False, True)):
            for steps, ls in ((1, "--"), (2, "-")):
                ect = sorted((r for r in res.get("ect", {}).get("rows", []) if r["steps"] == steps), key=lambda r: r["nimg"])
                if ect:
                    ax.plot([r["nimg"] + total * r["pretrain_nimg"] for r in ect], [r["fid"] for r in ect], "o" + ls,
                            color="C0", label=f"ECT {steps}-step (one run)")
                sc = sorted((r for r in res.get("scaling", {}).get("rows", []) if r["steps"] == steps),
                            key=lambda r: r["budget"])
                if sc and not total and steps == 2:  # the scaling runs are scored with 2 steps
                    ax.plot([r["budget"] for r in sc], [r["fid"] for r in sc], "s" + ls, color="C2", alpha=0.7,
                            label=f"ECT {steps}-step (run per budget)")
                ict = sorted((r for r in ict_rows(res) if r["steps"] == steps), key=lambda r: r["nimg"])
                if ict:
                    ax.plot([r["nimg"] for r in ict], [r["fid"] for r in ict], "^" + ls, color="C3", label=f"iCT {steps}-step")
            for r in res.get("teacher", {}).get("rows", []):
                ax.axhline(r["fid"], color="k", lw=1, ls=":", label="EDM teacher, Heun 35 NFE")
                if total:
                    ax.plot([r["pretrain_nimg"]], [r["fid"]], "k*", ms=10)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("images seen" + (" incl. the teacher's pretraining" if total else " in training (tuning for ECT)"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"FID (N = {res.get('teacher', res.get('ect', {})).get('rows', [{'n': '?'}])[0].get('n')})")
        axes[0].legend(fontsize=7)
        fig.suptitle("MNIST: FID against training images (ECT from the 1.6M-image teacher vs iCT from scratch)")
        save(fig, "fid_vs_images.png")

    if "scaling" in res:
        rows, fit = res["scaling"]["rows"], res["scaling"]["fit"]
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for steps, color in ((2, "C0"),):
            pts = sorted((r["budget"], r["fid"]) for r in rows if r["steps"] == steps)
            x, y = np.array(pts).T
            f = fit[f"{steps}-step"]
            ax.plot(x, y, "o", color=color, label=f"ECT {steps}-step")
            xs = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xs, np.exp(f["a"]) * xs ** f["b"], "-", color=color, alpha=0.6,
                    label=f"fit: FID ~ images^{f['b']:.2f} (R^2 {f['r2']:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tuning images (one run per budget)")
        ax.set_ylabel(f"FID (N = {rows[0]['n']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("ECT on MNIST: FID against tuning compute")
        save(fig, "scaling.png")

    if "flow" in res:
        rows = res["flow"]["rows"]
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for i, pw in enumerate(sorted({r["p"] for r in rows})):
            steps = sorted({r["euler_steps"] for r in rows})
            vals = [np.mean([r["sw"] for r in rows if r["p"] == pw and r["euler_steps"] == k]) for k in steps]
            ax.plot(steps, vals, "o-", color=f"C{i}", label=f"p = {pw:g}")
        if "truth_sw" in res["flow"]:
            ax.axhline(res["flow"]["truth_sw"]["mean"], color="k", ls=":", lw=1, label="truth vs truth (floor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Euler steps (NFE)")
        ax.set_ylabel("sliced Wasserstein-2 to the swiss roll")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title("Flow matching, adaptive weight 1/(delta + c^2)^p", fontsize=10)
        save(fig, "flow_toy.png")

    if "toy2d" in res:
        rows = res["toy2d"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        styles = {"EDM (Heun)": ("k", "*"), "ECT": ("C0", "o"), "iCT": ("C3", "^")}
        for (method, budget) in dict.fromkeys((r["method"], r["budget"]) for r in rows):
            for steps, ls in ((1, "--"), (2, "-"), (18, "-")):
                sel = sorted((r for r in rows if r["method"] == method and r["budget"] == budget and r["steps"] == steps),
                             key=lambda r: r["nimg"])
                if not sel:
                    continue
                color, marker = styles[method]
                if method == "iCT" and budget != min(r["budget"] for r in rows if r["method"] == "iCT"):
                    color = "C1"
                x = [r["nimg"] + r.get("pretrain_nimg", 0) for r in sel]
                label = f"{method} {sel[0]['nfe']} NFE" + (f" (budget {budget:,})" if method == "iCT" else "")
                ax.plot(x, [r["sw"] for r in sel], marker + ls, color=color, label=label)
        if "truth_sw" in res["toy2d"]:
            ax.axhline(res["toy2d"]["truth_sw"]["mean"], color="k", ls=":", lw=1, label="truth vs truth (floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("points seen, incl. pretraining for ECT")
        ax.set_ylabel("sliced Wasserstein-2")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("2-D swiss roll: quality against training compute")
        save(fig, "toy2d.png")
    return written


# ---------------------------------------------------------------------------------------------
# The command.


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def save_results(path: Path, mode: str, plan: Plan, sections: dict[str, Any], drop: list[str] = ()) -> dict[str, Any]:
    """Merge ``sections`` into results.json under a file lock (several processes may each run some
    sections into one folder) and return all sections."""
    import fcntl

    import hashlib
    import tempfile

    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"paper_claims-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_results(path)
        if old.get("mode") not in (None, mode):
            raise SystemExit(f"error: {path} holds {old['mode']} results: use another --out for {mode} mode")
        merged = {k: v for k, v in old.get("sections", {}).items() if k not in drop}
        merged.update(sections)
        merged = {k: merged[k] for k in SECTIONS if k in merged}
        payload = {"format": "ectune-paper-claims", "mode": mode, "plan": dataclasses.asdict(plan),
                   "teacher_pretrain_nimg": TEACHER_PRETRAIN_NIMG, "torch_threads": torch.get_num_threads(),
                   "sections": merged}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
        tmp.replace(path)
    return merged


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="paper_claims.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the whole pipeline in under 15 minutes")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of sections to run ({','.join(SECTIONS)})")
    ap.add_argument("--out", default=None, help="output folder (default results/paper_claims, or .../quick with --quick)")
    ap.add_argument("--work-dir", default=None, help="run folders (default /tmp/paper_claims_runs/<mode>)")
    ap.add_argument("--resume", action="store_true", help="keep the sections already in OUT/results.json and run the rest")
    ap.add_argument("--render", action="store_true", help="only rewrite tables.md, the CSVs and the figures from OUT/results.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default). 1 is the default because on a shared 2-core machine "
                         "2 OpenMP threads ran ECT 6x slower (9 vs 57 img/s) than 1 while another job was running")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = PLANS[mode]
    out = Path(args.out) if args.out else REPO / "results" / "paper_claims" / ("quick" if args.quick else "")
    work = Path(args.work_dir) if args.work_dir else Path("/tmp/paper_claims_runs") / mode
    if args.render and not read_results(out / "results.json").get("sections"):
        print(f"error: {out / 'results.json'} holds no results to render: run the study first, or pass its --out",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan, mode, out, work)
    res_path = out / "results.json"
    if args.render:
        merged = read_results(res_path).get("sections", {})
        write_tables({"mode": mode, **merged}, out)
        print("\n".join(str(p) for p in write_figures(merged, out)))
        return 0
    if args.resume:
        bench.results = {k: v for k, v in read_results(res_path).get("sections", {}).items() if k in sections}
    # Otherwise each section is replaced in results.json when it finishes; until then the old one stays,
    # and scaling / ablations reuse its runs of the same configuration (training is deterministic:
    # the same run done twice, in two processes, gave the same FID to the last digit).
    t_start = time.perf_counter()
    timings = {}
    for name in [s for s in SECTIONS if s in sections]:  # fixed order: later sections reuse earlier runs
        if name in bench.results:
            _log(f"{name}: kept from {res_path}")
            continue
        _log(f"{name}: start")
        t0 = time.perf_counter()
        bench.results[name] = getattr(bench, name)()
        bench.results[name]["wall_s"] = timings[name] = time.perf_counter() - t0
        bench.results[name]["plan"] = dataclasses.asdict(plan)  # processes may run different code versions
        _log(f"{name}: done in {timings[name] / 60:.1f} min")
        merged = save_results(res_path, mode, plan, {name: bench.results[name]})
        write_tables({"mode": mode, **merged}, out)
        write_figures(merged, out)
    _log(f"all done in {(time.perf_counter() - t_start) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
