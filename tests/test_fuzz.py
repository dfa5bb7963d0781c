"""Fuzz-style tests: malformed inputs to every loader and to the config parser.

Each case is drawn from a seeded generator, so a failure names a case that replays exactly
(``FUZZ_SEED`` below). The contract checked is the one of ``ectune.errors``: a load or parse either
succeeds (and then yields a well-formed result) or raises :class:`UserError` with a message; any
other exception type, or a case running longer than :data:`CASE_SECONDS`, is a failure.

Mutations: truncation, random byte flips, inserted and deleted runs, duplicated runs, wrong shapes
and dtypes, NaN / infinite values, absurd dimensions (which must be refused without allocating
them), labels out of range, and random JSON values, types and keys for the config.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import pickle
import random
import signal
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ectune import config as C
from ectune.data import MAX_LABEL_DIM, ArrayDataset, load_dataset
from ectune.errors import UserError

FUZZ_SEED = 20261122
CASE_SECONDS = 10.0
"""A single case that runs longer than this counts as a hang."""


# ---------------------------------------------------------------------------------------------
# The contract.


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise _Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(case: str, fn: Callable[[], object]) -> object | UserError:
    """Run one case: its result, or the UserError it raised. Anything else fails the test, naming the case."""
    try:
        with _deadline(CASE_SECONDS):
            return fn()
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), f"{case}: a UserError must be one line, got {e!r}"
        return e
    except _Hang:
        pytest.fail(f"{case}: hangs (more than {CASE_SECONDS} s)")
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: raised {type(e).__name__}: {e} (expected success or a UserError)")


def check_dataset(case: str, ds: object) -> None:
    """What a successful load must give: a non-empty ArrayDataset with valid values and labels."""
    assert isinstance(ds, ArrayDataset), case
    assert len(ds) >= 1 and all(s >= 1 for s in ds.shape), f"{case}: empty dataset {tuple(ds.data.shape)} accepted"
    if not ds.is_image:
        assert bool(np.isfinite(ds.data.numpy()).all()), f"{case}: non-finite vectors accepted"
    if ds.labels is not None:
        assert 1 <= ds.label_dim <= MAX_LABEL_DIM, case
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < ds.label_dim, f"{case}: labels out of range"


def load_case(case: str, *args, **kw) -> object | UserError:
    result = outcome(case, lambda: load_dataset(*args, **kw))
    if not isinstance(result, UserError):
        check_dataset(case, result)
    return result


# ---------------------------------------------------------------------------------------------
# Byte-level mutations.


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random damage to a file's bytes: (what was done, the damaged bytes)."""
    n = len(raw)
    kind = rng.choice(["truncate", "flip", "flip", "zero", "insert", "delete", "duplicate", "header"])
    if kind == "truncate":
        cut = rng.randrange(n)
        return f"truncate at {cut}/{n}", raw[:cut]
    b = bytearray(raw)
    if kind == "flip":
        flips = rng.randint(1, 8)
        for _ in range(flips):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return f"{flips} bit flips", bytes(b)
    if kind == "header":  # damage the first 64 bytes, where sizes and magic numbers live
        i = rng.randrange(min(n, 64))
        b[i] = rng.randrange(256)
        return f"byte {i} := {b[i]}", bytes(b)
    i = rng.randrange(n)
    k = rng.randint(1, 64)
    if kind == "zero":
        b[i:i + k] = bytes(len(b[i:i + k]))
        return f"zero {k} bytes at {i}", bytes(b)
    if kind == "insert":
        return f"insert {k} random bytes at {i}", raw[:i] + rng.randbytes(k) + raw[i:]
    if kind == "delete":
        return f"delete {k} bytes at {i}", raw[:i] + raw[i + k:]
    return f"duplicate {k} bytes at {i}", raw[:i + k] + raw[i:]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_with_header(width: int, height: int, mode_bits: tuple[int, int] = (8, 0), idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims any size (e.g. absurd ones), with whatever IDAT data is given."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, mode_bits[0], mode_bits[1], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(idat))
            + chunk(b"IEND", b""))


