"""``ectune plot``: PNG figures of one or more runs, from the files the runs already hold.

- ``training.png``: the loss and every metric logged during training (stats.jsonl: "fid", "kid",
  "sw", ...) against images seen, one line per run.
- ``steps.png``: a metric (FID, else FD-DINOv2, else SW) against network evaluations per sample, from
  the results ``ectune eval`` writes into ``<run>/eval/*.json`` (single settings and
  ``--steps-sweep``). An ECT run's teacher (its config's ``teacher``) is drawn beside it when the
  teacher's run folder holds results. One line per (model, sampler, N, encoder, reference): FIDs at
  different N are not comparable, so they are never joined; each steps sweep is a line of its own, and
  single results at one NFE but different levels are separate points (:func:`step_series`).
- ``mid.png``: the ``--search-mid`` scans (metric against the 2-step intermediate level).
- ``samples.png``: the latest preview of each run side by side, when more than one run is given.

Figures go to ``--out`` (default ``<first run>/plots/``), each written atomically. A line of
stats.jsonl that does not parse (a run being written) is skipped; results files that are not
ectune eval results are skipped with a warning.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ectune.checkpoint import atomic_write, read_stats_rows, run_relative_path
from ectune.errors import UserError
from ectune.metric_names import result_variant

METRIC_KEYS = ("fid", "fd_dinov2", "kid", "precision", "recall", "sw", "mmd")
STEP_METRICS = ("fid", "fd_dinov2", "sw", "mmd", "kid")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/stats.jsonl`` (lines that do not parse are skipped)."""
    return [r for _, r in read_stats_rows(run_dir / "stats.jsonl") if isinstance(r.get("nimg"), (int, float))]


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """The ``ectune eval`` results in ``run_dir/eval/*.json``, in name order."""
    folder = run_dir / "eval"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            _warn(f"skipping {path}: not valid JSON ({e})")
            continue
        if not isinstance(data, dict) or data.get("format") != "ectune-eval" or not isinstance(data.get("results"), list):
            _warn(f"skipping {path}: not an ectune eval results file")
            continue
        if not _well_formed(data):
            _warn(f"skipping {path}: an ectune eval results file with fields missing or damaged")
            continue
        out.append(data)
    return out


def _well_formed(data: dict[str, Any]) -> bool:
    """Whether an ectune-eval results object has the fields the plots read, of the right types."""
    number = (int, float)
    rows_ok = all(isinstance(r, dict) and isinstance(r.get("method", 0), (str, type(None)))  # None: an image folder's
                  and isinstance(r.get("sigmas", []), list)
                  and all(isinstance(x, number) for x in r.get("sigmas", [])) for r in data["results"])
    best = data.get("best")
    best_ok = best is None or (isinstance(best, dict) and isinstance(best.get("by"), str)
                               and isinstance(best.get("mid_sigma"), number)
                               and isinstance(best.get(best["by"]), number))
    parts_ok = all(isinstance(data.get(k), (dict, type(None))) for k in ("encoder", "data"))
    return isinstance(data.get("num_images"), int) and rows_ok and best_ok and parts_ok


