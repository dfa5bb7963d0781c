"""One training loop for EDM pretraining, ECT tuning and iCT, from one CPU process to torchrun DDP.

Progress is counted in images (``nimg``). Every random number of a step comes from a generator
seeded with (seed, nimg, micro-batch index), and the data order is a pure function of (seed, nimg),
so a resumed run replays exactly the stream an uninterrupted one would have seen, and the result
does not depend on how micro-batches are spread over processes (world size x accumulation), to
round-off. Resumes are bit for bit on a CPU; on a GPU, nondeterministic cuDNN kernels can leave
last-bit differences (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ectune import config as config_mod
from ectune.checkpoint import (ModelInfo, list_states, load_model, load_state, network_kwargs, read_model_info,
                               read_stats_rows, remove_stale_temp_files, save_model, save_state, write_text_atomic)
from ectune.config import TrainConfig
from ectune.data import ArrayDataset, load_dataset, stream_indices
from ectune.ema import EMAGroup, FixedEMA, PowerFunctionEMA
from ectune.errors import CheckpointError, ConfigError, DataError, UserError
from ectune.networks import build_network
from ectune.precond import Denoiser
from ectune import schedules

# A dataset of at most this many bytes (uint8 images) is moved to the GPU for training: CIFAR-10 is
# 150 MB, ImageNet 64x64 about 16 GB (which stays in host memory).
DATA_ON_DEVICE_BYTES = 4 << 30

# ---------------------------------------------------------------------------------------------
# Process group and device.


PG_TIMEOUT = datetime.timedelta(hours=1)
"""How long a collective waits: rank 0 alone writes previews, evaluates and saves while the others wait
in the next collective (NCCL's own default, 10 minutes, can be shorter than a large evaluation)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # the process group was created here (and is destroyed when training ends)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA, or the
    backend named by ECTUNE_DIST_BACKEND, e.g. "cuda:gloo" to run two processes on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = os.environ.get("ECTUNE_DIST_BACKEND") or ("nccl" if on_cuda else "gloo")
        if backend == "nccl" and device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"--device {device} puts every process of this node on one GPU, which NCCL refuses: "
                              f"use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if on_cuda:  # collectives without a device (barrier) run on the current one: make it this rank's
            torch.cuda.set_device(resolve_device(device, local_rank))
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend=backend, timeout=PG_TIMEOUT)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                    timeout=PG_TIMEOUT)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owned=owned)


def _attempt_store(world: int) -> dist.Store | None:
    """The store of this torchrun attempt, when torchrun restarts workers on one node.

    torchrun hands every attempt the same key-value store with no per-attempt prefix, so workers it
    restarts can read the addresses the killed workers published and fail to connect ("Connection
    refused" in gloo, pytorch/pytorch#135712). On one node all workers restart together and share the
    restart count, so it scopes the keys. Elsewhere None: torch's own rendezvous (with several nodes,
    set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts, see README)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("LOCAL_WORLD_SIZE") != str(world):
        return None
    from torch.distributed.constants import default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"ectune/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of --device ``name`` ("auto": this process's GPU if there is one). A CUDA device also
    turns TF32 off (:func:`exact_fp32`)."""
    if name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    elif name == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        exact_fp32()
    return device


