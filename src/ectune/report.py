"""The report written after a tune run: the teacher (Heun, 35 NFE) beside the consistency model's
1- and 2-step samples on the same seeds, with metrics at equal N (report.md, results.json, grids)."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ectune.checkpoint import load_model, resolve_model_folder, write_text_atomic
from ectune.config import TrainConfig
from ectune.evaluate import build_evaluator, default_cache_dir
from ectune.images import grid, save_png, save_scatter, side_by_side
from ectune.metrics.encoders import get_encoder, sha256_file
from ectune.metrics.store import features_agree, read_entry, write_entry
from ectune.preview import generate
from ectune.sampling import check_finite, seed_labels, to_uint8

GRID_IMAGES = 64
logger = logging.getLogger(__name__)


def _settings(mid_sigma: float) -> dict[str, dict[str, Any]]:
    return {"teacher, Heun 35 NFE": dict(model="teacher", slug="teacher-35nfe", nfe=35, method="heun", steps=18),
            "ECM 1 step": dict(model="student", slug="ecm-1step", nfe=1, method="consistency", steps=1),
            "ECM 2 steps": dict(model="student", slug="ecm-2step", nfe=2, method="consistency", steps=2,
                                sigmas=[mid_sigma])}


QUOTABLE_N = 5000
"""The smallest N whose FIDs the report does not flag as for comparing rows only."""

TEACHER_CACHE_FORMAT = 1
TEACHER_CHECK_SEEDS = 16
"""Teacher samples drawn and encoded again to check a cached teacher row before it is used."""
_TEACHER_KEYS = ("format", "teacher_weights_sha256", "teacher_config_sha256", "method", "steps", "sigmas", "seeds",
                 "labels", "encoder", "encoder_hash", "feature_dim")


def _teacher_entry(folder: Path, s: dict[str, Any], n: int, encoder,
                   label_dim: int) -> tuple[dict[str, Any], list[tuple[Path, Path]]]:
    """The provenance a cached teacher row must have, and where to look for one: shipped beside the
    teacher (report-cache/), then the user's metric cache. ``labels`` names the class-label rule of a
    conditional teacher; it is absent (None) for an unconditional one."""
    expected = {"format": TEACHER_CACHE_FORMAT, "teacher_weights_sha256": sha256_file(folder / "model.safetensors"),
                "teacher_config_sha256": sha256_file(folder / "config.json"), "method": s["method"],
                "steps": s["steps"], "sigmas": s.get("sigmas", []), "seeds": [0, n],
                "labels": f"seed mod {label_dim}" if label_dim else None, "encoder": encoder.name,
                "encoder_hash": encoder.file_hash, "feature_dim": encoder.feature_dim}
    stem = f"teacher-{s['method']}{s['steps']}-n{n}-{encoder.name}"
    user = default_cache_dir() / f"{stem}-{expected['teacher_weights_sha256'][:16]}"
    shipped = folder / "report-cache" / stem
    return expected, [(d.with_suffix(".npz"), d.with_suffix(".json")) for d in (shipped, user)]


def images_agree(fresh: np.ndarray, stored: np.ndarray) -> bool:
    """uint8 images equal up to the last-bit differences of another CPU or thread count: no pixel
    more than 2 levels apart, and at most 1% of pixels different at all."""
    diff = np.abs(fresh.astype(np.int16) - stored.astype(np.int16))
    return fresh.shape == stored.shape and int(diff.max(initial=0)) <= 2 and float((diff > 0).mean()) <= 0.01


def sample_setting(denoiser, minfo, s: dict[str, Any], n: int, *, batch: int = 250,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Samples of one report setting on seeds 0..n-1 (class labels by :func:`seed_labels`): uint8
    images, or float points for 2-D data."""
    parts = []
    for i in range(0, n, batch):
        seeds = list(range(i, min(i + batch, n)))
        parts.append(generate(denoiser, minfo, method=s["method"], steps=s["steps"], sigmas=s.get("sigmas"),
                              seeds=seeds, labels=seed_labels(seeds, minfo.label_dim, device), device=device))
    x = check_finite(torch.cat(parts).cpu())
    return to_uint8(x) if x.ndim == 4 else x.float()


