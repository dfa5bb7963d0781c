"""Tests for ectune.convert: EDM / EDM2 / ECT pickles are converted without running their code.

The pickles are built here in torch_utils.persistence's format: every network module pickles as a
call to torch_utils.persistence._reconstruct_persistent_obj(meta), with meta = dict(type='class',
version, module_src, class_name, state). A tiny fake ``torch_utils/persistence.py`` is importable only
while a pickle is written; the converter runs without it. The fake's reconstruct function executes
``module_src`` the way the real one does, so the tests can show that a plain ``pickle.load`` would
run the payload while the converter does not.
"""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ectune.checkpoint import load_model
from ectune.convert import (
    ALLOWED_GLOBALS,
    AttributeRef,
    PersistentObject,
    cli_convert,
    convert_checkpoint,
    convert_network,
    load_pickle,
    loads_pickle,
)
from ectune.errors import CheckpointError, UserError
from ectune.networks import EDM2UNet, SongUNet
from ectune.precond import Denoiser

FAKE_PERSISTENCE = '''\
"""Test-only stand-in for NVlabs' torch_utils/persistence.py: only what pickling needs."""
import types


def _reconstruct_persistent_obj(meta):
    # Like the real one: run the embedded module source, then rebuild the object from its state.
    module = types.ModuleType("_imported_module")
    exec(meta["module_src"], module.__dict__)
    return types.SimpleNamespace(class_name=meta["class_name"], **meta["state"])
'''

SONG_KWARGS = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=3, augment_dim=2, model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
EDM2_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.1)


# ----------------------------------------------------------------------------------------------
# Writing persistence-format pickles


@pytest.fixture
def fake_persistence(tmp_path: Path) -> Iterator[None]:
    """Make ``torch_utils.persistence`` (the fake) importable for the duration of a test's pickling."""
    root = tmp_path / "fake_modules"
    (root / "torch_utils").mkdir(parents=True)
    (root / "torch_utils" / "__init__.py").write_text("")
    (root / "torch_utils" / "persistence.py").write_text(FAKE_PERSISTENCE)

    @contextmanager
    def importable() -> Iterator[None]:
        sys.path.insert(0, str(root))
        try:
            yield
        finally:
            sys.path.remove(str(root))
            for name in ("torch_utils.persistence", "torch_utils"):
                sys.modules.pop(name, None)

    yield importable
    assert "torch_utils" not in sys.modules


class _Persistent:
    """Pickles exactly like a torch_utils.persistence object (a reduce to _reconstruct_persistent_obj)."""

    def __init__(self, class_name: str, state: dict, module_src: str) -> None:
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        from torch_utils import persistence  # the fake, importable only while writing
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return persistence._reconstruct_persistent_obj, (meta,)


class _FakeECMLoss(_Persistent):
    """Like ECT's ECMLoss: its state holds a bound method (self.t_to_r = self.t_to_r_sigmoid), which
    pickles as builtins.getattr(<the loss object>, 't_to_r_sigmoid')."""

    def __init__(self, module_src: str) -> None:
        super().__init__("ECMLoss", dict(P_mean=-1.1, P_std=2.0, q=2, stage=0, _init_args=(),
                                         _init_kwargs=dict(q=2)), module_src)
        self.state["t_to_r"] = self.t_to_r_sigmoid

    def t_to_r_sigmoid(self, t):
        return t


