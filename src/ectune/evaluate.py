"""``ectune eval``: how good a generator is, in the field's standard numbers, offline.

A *source* (a model folder to sample, or a folder / .zip / .npz of images) is compared with a
*reference* (a dataset split):

- images: FID, KID, precision and recall (k = 3) on Inception-v3 pool3 features, or the same on
  DINOv2 features (``--encoder dinov2``; the Frechet distance is then reported as "fd_dinov2").
  Reference features are cached on disk by :func:`ectune.metrics.reference_stats`, keyed by the
  dataset id, N, the encoder's weights hash and the *dataset hash*: the sha256 of the exact uint8
  reference images that are encoded (shape, dtype and bytes), so any change to the data, the split
  or the subset recomputes the cache. The dataset is therefore read on every call (MNIST: ~3 s).
- 2-D data: sliced Wasserstein ("sw") and RBF MMD^2 ("mmd") to fresh draws of the true
  distribution (:func:`ectune.data.sample_toy`), or to the points of a 2-D .npz.

The numbers are pure functions of (model, sampler, seeds, N, reference): generated image j uses
seed + j whatever the batch size, the reference subset is fixed, and KID's subsets are seeded.
FID and KID are computed in fp64 from fp32 features. FID at small N is biased upward (MNIST train
vs test: ~9.5 at 2k images each, ~0 only as N grows), so compare models only at equal N.

Three modes share one results object (``format: ectune-eval``): one sampler setting, a
``steps_sweep`` (one row per step count; plotted by ``ectune plot`` as FID against NFE), and
``search_mid`` (one row per 2-step intermediate level, and the best).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ectune
from ectune.checkpoint import BUILTIN_PREFIX, ModelInfo, load_model, resolve_model_folder, write_text_atomic
from ectune.config import EvalConfig, SampleConfig, TrainConfig
from ectune.data import TOY_DATASETS, ArrayDataset, load_dataset, sample_toy
from ectune.errors import ConfigError, DataError, UserError
from ectune.metric_names import result_variant
from ectune.metrics import (IMAGE_METRICS, POINT_METRICS, Encoder, compute_metrics, get_encoder, mmd_rbf,
                            reference_stats, sliced_wasserstein)
from ectune.precond import Denoiser
from ectune.sampling import SIGMA_MAX, check_finite, consistency_levels, nfe, seed_labels, to_uint8

RESULTS_FORMAT = "ectune-eval"
RESULTS_SCHEMA_VERSION = 1
HIGHER_IS_BETTER = frozenset({"precision", "recall"})
ENCODER_ALIASES = {"inception": "inception_v3", "inception_v3": "inception_v3", "dinov2": "dinov2"}
TOY_REFERENCE_SEED = 20_240_601
"""Seed of the fresh points of a 2-D toy's true distribution that generated points are compared with."""