def exact_fp32() -> None:
    """fp32 stays fp32 on CUDA: no TF32 in convolutions (cuDNN's default) or matrix products. EDM
    trains so, and ectune's reference features and cached teacher rows were made in exact fp32; TF32
    changes a 35-step sample's pixels by up to 12 levels. bf16 runs use --precision bf16."""
    # The legacy flags, which every torch since 1.7 reads. Set through torch >= 2.9's per-operator flags
    # instead, reading the legacy ones afterwards (as other libraries may) raises a RuntimeError.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def step_seed(seed: int, nimg: int, micro: int) -> int:
    """The seed of one micro-batch's generator: a hash of (seed, images seen, global micro-batch index)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, nimg, micro]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 32], dtype=np.uint64)) & 0x7FFFFFFFFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Building the pieces of a run.


def build_loss(cfg: TrainConfig):
    if cfg.method == "edm":
        return cfg.edm
    if cfg.method == "ect":
        return cfg.ect
    ict = cfg.ict
    return dataclasses.replace(ict, total_nimg=ict.total_nimg or cfg.total_nimg, batch=ict.batch or cfg.batch)


def network_info(cfg: TrainConfig, data: ArrayDataset, *,
                 new_run: bool = True) -> tuple[nn.Module, ModelInfo, Denoiser | None]:
    """The network to train and the description its exported model folder will carry.

    For ECT the architecture and weights come from the teacher; otherwise from ``cfg.network``.
    Returns (raw network, model info, teacher denoiser or None).
    """
    shape = tuple(data.shape)
    if cfg.method == "ect":
        # the teacher's architecture, with --network.kwargs on top for options that keep its weights (dropout_res)
        described = read_model_info(cfg.teacher)
        if new_run and described.method != "edm":  # a run an older ectune started from one still resumes
            raise UserError(f"the teacher {cfg.teacher} is a consistency model (method {described.method}): tune a "
                            f"diffusion model (from `ectune pretrain` or `ectune convert`); to train this one further, "
                            f"resume its run")
        overrides = teacher_overrides(cfg, described.network)
        teacher, tinfo = load_model(cfg.teacher, dropout=cfg.network.dropout, overrides=overrides)
        if tinfo.data_shape != shape:
            raise DataError(f"the teacher {cfg.teacher} was trained on data of shape {list(tinfo.data_shape)} but "
                            f"{cfg.data.name} has shape {list(shape)}: tune on the teacher's dataset")
        if tinfo.label_dim != data.label_dim:
            raise DataError(f"the teacher has {tinfo.label_dim} classes but the data has {data.label_dim}: "
                            f"set --data.use_labels to match the teacher")
        net = teacher.net
        kwargs = network_kwargs(tinfo.kwargs, overrides, cfg.network.dropout)  # those load_model built
        name = tinfo.network
    else:
        name = cfg.network.name
        kwargs = _fit_kwargs_to_data(name, network_kwargs(cfg.network.kwargs, dropout=cfg.network.dropout), data)
        net = build_network(name, **kwargs)
        teacher = None
    info = ModelInfo(network=name, kwargs=kwargs, sigma_data=cfg.precond.sigma_data, scalings=cfg.precond.sample_scalings,
                     sigma_min=cfg.precond.sigma_min, method=cfg.method, data_shape=shape, label_dim=data.label_dim,
                     mid_sigma=cfg.preview.mid_sigma, extra={"data": cfg.data.name, "preset": cfg.preset})
    return net, info, teacher


def teacher_overrides(cfg: TrainConfig, teacher_network: str) -> dict:
    """The ``--network.kwargs`` to lay over a teacher's options when tuning it.

    A preset's own network options are written for the preset's architecture (imagenet64-s sets EDM2's
    ``dropout_res``). A teacher of another architecture does not get those whose value is the preset's
    (left at it or set to it); other values are passed on, so a wrong one still fails by name.
    """
    kwargs = dict(cfg.network.kwargs)
    if teacher_network == cfg.network.name or cfg.preset not in config_mod.PRESETS:
        return kwargs
    preset_kwargs = config_mod.preset(cfg.preset, cfg.method).network.kwargs
    return {k: v for k, v in kwargs.items() if k not in preset_kwargs or preset_kwargs[k] != v}


def _fit_kwargs_to_data(name: str, kwargs: dict, data: ArrayDataset) -> dict:
    """Check (and fill in where absent) the network's data shape and label count against the dataset."""
    kwargs = dict(kwargs)
    if name == "mlp":
        if data.is_image:
            raise DataError(f"{data.name} holds images of shape {list(data.shape)} but the network is an MLP for "
                            f"vectors: use a U-Net preset (e.g. --preset mnist)")
        expect = {"dim": data.shape[0]}
    else:
        if not data.is_image:
            raise DataError(f"{data.name} holds {data.shape[0]}-D points but the network is a U-Net for images: "
                            f"use --preset toy2d")
        c, h, w = data.shape
        if h != w:
            raise DataError(f"{data.name} images are {h}x{w}: ectune's U-Nets need square images")
        channels = {"img_channels": c} if name == "edm2unet" else {"in_channels": c, "out_channels": c}
        expect = {"img_resolution": h, **channels}
    for key, value in expect.items():
        if key in kwargs and kwargs[key] != value:
            raise DataError(f"{data.name} has {key}={value} but the network is configured with {key}={kwargs[key]}: "
                            f"set --network.kwargs.{key} {value} or use a preset made for this data")
        kwargs[key] = value
    if kwargs.get("label_dim", 0) not in (0, data.label_dim):
        raise DataError(f"the network expects {kwargs['label_dim']} classes but the data has {data.label_dim}: "
                        f"set --data.use_labels or --network.kwargs.label_dim to match")
    kwargs["label_dim"] = data.label_dim
    return kwargs