class _Payload:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _record(module: nn.Module, src: str, class_name: str | None = None, init_kwargs: dict | None = None):
    """The persistence record of an ectune module tree: state = the module's __dict__ (real Parameters,
    buffers, hook OrderedDicts, sets), children as records, ModuleDicts as real (pickled) ModuleDicts."""
    if isinstance(module, nn.ModuleDict):
        md = nn.ModuleDict()
        md.__dict__["_modules"] = {k: _record(c, src) for k, c in module._modules.items()}
        return md
    state = dict(module.__dict__)
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {k: None if c is None else _record(c, src) for k, c in module._modules.items()}
    if init_kwargs is not None:
        state["_init_args"] = ()
        state["_init_kwargs"] = dict(init_kwargs)
    return _Persistent(class_name or type(module).__name__, state, src)


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Random values in every saved tensor (published nets zero-initialise some layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():  # shares storage with the parameters and persistent buffers
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return net.eval()


def _songunet(seed: int = 0) -> SongUNet:
    return _randomize(SongUNet(**SONG_KWARGS), seed)


def _edm2(seed: int = 0, **overrides) -> EDM2UNet:
    return _randomize(EDM2UNet(**{**EDM2_KWARGS, "logvar_channels": 8, **overrides}), seed)


def _edm_snapshot(net: SongUNet, src: str, wrapper: str = "EDMPrecond", **wrapper_kwargs) -> dict:
    """{'ema': EDMPrecond(SongUNet), 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...}, as EDM saves it."""
    model_kwargs = {k: v for k, v in SONG_KWARGS.items() if k not in ("img_resolution", "in_channels", "out_channels",
                                                                      "label_dim")}
    inner = _record(net, src, "SongUNet", init_kwargs=SONG_KWARGS)
    sigma_data = wrapper_kwargs.get("sigma_data", 0.5)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=3, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                  sigma_data=0.5, model_type="SongUNet", **model_kwargs)
    kwargs.update(wrapper_kwargs)
    shell = nn.Module()
    state = dict(shell.__dict__, _modules={"model": inner}, _init_args=(), _init_kwargs=kwargs,
                 img_resolution=8, img_channels=3, label_dim=3, use_fp16=False,
                 sigma_min=wrapper_kwargs.get("sigma_min", 0), sigma_max=float("inf"), sigma_data=sigma_data)
    loss_fn = _Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(), _init_kwargs={}), src)
    augment = _Persistent("AugmentPipe", dict(p=np.float64(0.12), xflip=np.float32(1e8), _init_args=(),
                                              _init_kwargs=dict(p=0.12)), src)
    return dict(ema=_Persistent(wrapper, state, src), loss_fn=loss_fn, augment_pipe=augment,
                dataset_kwargs=dict(path="cifar10-32x32.zip", max_size=np.int64(50000), xflip=False,
                                    dtype=np.dtype("float32")))


def _edm2_snapshot(net: EDM2UNet, src: str, fp16: bool = True) -> dict:
    """{'ema': Precond(UNet)} with fp16 weights, as EDM2 publishes it."""
    if fp16:
        net = _half_copy(net)
    unet_kwargs = {k: v for k, v in EDM2_KWARGS.items()}
    inner = _record(net.unet, src, "UNet", init_kwargs=unet_kwargs)
    modules = {"unet": inner}
    if net.logvar_fourier is not None:
        modules["logvar_fourier"] = _record(net.logvar_fourier, src, "MPFourier", init_kwargs={"num_channels": 8})
        modules["logvar_linear"] = _record(net.logvar_linear, src, "MPConv", init_kwargs={})
    shell = nn.Module()
    kwargs = dict(EDM2_KWARGS, use_fp16=True, sigma_data=0.5, logvar_channels=8)
    state = dict(shell.__dict__, _modules=modules, _init_args=(), _init_kwargs=kwargs,
                 img_resolution=8, img_channels=3, label_dim=4, use_fp16=True, sigma_data=0.5)
    return dict(ema=_Persistent("Precond", state, src))


def _half_copy(net: nn.Module) -> nn.Module:
    import copy
    out = copy.deepcopy(net)
    with torch.no_grad():
        for t in [*out.parameters(), *out.buffers()]:
            t.data = t.data.half()
    return out


def _rounded_fp16(net: nn.Module) -> nn.Module:
    """``net`` with every tensor rounded through fp16 (what an fp16 snapshot of it holds), in float32."""
    import copy
    out = copy.deepcopy(net)
    with torch.no_grad():
        for t in out.state_dict().values():
            t.copy_(t.half().float())
    return out


def _write(path: Path, obj, fake_persistence) -> Path:
    with fake_persistence():
        path.write_bytes(pickle.dumps(obj))
    return path


def _marker_src(marker: Path) -> str:
    """Module source that leaves a marker file when executed."""
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('module_src was executed')\n"


def _compare(original: nn.Module, folder: Path, labels: torch.Tensor | None, scalings: str = "edm") -> None:
    """The converted folder's denoiser equals Denoiser(original) on the same inputs."""
    denoiser, info = load_model(folder)
    reference = Denoiser(original.eval(), sigma_data=info.sigma_data, scalings=scalings, sigma_min=info.sigma_min)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        with torch.no_grad():
            got = denoiser(x * sigma, torch.full((4,), sigma), labels)
            want = reference(x * sigma, torch.full((4,), sigma), labels)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conversion of well-formed snapshots