SHIPPED_FEATURES = Path(__file__).resolve().parent / "assets" / "reference"
"""Reference features shipped with the package (MNIST train at the tune report's N), used on a cache miss."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ectune, or ~/.cache/ectune."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ectune"


def resolve_metrics(spec: str, is_image: bool, encoder_name: str = "inception_v3") -> tuple[str, ...]:
    """Metric names from a comma list ("auto" = all that apply to the data), in a fixed order.

    For DINOv2 features the Frechet distance is called "fd_dinov2" (accepted as a synonym of "fid").
    """
    names = [s.strip() for s in spec.split(",") if s.strip()] or ["auto"]
    valid = IMAGE_METRICS if is_image else POINT_METRICS
    if "auto" in names:
        return valid
    names = ["fid" if n == "fd_dinov2" else n for n in names]
    bad = [n for n in names if n not in valid]
    if bad:
        kind = "images" if is_image else "2-D points"
        raise ConfigError(f"metric {bad[0]!r} does not apply to {kind}: choose from {', '.join(valid)}")
    return tuple(m for m in valid if m in names)


def metric_key(name: str, encoder_name: str | None) -> str:
    """The key a metric is reported under: "fid" becomes "fd_dinov2" for DINOv2 features."""
    return "fd_dinov2" if name == "fid" and encoder_name == "dinov2" else name


# ---------------------------------------------------------------------------------------------
# The reference side.


def dataset_hash(data: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the provenance of cached reference statistics)."""
    arr = np.ascontiguousarray(data.detach().cpu().numpy())
    h = hashlib.sha256(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def dataset_id(name: str, path: str | None, split: str) -> str:
    """A readable cache name for a dataset split; paths get a short hash of their absolute location."""
    where = path or (name if name not in (*TOY_DATASETS, "mnist", "fashion-mnist", "digits") else None)
    if where is None:
        return f"{name}-{split}"
    where = where.removeprefix("folder:")  # "folder:DIR" is DIR (it resolved inside the current folder)
    loc = hashlib.sha256(str(Path(where).expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{Path(where).name or name}-{loc}-{split}"


def load_reference(name: str, path: str | None, split: str, n: int) -> ArrayDataset:
    """``n`` reference items of a dataset split (fewer if the split is smaller): a fixed random
    subset (seed 0) of images or vectors, or for a 2-D toy ``n`` fresh points of the truth."""
    if name in TOY_DATASETS:
        if path is not None:
            raise DataError(f"{name} is generated, not read from a file: drop --data-path")
        points = sample_toy(name, n, torch.Generator().manual_seed(TOY_REFERENCE_SEED))
        return ArrayDataset(name, points, None, 0)
    return load_dataset(name, path=path, split=split, max_items=n, seed=0)


def _shape_str(shape: Sequence[int]) -> str:
    if len(shape) == 1:
        return f"{shape[0]}-D points"
    c, h, w = shape
    return f"{h}x{w} images with {c} channel{'s' if c > 1 else ''}"


@dataclass
class Evaluator:
    """Scores generated samples against one reference set (built once, called per sample set).

    Attributes:
        metrics: metric names, a subset of IMAGE_METRICS or POINT_METRICS.
        shape: the shape of one item, (C, H, W) or (D,).
        reference: float32 (M, D) points, or the :class:`~ectune.metrics.ReferenceStats` of images.
        encoder: the feature extractor for images, None for points.
        info: provenance for the results (dataset id, hash, N, cache use).
    """

    metrics: tuple[str, ...]
    shape: tuple[int, ...]
    reference: Any
    encoder: Encoder | None
    info: dict[str, Any]
    kid_subset_size: int = 1000
    pr_k: int = 3

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        """Metrics of uint8 images (N, C, H, W) or float points (N, D); "encode_img_per_s" for images."""
        return self.score_samples(samples)[0]

    def score_samples(self, samples: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        """:meth:`__call__`'s metrics, and the images' features (None for points), e.g. to cache them."""
        if tuple(samples.shape[1:]) != self.shape:
            raise DataError(f"the samples are {_shape_str(tuple(samples.shape[1:]))} but the reference holds "
                            f"{_shape_str(self.shape)}: evaluate against the dataset the model was trained on")
        n_min = self.pr_k + 1 if {"precision", "recall"} & set(self.metrics) else 2
        if samples.shape[0] < n_min:
            raise DataError(f"{samples.shape[0]} samples are too few for {', '.join(self.metrics)}: use at least {n_min}")
        try:
            if not self.is_image:
                x = samples.to(torch.float64)
                if not torch.isfinite(x).all():
                    raise DataError("the generated points contain NaN or inf: the model has diverged")
                out = {}
                if "sw" in self.metrics:
                    out["sw"] = sliced_wasserstein(x, self.reference)
                if "mmd" in self.metrics:
                    out["mmd"] = mmd_rbf(x, self.reference)
                return out, None
            t0 = time.perf_counter()
            feats = self.encode(samples)
            seconds = time.perf_counter() - t0
            out = self.score_features(feats)
        except ValueError as e:  # features of the wrong size or with NaN: a broken encoder or model
            raise DataError(f"cannot compute {', '.join(self.metrics)}: {e}") from None
        out["encode_img_per_s"] = samples.shape[0] / max(seconds, 1e-9)
        return out, feats

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float32 features (N, d) of uint8 images with this evaluator's encoder."""
        return torch.as_tensor(self.encoder(images)).float()

    def score_features(self, feats: torch.Tensor | np.ndarray) -> dict[str, float]:
        """The image metrics of generated features (N, d) from :meth:`encode` (or a cache of them)."""
        ref = self.reference
        values = compute_metrics(torch.as_tensor(feats).float(), ref.features, self.metrics, ref_stats=ref.stats,
                                 kid_subset_size=self.kid_subset_size, pr_k=self.pr_k)
        return {metric_key(k, self.encoder.name): v for k, v in values.items()}


def build_evaluator(name: str, path: str | None, split: str, n_ref: int, shape: tuple[int, ...], metrics: str, *,
                    encoder: Encoder | Callable[[], Encoder] | None = None, cache_dir: str | os.PathLike | None = None,
                    kid_subset_size: int = 1000) -> Evaluator:
    """Load the reference split, check it against the samples' ``shape``, and fit its statistics.

    Args:
        name, path, split: the reference dataset (see :func:`ectune.data.load_dataset`).
        n_ref: reference items (capped at the split's size).
        shape: one generated item's shape; a different shape raises DataError before any encoding.
        metrics: comma list or "auto" (see :func:`resolve_metrics`).
        encoder: the image encoder, or a function that builds it (called only for image data);
            None builds Inception-v3.
        cache_dir: reference statistics cache (default :func:`default_cache_dir`).
    """
    if n_ref < 2:
        raise ConfigError(f"the reference needs at least 2 items, got {n_ref}")
    data = load_reference(name, path, split, n_ref)
    if data.shape != tuple(shape):
        raise DataError(f"{name} ({split}) holds {_shape_str(data.shape)} but the evaluated samples are "
                        f"{_shape_str(tuple(shape))}: pass a --data of that shape (the model's training data)")
    n = len(data)
    ds_id = dataset_id(name, path, split)
    if not data.is_image:
        chosen = resolve_metrics(metrics, False)
        info = {"name": name, "path": path, "split": split, "id": ds_id, "num_images": n,
                "hash": None if name in TOY_DATASETS else dataset_hash(data.data),
                "truth": name in TOY_DATASETS, "from_cache": False}
        return Evaluator(chosen, data.shape, data.data.to(torch.float64), None, info)
    if callable(encoder) and not isinstance(encoder, Encoder):
        encoder = encoder()
    if encoder is None:
        encoder = get_encoder("inception_v3")
    chosen = resolve_metrics(metrics, True, encoder.name)
    digest = dataset_hash(data.data)
    ref = reference_stats(ds_id, digest, lambda _n: data.data, n, encoder, cache_dir or default_cache_dir(),
                          resolution=data.shape[-1], shipped_dirs=[SHIPPED_FEATURES])
    info = {"name": name, "path": path, "split": split, "id": ds_id, "num_images": n, "hash": digest,
            "from_cache": ref.from_cache}
    if "from_shipped" in ref.provenance:
        info["from_shipped"] = ref.provenance["from_shipped"]
    return Evaluator(chosen, data.shape, ref, encoder, info, kid_subset_size=kid_subset_size)


# ---------------------------------------------------------------------------------------------
# The generated side.


@dataclass(frozen=True)
class Setting:
    """One sampler setting: method (consistency, heun, euler), steps and consistency levels after sigma_max."""

    method: str
    steps: int
    sigmas: tuple[float, ...] = ()

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "steps": self.steps, "nfe": nfe(self.method, self.steps),
                "sigmas": list(self.sigmas)}


def _is_model(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "model" / "config.json").is_file())


def sample_model(model: str, setting: Setting, cfg: EvalConfig, num_images: int,
                 progress: bool | None = None) -> tuple[torch.Tensor, float]:
    """``num_images`` samples of a model folder for seeds cfg.seed + j, and images/s.

    Images come back as uint8 (N, C, H, W), points as float32 (N, D). Calls
    :func:`ectune.sample_cmd.sample_images` one batch at a time (a sample does not depend on the
    batch it is generated in), which gives the progress bar.
    """
    from tqdm import tqdm

    from ectune.sample_cmd import sample_images

    base = SampleConfig(model=model, method=setting.method, steps=setting.steps, sigmas=tuple(setting.sigmas),
                        num_images=num_images, seed=cfg.seed, batch=cfg.batch, class_label=cfg.class_label,
                        device=cfg.device, renoise=cfg.renoise, S_churn=cfg.S_churn)
    chunk = max(cfg.batch, 1)
    loaded = load_model(model, device=_metric_device(cfg.device))  # once, not once per batch
    parts = []
    t0 = time.perf_counter()
    disable = None if progress is None else not progress
    label = f"{setting.method} {setting.steps} step{'s' if setting.steps > 1 else ''}"
    with tqdm(total=num_images, desc=label, unit="img", disable=disable, file=sys.stderr) as bar:
        for start in range(0, num_images, chunk):
            count = min(chunk, num_images - start)
            x, _ = sample_images(dataclasses.replace(base, seed=cfg.seed + start, num_images=count), loaded)
            check_finite(x)
            parts.append(to_uint8(x) if x.ndim == 4 else x.float())
            bar.update(count)
    seconds = time.perf_counter() - t0
    return torch.cat(parts), num_images / max(seconds, 1e-9)


def plan_settings(cfg: EvalConfig, info: ModelInfo) -> tuple[str, list[Setting]]:
    """The mode ("single", "steps_sweep" or "search_mid") and its sampler settings."""
    from ectune.sample_cmd import checked_levels, resolve_method

    if cfg.search_mid and cfg.steps_sweep:
        raise ConfigError("--search-mid and --steps-sweep are separate scans: run them one at a time")
    if cfg.search_mid:
        method = cfg.method if cfg.method != "auto" else ("heun" if info.method == "edm" else "consistency")
        if method != "consistency":
            raise ConfigError("--search-mid scans the intermediate level of 2-step consistency sampling: it needs an "
                              "ECT / iCT model (this one is sampled with an ODE solver)")
        if not cfg.mid_grid:
            raise ConfigError("--mid-grid is empty: give levels such as 0.2,0.4,0.821,1.5")
        bad = [s for s in cfg.mid_grid if not 0 < float(s) < SIGMA_MAX]
        if bad:
            raise ConfigError(f"--mid-grid levels must lie in (0, {SIGMA_MAX:g}), got {bad[0]}")
        return "search_mid", [Setting("consistency", 2, (float(s),)) for s in cfg.mid_grid]
    if cfg.steps_sweep:
        if cfg.sigmas:
            raise ConfigError("--sigmas sets the levels of one --steps; --steps-sweep chooses levels per step count")
        steps = []
        for s in cfg.steps_sweep:
            if float(s) != int(s) or int(s) < 1:
                raise ConfigError(f"--steps-sweep takes positive whole step counts, got {s}")
            steps.append(int(s))
        settings = []
        for k in steps:
            method, k = resolve_method(dataclasses.replace(SampleConfig(), method=cfg.method, steps=k), info.method)
            levels = consistency_levels(k, info.mid_sigma) if method == "consistency" else []
            settings.append(Setting(method, k, tuple(levels)))
        return "steps_sweep", settings
    scfg = dataclasses.replace(SampleConfig(), method=cfg.method, steps=cfg.steps, sigmas=tuple(cfg.sigmas))
    method, steps = resolve_method(scfg, info.method)
    levels = checked_levels(cfg.sigmas, steps, info.mid_sigma) if method == "consistency" else []
    return "single", [Setting(method, steps, tuple(levels))]


# ---------------------------------------------------------------------------------------------
# The command.


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be positive, got {value}")


def _run_folder(model_folder: Path) -> Path | None:
    """The run folder a model folder was exported into (run/model), or None."""
    cfg = model_folder.parent / "config.json"
    if model_folder.name != "model" or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return model_folder.parent if isinstance(data, dict) and "method" in data and "format" not in data else None


def _training_data(run_dir: Path | None, info: ModelInfo) -> tuple[str, str | None]:
    """(name, path) of the data a model was trained on: from its run's config.json, else its model config."""
    if run_dir is not None:
        data = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("data")
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            return data["name"], data.get("path")
    name = info.extra.get("data")
    if not isinstance(name, str) or not name:
        raise ConfigError("the model does not record its training data: pass --data (e.g. --data mnist)")
    return name, None


def results_name(results: dict[str, Any]) -> str:
    """File name of a results object in a run's eval/ folder, e.g. ``consistency-2steps-mnist-train-inception_v3-n1000.json``."""
    rows = results["results"]
    if results["mode"] == "search_mid":
        what = "search-mid"
    elif results["mode"] == "steps_sweep":
        what = f"{rows[0]['method']}-sweep-" + "_".join(str(r["steps"]) for r in rows)
    else:
        r = rows[0]
        what = f"{r['method']}-{r['steps']}steps"
        if r["method"] == "consistency" and r["steps"] > 1:
            what += "-" + "_".join(f"{s:g}" for s in r["sigmas"])
    # options away from their defaults (and metrics other than all), so that results differing only in
    # them do not overwrite each other
    for short, value in result_variant(results):
        if short == "renoise":
            what += f"-renoise_{value}"
        elif short == "churn":
            what += f"-churn{value:g}"
        else:
            what += f"-{short}{value}"
    enc_name = results["encoder"]["name"] if results["encoder"] else None
    every = [metric_key(m, enc_name) for m in (IMAGE_METRICS if enc_name else POINT_METRICS)]
    if results.get("metrics") and list(results["metrics"]) != every:
        what += "-" + "_".join(results["metrics"])
    enc = enc_name or "points"
    return f"{what}-{results['data']['id']}-{enc}-n{results['num_images']}.json"


def evaluate(cfg: EvalConfig, *, encoder: Encoder | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run ``ectune eval``: sample or read the source, score it, write and return the results object.

    Args:
        cfg: the options (see :class:`~ectune.config.EvalConfig`).
        encoder: image encoder to use instead of the one cfg names (tests pass a cheap stand-in).
        progress: progress bars on / off / only on a terminal (None).

    Returns:
        The results object (module docstring), also written to ``cfg.out`` or, for a model in a run
        folder, to ``<run>/eval/<results_name>``; its "out" entry says where (or None).

    Raises:
        UserError (ConfigError, DataError, CheckpointError): bad input, before anything is written.
    """
    t_start = time.perf_counter()
    _positive("num_images", cfg.num_images)
    _positive("search_num_images", cfg.search_num_images)
    _positive("batch", cfg.batch)
    _positive("encoder_batch", cfg.encoder_batch)
    if cfg.ref_num_images < 0:
        raise ConfigError(f"ref_num_images must be >= 0, got {cfg.ref_num_images}")
    if cfg.encoder not in ENCODER_ALIASES:
        raise ConfigError(f"unknown encoder {cfg.encoder!r}: use inception_v3 or dinov2")
    if cfg.out is not None and not cfg.out.endswith(".json"):
        raise ConfigError(f"--out must end in .json, got {cfg.out}")
    if cfg.out is not None and Path(cfg.out).exists():  # checked before the slow part, and nothing is overwritten
        raise UserError(f"{cfg.out} already exists: choose another --out or delete it")
    if not cfg.source:
        raise ConfigError("name what to evaluate: a model folder, or a folder / .zip / .npz of images")
    src = resolve_model_folder(cfg.source) if cfg.source.startswith(BUILTIN_PREFIX) else Path(cfg.source)
    if not src.exists():
        raise UserError(f"{src} does not exist: pass a model folder, or a folder / .zip / .npz of images")

    info = None
    images = None
    if _is_model(src):
        model_folder = resolve_model_folder(src)
        _, info = load_model(model_folder)
        mode, settings = plan_settings(cfg, info)
        shape = tuple(info.data_shape)
        run_dir = _run_folder(model_folder)
        data_name, data_path = cfg.data, cfg.data_path
        if not data_name:
            data_name, data_path = _training_data(run_dir, info)
        n_gen = cfg.search_num_images if mode == "search_mid" else cfg.num_images
    else:
        if cfg.search_mid or cfg.steps_sweep:
            raise ConfigError("--search-mid and --steps-sweep sample a model: pass a model folder, not images")
        if not cfg.data:
            raise ConfigError(f"pass the reference dataset for {src} with --data (e.g. --data mnist --split test)")
        loaded = load_dataset(f"folder:{src}")
        images = loaded.data[: cfg.num_images]
        shape, mode, settings, data_name, data_path, run_dir = loaded.shape, "single", [None], cfg.data, cfg.data_path, None
        n_gen = len(images)
    n_ref = cfg.ref_num_images or n_gen

    enc_name = ENCODER_ALIASES[cfg.encoder]

    def make_encoder() -> Encoder:
        if encoder is not None:
            return encoder
        return get_encoder(enc_name, cfg.encoder_path, batch_size=cfg.encoder_batch,
                           device=_metric_device(cfg.device), progress=progress)

    is_image = len(shape) == 3
    chosen = resolve_metrics(cfg.metrics, is_image)  # checked before any slow work
    search_name = None
    if mode == "search_mid":
        wanted = cfg.search_metric if cfg.search_metric != "auto" else ("fid" if is_image else "sw")
        if "," in wanted or wanted == "auto":
            raise ConfigError(f"--search-metric takes one metric, got {wanted!r}")
        (search_name,) = resolve_metrics(wanted, is_image)
        if search_name not in chosen:
            raise ConfigError(f"--search-metric {wanted} is not among --metrics {','.join(chosen)}")
    evaluator = build_evaluator(data_name, data_path, cfg.split, n_ref, shape, cfg.metrics, encoder=make_encoder,
                                cache_dir=cfg.cache_dir)
    search_key = metric_key(search_name, evaluator.encoder.name if evaluator.encoder else None) if search_name else None

    rows = []
    for setting in settings:
        if setting is None:
            row: dict[str, Any] = {"method": None, "steps": None, "nfe": None, "sigmas": []}
            row.update(evaluator(images))
        else:
            samples, rate = sample_model(str(src), setting, cfg, n_gen, progress)
            row = setting.row()
            row.update(evaluator(samples))
            row["sample_img_per_s"] = rate
        rows.append(row)

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "schema_version": RESULTS_SCHEMA_VERSION, "ectune_version": ectune.__version__,
        "source": str(src), "source_kind": "model" if info is not None else "images",
        "model": ({"method": info.method, "data": info.extra.get("data"), "nimg": info.extra.get("nimg"),
                   "mid_sigma": info.mid_sigma} if info is not None else None),
        "data": evaluator.info,
        "encoder": ({"name": evaluator.encoder.name, "file_hash": evaluator.encoder.file_hash}
                    if evaluator.encoder is not None else None),
        "num_images": n_gen, "mode": mode,
        # how the samples were drawn (None for images evaluated as they are: nothing was sampled)
        **{k: (getattr(cfg, k) if info is not None else None) for k in ("seed", "class_label", "renoise", "S_churn")},
        "metrics": [metric_key(m, evaluator.encoder.name if evaluator.encoder else None) for m in evaluator.metrics],
        "results": rows,
    }
    if search_key is not None:
        sign = -1.0 if search_key in HIGHER_IS_BETTER else 1.0
        best = min(rows, key=lambda r: sign * r[search_key] if math.isfinite(r[search_key]) else math.inf)
        results["best"] = {"by": search_key, "mid_sigma": best["sigmas"][0], search_key: best[search_key]}
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(cfg.out) if cfg.out else (run_dir / "eval" / results_name(results) if run_dir is not None else None)
    results["out"] = str(out) if out is not None else None
    if out is not None:
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    return results


def _metric_device(name: str) -> torch.device:
    from ectune.training import resolve_device

    return resolve_device(name)


def format_table(results: dict[str, Any]) -> str:
    """The results as a human-readable table (one row per sampler setting)."""
    data = results["data"]
    enc = results["encoder"]["name"] if results["encoder"] else "exact 2-D distances"
    ref = "fresh draws of the true distribution" if data.get("truth") else f"{data['name']} {data['split']}"
    cached = " (cached)" if data.get("from_cache") else ""
    lines = [f"{results['source']}: {results['num_images']} samples vs {data['num_images']} of {ref}{cached}, {enc}"]
    keys = list(results["metrics"])
    cols = ["method", "steps", "NFE", "sigmas", *keys, "img/s sample", "img/s encode"]
    table = []
    for r in results["results"]:
        cells = [r["method"] or "-", "-" if r["steps"] is None else str(r["steps"]), "-" if r["nfe"] is None else str(r["nfe"]),
                 ",".join(f"{s:.4g}" for s in r["sigmas"]) or "-"]
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else (f"{v:.3e}±{r['kid_std']:.1e}" if k == "kid" else f"{v:.4g}"))
        cells.append(f"{r['sample_img_per_s']:.1f}" if "sample_img_per_s" in r else "-")
        cells.append(f"{r['encode_img_per_s']:.1f}" if "encode_img_per_s" in r else "-")
        table.append(cells)
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)
    if "best" in results:
        b = results["best"]
        lines.append(f"best 2-step intermediate level by {b['by']}: {b['mid_sigma']:g} ({b['by']} {b[b['by']]:.4g}); "
                     f"use it with --sigmas {b['mid_sigma']:g}")
    if results.get("out"):
        lines.append(f"results: {results['out']}")
    return "\n".join(lines)


def cli_eval(cfg: EvalConfig, *, as_json: bool = False, progress: bool = True) -> int:
    """``ectune eval``: print the table (or one JSON object with --json)."""
    results = evaluate(cfg, progress=progress)
    print(json.dumps(results) if as_json else format_table(results))
    return 0


# ---------------------------------------------------------------------------------------------
# Metrics during training.


@functools.lru_cache(maxsize=2)
def _training_evaluator(name: str, path: str | None, split: str, n: int, shape: tuple[int, ...], metrics: str,
                        device: str) -> Evaluator:
    """One evaluator per process and setting, so periodic evaluations reuse the reference and encoder."""
    return build_evaluator(name, path, split, n, shape, metrics,
                           encoder=lambda: get_encoder("inception_v3", device=device, progress=False))


@torch.no_grad()
def training_metrics(net: nn.Module, info: ModelInfo, cfg: TrainConfig, device: torch.device, *,
                     evaluator: Evaluator | None = None) -> dict[str, float]:
    """Small-N metrics of the EMA network during training: FID/KID (images) or SW/MMD (2-D data).

    Samples ``cfg.eval_num_images`` items with seeds 0..N-1 (the same noise at every evaluation)
    with the preview's sampler: 2-step consistency at ``cfg.preview.mid_sigma`` for ECT / iCT, Heun
    (``cfg.preview.steps`` or 18) for diffusion models. Class labels cycle through the classes.
    The reference is cfg.data's split (reference statistics cached in :func:`default_cache_dir`).

    Returns:
        e.g. {"fid": ..., "kid": ..., "kid_std": ..., "eval_s": ...} for log.stats.
    """
    from ectune.preview import generate

    t0 = time.perf_counter()
    is_image = len(info.data_shape) == 3
    if evaluator is None:
        evaluator = _training_evaluator(cfg.data.name, cfg.data.path, cfg.data.split, cfg.eval_num_images,
                                        tuple(info.data_shape), "fid,kid" if cfg.eval_metrics == "auto" and is_image
                                        else cfg.eval_metrics, str(device))
    denoiser = Denoiser(net, info.sigma_data, info.scalings, info.sigma_min).to(device).eval()
    if info.method == "edm":
        kw: dict[str, Any] = dict(method="heun", steps=cfg.preview.steps or 18)
    else:
        kw = dict(method="consistency", steps=2, sigmas=[cfg.preview.mid_sigma])
    n = cfg.eval_num_images
    batch = cfg.batch_gpu or cfg.batch
    parts, finite = [], True
    for start in range(0, n, batch):
        seeds = list(range(start, min(start + batch, n)))
        labels = seed_labels(seeds, info.label_dim, device)
        x = generate(denoiser, info, seeds=seeds, labels=labels, device=device, **kw).cpu()
        finite = finite and bool(torch.isfinite(x).all())
        parts.append(to_uint8(x) if is_image else x.float())
    samples = torch.cat(parts)
    if not finite:  # diverged: NaN metrics in the log rather than a stopped run (or black images' finite FID)
        values = {m: float("nan") for m in evaluator.metrics}
    else:
        values = evaluator(samples)
    values.pop("encode_img_per_s", None)
    values["eval_s"] = time.perf_counter() - t0
    return values