def random_images(rng: random.Random, count: int, size: int = 8, channels: int = 1) -> list[bytes]:
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    shape = (size, size) if channels == 1 else (size, size, channels)
    return [png_bytes(nrng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# PNG folders, zips and dataset.json.


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 9, 10, 2**31, 2**63, 2**70, -(2**70), MAX_LABEL_DIM, MAX_LABEL_DIM - 1])
    if kind == 3:
        return rng.choice([0.0, 1.5, -2.0, 1e308, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", "a.png", "img0.png", "0", "\u00e9\u4e2d", "../a.png", "x" * 300])
    if kind == 5:
        return rng.choice([[], {}, [[]], [None, None]])
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {rng.choice(["labels", "label", "x", ""]): random_json(rng, depth + 1) for _ in range(rng.randint(0, 2))}
    return [[rng.choice(["img0.png", "img1.png", "img2.png", "missing.png"]), random_json(rng, depth + 1)]
            for _ in range(rng.randint(0, 4))]


def dataset_json_case(rng: random.Random, names: list[str]) -> tuple[str, bytes]:
    """A dataset.json: mostly structurally right with one bad label, or random JSON, or damaged bytes."""
    kind = rng.randrange(6)
    good = {"labels": [[n, i % 3] for i, n in enumerate(names)]}
    if kind == 0:
        entries = good["labels"]
        victim = rng.randrange(len(entries))
        bad = rng.choice([-1, MAX_LABEL_DIM, 2**63, 2**70, -(2**70), 1.0, "1", None, True, [1], float("nan")])
        entries[victim][1] = bad
        return f"label {bad!r} for {entries[victim][0]}", json.dumps(good).encode()
    if kind == 1:
        return "random JSON", json.dumps(random_json(rng)).encode()
    if kind == 2:
        what, raw = mutate(json.dumps(good).encode(), rng)
        return f"dataset.json: {what}", raw
    if kind == 3:
        depth = rng.choice([1000, 100_000])
        return f"nested {depth} deep", b"[" * depth + b"]" * rng.choice([0, depth])
    if kind == 4:
        return "not UTF-8", b'{"labels": [["img0.png", 0]]}\xff\xfe'
    return "labels missing for one image", json.dumps({"labels": good["labels"][1:]}).encode()


def image_set_case(rng: random.Random) -> tuple[str, dict[str, bytes]]:
    """Files of a small image dataset (name -> bytes), with one kind of damage."""
    channels = rng.choice([1, 3])
    images = random_images(rng, 3, channels=channels)
    files = {f"img{i}.png": raw for i, raw in enumerate(images)}
    kind = rng.randrange(7)
    victim = f"img{rng.randrange(3)}.png"
    if kind in (0, 1, 2):
        what, files[victim] = mutate(files[victim], rng)
        desc = f"{victim}: {what}"
    elif kind == 3:
        size = rng.choice([4, 9, 16])
        other = rng.choice([1, 3])
        files[victim] = random_images(rng, 1, size=size, channels=other)[0]
        desc = f"{victim}: {size}x{size}x{other} among 8x8x{channels}"
    elif kind == 4:
        w, h = rng.choice([(60_000, 60_000), (2**31 - 1, 1), (1, 2**31 - 1), (20_000, 20_000), (0, 8), (8, 0)])
        files[victim] = png_with_header(w, h)
        desc = f"{victim}: IHDR claims {w}x{h}"
    elif kind == 5:
        files[victim] = rng.choice([b"", b"\x89PNG\r\n\x1a\n", rng.randbytes(100), b"GIF89a" + rng.randbytes(40)])
        desc = f"{victim}: {len(files[victim])} bytes of junk"
    else:
        desc = "intact images"
    if rng.random() < 0.5:
        what, files["dataset.json"] = dataset_json_case(rng, sorted(n for n in files if n.endswith(".png")))
        desc += f"; dataset.json: {what}"
    return desc, files


def test_fuzz_png_folders(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED + 1)
    errors = 0
    for i in range(120):
        desc, files = image_set_case(rng)
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for name, raw in files.items():
            (folder / name).write_bytes(raw)
        use_labels = "dataset.json" in files and rng.random() < 0.8
        max_items = rng.choice([None, None, 1, 2, 5])
        result = load_case(f"folder case {i} ({desc}, use_labels={use_labels}, max_items={max_items})",
                           "folder:" + str(folder), use_labels=use_labels, max_items=max_items)
        errors += isinstance(result, UserError)
    assert errors >= 40, "the cases should mostly be refused: is the fuzzing still damaging the files?"


def test_fuzz_zips(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED + 2)
    errors = 0
    for i in range(100):
        desc, files = image_set_case(rng)
        buf = io.BytesIO()
        method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
        with zipfile.ZipFile(buf, "w", compression=method) as z:
            for name, raw in files.items():
                z.writestr(name, raw)
        raw = buf.getvalue()
        if rng.random() < 0.5:  # damage the archive itself (directory, local headers, compressed data)
            what, raw = mutate(raw, rng)
            desc += f"; zip: {what}"
        file = tmp_path / f"case{i}.zip"
        file.write_bytes(raw)
        use_labels = "dataset.json" in files and rng.random() < 0.8
        result = load_case(f"zip case {i} ({desc}, use_labels={use_labels})", str(file), use_labels=use_labels)
        errors += isinstance(result, UserError)
    assert errors >= 20


# ---------------------------------------------------------------------------------------------
# .npz files.


def npy_with_header(shape: tuple[int, ...], dtype: str = "<f4", payload: bytes = b"") -> bytes:
    """An .npy member whose header claims ``shape`` (absurd ones included) over ``payload``."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def npz_case(rng: random.Random) -> tuple[str, bytes, bool]:
    """(description, .npz bytes, use_labels)."""
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    n = rng.choice([1, 3, 8])
    vectors = rng.random() < 0.4
    x = nrng.standard_normal((n, 2)).astype(np.float32) if vectors else nrng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    arrays: dict[str, np.ndarray] = {rng.choice(["x", "images"]): x}
    labels = nrng.integers(0, 5, n)
    use_labels = rng.random() < 0.5
    if use_labels:
        arrays[rng.choice(["labels", "y"])] = labels
    kind = rng.randrange(9)
    desc = ""
    if kind == 0:  # wrong shapes
        shape = rng.choice([(n,), (n, 2, 2, 2, 2), (0, 2), (n, 0), (n, 2, 8, 8), (n, 8, 8, 5), (n, 1, 0, 8), ()])
        key = next(iter(arrays))
        arrays[key] = np.zeros(shape, rng.choice([np.uint8, np.float32]))
        desc = f"data of shape {shape}"
    elif kind == 1:  # wrong dtypes
        dtype = rng.choice([np.float16, np.float64, np.int16, np.int64, np.uint16, np.bool_, np.complex64, "U3", "S2",
                            np.dtype([("a", "<i4")])])
        key = next(iter(arrays))
        arrays[key] = np.zeros(x.shape, dtype) if np.dtype(dtype).kind != "b" else np.ones(x.shape, dtype)
        if np.dtype(dtype).kind in "iu":
            arrays[key] = arrays[key] + rng.choice([0, 255, 256, 70_000])
        desc = f"data as {np.dtype(dtype)}"
    elif kind == 2:  # NaN / infinite / overflowing values
        value = rng.choice([np.nan, np.inf, -np.inf, 1e39, -1e300])
        v = nrng.standard_normal((n, 2)).astype(np.float64)
        v[rng.randrange(n), rng.randrange(2)] = value
        arrays = {"x": v}
        use_labels = False
        desc = f"vector value {value}"
    elif kind == 3:  # labels out of range, wrong shape or type
        bad = rng.choice([np.array([-1] + [0] * (n - 1)), np.array([MAX_LABEL_DIM] * n), np.array([2**63 - 1] * n),
                          np.array([2**64 - 1] * n, np.uint64), labels.astype(np.float32), labels[:-1] if n > 1 else labels[:0],
                          labels.reshape(-1, 1), np.array(["a"] * n), np.ones(n, bool), np.array([np.nan] * n)])
        arrays.pop("labels", None)
        arrays.pop("y", None)
        arrays["labels"] = bad
        use_labels = True
        desc = f"labels {bad.dtype} {bad.shape} {bad.ravel()[:2]}"
    elif kind == 4:  # two data arrays, none, or both label names
        arrays = rng.choice([{"x": x, "images": x}, {"data": x}, {"x": x, "labels": labels, "y": labels}, {}])
        use_labels = True
        desc = f"arrays {sorted(arrays)}"
    elif kind == 5:  # object arrays (would need pickle)
        arrays["x"] = np.array([{"a": 1}, None], dtype=object)
        arrays.pop("images", None)
        desc = "object array"
    buf = io.BytesIO()
    np.savez(buf, **arrays) if kind != 5 else np.savez(buf, allow_pickle=True, **arrays)  # type: ignore[call-overload]
    raw = buf.getvalue()
    if kind == 6:  # damage the bytes
        what, raw = mutate(raw, rng)
        desc = f"npz bytes: {what}"
    elif kind == 7:  # an .npy member claiming absurd dimensions over little or no data
        shape = rng.choice([(10**7, 10**6), (2**40,), (10**9, 1, 1000, 1000), (3, 2**62), (-1, 2)])
        dtype = rng.choice(["<f4", "|u1", "<f8"])
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as z:
            z.writestr("x.npy", npy_with_header(shape, dtype, rng.randbytes(rng.choice([0, 64]))))
        raw = zbuf.getvalue()
        use_labels = False
        desc = f"x.npy header claims {shape} {dtype}"
    elif kind == 8:
        desc = "intact"
    return desc, raw, use_labels


def test_fuzz_npz(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED + 3)
    errors = 0
    for i in range(90):
        desc, raw, use_labels = npz_case(rng)
        file = tmp_path / f"case{i}.npz"
        file.write_bytes(raw)
        max_items = rng.choice([None, 2])
        result = load_case(f"npz case {i} ({desc}, use_labels={use_labels})", str(file), use_labels=use_labels,
                           max_items=max_items)
        errors += isinstance(result, UserError)
    assert errors >= 30


# ---------------------------------------------------------------------------------------------
# MNIST's pickle, read by the restricted unpickler.


class _Reduce:
    """Pickles as ``func(*args)``: hand-made payloads for the unpickler."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _reconstruct():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


def mnist_case(rng: random.Random) -> tuple[str, bytes]:
    nrng = np.random.default_rng(rng.randrange(1 << 30))

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (nrng.integers(0, 256, (n, 784)) / 256).astype(np.float32), nrng.integers(0, 10, n)

    parts = [list(part(n)) for n in (4, 2, 2)]
    kind = rng.randrange(8)
    desc = "intact"
    payload: object = None
    if kind == 1:
        value = rng.choice([np.nan, np.inf, -np.inf, -5.0, 300.0])
        parts[0][0][rng.randrange(4), rng.randrange(784)] = value
        desc = f"pixel {value}"
    elif kind == 2:
        bad = rng.choice([-1, MAX_LABEL_DIM, 2**40])
        parts[0][1] = np.array([bad, 0, 0, 0])
        desc = f"label {bad}"
    elif kind == 3:
        shape = rng.choice([(4, 783), (4, 28, 28), (4,), (0, 784)])
        parts[rng.randrange(3)][0] = np.zeros(shape, np.float32)
        desc = f"images of shape {shape}"
    elif kind == 4:
        dtype = rng.choice([np.uint8, np.int64, np.float16, np.complex64, np.bool_])
        parts[0][0] = parts[0][0].astype(dtype)
        desc = f"images as {np.dtype(dtype)}"
    elif kind == 5:  # absurd sizes asked of numpy's constructors by a crafted file
        shape = rng.choice([(10**7, 784), (2**40,), (10**12, 784), (3, 2**61)])
        payload = rng.choice([_Reduce(_reconstruct(), np.ndarray, shape, np.dtype("f4")),
                              _Reduce(np.ndarray, shape, np.dtype("f4"))])
        desc = f"constructor asked for {shape}"
    elif kind == 6:
        payload = rng.choice([None, 5, "x", [1, 2, 3], {"a": np.zeros(3)}, ((np.zeros(3), np.zeros(3)),) * 3,
                              tuple(tuple(p) for p in parts[:2]), np.zeros((3, 2))])
        desc = f"structure {type(payload).__name__}"
    data = payload if kind in (5, 6) else tuple(tuple(p) for p in parts)
    raw = pickle.dumps(data, protocol=rng.choice([2, 4, 5]))
    if kind == 7:
        what, raw = mutate(raw, rng)
        desc = f"pickle bytes: {what}"
    if rng.random() < 0.5:
        raw = gzip.compress(raw, mtime=0)
        if rng.random() < 0.3:
            what, raw = mutate(raw, rng)
            desc += f"; gzip bytes: {what}"
    return desc, raw


def test_fuzz_mnist_pickle(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED + 4)
    errors = 0
    for i in range(100):
        desc, raw = mnist_case(rng)
        file = tmp_path / f"case{i}.pkl.gz"
        file.write_bytes(raw)
        use_labels = rng.random() < 0.5
        split = rng.choice(["train", "val", "all"])
        result = load_case(f"mnist case {i} ({desc})", "mnist", path=file, use_labels=use_labels, split=split)
        errors += isinstance(result, UserError)
        if "pixel" in desc and split != "val":  # the bad pixel is in the train part
            assert isinstance(result, UserError), f"mnist case {i} ({desc}): accepted pixels outside [0, 1)"
    assert errors >= 25


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST's IDX files, via path=.


def idx_bytes(array: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_fuzz_idx(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED + 5)
    errors = 0
    for i in range(60):
        nrng = np.random.default_rng(rng.randrange(1 << 30))
        n = rng.choice([1, 3, 5])
        images = nrng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = nrng.integers(0, 10, n, dtype=np.uint8)
        files = {"train-images-idx3-ubyte": idx_bytes(images), "train-labels-idx1-ubyte": idx_bytes(labels)}
        kind = rng.randrange(6)
        target = rng.choice(sorted(files))
        desc = "intact"
        if kind in (0, 1):
            what, files[target] = mutate(files[target], rng)
            desc = f"{target}: {what}"
        elif kind == 2:  # a header claiming absurd dimensions over the real data
            dims = rng.choice([(2**32 - 1, 28, 28), (n, 2**31, 2**31), (0, 28, 28), (n, 0, 28), (n * 784,), (n, 28, 28, 1)])
            raw = files["train-images-idx3-ubyte"]
            files["train-images-idx3-ubyte"] = (b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
                                                 + raw[16:])
            desc = f"images header claims {dims}"
        elif kind == 3:
            count = rng.choice([0, n - 1, n + 1])
            files["train-labels-idx1-ubyte"] = idx_bytes(nrng.integers(0, 10, count, dtype=np.uint8))
            desc = f"{count} labels for {n} images"
        elif kind == 4:
            magic = rng.choice([b"\0\0\x09\x03", b"\x01\0\x08\x03", b"\0\0\x08\xff", b"\0\0\x08"])
            files[target] = magic + files[target][4:]
            desc = f"{target}: magic {magic!r}"
        if rng.random() < 0.4:
            target = rng.choice(sorted(files))
            files[target + ".gz"] = gzip.compress(files.pop(target), mtime=0)
        if rng.random() < 0.1:
            files.pop(rng.choice(sorted(files)))
            desc += "; a file missing"
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for name, raw in files.items():
            (folder / name).write_bytes(raw)
        use_labels = rng.random() < 0.6
        result = load_case(f"idx case {i} ({desc}, use_labels={use_labels})", "fashion-mnist", path=folder,
                           use_labels=use_labels)
        errors += isinstance(result, UserError)
    assert errors >= 15


# ---------------------------------------------------------------------------------------------
# The config parser: from_dict, apply_overrides, validate.

_DEFAULTS = {key: default for key, _tp, _help, default in C.iter_options(C.TrainConfig)}
_OPTIONS = sorted(_DEFAULTS)
_SECTIONS = sorted({key.split(".")[0] for key in _OPTIONS if "." in key})


def config_value(rng: random.Random, depth: int = 0) -> object:
    pool: list[Callable[[], object]] = [
        lambda: None, lambda: rng.choice([True, False]),
        lambda: rng.choice([0, 1, -1, 3, 64, 128, 2**31, 2**63, 10**30, 10**400, -(10**400)]),
        lambda: rng.choice([0.0, -0.0, 0.5, 1e-4, 1.5, -3.0, 1e308, float("nan"), float("inf"), float("-inf")]),
        lambda: rng.choice(["", "nan", "inf", "-inf", "1e400", "1" * 400, "abc", "true", "none", "null", "[1, 2",
                            "{", "[0.9, 0.999]", '{"dim": 2}', "1,2,3", "0x10", "\u00e9\u4e2d", "edm", "cm", "mlp",
                            "[" * 50_000, '{"a": ' * 50_000]),
    ]
    if depth < 2:
        pool += [lambda: [config_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                 lambda: {rng.choice(_OPTIONS + ["x", "dim"]).split(".")[-1]: config_value(rng, depth + 1)
                          for _ in range(rng.randint(0, 3))}]
    return rng.choice(pool)()


def plausible_value(rng: random.Random, key: str) -> object:
    """A value of the option's own type (its default, as given or as a string), so that cases reach validate."""
    default = _DEFAULTS.get(key)
    if isinstance(default, tuple):
        default = list(default)
    return rng.choice([default, json.dumps(default) if not isinstance(default, str) else default])


def config_key(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.7:
        return rng.choice(_OPTIONS)
    if r < 0.8:
        return "network.kwargs." + rng.choice(["dim", "hidden_dim", "model_channels", "dropout", "x"])
    return rng.choice(["nope", "data.nope", "ema.beta.x", "batch.x", "data", "ect", "", ".", "a..b", "schema_version",
                       "network.kwargs", "network", rng.choice(_SECTIONS) + ".", "__class__", "data.__dict__"])


def nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return out


def test_fuzz_config_from_dict_and_validate() -> None:
    rng = random.Random(FUZZ_SEED + 6)
    accepted = 0
    for i in range(150):
        keys = [config_key(rng) for _ in range(rng.randint(1, 4))]
        flat = {k: config_value(rng) if j == 0 or rng.random() < 0.3 else plausible_value(rng, k)
                for j, k in enumerate(keys)}
        data: object = nest(flat)
        if rng.random() < 0.1:
            data = config_value(rng)  # not even an object
        base = C.preset(rng.choice(list(C.PRESETS)[:3]), rng.choice(["edm", "ict"])) if rng.random() < 0.8 else None
        case = f"from_dict case {i}: {str(data)[:200]}"
        cfg = outcome(case, lambda: C.from_dict(C.TrainConfig, data, base=base))  # type: ignore[arg-type]
        if isinstance(cfg, UserError):
            continue
        assert isinstance(cfg, C.TrainConfig), case
        result = outcome(case + " (validate)", lambda: C.validate(cfg))
        if not isinstance(result, UserError):
            accepted += 1
            assert_finite_numbers(case, cfg)
    assert accepted >= 5, "some random configs should pass: is the fuzzing still reaching validate?"


def test_fuzz_config_overrides_and_validate() -> None:
    rng = random.Random(FUZZ_SEED + 7)
    accepted = 0
    for i in range(150):
        overrides = {}
        for _ in range(rng.randint(1, 4)):
            value = config_value(rng)
            if rng.random() < 0.6:  # as the command line gives them: strings
                value = json.dumps(value) if not isinstance(value, str) and rng.random() < 0.5 else str(value)
            overrides[config_key(rng)] = value
        base = C.preset(rng.choice(list(C.PRESETS)[:3]), rng.choice(["edm", "ict"]))
        case = f"apply_overrides case {i}: {str(overrides)[:200]}"
        cfg = outcome(case, lambda: C.apply_overrides(base, overrides))
        if isinstance(cfg, UserError):
            continue
        result = outcome(case + " (validate)", lambda: C.validate(cfg))
        if not isinstance(result, UserError):
            accepted += 1
            assert_finite_numbers(case, cfg)
            # an accepted config survives its own JSON round trip
            again = outcome(case + " (round trip)", lambda: C.from_dict(C.TrainConfig, json.loads(C.to_json(cfg))))
            assert again == cfg, case
    assert accepted >= 10


def assert_finite_numbers(case: str, cfg: object) -> None:
    """A config that validates holds no NaN or infinite option (kwargs of the backbone aside)."""
    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and prefix + k != "network.kwargs":
                walk(v, prefix + k + ".")
            for x in (v if isinstance(v, list) else [v]):
                assert not (isinstance(x, float) and not math.isfinite(x)), f"{case}: {prefix}{k} = {v} accepted"
    walk(C.to_dict(cfg), "")


def test_fuzz_presets_and_unknown_names() -> None:
    rng = random.Random(FUZZ_SEED + 8)
    for i in range(30):
        name = rng.choice([*C.PRESETS, "", "MNIST", "toy", "cifar-10", "\u00e9"])
        method = rng.choice([*C.METHODS, "", "ECT", "diffusion"])
        outcome(f"preset case {i}: {name!r} {method!r}", lambda: C.preset(name, method))


# ---------------------------------------------------------------------------------------------
# The faults the fuzzing found, pinned down one by one.


def test_found_deep_json_and_huge_labels_in_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "img0.png").write_bytes(random_images(random.Random(0), 1)[0])
    for raw, fragment in [(b"[" * 100_000, "not valid JSON"),
                          (json.dumps({"labels": [["img0.png", 2**70]]}).encode(), "out of range")]:
        (tmp_path / "dataset.json").write_bytes(raw)
        with pytest.raises(UserError, match=fragment):
            load_dataset("folder:" + str(tmp_path), use_labels=True)


def test_found_empty_and_overflowing_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "inf.npz", x=np.array([[1e39, 0.0]]))  # finite in float64, inf in float32
    np.savez(tmp_path / "flat.npz", x=np.zeros((3, 0), np.float32))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, np.uint8)))
    with pytest.raises(UserError, match="infinite"):
        load_dataset(str(tmp_path / "inf.npz"))
    with pytest.raises(UserError, match="holds no data"):
        load_dataset(str(tmp_path / "flat.npz"))
    with pytest.raises(UserError, match="holds no data"):
        load_dataset("fashion-mnist", path=tmp_path, use_labels=True)