def build_ema(cfg: TrainConfig, net: nn.Module) -> EMAGroup:
    """The run's EMAs, started from ``net``'s current weights: for a tuning run that is the power-function
    EMA's restart at the first tuning step (ECT ImageNet 64)."""
    members: list[FixedEMA | PowerFunctionEMA] = []
    if cfg.ema.beta is not None:
        members.append(FixedEMA(net, cfg.ema.beta))
    if cfg.ema.stds:
        members.append(PowerFunctionEMA(net, tuple(cfg.ema.stds)))
    return EMAGroup(members)


def build_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.RAdam
    return cls(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def learning_rate(cfg: TrainConfig, nimg: int) -> float:
    """The learning rate of the step that starts at ``nimg`` images: EDM2's inverse-sqrt decay if chosen,
    times the warm-up ramp min((nimg + batch) / warmup_nimg, 1), which counts the step's own images so
    that the first step does not train at lr 0 (EDM's ramp-up, shifted by one step)."""
    o = cfg.optim
    lr = o.lr
    if o.schedule == "inverse_sqrt":
        lr = schedules.lr_inverse_sqrt(nimg, cfg.batch, lr, o.ref_batches)
    if o.warmup_nimg > 0:
        lr *= min((nimg + cfg.batch) / o.warmup_nimg, 1.0)
    return lr


def prepare_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-{cfg.preset}-{stamp}"


# ---------------------------------------------------------------------------------------------
# Logging.


class RunLog:
    """log.txt, stats.jsonl and TensorBoard events in the run folder (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = None

    def text(self, line: str) -> None:
        if self.enabled:
            with open(self.run_dir / "log.txt", "a", encoding="utf-8") as f:
                f.write(line.rstrip() + "\n")

    def stats(self, nimg: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "stats.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"nimg": nimg, "kimg": nimg / 1000, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, nimg)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    run_dir: Path
    nimg: int
    model_dir: Path
    wall_s: float
    nonfinite_steps: int
    interrupted: int | None = None  # the signal (SIGINT / SIGTERM) that stopped the run early, if any


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True,
          stop_after_nimg: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. ``resume`` is a run folder holding training states.
    ``stop_after_nimg`` stops early (for tests of resumption) without changing the schedule."""
    if resume:
        run_dir = Path(resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise CheckpointError(f"{run_dir} has no config.json: pass the folder of a run to resume")
        try:
            data = json.loads(saved.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
            raise CheckpointError(f"{saved} is not valid JSON ({e})") from None
        if isinstance(data, dict) and "format" in data:  # a model folder's config.json
            raise CheckpointError(f"{run_dir} is a model folder, not a run: resume the run folder that holds it "
                                  f"(e.g. {run_dir.parent})")
        cfg = config_mod.from_dict(TrainConfig, data)
        states = list_states(run_dir)
        if not states:
            raise CheckpointError(f"{run_dir} holds no training state to resume from (checkpoints/training-state-*.pt)")
    try:
        config_mod.validate(cfg, new_run=not resume)
    except ConfigError as e:
        if resume:  # the run's own config.json holds the value, e.g. one an older ectune accepted
            raise ConfigError(f"{Path(resume) / 'config.json'}: {e}") from None
        raise
    ddp = init_distributed(cfg.device)
    try:
        return _train(cfg, ddp, resume=resume, progress=progress, stop_after_nimg=stop_after_nimg)
    finally:
        if ddp.owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ddp: Dist, *, resume: str | None, progress: bool,
           stop_after_nimg: int | None) -> TrainResult:
    device = resolve_device(cfg.device, ddp.local_rank)
    batch_gpu = cfg.batch_gpu or cfg.batch // ddp.world
    if cfg.batch % (batch_gpu * ddp.world):
        raise ConfigError(f"batch ({cfg.batch}) must be a multiple of batch_gpu x processes ({batch_gpu} x {ddp.world})")
    accum = cfg.batch // (batch_gpu * ddp.world)

    data = load_dataset(cfg.data.name, path=cfg.data.path, split=cfg.data.split, use_labels=cfg.data.use_labels,
                        max_items=cfg.data.max_items, seed=cfg.seed)
    if len(data) < batch_gpu:
        raise DataError(f"{cfg.data.name} has {len(data)} items, fewer than one micro-batch ({batch_gpu}): lower --batch")
    if device.type == "cuda" and data.data.nbytes <= DATA_ON_DEVICE_BYTES:
        data = data.to(device)  # a batch is an index op on the GPU: only the indices cross the bus
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    net, info, _ = network_info(cfg, data, new_run=not resume)
    fmt = torch.channels_last if cfg.channels_last and len(data.shape) == 3 else torch.preserve_format
    net.to(device, memory_format=fmt).train()
    for pname, p in net.named_parameters():
        # Parameters no training forward uses, kept out of DDP (which waits for their gradients) and the
        # optimiser: EDM2's uncertainty head (D(x, sigma) ignores it), and EDM's augmentation embedding
        # (ectune feeds no augmentation labels; EDM's published CIFAR-10 networks carry augment_dim 9).
        if pname.startswith(("logvar_", "map_augment.")):
            p.requires_grad_(False)
    denoiser = Denoiser(net, sigma_data=cfg.precond.sigma_data, scalings=cfg.precond.train_scalings,
                        sigma_min=cfg.precond.sigma_min)
    ema = build_ema(cfg, net)  # copies of the network, already on the device
    optimizer = build_optimizer(cfg, net)
    loss_fn = build_loss(cfg)
    export_name = cfg.ema.export or next(iter(ema.nets()))
    if export_name not in ema.nets():
        raise ConfigError(f"ema.export {export_name!r} is not one of {', '.join(ema.nets())}")
    # the run folder is written only once every piece of the run is built: a setup error leaves nothing
    run_dir = Path(resume) if resume else prepare_run_dir(cfg)
    if not resume:
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
        if ddp.is_main:
            if run_dir.exists() and not run_dir.is_dir():
                raise UserError(f"--run-dir {run_dir} is a file: pick a folder")
            if (run_dir / "config.json").exists() or list_states(run_dir):
                raise UserError(f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another "
                                "--run-dir")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.json", config_mod.to_json(cfg))
    if ddp.world > 1:
        dist.barrier()
    nimg = 0
    tally: dict[str, Any] = {}
    if resume:
        state, skipped = _latest_readable_state(run_dir)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        nimg = int(state["nimg"])
        tally = state.get("tally", {})  # absent in states written before it was saved
    if ddp.world > 1:
        _check_same_parameters(net)
    model: nn.Module = denoiser
    if cfg.compile:
        # Static shapes: with automatic dynamic shapes this torch's inductor fails on the U-Net
        # ("cannot determine truth value of Relational"); the target pass runs uncompiled (_unwrap).
        model = torch.compile(model, dynamic=False)
    if ddp.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log = RunLog(run_dir, ddp.is_main)
    if resume and ddp.is_main:
        for path in remove_stale_temp_files(run_dir):
            log.text(f"removed {path.relative_to(run_dir)}, left by a write that was killed")
        for path, why in skipped:
            log.text(f"skipped unreadable training state {path.name}: {why}")
        _trim_stats(run_dir / "stats.jsonl", nimg)
    log.text(f"{'resuming' if resume else 'starting'} {cfg.method} at {nimg} images on {device} x {ddp.world}, "
             f"batch {cfg.batch} = {batch_gpu} x {ddp.world} processes x {accum} accumulation rounds")

    def outputs(at: int, missing_only: bool = False) -> None:
        """The preview and training-time metrics due once ``at`` images are seen (``missing_only``: those
        a kill between the training state and them left unwritten)."""
        from ectune.preview import legacy_preview_name, preview_name, write_preview

        final = at >= cfg.total_nimg
        preview = run_dir / "samples" / preview_name(at)
        written = preview.exists() or (run_dir / "samples" / legacy_preview_name(at)).exists()  # older runs' name
        if ((cfg.preview_every_nimg > 0 and at % cfg.preview_every_nimg < cfg.batch) or final) and not (
                missing_only and written):
            write_preview(preview, ema.nets()[export_name], info, cfg.preview, device)
        if cfg.eval_every_nimg > 0 and (at % cfg.eval_every_nimg < cfg.batch or final) and not (
                missing_only and _eval_logged(run_dir / "stats.jsonl", at)):
            from ectune.evaluate import training_metrics
            values = training_metrics(ema.nets()[export_name], info, cfg, device)
            log.stats(at, values)
            log.text(f"kimg {at / 1000:.1f} eval " + " ".join(f"{k} {v:.5g}" for k, v in values.items()))

    if resume and nimg > 0 and ddp.is_main:
        if nimg >= cfg.total_nimg:
            # finished, but perhaps killed between its last training state and the model export: export again
            save_model(run_dir / "model", ema.nets()[export_name],
                       dataclasses.replace(info, extra={**info.extra, "nimg": nimg}))
        outputs(nimg, missing_only=True)

    stop_at = min(cfg.total_nimg, stop_after_nimg) if stop_after_nimg is not None else cfg.total_nimg
    bar = None
    if progress and ddp.is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                   desc=f"{cfg.method}")
    t_start = time.perf_counter()
    t_log, nimg_log = t_start, nimg
    # the loss and non-finite tallies between log lines travel in the training state, so a resumed
    # run logs the lines of an uninterrupted one
    loss_acc = torch.tensor(float(tally.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
    loss_count = int(tally.get("loss_count", 0))
    nonfinite_total, nonfinite_run = int(tally.get("nonfinite_total", 0)), int(tally.get("nonfinite_run", 0))
    params = [p for p in net.parameters() if p.requires_grad]
    stop = _StopFlag()
    interrupted: int | None = None
    try:
        stop.install()
        while nimg < stop_at:
            lr = learning_rate(cfg, nimg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device, dtype=torch.float64)
            for a in range(accum):
                micro = a * ddp.world + ddp.rank
                gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, nimg, micro))
                idx = stream_indices(len(data), cfg.seed, nimg + micro * batch_gpu, batch_gpu)
                x, labels = data.batch(idx, xflip=cfg.data.xflip, generator=gen, device=device)
                x = x.contiguous(memory_format=fmt) if fmt is torch.channels_last else x
                sync = contextlib.nullcontext() if (ddp.world == 1 or a == accum - 1) else model.no_sync()
                with sync:
                    with _autocast(device, cfg.precision):
                        per_sample = loss_fn(model, x, labels, nimg, gen)
                    total = per_sample.sum()
                    (total * (ddp.world / cfg.batch)).backward()
                step_loss += total.detach().to(torch.float64)
            if ddp.world > 1:
                dist.all_reduce(step_loss)
            finite = bool(torch.isfinite(step_loss)) and _grads_finite(params)  # grads agree across ranks
            if finite:
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                nonfinite_run = 0
                loss_acc += step_loss
                loss_count += cfg.batch
            else:
                nonfinite_total += 1
                nonfinite_run += 1
                log.text(f"non-finite loss or gradient at {nimg} images: step skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.max_nonfinite_steps:
                    saved = list_states(run_dir)
                    kept = (f"the last training state saved before it is {saved[-1][1]}" if saved else
                            f"no training state was saved before it: start again in another --run-dir than {run_dir}")
                    raise UserError(f"{nonfinite_run} consecutive steps had a non-finite loss or gradient at {nimg} "
                                    f"images: lower --optim.lr or use --precision fp32; {kept}")
            nimg += cfg.batch
            ema.update(net, nimg, cfg.batch)
            if bar is not None:
                bar.update(cfg.batch)
            done = nimg >= stop_at
            if nimg % cfg.log_every_nimg < cfg.batch or nimg >= cfg.total_nimg:  # not at a stop_after_nimg
                now = time.perf_counter()
                mean_loss = float(loss_acc) / max(loss_count, 1)
                curriculum = loss_fn.stats(nimg - cfg.batch)  # of the step just taken
                stats = {"loss": mean_loss, "lr": lr, "img_per_s": (nimg - nimg_log) / max(now - t_log, 1e-9),
                         "nonfinite_steps": nonfinite_total, "wall_s": now - t_start, **curriculum}
                log.stats(nimg, stats)
                log.text(f"kimg {nimg / 1000:.1f} loss {mean_loss:.5g} lr {lr:.3g} img/s {stats['img_per_s']:.1f} "
                         + " ".join(f"{k} {v}" for k, v in curriculum.items()))
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4g}", **curriculum)
                t_log, nimg_log = now, nimg
                loss_acc.zero_()
                loss_count = 0
            interrupted = stop.agreed(ddp, device)
            ckpt_due = cfg.checkpoint_every_nimg > 0 and nimg % cfg.checkpoint_every_nimg < cfg.batch
            if ckpt_due or done or interrupted:
                tally = {"loss_sum": float(loss_acc), "loss_count": loss_count, "nonfinite_total": nonfinite_total,
                         "nonfinite_run": nonfinite_run}
                _save(run_dir, cfg, nimg, net, ema, optimizer, info, export_name, ddp, tally)
            if ddp.is_main:
                outputs(nimg)
            if interrupted:
                log.text(f"stopped by signal {interrupted} at {nimg} images; resume with --resume {run_dir}")
                break
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        log.close()
    wall = time.perf_counter() - t_start
    log.text(f"stopped at {nimg} images after {wall:.1f} s")
    return TrainResult(run_dir=run_dir, nimg=nimg, model_dir=run_dir / "model", wall_s=wall, nonfinite_steps=nonfinite_total,
                       interrupted=interrupted)


def _grads_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient entry is finite: one fused max-abs per device and dtype, one sync."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    flags = [torch.stack(torch._foreach_norm(g, ord=math.inf)).isfinite().all().cpu() for g in groups.values()]
    return bool(torch.stack(flags).all()) if flags else True


class _StopFlag:
    """SIGINT / SIGTERM handlers that only raise a flag; the loop saves a training state and stops at the
    end of the current step (all processes agree on it, so they save together)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(self, ddp: Dist, device: torch.device) -> int | None:
        if ddp.world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None


def _latest_readable_state(run_dir: Path) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The newest training state that loads; unreadable newer ones are skipped (and reported)."""
    skipped = []
    for _, path in reversed(list_states(run_dir)):
        try:
            return load_state(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    raise CheckpointError(f"no readable training state in {run_dir / 'checkpoints'}: start a new run")


def _trim_stats(path: Path, nimg: int) -> None:
    """Drop stats lines logged after the state a run resumes from (they are about to be replayed)."""
    if path.is_file():
        kept = [line for line, row in read_stats_rows(path) if row.get("nimg", 0) <= nimg]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _eval_logged(path: Path, nimg: int) -> bool:
    """Whether stats.jsonl holds the training-time metrics (an ``eval_s`` line) at ``nimg`` images."""
    return any(row.get("nimg") == nimg and "eval_s" in row for _, row in read_stats_rows(path))


def _config_differences(saved: Path, cfg: TrainConfig) -> list[str]:
    """The options in which a run's saved config.json, read as ``train`` reads it (fields added since
    take their defaults), differs from ``cfg``; ["config.json"] if it cannot be read, [] if it is gone
    (another rank's restart removed it)."""
    try:
        theirs = config_mod.from_dict(TrainConfig, json.loads(saved.read_text("utf-8")))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError, ConfigError):
        return ["config.json"]

    def value(c: Any, key: str) -> Any:
        for part in key.split("."):
            c = getattr(c, part)
        return c

    return [key for key, *_ in config_mod.iter_options(TrainConfig) if value(theirs, key) != value(cfg, key)]


def resume_or_start(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """``--resume auto``: resume the run in ``cfg.run_dir`` if it holds a training state, else start it
    there. The same command can be relaunched after any kill (e.g. by torchrun's elastic restarts);
    options other than the run's own are refused, as they would be ignored (a state) or lost (none)."""
    if not cfg.run_dir:
        raise ConfigError("--resume auto needs --run-dir: the folder to resume from or start in")
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir)))  # as train() records it ("runs/a/" -> "runs/a")
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.json"
    # every rank compares (a read: at worst it finds the file gone, or rewritten by rank 0 with this same
    # config), so a refusal stops every process; only rank 0 removes files
    if saved.is_file():
        differ = _config_differences(saved, cfg)
        if differ:
            raise UserError(f"{run_dir} holds another run (its config.json differs in {', '.join(differ)}): resume "
                            f"it with --resume {run_dir} alone, or pick another --run-dir")
    if list_states(run_dir):
        return train(cfg, resume=str(run_dir), progress=progress)
    if int(os.environ.get("RANK", "0")) == 0 and saved.is_file():
        # killed before its first checkpoint: start the same run again
        for name in ("config.json", "stats.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    return train(cfg, progress=progress)


def _save(run_dir: Path, cfg: TrainConfig, nimg: int, net: nn.Module, ema: EMAGroup, optimizer: torch.optim.Optimizer,
          info: ModelInfo, export_name: str, ddp: Dist, tally: dict[str, Any]) -> None:
    if ddp.is_main:
        state = {"nimg": nimg, "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "tally": tally}
        save_state(run_dir, nimg, state, cfg.keep_checkpoints)
        save_model(run_dir / "model", ema.nets()[export_name], dataclasses.replace(info, extra={**info.extra, "nimg": nimg}))
    if ddp.world > 1:
        dist.barrier()


def _check_same_parameters(net: nn.Module) -> None:
    """All ranks must start from identical weights (checked once at start)."""
    flat = torch.cat([p.detach().float().flatten() for p in net.parameters()])
    checksum = torch.stack([flat.sum(), flat.square().sum()]).double()  # on the device: NCCL takes no CPU tensors
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise UserError("processes hold different parameters at start: relaunch all workers from the same run folder")