def _cached_teacher_row(denoiser, minfo, s: dict[str, Any], expected: dict[str, Any],
                        places: list[tuple[Path, Path]], n: int, evaluator,
                        device) -> tuple[torch.Tensor, np.ndarray, str] | None:
    """(images, features, where) of a cached teacher row at one of ``places`` with the ``expected``
    provenance whose first seeds, sampled and encoded again, agree with it; else None."""
    shapes = {"images": (n, *minfo.data_shape), "features": (n, evaluator.encoder.feature_dim)}
    k = min(TEACHER_CHECK_SEEDS, n)
    for npz_path, json_path in places:
        entry = read_entry(npz_path, json_path, expected, _TEACHER_KEYS, shapes)
        if entry is None or entry[0]["images"].dtype != np.uint8:
            continue
        images, feats = entry[0]["images"], entry[0]["features"].astype(np.float32)
        fresh = sample_setting(denoiser, minfo, s, k, device=device).numpy()
        if not images_agree(fresh, images[:k]):
            logger.warning("cached teacher samples %s differ from the teacher's on seeds 0..%d: sampling again",
                           npz_path, k - 1)
            continue
        if not features_agree(evaluator.encode(torch.from_numpy(images[:k])).numpy(), feats[:k]):
            logger.warning("cached teacher features %s differ from this encoder's: encoding again", npz_path)
            continue
        return torch.from_numpy(images), feats, f"{npz_path} (seeds 0..{k - 1} sampled and encoded again, agreeing)"
    return None


def save_teacher_row(npz_path: Path, json_path: Path, expected: dict[str, Any], teacher: str,
                     images: torch.Tensor, feats: torch.Tensor) -> None:
    """Write a teacher row (uint8 images, float16 features) with its provenance and the ``teacher``'s
    name; a failure is logged, as a read-only cache costs time next run, not this report."""
    try:
        write_entry(npz_path, json_path, {"images": images.numpy(), "features": feats.numpy().astype(np.float16)},
                    dict(expected, teacher=teacher))
    except OSError as exc:
        logger.warning("could not cache the teacher row in %s (%s)", npz_path.parent, exc)


