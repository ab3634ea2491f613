"""The conformance suite: every `RasterSource` implementation, on every kind of file, passes these.

Each case pairs a file with the source class `open_source` must pick for it and a reference
reader that reads the same window straight through the underlying library (rasterio,
tifffile, OpenSlide). Synthetic cases always run; cases on the shared real samples skip when
``../shared/data`` is absent.
"""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
import rasterio
import tifffile
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.sources import (
    GeoTiffSource,
    RasterSource,
    SlideSource,
    TiffSource,
    open_source,
    reflect_indices,
)
from tests.sources.conftest import write_truncated_copy

Reference = Callable[[Path, int, int, int, int, int], np.ndarray]
SourceClass = type[GeoTiffSource] | type[TiffSource] | type[SlideSource]


def rasterio_window(path: Path, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The window read by rasterio from level 0 or from overview `level - 1`."""
    options = {"overview_level": level - 1} if level else {}
    with rasterio.open(path, **options) as dataset:
        return dataset.read(window=Window(x0, y0, w, h))


def tifffile_window(path: Path, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The window cut from tifffile's full read of the level (fixtures are tiny)."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        image = series.levels[level].asarray()
        axes = series.axes
    if "S" in axes:  # YXS
        image = np.moveaxis(image, -1, 0)
    elif "C" not in axes:  # YX
        image = image[None]
    return image[:, y0 : y0 + h, x0 : x0 + w]


def openslide_window(path: Path, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The window's RGB from OpenSlide's read_region (level-0 coordinates)."""
    with openslide.OpenSlide(path) as slide:
        downsample = slide.level_downsamples[level]
        region = slide.read_region((round(x0 * downsample), round(y0 * downsample)), level, (w, h))
        return np.asarray(region)[..., :3].transpose(2, 0, 1)


@dataclass(frozen=True)
class Case:
    """One file, the source class that must read it, and a reference reader."""

    path: Path
    kind: SourceClass
    reference: Reference


READERS: dict[SourceClass, Reference] = {
    GeoTiffSource: rasterio_window,
    TiffSource: tifffile_window,
    SlideSource: openslide_window,
}

CASES: dict[str, tuple[str, SourceClass]] = {
    "geotiff": ("geotiff_path", GeoTiffSource),
    "ome-tiff": ("ome_tiff_path", TiffSource),
    "png-tiff": ("png_tiff_path", TiffSource),
    "svs": ("svs_path", SlideSource),
    "rgb-byte": ("rgb_byte_path", GeoTiffSource),
    "spacenet": ("spacenet_path", GeoTiffSource),
    "cmu-svs": ("cmu_svs_path", SlideSource),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    fixture, kind = CASES[request.param]
    return Case(request.getfixturevalue(fixture), kind, READERS[kind])


@pytest.fixture(scope="module")
def source(case: Case) -> RasterSource:
    return open_source(case.path)


@pytest.fixture(scope="module")
def full(case: Case, source: RasterSource) -> np.ndarray:
    """The whole working level, read by the reference library."""
    return case.reference(case.path, 0, 0, 0, source.height, source.width)


def numpy_reflect_window(full: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The window of `full` extended by ``np.pad(mode="reflect")``, computed on index vectors."""
    _, height, width = full.shape

    def axis(start: int, size: int, n: int) -> np.ndarray:
        before, after = max(0, -start), max(0, start + size - n)
        indices = np.pad(np.arange(n), (before, after), mode="reflect")
        return indices[start + before : start + before + size]

    return full[:, axis(y0, h, height)[:, None], axis(x0, w, width)[None, :]]


class TestRasterSourceConformance:
    """What every source guarantees, checked on every case."""

    def test_open_source_picks_the_reader(self, case: Case, source: RasterSource) -> None:
        assert type(source) is case.kind
        assert source.path == str(case.path)
        assert source.level == 0

    def test_metadata_is_consistent_with_a_full_read(self, source: RasterSource, full: np.ndarray) -> None:
        image = source.read(0, 0, source.height, source.width)
        assert image.shape == (source.bands, source.height, source.width) == full.shape
        assert image.dtype == source.dtype == full.dtype
        np.testing.assert_array_equal(image, full)
        levels = source.levels
        assert (levels[0].height, levels[0].width, levels[0].downsample) == (source.height, source.width, 1.0)
        assert all(a.downsample < b.downsample for a, b in itertools.pairwise(levels))
        if source.crs is not None:  # georeferenced: a transform, and no microns
            assert source.transform is not None and source.mpp is None

    @pytest.mark.parametrize("where", ["origin", "interior", "bottom-right", "one-pixel"])
    def test_inbounds_window_equals_the_library(self, case: Case, source: RasterSource, where: str) -> None:
        for level in {0, len(source.levels) - 1}:
            at = source.at_level(level)
            h, w = min(37, at.height), min(23, at.width)
            y0, x0 = {
                "origin": (0, 0),
                "interior": ((at.height - h) // 2, (at.width - w) // 3),
                "bottom-right": (at.height - h, at.width - w),
                "one-pixel": (at.height // 2, at.width // 2),
            }[where]
            if where == "one-pixel":
                h = w = 1
            expected = case.reference(case.path, level, y0, x0, h, w)
            np.testing.assert_array_equal(at.read(y0, x0, h, w), expected)

    @pytest.mark.parametrize(
        "edge", ["top", "bottom", "left", "right", "top-left", "bottom-right", "all-around"]
    )
    def test_window_past_an_edge_is_reflect_padded(
        self, source: RasterSource, full: np.ndarray, edge: str
    ) -> None:
        height, width = source.height, source.width
        h, w = min(40, height), min(40, width)
        pad = min(5, h - 1, w - 1)
        y0, x0, wh, ww = {
            "top": (-pad, width // 2 - w // 2, h, w),
            "bottom": (height - h + pad, 0, h, w),
            "left": (height // 3, -pad, h, w),
            "right": (0, width - w + pad, h, w),
            "top-left": (-pad, -pad, h, w),
            "bottom-right": (height - h + pad, width - w + pad, h, w),
            "all-around": (-pad, -pad, height + 2 * pad, width + 2 * pad),
        }[edge]
        window = source.read(y0, x0, wh, ww)
        # What the spec states: np.pad of the part inside the image, reflecting at the image's edges.
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + wh, height), min(x0 + ww, width)
        inside = full[:, top:bottom, left:right]
        expected = np.pad(
            inside,
            ((0, 0), (top - y0, y0 + wh - bottom), (left - x0, x0 + ww - right)),
            mode="reflect",
        )
        np.testing.assert_array_equal(window, expected)

    def test_window_larger_than_the_whole_image(self, source: RasterSource, full: np.ndarray) -> None:
        height, width = source.height, source.width
        # Pads beyond the image's own size on small images; bounded on big ones to keep this fast.
        pad_y, pad_x = min(height, 150) + 3, min(width, 150) + 5
        y0, x0, h, w = -pad_y, -pad_x, height + pad_y + 7, width + pad_x + 11
        window = source.read(y0, x0, h, w)
        assert window.shape == (source.bands, h, w)
        np.testing.assert_array_equal(window, numpy_reflect_window(full, y0, x0, h, w))

    @settings(max_examples=25, deadline=None)
    @given(data=st.data())
    def test_any_window_matches_numpy_reflect(
        self, source: RasterSource, full: np.ndarray, data: st.DataObject
    ) -> None:
        height, width = source.height, source.width
        y0 = data.draw(st.integers(-3 * height, 3 * height), label="y0")
        x0 = data.draw(st.integers(-3 * width, 3 * width), label="x0")
        h = data.draw(st.integers(1, 48), label="h")
        w = data.draw(st.integers(1, 48), label="w")
        np.testing.assert_array_equal(source.read(y0, x0, h, w), numpy_reflect_window(full, y0, x0, h, w))

    def test_valid_is_false_outside_the_image(self, source: RasterSource) -> None:
        height, width = source.height, source.width
        valid = source.valid(-4, -6, height + 9, width + 11)
        assert valid.shape == (height + 9, width + 11) and valid.dtype == bool
        outside = np.ones_like(valid)
        outside[4 : 4 + height, 6 : 6 + width] = False
        assert not valid[outside].any()
        np.testing.assert_array_equal(valid[4 : 4 + height, 6 : 6 + width], source.valid(0, 0, height, width))
        assert not source.valid(height + 10, width + 10, 5, 5).any()
        assert source.valid(0, 0, height, width).any()

    @pytest.mark.parametrize("max_size", [1024, 64, 7])
    def test_foreground_mask_and_factor_fit_the_image(self, source: RasterSource, max_size: int) -> None:
        mask, factor = source.foreground(max_size)
        assert mask.dtype == bool and mask.ndim == 2
        assert factor >= 1 and factor == int(factor)
        f = int(factor)
        assert mask.shape == (math.ceil(source.height / f), math.ceil(source.width / f))
        assert max(mask.shape) <= max_size
        assert f == 1 or math.ceil(max(source.height, source.width) / (f - 1)) > max_size  # smallest f

    def test_foreground_rejects_a_non_positive_size(self, source: RasterSource) -> None:
        with pytest.raises(ConfigError, match="max_size"):
            source.foreground(0)

    def test_pickles_without_its_handle_and_reads_the_same(self, source: RasterSource) -> None:
        for at in (source, source.at_level(len(source.levels) - 1)):
            before = at.read(-3, -3, 19, 17)  # opens the handle
            payload = pickle.dumps(at)
            assert len(payload) < 400  # class and (path, level) only: no handle, no pixels
            restored = pickle.loads(payload)
            assert type(restored) is type(at)
            assert (restored.path, restored.level) == (at.path, at.level)
            assert restored._handle is None  # nothing opened until first use
            np.testing.assert_array_equal(restored.read(-3, -3, 19, 17), before)
            restored.close()

    def test_at_level_gives_the_level_size_transform_and_mpp(self, source: RasterSource) -> None:
        base = source.levels[0]
        for k, level in enumerate(source.levels):
            at = source.at_level(k)
            assert (at.level, at.height, at.width) == (k, level.height, level.width)
            assert at.levels == source.levels
            assert at.read(0, 0, 3, 3).shape == (source.bands, 3, 3)
            if source.transform is None:
                assert at.transform is None
            else:
                expected = source.transform @ Affine.scale(
                    base.width / level.width, base.height / level.height
                )
                assert at.transform is not None and at.transform.almost_equals(expected)
            if source.mpp is None:
                assert at.mpp is None
            else:
                assert at.mpp == pytest.approx(source.mpp * level.downsample)
            at.close()

    def test_a_level_that_does_not_exist_is_a_config_error(self, case: Case, source: RasterSource) -> None:
        count = len(source.levels)
        for bad in (count, -1):
            with pytest.raises(ConfigError, match="available levels"):
                source.at_level(bad)
        with pytest.raises(ConfigError, match=f"level {count + 3} does not exist"):
            open_source(case.path, level=count + 3)

    def test_best_level_follows_the_resolution_the_file_has(self, source: RasterSource) -> None:
        last = len(source.levels) - 1
        coarsest = source.levels[last].downsample
        units = {"um": source.mpp}
        if source.transform is not None and source.crs is not None:
            units["m"] = abs(source.transform.a)
        for unit, size in units.items():
            if size is None:
                with pytest.raises(ConfigError, match="no "):
                    source.best_level(1.0, unit)
                continue
            assert source.best_level(size, unit) == 0
            assert source.best_level(size / 10, unit) == 0  # finer than the file: level 0
            assert source.best_level(size * coarsest, unit) == last
            assert source.best_level(size * coarsest * 100, unit) == last
        with pytest.raises(ConfigError, match="unit"):
            source.best_level(1.0, "px")

    def test_open_source_rejects_a_truncated_copy(self, case: Case, tmp_path: Path) -> None:
        truncated = write_truncated_copy(case.path, tmp_path / f"truncated{case.path.suffix}")
        with pytest.raises(SourceReadError, match="truncated"):
            open_source(truncated)

    def test_context_manager_closes_and_a_closed_source_reopens(self, case: Case) -> None:
        with open_source(case.path) as opened:
            first = opened.read(0, 0, 4, 4)
            assert opened._handle is not None
        assert opened._handle is None
        np.testing.assert_array_equal(opened.read(0, 0, 4, 4), first)
        opened.close()


def test_open_source_on_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tif"
    with pytest.raises(SourceNotFoundError, match=r"nowhere\.tif") as raised:
        open_source(missing)
    assert isinstance(raised.value, FileNotFoundError)


def test_open_source_on_a_text_file_named_tif(tmp_path: Path) -> None:
    fake = tmp_path / "notes.tif"
    fake.write_text("these are meeting notes, not an image\n" * 20)
    with pytest.raises(SourceReadError) as raised:
        open_source(fake)
    message = str(raised.value)
    assert "notes.tif" in message and "rasterio" in message and "tifffile" in message


def test_open_source_on_an_empty_file_and_a_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SourceReadError, match="openslide"):
        open_source(empty)
    with pytest.raises(SourceReadError, match="directory"):
        open_source(tmp_path)


def test_a_missing_file_found_by_a_worker_is_source_not_found(geotiff_path: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone.tif"
    gone.write_bytes(geotiff_path.read_bytes())
    shipped = pickle.loads(pickle.dumps(open_source(gone)))
    gone.unlink()
    with pytest.raises(SourceNotFoundError):
        shipped.read(0, 0, 2, 2)


def test_an_empty_window_is_a_config_error(geotiff_path: Path) -> None:
    source = open_source(geotiff_path)
    for h, w in ((0, 4), (4, 0), (-1, 3)):
        with pytest.raises(ConfigError, match="window size"):
            source.read(0, 0, h, w)
        with pytest.raises(ConfigError, match="window size"):
            source.valid(0, 0, h, w)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 12), start=st.integers(-60, 60), size=st.integers(1, 60))
def test_reflect_indices_is_numpy_reflect_extended(n: int, start: int, size: int) -> None:
    before, after = max(0, -start), max(0, start + size - n)
    expected = np.pad(np.arange(n), (before, after), mode="reflect")[start + before : start + before + size]
    np.testing.assert_array_equal(reflect_indices(start, size, n), expected)
