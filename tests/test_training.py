"""The training loop: exact resumption, DDP equivalence, non-finite handling and run folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from ectune import config as C
from ectune.checkpoint import list_states, load_model, load_state
from ectune.errors import ConfigError, UserError
from ectune.plots import latest_preview
from ectune.preview import legacy_preview_name, preview_name, preview_nimg
from ectune.training import learning_rate, step_seed, train

TINY_MLP = {"dim": 2, "hidden_dim": 32, "num_blocks": 1, "dropout": 0.0}


def tiny_cfg(tmp: Path, method: str = "edm", **over) -> C.TrainConfig:
    """A toy2d config small enough to train in about a second."""
    cfg = C.preset("toy2d", method)
    base = {"batch": 64, "total_nimg": 64 * 8, "log_every_nimg": 64 * 2, "checkpoint_every_nimg": 64 * 4,
            "data.max_items": 2048, "run_dir": str(tmp / f"run-{method}"), "preview.num_images": 64}
    if method != "ect":
        base["network.kwargs"] = json.dumps(TINY_MLP)
    base.update(over)
    return C.apply_overrides(cfg, base)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    return train(tiny_cfg(tmp, "edm"), progress=False).model_dir


def test_learning_rate_warm_up_and_inverse_sqrt_decay():
    """Worked by hand. Warm-up scales by the images seen after the step (so the first step does not
    train at lr 0, EDM's ramp-up shifted by one step); EDM2's decay is lr / sqrt(max(nimg / (ref x batch), 1))."""
    cfg = C.apply_overrides(C.TrainConfig(), {"batch": 100, "optim.lr": 1e-3, "optim.warmup_nimg": 1000})
    assert [learning_rate(cfg, n) for n in (0, 400, 900, 5000)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3])
    decay = C.apply_overrides(cfg, {"optim.warmup_nimg": 0, "optim.schedule": "inverse_sqrt", "optim.ref_batches": 10})
    assert [learning_rate(decay, n) for n in (0, 1000, 4000, 9000)] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-3 / 3])
    both = C.apply_overrides(decay, {"optim.warmup_nimg": 8000})
    assert learning_rate(both, 3900) == pytest.approx(1e-3 / math.sqrt(3.9) * 0.5)


def test_logged_loss_is_the_mean_per_sample_loss(tmp_path, monkeypatch):
    """A loss of exactly 1 per sample logs 1.0, with and without gradient accumulation (a review found
    that counting steps instead of samples, 64x the loss, passed every test)."""
    import ectune.training as T

    class OnePerSample:
        def __call__(self, model, x, labels, nimg, gen):
            return torch.ones(x.shape[0]) + 0.0 * sum(p.sum() for p in model.parameters())

        def stats(self, nimg):
            return {}

    monkeypatch.setattr(T, "build_loss", lambda cfg: OnePerSample())
    for name, over in [("plain", {}), ("accum", {"batch_gpu": 16})]:
        run = train(tiny_cfg(tmp_path / name, **over), progress=False).run_dir
        losses = [json.loads(line)["loss"] for line in (run / "stats.jsonl").read_text().splitlines()]
        assert losses == [1.0] * 4, name


def test_previews_more_often_than_every_1000_images_each_keep_their_own_file(tmp_path):
    """Preview names are exact to the image: a preview every 128 images is four files, not one
    overwritten four times, and the newest sorts last."""
    run = train(tiny_cfg(tmp_path, preview_every_nimg=128), progress=False).run_dir
    names = sorted(p.name for p in (run / "samples").glob("preview-*.png"))
    assert names == [preview_name(n) for n in (128, 256, 384, 512)]
    assert latest_preview(run).name == preview_name(512) == "preview-000000.512kimg.png"
    assert preview_name(28_800) == "preview-000028.800kimg.png"
    assert [preview_nimg(n) for n in (preview_name(28_800), legacy_preview_name(28_800), "notes.png")] == [28_800,
                                                                                                         28_000, None]
    # runs written before the exact names: the newest is found by images seen, not by sorting the names
    (run / "samples" / preview_name(512)).rename(run / "samples" / legacy_preview_name(1000))
    assert latest_preview(run).name == legacy_preview_name(1000)


def test_run_folder_contents(tmp_path):
    res = train(tiny_cfg(tmp_path), progress=False)
    run = res.run_dir
    assert res.nimg == 512
    saved = json.loads((run / "config.json").read_text())
    assert saved["schema_version"] == C.SCHEMA_VERSION and saved["method"] == "edm"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [128, 256, 384, 512]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)
    assert (run / "log.txt").read_text().count("kimg") == 4
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    assert (run / "samples" / "preview-000000.512kimg.png").is_file()
    # keep_checkpoints = 2: the states at 256 and 512 images
    assert [n for n, _ in list_states(run)] == [256, 512]
    state = torch.load(list_states(run)[-1][1], weights_only=True)
    assert state["nimg"] == 512
    denoiser, info = load_model(run)
    assert info.method == "edm" and info.data_shape == (2,)


def test_existing_run_folder_is_not_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path)
    train(cfg, progress=False)
    before = (tmp_path / "run-edm" / "config.json").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, progress=False)
    assert (tmp_path / "run-edm" / "config.json").read_text() == before


@pytest.mark.parametrize("method", ["edm", "ect", "ict"])
def test_resume_is_exact(tmp_path, teacher, method):
    """Stop after 3 checkpoints' worth of images, resume: the weights, EMA and optimizer state equal
    an uninterrupted run bit for bit."""
    over = {"teacher": str(teacher), "network.dropout": 0.2} if method == "ect" else {"network.kwargs.dropout": 0.2}
    if method == "ect":
        over["ect.stage_nimg"] = 128  # cross stage boundaries within the run
    full = train(tiny_cfg(tmp_path / "a", method, **over), progress=False)
    cfg_b = tiny_cfg(tmp_path / "b", method, **over)
    part = train(cfg_b, progress=False, stop_after_nimg=256)
    assert part.nimg == 256 and [n for n, _ in list_states(part.run_dir)] == [256]
    resumed = train(C.TrainConfig(), resume=str(part.run_dir), progress=False)
    assert resumed.nimg == full.nimg
    wa, wb = weights(full.model_dir), weights(resumed.model_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = load_state(list_states(full.run_dir)[-1][1]), load_state(list_states(resumed.run_dir)[-1][1])
    for k in sa["net"]:
        assert torch.equal(sa["net"][k], sb["net"][k]), k
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()


def test_resume_needs_a_state(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        train(C.TrainConfig(), resume=str(tmp_path), progress=False)


def test_step_seed_is_distinct_and_stable():
    seeds = {step_seed(0, n, m) for n in range(0, 6400, 64) for m in range(4)}
    assert len(seeds) == 400
    assert step_seed(3, 128, 1) == step_seed(3, 128, 1)


def test_nonfinite_loss_stops_with_clear_error(tmp_path, monkeypatch):
    from ectune import losses

    def bad_loss(self, denoiser, x, labels, nimg, generator):
        return denoiser(x, torch.ones(x.shape[0]), labels).sum(1) * float("nan")

    monkeypatch.setattr(losses.EDMLoss, "__call__", bad_loss)
    cfg = tiny_cfg(tmp_path, max_nonfinite_steps=3)
    # before the first checkpoint there is no state to name (the message claimed one: a docs audit found it)
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite loss.*no training state was saved"):
        train(cfg, progress=False)
    assert not list_states(cfg.run_dir)
    monkeypatch.undo()
    real = losses.EDMLoss.__call__

    def bad_after_a_checkpoint(self, denoiser, x, labels, nimg, generator):
        fault = bad_loss if nimg >= 256 else real
        return fault(self, denoiser, x, labels, nimg, generator)

    monkeypatch.setattr(losses.EDMLoss, "__call__", bad_after_a_checkpoint)
    cfg = tiny_cfg(tmp_path / "later", max_nonfinite_steps=3)  # a state every 256 images
    with pytest.raises(UserError, match=r"the last training state saved before it is .*training-state-0*256"):
        train(cfg, progress=False)


def test_nonfinite_gradient_skips_the_step(tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (sqrt at 0 times 0) skips its step: counted in the stats, the
    weights untouched by it, the run goes on; the same fault every step stops the run."""
    from ectune import losses

    good = losses.EDMLoss.__call__

    def nan_grad_at_second_step(self, denoiser, x, labels, nimg, generator):
        loss = good(self, denoiser, x, labels, nimg, generator)
        if nimg == 64:
            loss = loss + (loss * 0).sqrt()  # value unchanged and finite, gradient NaN
        return loss

    monkeypatch.setattr(losses.EDMLoss, "__call__", nan_grad_at_second_step)
    res = train(tiny_cfg(tmp_path, total_nimg=64 * 4, checkpoint_every_nimg=64, keep_checkpoints=4), progress=False)
    rows = [json.loads(line) for line in (res.run_dir / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in weights(res.model_dir).values())
    states = {n: load_state(path)["net"] for n, path in list_states(res.run_dir)}
    assert sorted(states) == [64, 128, 192, 256]
    assert all(torch.equal(states[64][k], states[128][k]) for k in states[64])  # step 2 was skipped
    assert not all(torch.equal(states[128][k], states[192][k]) for k in states[64])  # step 3 was taken
    # the count travels in the training state: stopped after the skipped step and resumed, the run
    # logs the lines of the uninterrupted one
    part = tiny_cfg(tmp_path / "part", total_nimg=64 * 4, checkpoint_every_nimg=64, keep_checkpoints=4)
    train(part, progress=False, stop_after_nimg=128)
    resumed = train(C.TrainConfig(), resume=part.run_dir, progress=False)
    from test_reliability import stats_lines

    assert stats_lines(resumed.run_dir) == stats_lines(res.run_dir)
    assert stats_lines(res.run_dir)[-1]["nonfinite_steps"] == 1

    monkeypatch.setattr(losses.EDMLoss, "__call__",
                        lambda self, d, x, labels, nimg, gen: (good(self, d, x, labels, nimg, gen) * 0).sqrt())
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite loss or gradient"):
        train(tiny_cfg(tmp_path / "all", max_nonfinite_steps=3), progress=False)


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes x micro-batch 32 == 1 process x 2 accumulation rounds x 32.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cfg = C.from_dict(C.TrainConfig, json.loads(cfg_json))
    res = train(cfg, progress=False)
    assert not torch.distributed.is_initialized()  # train destroys the group it created
    if rank == 0:
        Path(out).write_text(str(res.model_dir))


def test_process_group_backend_device_and_timeout(monkeypatch):
    """gloo on the CPU, the override ECTUNE_DIST_BACKEND (e.g. cuda:gloo: two processes on one GPU), a
    timeout longer than NCCL's 10 minutes (rank 0 evaluates alone while the others wait), and NCCL
    refused a --device cuda:N that would put every process on one GPU."""
    from ectune import training as T

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "ECTUNE_DIST_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert T.init_distributed("cpu") == T.Dist(rank=1, world=2, local_rank=1, owned=True)
    assert calls[-1] == {"backend": "gloo", "timeout": T.PG_TIMEOUT} and T.PG_TIMEOUT.total_seconds() >= 3600
    monkeypatch.setenv("ECTUNE_DIST_BACKEND", "cpu:gloo")
    T.init_distributed("cpu")
    assert calls[-1]["backend"] == "cpu:gloo"
    monkeypatch.delenv("ECTUNE_DIST_BACKEND")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--device cuda:0 puts every process of this node on one GPU, which NCCL"):
        T.init_distributed("cuda:0")
    assert len(calls) == 2
    # one process per node may name its GPU (the refusal only looks at this node's processes)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    T.init_distributed("cuda:0")
    assert calls[-2:] == [("set_device", torch.device("cuda:0")), {"backend": "nccl", "timeout": T.PG_TIMEOUT}]


def test_a_cuda_device_turns_tf32_off(monkeypatch):
    """cuDNN convolutions default to TF32 on recent GPUs, so "fp32" sampling there changed pixels by up
    to 12 levels (a review emulated it) and failed the shipped teacher rows' check. Resolving a CUDA
    device turns it off; a CPU device leaves the flags alone."""
    from ectune.training import resolve_device

    conv = getattr(torch.backends.cudnn, "conv", None)
    # restored through the legacy flags: after the per-operator ones are set, torch >= 2.9 raises on reading them
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        resolve_device("cpu")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("cuda", 1) == torch.device("cuda:1")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        if hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-operator flag the convolutions read
            assert conv.fp32_precision != "tf32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    cfg = tiny_cfg(tmp_path, "edm", batch_gpu=32, **{"network.kwargs.dropout": 0.1})
    single = train(dataclasses.replace(cfg, run_dir=str(tmp_path / "single")), progress=False)
    ddp_cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "ddp"))
    out = tmp_path / "ddp_out.txt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), C.to_json(ddp_cfg), str(out)), nprocs=2, join=True)
    w1, w2 = weights(single.model_dir), weights(Path(out.read_text()))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the run really changed the weights (the comparison is not between two untouched inits)
    init = train(dataclasses.replace(cfg, run_dir=str(tmp_path / "init"), total_nimg=64), progress=False)
    assert any(not torch.allclose(w1[k], weights(init.model_dir)[k]) for k in w1)


