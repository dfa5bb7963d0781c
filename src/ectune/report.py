"""The report written after a tune run: the teacher (Heun, 35 NFE) beside the consistency model's
1- and 2-step samples on the same seeds, with metrics at equal N (report.md, results.json, grids)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ectune.checkpoint import load_model, write_text_atomic
from ectune.config import TrainConfig
from ectune.evaluate import build_evaluator
from ectune.images import grid, save_png, save_scatter, side_by_side
from ectune.preview import generate
from ectune.sampling import to_uint8

GRID_IMAGES = 64


def _settings(mid_sigma: float) -> dict[str, dict[str, Any]]:
    return {"teacher, Heun 35 NFE": dict(model="teacher", slug="teacher-35nfe", nfe=35, method="heun", steps=18),
            "ECM 1 step": dict(model="student", slug="ecm-1step", nfe=1, method="consistency", steps=1),
            "ECM 2 steps": dict(model="student", slug="ecm-2step", nfe=2, method="consistency", steps=2,
                                sigmas=[mid_sigma])}


@torch.no_grad()
def write_tune_report(run_dir: str | Path, cfg: TrainConfig, *, train_wall_s: float, nimg: int,
                      encoder=None, batch: int = 250, device: str | torch.device = "cpu") -> Path:
    """Sample the teacher and the tuned model (run_dir/model) on seeds 0..N-1, N = cfg.report_num_images,
    score each against N training items, and write report.md, results.json and the grids. Returns report.md."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    n = cfg.report_num_images
    models = {"teacher": load_model(cfg.teacher, device=device), "student": load_model(run_dir / "model", device=device)}
    info = models["student"][1]
    rows, samples = [], {}
    for title, s in _settings(info.mid_sigma).items():
        denoiser, minfo = models[s["model"]]
        start = time.perf_counter()
        parts = [generate(denoiser, minfo, method=s["method"], steps=s["steps"], sigmas=s.get("sigmas"),
                          seeds=list(range(i, min(i + batch, n))), device=device) for i in range(0, n, batch)]
        x = torch.cat(parts).cpu()
        samples[title] = to_uint8(x) if x.ndim == 4 else x.float()
        rows.append({"name": title, "grid": f"grid-{s['slug']}.png", "nfe": s["nfe"], "method": s["method"], "steps": s["steps"],
                     "sigmas": s.get("sigmas", []), "sample_s": time.perf_counter() - start})
    shape = tuple(info.data_shape)
    evaluator = build_evaluator(cfg.data.name, cfg.data.path, "train", n, shape, "auto", encoder=encoder)
    for row in rows:
        row.update(evaluator(samples[row["name"]]))
    # grids on the same seeds
    if len(shape) == 3:
        panels = []
        for row in rows:
            g = grid(samples[row["name"]][:GRID_IMAGES])
            save_png(g, run_dir / row["grid"], scale=2)
            panels.append(g)
        save_png(side_by_side(panels), run_dir / "grid-side-by-side.png", scale=2)
    else:
        save_scatter({row["name"]: samples[row["name"]] for row in rows}, run_dir / "grid-side-by-side.png")
        for row in rows:
            row["grid"] = "grid-side-by-side.png"
    results = {"format": "ectune-tune-report", "schema_version": 1, "teacher": str(cfg.teacher),
               "model": str(run_dir / "model"), "data": cfg.data.name, "num_images": n,
               "reference": evaluator.info, "images_seen": nimg, "train_wall_s": train_wall_s,
               "report_wall_s": time.perf_counter() - t0, "precision": cfg.precision, "rows": rows}
    results["total_wall_s"] = train_wall_s + results["report_wall_s"]
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    write_text_atomic(run_dir / "report.md", format_report(results))
    return run_dir / "report.md"


def format_report(results: dict[str, Any]) -> str:
    """The markdown of report.md from the results.json object."""
    rows = results["rows"]
    metrics = [k for k in rows[0] if k.split("_")[0] in ("fid", "kid", "sw", "mmd") and not k.endswith("_std")]
    lines = [f"# ECT tuning report: {results['data']}", "",
             f"Teacher `{results['teacher']}` tuned into `{results['model']}` on {results['images_seen']:,} images "
             f"({results['precision']}) in {results['train_wall_s'] / 60:.1f} min of training; "
             f"this report took {results['report_wall_s'] / 60:.1f} min more "
             f"(total {results['total_wall_s'] / 60:.1f} min).", "",
             f"Metrics on N = {results['num_images']:,} samples (seeds 0..{results['num_images'] - 1}) against "
             f"{results['reference']['num_images']:,} training items. FID at small N is biased upward: compare the "
             f"rows with each other, and measure at N >= 5,000 with `ectune eval` for figures to quote.", "",
             "| sampler | NFE | " + " | ".join(metrics) + " | ratio to teacher |",
             "|---|---:|" + "---:|" * (len(metrics) + 1)]
    first = metrics[0]
    for row in rows:
        vals = " | ".join(f"{row[m]:.4g}" for m in metrics)
        ratio = row[first] / rows[0][first] if rows[0][first] else float("nan")
        lines.append(f"| {row['name']} | {row['nfe']} | {vals} | {ratio:.2f}x ({first}) |")
    lines += ["", "Samples on the same seeds (teacher, 1 step, 2 steps): `grid-side-by-side.png`.", ""]
    return "\n".join(lines)
