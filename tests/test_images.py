"""Tests for ectune.images: grid layout, PNG writing and side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.images import grid, save_png, side_by_side


def _constant_images(n: int, c: int = 3, h: int = 3, w: int = 4) -> torch.Tensor:
    """n uint8 images (n, c, h, w), image i filled with the value 10 * (i + 1) (never 255)."""
    values = torch.arange(1, n + 1, dtype=torch.uint8) * 10
    return values.view(n, 1, 1, 1).expand(n, c, h, w).contiguous()


@pytest.mark.parametrize("nrow, pad, cols", [(2, 2, 2), (4, 1, 4), (None, 3, 3)])  # None: ceil(sqrt(5)) columns
def test_grid_places_image_i_at_row_i_div_cols_column_i_mod_cols_in_a_white_border(nrow, pad, cols):
    """Image i sits at (i // cols, i % cols) with nrow columns; everything else (border, gaps, empty slots) is 255."""
    n, c, h, w = 5, 3, 3, 4
    out = grid(_constant_images(n, c, h, w), nrow=nrow, pad=pad)
    rows = -(-n // cols)
    assert out.dtype == np.uint8 and out.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, c)
    covered = np.zeros(out.shape[:2], dtype=bool)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        assert (out[top : top + h, left : left + w] == 10 * (i + 1)).all(), i
        covered[top : top + h, left : left + w] = True
    assert (out[~covered] == 255).all()
    assert covered.sum() == n * h * w


def test_grid_keeps_pixels_and_channels_in_place():
    """A random image comes back untransposed: pixel (y, x) of channel k lands at out[pad + y, pad + x, k]."""
    img = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = grid(img, pad=2)
    np.testing.assert_array_equal(out[2:7, 2:9], img[0].permute(1, 2, 0).numpy())
    with pytest.raises(TypeError, match="uint8"):
        grid(img.float())


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_reads_back_bit_exact(tmp_path: Path, channels: int):
    """An (H, W, C) uint8 array written as PNG reads back with the same values in the same channel order."""
    array = np.random.default_rng(channels).integers(0, 256, (6, 9, channels), dtype=np.uint8)
    save_png(array, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == ("RGB" if channels == 3 else "L")
        back = np.asarray(im)
    np.testing.assert_array_equal(back.reshape(array.shape), array)


def test_save_png_scale_repeats_each_pixel(tmp_path: Path):
    """scale=2 doubles both sides, each pixel becoming a 2x2 block (nearest neighbour)."""
    array = np.random.default_rng(5).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    save_png(array, tmp_path / "big.png", scale=2)
    with Image.open(tmp_path / "big.png") as im:
        assert im.size == (14, 8)
        back = np.asarray(im)
    np.testing.assert_array_equal(back, array.repeat(2, axis=0).repeat(2, axis=1))


def test_side_by_side_puts_gaps_only_between_panels():
    """Width = sum of the panel widths + gap * (panels - 1); gaps and the padding under a short panel are white."""
    gen = np.random.default_rng(6)
    panels = [gen.integers(0, 255, (5, w, 3), dtype=np.uint8) for w in (3, 6, 4)]
    panels[1] = panels[1][:3]  # shorter: padded with white at the bottom
    out = side_by_side(panels, gap=8)
    assert out.shape == (5, 3 + 6 + 4 + 2 * 8, 3)
    np.testing.assert_array_equal(out[:, 0:3], panels[0])
    assert (out[:, 3:11] == 255).all()
    np.testing.assert_array_equal(out[:3, 11:17], panels[1])
    assert (out[3:, 11:17] == 255).all()
    assert (out[:, 17:25] == 255).all()
    np.testing.assert_array_equal(out[:, 25:29], panels[2])
    np.testing.assert_array_equal(side_by_side(panels[:1], gap=8), panels[0])
