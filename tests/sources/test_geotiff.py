"""What is particular to `GeoTiffSource`: georeferencing, GDAL masks, overviews, metres."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS

from pipeline.errors import ConfigError
from pipeline.sources import GeoTiffSource, open_source
from tests.sources.conftest import (
    GEOTIFF_PIXEL,
    geotiff_nodata_area,
    north_up,
    write_alpha_geotiff,
    write_geotiff,
    write_masked_geotiff,
)


def test_synthetic_geotiff_reports_its_crs_transform_nodata_and_overviews(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    assert isinstance(source, GeoTiffSource)
    assert source.crs is not None and CRS.from_wkt(source.crs).to_epsg() == 32632
    assert source.transform == north_up(GEOTIFF_PIXEL)
    assert source.nodata == 0 and source.mpp is None
    assert (source.bands, source.dtype) == (2, np.dtype("uint16"))
    assert [(lvl.height, lvl.width) for lvl in source.levels] == [(301, 257), (151, 129), (76, 65)]
    assert [round(lvl.downsample) for lvl in source.levels] == [1, 2, 4]


def test_transform_at_each_level_is_what_gdal_reports_for_the_overview(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    for k in range(1, len(source.levels)):
        with rasterio.open(geotiff_path, overview_level=k - 1) as overview:
            at = source.at_level(k)
            assert at.transform is not None and at.transform.almost_equals(overview.transform)


def test_valid_is_false_on_the_nodata_area(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    valid = source.valid(0, 0, source.height, source.width)
    np.testing.assert_array_equal(valid, ~geotiff_nodata_area(source.height, source.width))


def test_foreground_reads_the_overview_and_follows_the_mask(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    mask, factor = source.foreground(max_size=76)
    assert factor == 4 and mask.shape == (76, 65)
    f = int(factor)
    nodata = np.ones((mask.shape[0] * f, mask.shape[1] * f), dtype=bool)  # past the image: no data
    nodata[: source.height, : source.width] = geotiff_nodata_area(source.height, source.width)
    fully_nodata = nodata.reshape(mask.shape[0], f, mask.shape[1], f).all(axis=(1, 3))
    assert not mask[:3, :3].any()  # deep in the nodata corner
    assert mask[~fully_nodata].all()  # every cell with data is in (the mask errs outwards)
    assert mask.mean() > 0.9


def test_alpha_band_marks_pixels_invalid(tmp_path: Path) -> None:
    path, alpha = write_alpha_geotiff(tmp_path / "rgba.tif")
    source = open_source(path)
    assert source.bands == 4
    np.testing.assert_array_equal(source.valid(0, 0, source.height, source.width), alpha > 0)


def test_internal_mask_marks_pixels_invalid(tmp_path: Path) -> None:
    path, mask = write_masked_geotiff(tmp_path / "masked.tif")
    source = open_source(path)
    assert source.nodata is None
    np.testing.assert_array_equal(source.valid(0, 0, source.height, source.width), mask)


def test_best_level_in_metres(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    assert source.best_level(10, "m") == 0
    assert source.best_level(5, "m") == 0  # finer than the file: the finest it has
    assert source.best_level(20, "m") == 1  # overview 1 is 19.9 m
    assert source.best_level(21.5, "m") == 1
    assert source.best_level(37, "m") == 2  # 39.6 m is within 10% of 37 m
    assert source.best_level(1000, "m") == 2
    with pytest.raises(ConfigError, match="microns"):
        source.best_level(0.5, "um")


def test_a_geographic_crs_has_no_metres(tmp_path: Path) -> None:
    source = open_source(write_geotiff(tmp_path / "wgs84.tif", crs="EPSG:4326"))
    assert source.transform is not None
    with pytest.raises(ConfigError, match="projected CRS"):
        source.best_level(10, "m")


def test_rgb_byte_gives_the_files_georeferencing(rgb_byte_path: Path) -> None:
    source = open_source(rgb_byte_path)
    with rasterio.open(rgb_byte_path) as dataset:
        assert source.crs == dataset.crs.to_wkt()
        assert source.transform == dataset.transform
        assert source.nodata == dataset.nodata == 0
        assert dataset.profile["tiled"] is False  # striped: windows still work
    assert CRS.from_wkt(source.crs).to_epsg() == 32618
    assert (source.height, source.width, source.bands) == (718, 791, 3)
    assert source.best_level(300, "m") == 0


def test_rgb_byte_is_invalid_on_its_nodata_collar(rgb_byte_path: Path) -> None:
    source = open_source(rgb_byte_path)
    valid = source.valid(0, 0, source.height, source.width)
    with rasterio.open(rgb_byte_path) as dataset:
        np.testing.assert_array_equal(valid, dataset.dataset_mask() > 0)
    assert not valid[0, 0] and not valid[-1, -1]  # the corners are collar
    assert not valid[:5, :5].any() and valid[359, 395]  # ... the centre is scene
    assert 0.5 < valid.mean() < 0.9


def test_rgb_byte_foreground_roughly_matches_the_dataset_mask(rgb_byte_path: Path) -> None:
    source = open_source(rgb_byte_path)
    mask, factor = source.foreground(max_size=200)
    f = int(factor)
    with rasterio.open(rgb_byte_path) as dataset:
        truth = dataset.dataset_mask() > 0
    padded = np.zeros((mask.shape[0] * f, mask.shape[1] * f), dtype=bool)
    padded[: truth.shape[0], : truth.shape[1]] = truth
    cells = padded.reshape(mask.shape[0], f, mask.shape[1], f).mean(axis=(1, 3))
    assert (mask == (cells > 0.5)).mean() > 0.95
    assert mask[cells > 0].all()  # no cell with data is left out


def test_spacenet_panchromatic(spacenet_path: Path) -> None:
    source = open_source(spacenet_path)
    assert (source.bands, source.dtype, source.height, source.width) == (1, np.dtype("uint16"), 900, 900)
    assert source.crs is not None and CRS.from_wkt(source.crs).to_epsg() == 32616
    assert source.transform is not None and source.transform.a == 0.5
    assert source.best_level(0.5, "m") == 0


def test_a_plain_image_has_no_georeferencing(spacenet_mask_path: Path) -> None:
    source = open_source(spacenet_mask_path)
    assert isinstance(source, GeoTiffSource)
    assert source.crs is None and source.transform is None and source.nodata is None
    assert source.valid(0, 0, 10, 10).all()
    with pytest.raises(ConfigError, match="not georeferenced"):
        source.best_level(0.5, "m")
