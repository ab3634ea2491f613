"""Truth read by window: label rasters (on the grid or scaled onto it) and polygons, as the whole would be."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
from rasterio.transform import Affine

from pipeline.training import truth as truth_module
from pipeline.training.truth import PolygonTruth, RasterTruth


def write(path: Path, labels: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", height=labels.shape[0], width=labels.shape[1], count=1,
                       dtype="uint8") as dst:
        dst.write(labels[None])
    return path


def test_a_label_raster_at_another_size_is_scaled_by_nearest_neighbour(tmp_path: Path) -> None:
    # A mask at a quarter of the image's size: each mask pixel covers 4 x 4 image pixels.
    mask = np.random.default_rng(0).integers(0, 4, (50, 60), dtype=np.uint8)
    truth = RasterTruth(str(write(tmp_path / "mask.tif", mask)), (200, 240), label_map={3: 255})
    expected = np.where(mask == 3, 255, mask).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(truth.read(0, 0, 200, 240), expected)
    np.testing.assert_array_equal(truth.read(37, 101, 50, 70), expected[37:87, 101:171])
    again = pickle.loads(pickle.dumps(truth))  # as a data-loader process or a Ray worker gets it
    np.testing.assert_array_equal(again.read(8, 8, 16, 16), expected[8:24, 8:24])


def test_polygons_burnt_window_by_window_equal_the_whole_burnt_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    transform = Affine(0.5, 0, 1000, 0, -0.5, 2000)  # image pixels to the polygons' coordinates
    shapes = []
    for _ in range(60):
        x, y = 1000 + rng.uniform(0, 150), 2000 - rng.uniform(0, 100)
        size = rng.uniform(1, 12)
        ring = [[x, y], [x + size, y], [x + size, y - size / 2], [x, y - size], [x, y]]
        shapes.append(({"type": "Polygon", "coordinates": [ring]}, int(rng.integers(1, 4))))
    whole = rasterio.features.rasterize(shapes, out_shape=(200, 300), transform=transform, fill=0, dtype="uint8")
    truth = PolygonTruth(shapes, transform, key="test")
    tiled = np.zeros_like(whole)
    for y in range(0, 200, 64):
        for x in range(0, 300, 48):
            h, w = min(64, 200 - y), min(48, 300 - x)
            tiled[y : y + h, x : x + w] = truth.read(y, x, h, w)
    assert whole.any() and len(np.unique(whole)) == 4
    np.testing.assert_array_equal(tiled, whole)
    # Burnt in a grid of small tiles, cached (two at most here, so most are burnt again): any window,
    # across tiles and past the edges, is the same as the whole burnt at once.
    monkeypatch.setattr("pipeline.training.truth.POLYGON_CACHE", 2)
    small = PolygonTruth(shapes, transform, key="test", tile=40)
    padded = rasterio.features.rasterize(shapes, out_shape=(260, 360), fill=0, dtype="uint8",
                                         transform=transform * Affine.translation(-30, -30))  # and 30 px around
    np.testing.assert_array_equal(padded[30:-30, 30:-30], whole)
    for _ in range(60):
        y, x = int(rng.integers(-30, 200)), int(rng.integers(-30, 300))
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        expected = padded[y + 30 : y + 30 + h, x + 30 : x + 30 + w]
        np.testing.assert_array_equal(small.read(y, x, *expected.shape), expected)
    assert len(truth_module._TILES) <= 2  # one cache for the process, bounded
    assert truth.overlaps(200, 300) and not PolygonTruth(shapes, transform * Affine.translation(5000, 0),
                                                          "far").overlaps(200, 300)