def test_edm_songunet_snapshot_converts_without_running_its_code(tmp_path, fake_persistence):
    marker = tmp_path / "executed.txt"
    net = _songunet()
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(net, _marker_src(marker)), fake_persistence)
    assert "torch_utils" not in sys.modules

    dest = convert_checkpoint(src, tmp_path / "converted")

    assert not marker.exists()
    assert "torch_utils" not in sys.modules
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["network"]["name"] == "songunet"
    assert cfg["network"]["kwargs"]["augment_dim"] == 2 and cfg["network"]["kwargs"]["dropout"] == 0.13
    assert cfg["method"] == "edm" and cfg["precond"]["scalings"] == "edm" and cfg["precond"]["sigma_data"] == 0.5
    assert cfg["data_shape"] == [3, 8, 8] and cfg["label_dim"] == 3
    assert cfg["converted_from"]["network"] == "EDMPrecond(SongUNet)" and cfg["converted_from"]["file"] == "edm.pkl"
    _compare(net, dest, torch.eye(3)[[0, 1, 2, 1]])


def test_the_fake_persistence_payload_is_live_under_plain_pickle(tmp_path, fake_persistence):
    """Control for the test above: the stock way of loading would execute module_src."""
    marker = tmp_path / "executed.txt"
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), _marker_src(marker)), fake_persistence)
    with fake_persistence():
        pickle.loads(src.read_bytes())
    assert marker.exists()


def test_ect_cifar10_snapshot_samples_with_cm_scalings(tmp_path, fake_persistence):
    net = _songunet(seed=3)
    snapshot = _edm_snapshot(net, "", wrapper="ECMPrecond", sigma_min=0.003, sigma_data=0.5)
    snapshot["loss_fn"] = _FakeECMLoss("")
    src = _write(tmp_path / "ecm.pkl", snapshot, fake_persistence)
    loss = load_pickle(src)["loss_fn"]
    assert isinstance(loss.state["t_to_r"], AttributeRef) and loss.state["t_to_r"].name == "t_to_r_sigmoid"
    dest = convert_checkpoint(src, tmp_path / "ecm")
    denoiser, info = load_model(dest)
    assert (info.method, info.scalings, info.sigma_min, info.mid_sigma) == ("ect", "cm", 0.003, 0.821)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # boundary condition D(x, sigma_min) = x
        torch.testing.assert_close(denoiser(x, torch.full((2,), 0.003)), x, rtol=0, atol=1e-6)
    _compare(net, dest, None, scalings="cm")


def test_edm2_fp16_snapshot_converts_to_float32(tmp_path, fake_persistence):
    marker = tmp_path / "executed.txt"
    net = _edm2(seed=5)
    src = _write(tmp_path / "edm2.pkl", _edm2_snapshot(net, _marker_src(marker)), fake_persistence)
    dest = convert_checkpoint(src, tmp_path / "edm2")
    assert not marker.exists()
    denoiser, info = load_model(dest)
    assert info.network == "edm2unet" and info.method == "edm" and info.scalings == "edm"
    assert info.kwargs["logvar_channels"] == 8 and info.kwargs["channels_per_head"] == 8
    assert info.mid_sigma == 1.526
    assert all(t.dtype == torch.float32 for t in denoiser.state_dict().values())
    rounded = _rounded_fp16(net)
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), rounded.parameters()))  # fp16 loses bits
    _compare(rounded, dest, torch.eye(4)[[3, 2, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(denoiser.net.logvar(torch.tensor([0.1, -0.3])),
                                   rounded.logvar(torch.tensor([0.1, -0.3])), rtol=0, atol=1e-6)


def test_precond_without_logvar_head_is_an_ect_model(tmp_path, fake_persistence):
    net = _edm2(seed=6, logvar_channels=0)
    src = _write(tmp_path / "ect-imgnet.pkl", _edm2_snapshot(net, "", fp16=False), fake_persistence)
    dest = convert_checkpoint(src, tmp_path / "ect")
    denoiser, info = load_model(dest)
    assert info.method == "ect" and info.scalings == "edm" and info.kwargs["logvar_channels"] == 0
    _compare(net, dest, torch.eye(4)[[0, 0, 1, 1]])
    dest2 = convert_checkpoint(src, tmp_path / "ect-as-edm", method="edm")
    assert load_model(dest2)[1].method == "edm"


def test_bare_network_pickle_and_empty_dest_are_accepted(tmp_path, fake_persistence):
    net = _songunet(seed=7)
    src = _write(tmp_path / "bare.pkl", _edm_snapshot(net, "")["ema"], fake_persistence)
    (tmp_path / "empty").mkdir()
    dest = convert_checkpoint(src, tmp_path / "empty")
    _compare(net, dest, torch.eye(3)[[2, 2, 0, 1]])


def test_cli_convert_prints_where_it_wrote(tmp_path, fake_persistence, capsys):
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), ""), fake_persistence)
    assert cli_convert(str(src), str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out") in out and "EDMPrecond(SongUNet)" in out and "songunet" in out


def test_unpickled_records_hold_state_not_code(tmp_path, fake_persistence):
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), "raise SystemExit"), fake_persistence)
    snap = load_pickle(src)
    assert isinstance(snap["ema"], PersistentObject) and snap["ema"].class_name == "EDMPrecond"
    assert not hasattr(snap["ema"], "module_src")
    assert snap["dataset_kwargs"]["max_size"] == 50000 and snap["dataset_kwargs"]["dtype"] == np.dtype("float32")
    assert snap["augment_pipe"].state["p"] == pytest.approx(0.12)
    model = snap["ema"].state["_modules"]["model"]
    assert model.class_name == "SongUNet" and model.state["_init_kwargs"]["model_channels"] == 16