@torch.no_grad()
def write_tune_report(run_dir: str | Path, cfg: TrainConfig, *, train_wall_s: float, nimg: int,
                      encoder=None, batch: int = 250, device: str | torch.device = "cpu",
                      out_dir: str | Path | None = None, right_after_training: bool = True) -> Path:
    """Sample the teacher and the tuned model (run_dir/model) on seeds 0..N-1, N = cfg.report_num_images,
    score each against N items of the training data (cfg.data's split), and write report.md, results.json
    and the grids into ``out_dir`` (default: run_dir). Returns report.md. ``right_after_training=False``
    (a later measurement, e.g. at a larger N) leaves the total wall time, training plus report, out.

    The teacher's row (images and Inception features) is cached: shipped beside the teacher for the
    default report, and in the user's metric cache after a first report. A cached row is used only
    if its provenance matches (teacher weights, sampler, seeds, encoder) and its first 16 seeds,
    sampled and encoded again here, agree with it. ``device``: where the models and (unless ``encoder``
    is given) Inception-v3 run."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    t0 = time.perf_counter()
    n = cfg.report_num_images
    models = {"teacher": load_model(cfg.teacher, device=device), "student": load_model(run_dir / "model", device=device)}
    info = models["student"][1]
    shape = tuple(info.data_shape)
    if encoder is None:  # Inception-v3 on the models' device, built only for image data
        encoder = functools.partial(get_encoder, "inception_v3", device=device)
    evaluator = build_evaluator(cfg.data.name, cfg.data.path, cfg.data.split, n, shape, "auto", encoder=encoder)
    teacher_folder = resolve_model_folder(cfg.teacher)
    cacheable = evaluator.is_image and all((teacher_folder / f).is_file() for f in ("model.safetensors", "config.json"))
    rows, samples = [], {}
    for title, s in _settings(info.mid_sigma).items():
        denoiser, minfo = models[s["model"]]
        start = time.perf_counter()
        row = {"name": title, "grid": f"grid-{s['slug']}.png", "nfe": s["nfe"], "method": s["method"],
               "steps": s["steps"], "sigmas": s.get("sigmas", [])}
        teacher = s["model"] == "teacher" and cacheable
        expected, places = (_teacher_entry(teacher_folder, s, n, evaluator.encoder, minfo.label_dim) if teacher
                            else ({}, []))
        cached = _cached_teacher_row(denoiser, minfo, s, expected, places, n, evaluator, device) if teacher else None
        if cached is not None:
            samples[title], feats, row["from_cache"] = cached
            row["sample_s"] = time.perf_counter() - start
            row.update(evaluator.score_features(feats))
        else:
            samples[title] = sample_setting(denoiser, minfo, s, n, batch=batch, device=device)
            row["sample_s"] = time.perf_counter() - start
            metrics, feats = evaluator.score_samples(samples[title])
            row.update(metrics)
            if teacher:  # cached in the user's metric cache for the next report
                save_teacher_row(*places[-1], expected, str(teacher_folder), samples[title], feats)
        rows.append(row)
    # grids on the same seeds
    if len(shape) == 3:
        panels = []
        for row in rows:
            g = grid(samples[row["name"]][:GRID_IMAGES])
            save_png(g, out / row["grid"], scale=2)
            panels.append(g)
        save_png(side_by_side(panels), out / "grid-side-by-side.png", scale=2)
    else:
        save_scatter({row["name"]: samples[row["name"]] for row in rows}, out / "grid-side-by-side.png")
        for row in rows:
            row["grid"] = "grid-side-by-side.png"
    results = {"format": "ectune-tune-report", "schema_version": 1, "teacher": str(cfg.teacher),
               "model": str(run_dir / "model"), "data": cfg.data.name, "num_images": n,
               "reference": evaluator.info, "images_seen": nimg, "train_wall_s": train_wall_s,
               "report_wall_s": time.perf_counter() - t0, "precision": cfg.precision, "rows": rows}
    results["total_wall_s"] = train_wall_s + results["report_wall_s"] if right_after_training else None
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out / "report.md", format_report(results))
    return out / "report.md"


def format_report(results: dict[str, Any]) -> str:
    """The markdown of report.md from the results.json object."""
    rows = results["rows"]
    metrics = [k for k in rows[0] if k.split("_")[0] in ("fid", "kid", "sw", "mmd") and not k.endswith("_std")]
    small = results["num_images"] < QUOTABLE_N
    lines = [f"# ECT tuning report: {results['data']}", "",
             f"Teacher `{results['teacher']}` tuned into `{results['model']}` on {results['images_seen']:,} images "
             f"({results['precision']}) in {results['train_wall_s'] / 60:.1f} min of training; "
             + (f"this report took {results['report_wall_s'] / 60:.1f} min more "
                f"(total {results['total_wall_s'] / 60:.1f} min)." if results.get("total_wall_s") is not None else
                f"this report, measured later, took {results['report_wall_s'] / 60:.1f} min."), "",
             f"Metrics on N = {results['num_images']:,} samples (seeds 0..{results['num_images'] - 1}) against "
             f"{results['reference']['num_images']:,} "
             + ("training items." if results["reference"].get("split", "train") == "train"
                else f"items of the {results['reference']['split']} split (the training data).")
             + (" FID at small N is biased upward: compare the rows with each other, and measure at "
                f"N >= {QUOTABLE_N:,} (benchmarks/tune_targets.py) for figures to quote." if small else ""), "",
             "| sampler | NFE | " + " | ".join(metrics) + " | ratio to teacher |",
             "|---|---:|" + "---:|" * (len(metrics) + 1)]
    first = metrics[0]
    for row in rows:
        vals = " | ".join(f"{row[m]:.4g}" for m in metrics)
        ratio = row[first] / rows[0][first] if rows[0][first] else float("nan")
        lines.append(f"| {row['name']} | {row['nfe']} | {vals} | {ratio:.2f}x ({first}) |")
    lines += ["", "Samples on the same seeds (teacher, 1 step, 2 steps): `grid-side-by-side.png`."]
    lines += [f"The {row['name']} row's samples and features are from the cache {row['from_cache']}."
              for row in rows if row.get("from_cache")]
    lines.append("")
    return "\n".join(lines)