def test_found_pickles_that_ask_numpy_for_memory_they_do_not_hold(tmp_path: Path) -> None:
    """A few hundred bytes must not make the loader allocate (and then copy) hundreds of megabytes."""
    shape = (200_000, 784)  # 627 MB of float32
    for images in [_Reduce(_reconstruct(), np.ndarray, shape, np.dtype("f4")), _Reduce(np.ndarray, shape, np.dtype("f4"))]:
        labels = _Reduce(np.ndarray, (shape[0],), np.dtype("i8"))
        small = (np.zeros((1, 784), np.float32), np.zeros(1, np.int64))
        (tmp_path / "m.pkl").write_bytes(pickle.dumps(((images, labels), small, small), protocol=2))
        with pytest.raises(UserError, match="refusing"):
            load_dataset("mnist", path=tmp_path / "m.pkl")


def test_found_image_folder_larger_than_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i, raw in enumerate(random_images(random.Random(0), 2)):
        (tmp_path / f"img{i}.png").write_bytes(raw)
    real_empty = np.empty

    def no_memory(shape, *args, **kw):
        if len(shape) == 4:  # the (N, C, H, W) array of all images
            raise MemoryError
        return real_empty(shape, *args, **kw)

    monkeypatch.setattr(np, "empty", no_memory)
    with pytest.raises(UserError, match="GB of memory"):
        load_dataset("folder:" + str(tmp_path))


def test_found_config_values_beyond_float_and_non_objects() -> None:
    for data, fragment in [({"batch": 10**400, "total_nimg": 10**400}, None), ({"optim": {"lr": 10**400}}, "number"),
                           ([1, 2], "JSON object"), (None, "JSON object"), ({"optim": {"lr": "nan"}}, "finite"),
                           ({"ema": {"stds": [0.05, "inf"]}}, "finite"), ({"network": {"kwargs": "[" * 50_000}}, "object")]:
        base = C.preset("toy2d", "edm")
        if fragment is None:
            C.validate(C.from_dict(C.TrainConfig, data, base=base))  # huge but exact integers are fine
            continue
        with pytest.raises(UserError, match=fragment):
            C.validate(C.from_dict(C.TrainConfig, data, base=base))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="nested too deeply"):
        C.apply_overrides(C.preset("toy2d", "edm"), {"network.kwargs.dim": "[" * 50_000})