# ----------------------------------------------------------------------------------------------
# Hostile pickles: nothing runs


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
def test_pickles_that_would_run_code_are_refused(tmp_path, fake_persistence, kind):
    def hostile(marker: Path) -> bytes:
        code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
        payload = {
            "os.system": _Payload(os.system, f"touch {marker}"),
            "builtins.eval": _Payload(builtins.eval, code),
            "builtins.exec": _Payload(builtins.exec, code),
        }[kind]
        snapshot = _edm_snapshot(_songunet(), "")
        snapshot["loss_fn"] = payload
        return _write(tmp_path / f"{marker.stem}.pkl", snapshot, fake_persistence).read_bytes()

    control = hostile(tmp_path / "control.txt")  # control: the stock unpickler runs the payload
    with fake_persistence():
        pickle.loads(control)
    assert (tmp_path / "control.txt").exists()

    marker = tmp_path / "pwned.txt"
    hostile(marker)
    with pytest.raises(CheckpointError, match="allow-list") as info:
        convert_checkpoint(tmp_path / "pwned.pkl", tmp_path / "out")
    name = {"os.system": os.system.__module__ + ".system", "builtins.eval": "builtins.eval",
            "builtins.exec": "builtins.exec"}[kind]
    assert name in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_getattr_is_recorded_but_never_looked_up_or_called(tmp_path, fake_persistence):
    """ECT snapshots pickle a bound method as getattr(loss_fn, name): that loads as an inert record;
    calling a getattr result (the usual gadget) is refused."""
    data = pickle.dumps({"ema": None, "f": _Payload("text".upper)})  # REDUCE(getattr("text", "upper"), ())
    assert pickle.loads(data)["f"] == "TEXT"  # control: the stock unpickler looks it up and calls it
    with pytest.raises(CheckpointError, match="calls a AttributeRef object"):
        loads_pickle(data)
    ref = loads_pickle(pickle.dumps({"m": "text".upper}))["m"]
    assert isinstance(ref, AttributeRef) and (ref.obj, ref.name) == ("text", "upper")


