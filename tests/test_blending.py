"""Weight windows and blend arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.blending import WINDOWS, Accumulator, tile_window, window_profile
from pipeline.errors import ConfigError
from pipeline.tiling import Rect


@pytest.mark.parametrize("kind", WINDOWS)
@pytest.mark.parametrize("size", [1, 2, 17, 64, 512])
def test_profiles_are_positive_symmetric_with_peak_one(kind: str, size: int) -> None:
    p = window_profile(kind, size)
    assert p.shape == (size,)
    assert (p > 0).all()
    assert p.max() == pytest.approx(1.0)
    np.testing.assert_allclose(p, p[::-1], atol=1e-12)


def test_gaussian_matches_monai_importance_map() -> None:
    from monai.data.utils import compute_importance_map

    monai = compute_importance_map((64, 64), mode="gaussian", sigma_scale=0.125).numpy()
    ours = tile_window("gaussian", 64, (False, False, False, False))
    monai = monai / monai.max()
    above_floor = monai > 2e-3  # MONAI clamps the far tails to a small floor; the shapes agree above it
    assert above_floor.mean() > 0.5
    np.testing.assert_allclose(ours[above_floor], monai[above_floor], rtol=1e-4, atol=1e-6)


def test_unknown_window_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="gaussian, cosine, linear, constant"):
        window_profile("hamming", 8)


@pytest.mark.parametrize("kind", ["gaussian", "cosine", "linear"])
def test_image_edges_are_not_down_weighted(kind: str) -> None:
    w = tile_window(kind, 64, (True, False, True, False))  # top-left tile
    assert w[0, 0] == pytest.approx(1.0)
    assert w[0, :32].min() == pytest.approx(1.0)
    assert w[-1, -1] < 0.5  # interior sides keep their taper
    centre = tile_window(kind, 64, (False, False, False, False))
    assert centre[0, 0] < 0.5


@given(seed=st.integers(0, 1000), split=st.integers(1, 47))
def test_split_accumulation_then_merge_equals_direct(seed: int, split: int) -> None:
    rng = np.random.default_rng(seed)
    region = Rect(0, 0, 48, 64)
    tiles = [(Rect(y, x, y + 16, x + 16), rng.normal(size=(3, 16, 16)).astype(np.float32))
             for y, x in rng.integers(-8, 56, size=(6, 2))]
    window = tile_window("gaussian", 16, (False,) * 4)
    direct = Accumulator.zeros(region, 3)
    top, bottom = Accumulator.zeros(Rect(0, 0, split, 64), 3), Accumulator.zeros(Rect(split, 0, 48, 64), 3)
    for rect, values in tiles:
        direct.add(values, window, rect)
        top.add(values, window, rect)
        bottom.add(values, window, rect)
    merged = Accumulator.zeros(region, 3)
    merged.merge(top)
    merged.merge(bottom)
    np.testing.assert_allclose(merged.total, direct.total, atol=1e-5)
    np.testing.assert_allclose(merged.weight, direct.weight, atol=1e-5)
    np.testing.assert_allclose(direct.crop(Rect(0, 0, split, 64)).total, top.total, atol=1e-6)


def test_normalised_is_weighted_mean_and_nan_where_uncovered() -> None:
    acc = Accumulator.zeros(Rect(0, 0, 4, 8), 1)
    ones = np.ones((4, 4), np.float32)
    acc.add(np.full((1, 4, 4), 2.0, np.float32), ones, Rect(0, 0, 4, 4))
    acc.add(np.full((1, 4, 4), 4.0, np.float32), 3 * ones, Rect(0, 2, 4, 6))
    out = acc.normalised()
    assert out[0, 0, 0] == 2.0
    assert out[0, 0, 2] == pytest.approx((2 + 12) / 4)
    assert out[0, 0, 5] == 4.0
    assert np.isnan(out[0, 0, 7])
    spent = acc.normalised(in_place=True)
    assert spent is acc.total
    np.testing.assert_array_equal(spent, out)
