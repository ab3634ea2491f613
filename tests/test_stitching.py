"""Tile blending inside one worker: the read-ahead gives the same sums as reading in line."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.inference import InferenceOptions, Predictor
from pipeline.models.bundle import ModelBundle
from pipeline.sources import open_source
from pipeline.stitching import blend_tiles, prefetched
from pipeline.tiling import Rect, TileGrid
from tests.conftest import make_bundle, smooth_image, write_geotiff


def test_prefetched_keeps_order_loads_one_ahead_and_raises_errors() -> None:
    started: list[int] = []

    def load(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        if i == 3:
            raise ValueError("bad item 3")
        return i * 10

    with ThreadPoolExecutor(1) as pool:
        got = prefetched(load, range(5), pool)
        assert next(got) == 0
        assert started == [0, 1]  # item 1 was already loading while item 0 was used
        assert [next(got), next(got)] == [10, 20]
        with pytest.raises(ValueError, match="bad item 3"):
            next(got)
    assert list(prefetched(load, range(3), None)) == [0, 10, 20]


def test_read_ahead_blends_the_same_sums(tmp_path: Path) -> None:
    source = open_source(str(write_geotiff(tmp_path / "s.tif", smooth_image(300, 260, seed=5))))
    predictor = Predictor(ModelBundle.load(make_bundle(tmp_path / "b.bundle", tile=64, overlap=16)),
                          InferenceOptions(device="cpu", batch_size=3))
    grid = TileGrid(source.height, source.width, 64, 16)
    tiles = list(grid)
    regions = [Rect(0, 0, 150, 260), Rect(150, 0, 300, 260)]
    inline = blend_tiles(tiles, regions, grid, source, predictor, "gaussian")
    with ThreadPoolExecutor(1) as reader:
        ahead = blend_tiles(tiles, regions, grid, source, predictor, "gaussian", reader)
    for a, b in zip(inline, ahead, strict=True):
        np.testing.assert_array_equal(a.normalised(), b.normalised())


def test_entropy_is_normalised_and_agrees_for_logits_and_probabilities() -> None:
    from scipy.special import softmax

    from pipeline.stitching import entropy, mask_dtype, summarise

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 16, 16)) * rng.uniform(0, 6, size=(1, 16, 16))).astype(np.float32)
    logits[:, 0, 0] = 0  # uniform: entropy 1
    logits[:, 0, 1] = [50, 0, 0, 0, 0]  # certain: entropy 0
    logits[:, 1, 1] = np.nan  # nodata
    p = softmax(logits.astype(np.float64), axis=0)
    direct = -(p * np.log(np.where(p > 0, p, 1))).sum(0) / np.log(5)
    for kind, scores in (("logits", logits), ("probabilities", p.astype(np.float32))):
        h = entropy(scores, kind)
        assert h.dtype == np.float32 and np.isnan(h[1, 1]) and abs(h[0, 0] - 1) < 1e-6 and h[0, 1] < 1e-6
        np.testing.assert_allclose(h, direct, atol=1e-5)
    assert entropy(logits[:1], "logits")[0, 0] == 0  # one class: nothing to be unsure of
    mask, _ = summarise(np.pad(logits, ((297, 0), (0, 0), (0, 0)), constant_values=-9), "logits")
    assert mask.dtype == mask_dtype(302) == np.uint16 and mask[1, 1] == 65535
    np.testing.assert_array_equal(mask[2:], 297 + logits[:, 2:].argmax(0))