def test_persistent_object_of_unknown_class_with_code_is_refused_unexecuted(tmp_path, fake_persistence):
    marker = tmp_path / "executed.txt"
    evil = _Persistent("Backdoor", dict(_init_args=(), _init_kwargs={}), _marker_src(marker) + "import os\n")
    src = _write(tmp_path / "evil.pkl", {"ema": evil}, fake_persistence)
    with pytest.raises(CheckpointError, match="Backdoor"):
        convert_checkpoint(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_build_and_newobj_of_unlisted_types_are_refused():
    # BUILD on a tensor (would call Tensor.__setstate__), NEWOBJ of OrderedDict with arguments.
    data = pickle.dumps(torch.zeros(2), protocol=3)  # protocol 3: no frames, so opcodes can be appended
    tampered = data[:-1] + pickle.EMPTY_DICT + pickle.BUILD + pickle.STOP
    with pytest.raises(CheckpointError, match="Tensor"):
        loads_pickle(tampered)
    newobj = (pickle.PROTO + bytes([4]) + pickle.GLOBAL + b"collections\nOrderedDict\n"
              + pickle.NONE + pickle.TUPLE1 + pickle.NEWOBJ + pickle.STOP)
    with pytest.raises(CheckpointError, match="OrderedDict"):
        loads_pickle(newobj)


def test_tensor_reaching_past_its_storage_is_refused():
    """A crafted size/stride must not read memory beyond the stored bytes."""
    from ectune.convert.safe_pickle import _rebuild_tensor
    storage = torch.arange(4.0)._typed_storage()
    assert torch.equal(_rebuild_tensor(storage, 1, (3,), (1,)), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(CheckpointError, match="past its storage"):
        _rebuild_tensor(storage, 1, (4,), (1,))
    with pytest.raises(CheckpointError, match="past its storage"):
        _rebuild_tensor(storage, 0, (2, 2), (3, 1))
    # a tiny file must not make the copy allocate far more than it holds: stride 0 over one element
    with pytest.raises(CheckpointError, match="needs more elements than the 4 its storage holds"):
        _rebuild_tensor(storage, 0, (100_000, 100_000), (0, 0))
    assert torch.equal(_rebuild_tensor(storage, 0, (2, 2), (1, 2)), torch.tensor([[0.0, 2.0], [1.0, 3.0]]))


def test_allow_list_is_short_and_has_no_code_runners():
    names = {f"{m}.{n}" for m, n in ALLOWED_GLOBALS if m != "torch"}
    assert "torch_utils.persistence._reconstruct_persistent_obj" in names
    assert len(names) <= 13
    assert not any(bad in names for bad in ("builtins.eval", "builtins.exec", "posix.system", "torch.load",
                                            "copyreg._reconstructor", "builtins.__import__"))
    assert not isinstance(ALLOWED_GLOBALS[("builtins", "getattr")]("text", "upper"), str)  # never looks up


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing written


def _assert_one_line(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, UserError) and "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, fake_persistence, fraction):
    full = _write(tmp_path / "full.pkl", _edm_snapshot(_songunet(), ""), fake_persistence).read_bytes()
    src = tmp_path / "cut.pkl"
    src.write_bytes(full[: int(len(full) * fraction)])
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(src, tmp_path / "out")
    _assert_one_line(err)
    assert "truncated" in str(err.value) or "damaged" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pkl", "fake_modules", "full.pkl"]


def test_missing_and_non_pickle_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope.pkl", tmp_path / "out")
    text = tmp_path / "notes.pkl"
    text.write_text("these are not the weights you are looking for\n")
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(text, tmp_path / "out")
    _assert_one_line(err)
    png = tmp_path / "grid.png"  # it was said to use "persistent ids (a torch.save archive?)"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    with pytest.raises(CheckpointError, match="grid.png is not a network pickle .it does not start as one.") as err:
        convert_checkpoint(png, tmp_path / "out")
    _assert_one_line(err)
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="zip archive .as torch.save writes.") as err:
        convert_checkpoint(tmp_path / "state.pt", tmp_path / "out")
    _assert_one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wrapper, inner, message", [
    ("StyleGAN2Generator", "SongUNet", "StyleGAN2Generator"),
    ("EDMPrecond", "DhariwalUNet", r"EDMPrecond\(DhariwalUNet\)"),
    ("VPPrecond", "SongUNet", "VPPrecond"),
    ("Precond", "SongUNet", r"Precond\(SongUNet\)"),
])
def test_unsupported_networks(tmp_path, fake_persistence, wrapper, inner, message):
    snapshot = _edm_snapshot(_songunet(), "", wrapper=wrapper)
    snapshot["ema"].state["_modules"]["model"].class_name = inner
    if wrapper == "Precond":
        snapshot["ema"].state["_modules"]["unet"] = snapshot["ema"].state["_modules"]["model"]
    src = _write(tmp_path / "other.pkl", snapshot, fake_persistence)
    with pytest.raises(CheckpointError, match=message) as err:
        convert_checkpoint(src, tmp_path / "out")
    _assert_one_line(err)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_first_tensor(tmp_path, fake_persistence):
    net = _songunet()
    snapshot = _edm_snapshot(net, "")
    inner = snapshot["ema"].state["_modules"]["model"]
    layer = inner.state["_modules"]["map_layer1"]
    layer.state["_parameters"] = dict(layer.state["_parameters"], weight=nn.Parameter(torch.randn(64, 65)))
    src = _write(tmp_path / "bad.pkl", snapshot, fake_persistence)
    with pytest.raises(CheckpointError, match=r"'map_layer1.weight' has shape \[64, 65\].*\[64, 64\]") as err:
        convert_checkpoint(src, tmp_path / "out")
    _assert_one_line(err)
    assert not (tmp_path / "out").exists()


