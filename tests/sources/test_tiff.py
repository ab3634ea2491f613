"""What is particular to `TiffSource`: OME pyramids and pixel sizes, axes, codecs GDAL lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import ConfigError
from pipeline.sources import GeoTiffSource, TiffSource, open_source
from pipeline.sources.tiff import describe_truncation, is_ome_tiff
from tests.sources.conftest import (
    OME_MPP,
    OME_SHAPE,
    write_imagej_tiff,
    write_stack_ome_tiff,
    write_truncated_copy,
)


def test_ome_tiff_gives_its_mpp_and_levels(ome_tiff_path: Path) -> None:
    source = open_source(ome_tiff_path)
    assert isinstance(source, TiffSource)  # although GDAL could open it too
    assert source.mpp == pytest.approx(OME_MPP)
    height, width = OME_SHAPE
    assert [(lvl.height, lvl.width, lvl.downsample) for lvl in source.levels] == [
        (height, width, 1.0),
        (height // 2, width // 2, 2.0),
        (height // 4, width // 4, 4.0),
    ]
    assert [source.at_level(k).mpp for k in range(3)] == pytest.approx([OME_MPP, 2 * OME_MPP, 4 * OME_MPP])
    assert (source.bands, source.dtype) == (3, np.dtype("uint8"))
    assert source.crs is None and source.transform is None and source.nodata is None


def test_ome_tiff_best_level_in_microns(ome_tiff_path: Path) -> None:
    source = open_source(ome_tiff_path)
    assert source.best_level(0.25, "um") == 0
    assert source.best_level(0.5, "um") == 1
    assert source.best_level(0.54, "um") == 1
    assert source.best_level(0.95, "um") == 2  # 1.0 um/px is within 10% of 0.95
    with pytest.raises(ConfigError, match="metres"):
        source.best_level(1.0, "m")


def test_levels_read_their_own_pyramid_level(ome_tiff_path: Path) -> None:
    with tifffile.TiffFile(ome_tiff_path) as tif:
        expected = tif.series[0].levels[2].asarray()
    at = open_source(ome_tiff_path, level=2)
    np.testing.assert_array_equal(at.read(0, 0, at.height, at.width), np.moveaxis(expected, -1, 0))


def test_channel_axes_become_bands_and_other_axes_take_the_first_plane(tmp_path: Path) -> None:
    path, data = write_stack_ome_tiff(tmp_path / "stack.ome.tif")  # ZCYX
    source = open_source(path)
    assert isinstance(source, TiffSource)
    assert (source.bands, source.height, source.width, source.dtype) == (4, 50, 70, np.dtype("uint16"))
    np.testing.assert_array_equal(source.read(5, 7, 20, 30), data[0, :, 5:25, 7:37])
    assert source.mpp is None


def test_tiff_that_gdal_cannot_decode_falls_back_to_tifffile(png_tiff_path: Path) -> None:
    with pytest.raises(Exception, match="codec"):  # whatever GDAL raises, it must refuse
        GeoTiffSource(png_tiff_path).read(0, 0, 1, 1)
    source = open_source(png_tiff_path)
    assert isinstance(source, TiffSource)
    assert len(source.levels) == 1 and source.mpp is None
    mask, factor = source.foreground()
    assert mask.all() and factor == 1


def test_imagej_calibration_gives_mpp(tmp_path: Path) -> None:
    source = TiffSource(write_imagej_tiff(tmp_path / "imagej.tif", mpp=0.5))
    assert source.mpp == pytest.approx(0.5)
    assert source.bands == 1


def test_describe_truncation(ome_tiff_path: Path, tmp_path: Path) -> None:
    assert describe_truncation(ome_tiff_path) is None
    truncated = write_truncated_copy(ome_tiff_path, tmp_path / "cut.ome.tif")
    message = describe_truncation(truncated)
    assert message is not None and "bytes" in message


def test_is_ome_tiff(ome_tiff_path: Path, png_tiff_path: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.ome.tif"
    text.write_text("not a tiff")
    assert is_ome_tiff(ome_tiff_path)
    assert not is_ome_tiff(png_tiff_path)
    assert not is_ome_tiff(text)