def teacher_run(run_dir: Path) -> Path | None:
    """The run folder of an ECT run's teacher, if its config names one that is a run's model folder."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    teacher = cfg.get("teacher") if isinstance(cfg, dict) else None
    if not isinstance(teacher, str) or not teacher:
        return None
    recorded = cfg.get("run_dir") if isinstance(cfg.get("run_dir"), str) else None
    path = Path(run_relative_path(run_dir, recorded, teacher))
    for candidate in (path, path.parent):
        if (candidate / "stats.jsonl").is_file() or (candidate / "eval").is_dir():
            return candidate
    return None


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(stats: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Loss and logged metrics against images seen, one panel per quantity; False if nothing to draw."""
    keys = [k for k in ("loss", *METRIC_KEYS) if any(k in r for records in stats.values() for r in records)]
    if not keys:
        return False
    plt = _pyplot()
    top = max((r["nimg"] for records in stats.values() for r in records), default=0)
    scale, unit = (1e6, "millions") if top >= 1e6 else (1e3, "thousands")
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, records in stats.items():
            pts = sorted((r["nimg"], r[key]) for r in records if isinstance(r.get(key), (int, float)))
            pts = [(n, v) for n, v in pts if math.isfinite(v)]
            if pts:
                ax.plot([n / scale for n, _ in pts], [v for _, v in pts], marker="." if len(pts) < 30 else None,
                        label=label)
        ax.set_title(key)
        ax.set_xlabel(f"images seen ({unit})")
        if key == "loss" or key in ("fid", "fd_dinov2", "mmd"):
            values = [r[key] for records in stats.values() for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values and min(values) > 0:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(stats) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return True


def _series_key(res: dict[str, Any], row: dict[str, Any]) -> tuple:
    enc = (res.get("encoder") or {}).get("name", "points")
    data = res.get("data") or {}
    variant = ", ".join(f"{short}={value}" for short, value in result_variant(res))  # as in its file name
    return (res.get("source"), row.get("method"), res.get("num_images"), enc, data.get("id"), variant)


def _step_metric(results: Sequence[dict[str, Any]]) -> str | None:
    for key in STEP_METRICS:
        if any(key in row for res in results for row in res["results"]):
            return key
    return None


def _steps_result(res: dict[str, Any]) -> bool:
    """Whether an eval result has points for steps.png: a model at single settings or a steps sweep."""
    return res.get("mode") in ("single", "steps_sweep") and res.get("source_kind") == "model"


def _levels(sigmas: Sequence[float]) -> str:
    return ",".join(f"{s:g}" for s in sigmas)


def step_series(results: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, dict[int, float]]:
    """The lines of ``steps.png``: legend label -> {NFE: metric}.

    A line is one (model, sampler, N, encoder, reference). Each ``--steps-sweep`` with its own levels
    is a line of its own; single settings join into one line, except those at an NFE measured at more
    than one set of levels (e.g. 2 steps at 0.2 and at 5): each of those is a point of its own, its
    levels in the label. Of two results at the same setting, the later file's replaces the earlier.
    """
    sweeps: dict[tuple, dict[int, float]] = {}
    singles: dict[tuple, dict[int, dict[tuple, float]]] = {}
    labels: dict[tuple, str] = {}
    for label, rs in results.items():
        for res in filter(_steps_result, rs):
            rows = [r for r in res["results"] if isinstance(r.get(metric), (int, float))
                    and isinstance(r.get("nfe"), int) and math.isfinite(r[metric])]
            for row in rows:
                key = (label, *_series_key(res, row))
                variant = f", {key[-1]}" if key[-1] else ""
                labels[key] = f"{label}: {row['method']}, N={res['num_images']}{variant}"
                levels = tuple(row.get("sigmas") or ())
                if res["mode"] == "steps_sweep":
                    sweep = tuple((r["nfe"], tuple(r.get("sigmas") or ())) for r in rows)
                    sweeps.setdefault((*key, sweep), {})[row["nfe"]] = row[metric]
                else:
                    singles.setdefault(key, {}).setdefault(row["nfe"], {})[levels] = row[metric]
    out: dict[str, dict[int, float]] = {}
    for (*key, sweep), points in sweeps.items():
        others = [sw for (*k, sw) in sweeps if k == key]
        name = labels[tuple(key)] + ", sweep"
        if len(others) > 1:  # sweeps of one model at other levels: told apart by the 2-step level, else a number
            two = dict(sweep).get(2)
            name += f" (2-step level {_levels(two)})" if two else f" #{others.index(sweep) + 1}"
        out[name] = points
    for key, by_nfe in singles.items():
        line = {n: next(iter(v.values())) for n, v in by_nfe.items() if len(v) == 1}
        if line:
            out[labels[key]] = line
        for n, v in by_nfe.items():
            if len(v) > 1:
                for levels, value in v.items():
                    out[f"{labels[key]}, {n} NFE at {_levels(levels) or 'no levels'}"] = {n: value}
    return out


def plot_steps(results: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Metric against NFE, lines as :func:`step_series` draws them; False if none."""
    metric = _step_metric([r for rs in results.values() for r in filter(_steps_result, rs)])
    series = step_series(results, metric) if metric is not None else {}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(metric)
    if metric in ("fid", "fd_dinov2") and all(v > 0 for points in series.values() for v in points.values()):
        ax.set_yscale("log")
    ax.set_title(f"{metric} against sampling steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_mid(results: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """The --search-mid scans: metric against the 2-step intermediate level; False if none."""
    scans = [(label, r) for label, rs in results.items() for r in rs if r.get("mode") == "search_mid" and r.get("best")]
    if not scans:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    metrics = set()
    for label, res in scans:
        by = res["best"]["by"]
        metrics.add(by)
        pts = sorted((row["sigmas"][0], row[by]) for row in res["results"]
                     if row.get("sigmas") and isinstance(row.get(by), (int, float)) and math.isfinite(row[by]))
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label}, N={res['num_images']}")
        ax.plot([res["best"]["mid_sigma"]], [res["best"][by]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("intermediate noise level of 2-step sampling")
    ax.set_ylabel(" / ".join(sorted(metrics)))
    ax.set_title("2-step intermediate level scan (star: best)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def latest_preview(run_dir: Path) -> Path | None:
    """The newest samples/preview-*.png of a run, by the images seen its name gives."""
    from ectune.preview import preview_nimg

    found = [(n, p) for p in (run_dir / "samples").glob("preview-*.png") if (n := preview_nimg(p.name)) is not None]
    return max(found)[1] if found else None


def compose_samples(previews: dict[str, Path], path: Path) -> bool:
    """The given preview PNGs side by side with their run names as titles; False if fewer than 2."""
    if len(previews) < 2:
        return False
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(previews), figsize=(4.5 * len(previews), 4.5), squeeze=False)
    for ax, (label, file) in zip(axes[0], previews.items()):
        with Image.open(file) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(f"{label}: {file.stem.removeprefix('preview-')}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write the figures of the module docstring for ``run_dirs``; returns the files written.

    Raises:
        UserError: a run folder does not exist, or none of them holds anything to plot.
    """
    runs = [Path(r) for r in run_dirs]
    for run in runs:
        if not run.is_dir():
            raise UserError(f"{run} is not a folder: pass run folders (they hold stats.jsonl and eval/)")
    labels = _labels(runs)
    stats = {labels[r]: read_stats(r) for r in runs}
    results = {labels[r]: read_results(r) for r in runs}
    for run in runs:  # the teachers of ECT runs, for FID against steps
        teacher = teacher_run(run)
        if teacher is not None and teacher.resolve() not in {r.resolve() for r in runs}:
            found = read_results(teacher)
            if found:
                results.setdefault(f"{teacher.name} (teacher)", found)
    if not any(stats.values()) and not any(results.values()):
        names = ", ".join(str(r) for r in runs)
        raise UserError(f"nothing to plot in {names}: no stats.jsonl records and no eval/*.json results "
                        f"(write results with `ectune eval RUN_DIR`)")
    folder = Path(out) if out is not None else runs[0] / "plots"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file: pass a folder for the PNGs")
    existed = folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {folder} ({e.strerror}): pass a folder that can be written") from None
    written = []
    for name, draw, data in (("training.png", plot_training, stats), ("steps.png", plot_steps, results),
                             ("mid.png", plot_mid, results)):
        if draw(data, folder / name):
            written.append(folder / name)
    previews = {labels[r]: p for r in runs if (p := latest_preview(r)) is not None}
    if compose_samples(previews, folder / "samples.png"):
        written.append(folder / "samples.png")
    if not written and not existed:
        folder.rmdir()  # nothing to draw: leave no empty folder behind
    return written


def _labels(runs: Sequence[Path]) -> dict[Path, str]:
    """Run names for legends: the folder name, with its parent where two runs share a name."""
    names = [r.resolve().name for r in runs]
    return {r: (f"{r.resolve().parent.name}/{n}" if names.count(n) > 1 else n) for r, n in zip(runs, names)}


def cli_plot(run_dirs: Sequence[str], out: str | None = None) -> int:
    """``ectune plot``: write the figures and list them."""
    written = plot_runs(run_dirs, out)
    if not written:
        print("nothing to draw: the runs hold no loss, metric or eval records yet")
    for path in written:
        print(f"wrote {path}")
    return 0