def test_recorded_options_must_match_the_weights(tmp_path, fake_persistence):
    """init_kwargs say one architecture, the tensors another: the first differing tensor is named."""
    snapshot = _edm_snapshot(_songunet(), "")
    snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"]["augment_dim"] = 0
    src = _write(tmp_path / "bad.pkl", snapshot, fake_persistence)
    with pytest.raises(CheckpointError, match="map_augment.weight"):
        convert_checkpoint(src, tmp_path / "out")

    snapshot = _edm_snapshot(_songunet(), "")
    snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"]["use_magic"] = True
    src = _write(tmp_path / "bad2.pkl", snapshot, fake_persistence)
    with pytest.raises(CheckpointError, match="use_magic"):
        convert_checkpoint(src, tmp_path / "out")


def test_existing_non_empty_dest_is_left_untouched(tmp_path, fake_persistence):
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), ""), fake_persistence)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty") as err:
        convert_checkpoint(src, dest)
    _assert_one_line(err)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "edm.pkl", "fake_modules"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_checkpoint(src, tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "x"
    with pytest.raises(CheckpointError, match="a-file is a file") as err:  # a destination below a file
        convert_checkpoint(src, tmp_path / "a-file" / "sub" / "model")
    _assert_one_line(err)
    assert (tmp_path / "a-file").read_text() == "x"


def test_snapshot_dict_without_network(tmp_path, fake_persistence):
    src = _write(tmp_path / "opts.pkl", {"loss_fn": None, "dataset_kwargs": {}}, fake_persistence)
    with pytest.raises(CheckpointError, match="'ema'"):
        convert_checkpoint(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="method"):
        convert_network({}, method="ict")


def test_converted_weights_keep_every_value(tmp_path, fake_persistence):
    """Every tensor arrives bit for bit (float32 source), and the strict load saw all of them."""
    net = _songunet(seed=11)
    src = _write(tmp_path / "edm.pkl", _edm_snapshot(net, ""), fake_persistence)
    converted = convert_network(load_pickle(src), name="edm.pkl")
    want = net.state_dict()
    got = converted.net.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert math.isclose(converted.info.sigma_data, 0.5)


def test_ectune_convert_command_and_its_errors(tmp_path, fake_persistence, capsys):
    from ectune.cli import main

    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), ""), fake_persistence)
    assert main(["convert", str(src), str(tmp_path / "out"), "--method", "edm"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    before = (tmp_path / "out" / "config.json").read_text()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").read_text() == before


def test_tune_a_converted_edm_model_with_the_cifar10_preset_in_one_command(tmp_path, fake_persistence):
    """Issue: tuning a converted EDM model is one command with the cifar10 preset and an EDM-format zip."""
    import zipfile

    from PIL import Image

    from ectune.cli import main

    src = _write(tmp_path / "edm.pkl", _edm_snapshot(_songunet(), ""), fake_persistence)
    assert main(["convert", str(src), str(tmp_path / "teacher")]) == 0
    rng = np.random.default_rng(0)
    labels = []
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for i in range(256):
            name = f"00000/img{i:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
            labels.append([name, int(i % 3)])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    run = tmp_path / "run"
    assert main(["tune", "--preset", "cifar10", "--teacher", str(tmp_path / "teacher"), "--data.path",
                 str(tmp_path / "data.zip"), "--data.use_labels", "true", "--total_nimg", "256", "--run-dir", str(run),
                 "--preview.num_images", "4", "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["ect"]["q"] == 2.0 and saved["optim"]["name"] == "radam" and saved["network"]["dropout"] == 0.2
    model = json.loads((run / "model" / "config.json").read_text())
    assert model["precond"] == {"sigma_data": 0.5, "scalings": "cm", "sigma_min": 0.003}
    assert model["network"]["kwargs"]["dropout"] == 0.2 and model["label_dim"] == 3