@pytest.mark.slow
def test_ddp_trains_a_network_with_an_unused_augmentation_embedding(tmp_path):
    """EDM's CIFAR-10 networks have augment_dim 9, and no augmentation labels are fed: DDP stopped at the
    second step waiting for map_augment's gradient (a review found it). It is frozen, and kept as is."""
    cfg = _digits_cfg(tmp_path, "ddp", batch_gpu=8, total_nimg=48,
                      **{"network.kwargs.augment_dim": 9, "optim.warmup_nimg": 0, "ema.beta": 0.5})
    out = tmp_path / "ddp_out.txt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), C.to_json(cfg), str(out)), nprocs=2, join=True)
    trained, init = weights(Path(out.read_text())), weights(train(dataclasses.replace(
        cfg, run_dir=str(tmp_path / "init"), total_nimg=16), progress=False).model_dir)
    assert trained["map_augment.weight"].shape == (8, 9)
    assert torch.equal(trained["map_augment.weight"], init["map_augment.weight"])
    assert not torch.equal(trained["map_layer0.weight"], init["map_layer0.weight"])


TINY_UNET = {"img_resolution": 8, "in_channels": 1, "out_channels": 1, "model_channels": 8, "channel_mult": [1, 2],
             "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}


def _digits_cfg(tmp: Path, name: str, **over) -> C.TrainConfig:
    cfg = C.preset("mnist", "edm")
    return C.apply_overrides(cfg, {"data.name": "digits", "network.kwargs": json.dumps(TINY_UNET), "batch": 16,
                                   "total_nimg": 32, "precision": "fp32", "checkpoint_every_nimg": 0,
                                   "preview.num_images": 4, "run_dir": str(tmp / name), **over})


def test_channels_last_trains_the_same_model(tmp_path, monkeypatch):
    """channels_last changes only the memory layout: two steps give the same weights (to conv
    round-off), the export is a plain contiguous safetensors file that loads."""
    from ectune.precond import Denoiser

    layouts: list[bool] = []
    forward = Denoiser.forward

    def spy(self, x, *args, **kwargs):  # is every conv weight with several input channels channels_last?
        convs = [p for p in self.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
        layouts.append(all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "forward", spy)
    plain = train(_digits_cfg(tmp_path, "plain"), progress=False)
    assert layouts and not any(layouts)
    layouts.clear()
    cl = train(_digits_cfg(tmp_path, "cl", channels_last=True), progress=False)
    assert layouts and all(layouts)
    a, b = weights(plain.model_dir), weights(cl.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert all(v.is_contiguous() for v in b.values())
    load_model(cl.model_dir)


def test_compile_option_trains(tmp_path):
    """--compile runs the student pass through torch.compile (static shapes) and ends with a model."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg(tmp_path, "edm", compile=True, total_nimg=64 * 2, checkpoint_every_nimg=0)
    result = train(cfg, progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # the student pass really went through dynamo
    losses = [row["loss"] for row in map(json.loads, (result.run_dir / "stats.jsonl").read_text().splitlines())
              if "loss" in row]
    assert losses and all(map(math.isfinite, losses))
    assert (result.model_dir / "model.safetensors").is_file()


def test_export_ema_writes_any_of_a_runs_emas_as_a_model(tmp_path, capsys):
    """`ectune export-ema` lists a run's EMAs and writes the named one, from the latest or a chosen
    training state, bit for bit; bad input is one line, exit 2, with nothing written."""
    from ectune.checkpoint import state_emas
    from ectune.cli import main

    cfg = tiny_cfg(tmp_path, **{"ema.beta": 0.99, "ema.stds": "[0.05, 0.1]"})
    run = train(cfg, progress=False).run_dir
    assert main(["export-ema", str(run)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["ema-0.99", "ema-std0.050", "ema-std0.100"]
    assert "model/" in listing[1] and "model/" not in "".join(listing[2:])

    states = dict(list_states(run))
    latest = state_emas(load_state(states[512]))
    assert main(["export-ema", str(run), "--ema", "ema-std0.100"]) == 0
    out = run / "model-ema-std0.100"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    got = weights(out)
    assert got.keys() == latest["ema-std0.100"].keys()
    assert all(torch.equal(got[k], latest["ema-std0.100"][k]) for k in got)
    assert not all(torch.equal(got[k], weights(run / "model")[k]) for k in got)  # another average than model/
    _, info = load_model(out)
    assert info.extra["ema"] == "ema-std0.100" and info.extra["nimg"] == 512 and info.method == "edm"

    # the run's own EMA comes out equal to its model/; an earlier state gives that state's weights
    assert main(["export-ema", str(run), "--ema", "ema-0.99", "--dest", str(tmp_path / "own")]) == 0
    own, model = weights(tmp_path / "own"), weights(run / "model")
    assert own.keys() == model.keys() and all(torch.equal(own[k], model[k]) for k in own)
    assert main(["export-ema", str(run), "--ema", "ema-std0.100", "--nimg", "256",
                 "--dest", str(tmp_path / "early")]) == 0
    early = state_emas(load_state(states[256]))["ema-std0.100"]
    assert weights(tmp_path / "early").keys() == early.keys()
    assert all(torch.equal(weights(tmp_path / "early")[k], early[k]) for k in early)
    assert load_model(tmp_path / "early")[1].extra["nimg"] == 256
    capsys.readouterr()

    # bad input: one line, exit 2, nothing written or overwritten
    before = (out / "model.safetensors").read_bytes()
    for args, message in [(["--ema", "ema-std0.100"], "already exists and is not empty"),
                          (["--ema", "ema-0.5", "--dest", str(tmp_path / "x")], "choose one of ema-0.99, ema-std0.050"),
                          (["--ema", "ema-0.99", "--nimg", "100", "--dest", str(tmp_path / "x")], "it has 256, 512"),
                          (["--dest", str(tmp_path / "x")], "--dest needs --ema")]:
        assert main(["export-ema", str(run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert (out / "model.safetensors").read_bytes() == before and not (tmp_path / "x").exists()
    assert main(["export-ema", str(tmp_path)]) == 2 and "holds no training state" in capsys.readouterr().err
    for args in ([], ["--ema", "ema-0.99"]):
        assert main(["export-ema", str(tmp_path / "nope"), *args]) == 2 and "does not exist" in capsys.readouterr().err


def test_export_ema_of_a_run_with_power_emas_only(tmp_path, capsys):
    """No fixed EMA, model/ = a power-function EMA named by --ema.export: the listing marks that one, and
    weights that do not fit model/'s network are refused with the offending key named."""
    from ectune.cli import main

    cfg = tiny_cfg(tmp_path, **{"ema.beta": "null", "ema.stds": "[0.05, 0.1]", "ema.export": "ema-std0.100"})
    run = train(cfg, progress=False).run_dir
    assert main(["export-ema", str(run)]) == 0
    listing = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in listing] == ["ema-std0.050", "ema-std0.100"]
    assert "exports as model/" in listing[1] and "exports" not in listing[0]
    assert main(["export-ema", str(run), "--ema", "ema-std0.100", "--dest", str(tmp_path / "own")]) == 0
    own, model = weights(tmp_path / "own"), weights(run / "model")
    assert own.keys() == model.keys() and all(torch.equal(own[k], model[k]) for k in own)

    # model/ describing another network than the run trained: refused, nothing written
    info = json.loads((run / "model" / "config.json").read_text())
    info["network"]["kwargs"]["hidden_dim"] = 16
    (run / "model" / "config.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["export-ema", str(run), "--ema", "ema-std0.050"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the network" in err[0] and "size mismatch" in err[0], err
    assert not (run / "model-ema-std0.050").exists()
    # killed between its training state and model/: told to resume
    for f in (run / "model").iterdir():
        f.unlink()
    (run / "model").rmdir()
    assert main(["export-ema", str(run), "--ema", "ema-std0.050"]) == 2
    assert f"resume the run (--resume {run})" in capsys.readouterr().err

