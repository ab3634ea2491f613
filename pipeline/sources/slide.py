"""`SlideSource`: whole-slide images (Aperio, Hamamatsu, MIRAX, ...) through OpenSlide."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage

from pipeline.sources.base import Level, RasterSource, SourceInfo, grow_mask
from pipeline.storage.cache import local_copy
from pipeline.storage.location import Location

# Saturation bounds for the tissue threshold: below MIN, a blank slide's JPEG noise would
# pass as tissue; above MAX, Otsu on an all-tissue slide would split tissue from tissue.
MIN_TISSUE_SATURATION = 0.05
MAX_TISSUE_SATURATION = 0.15

# Longest side, in level pixels, of one read while building a thumbnail: bounds memory on
# single-level slides, where the thumbnail has to be made from full resolution.
THUMBNAIL_READ_SIZE = 2048


class SlideSource(RasterSource):
    """A whole-slide image read through OpenSlide, as 3-band RGB uint8.

    Levels are OpenSlide's (their downsamples may be slightly fractional); ``mpp`` comes
    from ``openslide.mpp-x``/``mpp-y`` (their mean) scaled by the working level's downsample;
    ``crs``, ``transform`` and ``nodata`` are None. Transparent pixels (areas the scanner did
    not capture) are composited onto the slide's background colour (white unless the file
    says otherwise), as OpenSlide's own thumbnails are, and are invalid in `valid`.

    Args:
        path: The slide file (for MIRAX, the ``.mrxs`` file), or a single-file slide on object storage
            (``s3://bucket/CMU-1.svs``), copied once to this machine's cache (`pipeline.storage.cache`).
        level: Working level (0 = full resolution).

    Example:
        >>> with SlideSource("CMU-1.svs", level=1) as slide:
        ...     tile = slide.read(0, 0, 512, 512)  # (3, 512, 512) uint8
    """

    reader: ClassVar[str] = "openslide"

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        self._background = (255, 255, 255)
        # The RGBA of the last window read, so `valid` right after `read` of the same window
        # does not decode the tiles twice.
        self._last_region: tuple[tuple[int, int, int, int], np.ndarray] | None = None

    def _open(self) -> tuple[Any, SourceInfo]:
        # OpenSlide reads files only: a slide on object storage is read from this machine's copy of it.
        slide = openslide.OpenSlide(local_copy(Location.parse(self.path)))
        try:
            levels = tuple(
                Level(height, width, float(downsample))
                for (width, height), downsample in zip(
                    slide.level_dimensions, slide.level_downsamples, strict=True
                )
            )
            self._require_level(levels)
            self._background = _background_colour(slide)
        except BaseException:
            slide.close()
            raise
        return slide, SourceInfo(
            levels=levels, bands=3, dtype=np.dtype(np.uint8), mpp0=_microns_per_pixel(slide)
        )

    def _close_handle(self, handle: Any) -> None:
        self._last_region = None
        handle.close()

    def _region(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGBA (h, w, 4) of a working-level window, via OpenSlide's level-0 coordinates."""
        key = (y0, x0, h, w)
        if self._last_region is not None and self._last_region[0] == key:
            return self._last_region[1]
        assert self._handle is not None
        downsample = self.levels[self.level].downsample
        location = (round(x0 * downsample), round(y0 * downsample))
        rgba = np.asarray(self._handle.read_region(location, self.level, (w, h)))
        self._last_region = (key, rgba)
        return rgba

    def _read_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        rgb = _composite(self._region(y0, x0, h, w), self._background)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def _valid_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self._region(y0, x0, h, w)[..., 3] > 0

    def foreground(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """Tissue at low resolution, found on a thumbnail of the working level.

        Method: a thumbnail with one pixel per ``f x f`` working-level cell is built from the
        coarsest level that is still fine enough (box-averaged, transparent areas as
        background); `detect_tissue` thresholds its HSV saturation with Otsu's method (clamped
        to [0.05, 0.15]), drops specks and fills holes; the mask is then grown by one cell so
        tissue edges are not cut.

        Arguments, result and errors as in `RasterSource.foreground`.
        """
        factor, mh, mw = self._foreground_grid(max_size)
        thumbnail = self._guarded(lambda _y, _x, h, w: self._thumbnail(factor, h, w), 0, 0, mh, mw)
        return grow_mask(detect_tissue(thumbnail)), float(factor)

    def _thumbnail(self, factor: int, mh: int, mw: int) -> np.ndarray:
        """RGB (mh, mw, 3): each pixel the mean of a ``factor``-sized working-level cell."""
        slide = self._handle
        assert slide is not None
        target = factor * self.levels[self.level].downsample
        read_level = slide.get_best_level_for_downsample(target)
        level_downsample = self.levels[read_level].downsample
        cell = target / level_downsample  # read-level pixels per mask cell, >= 1
        step = max(1, int(THUMBNAIL_READ_SIZE // cell))
        out = np.empty((mh, mw, 3), dtype=np.uint8)
        for i0 in range(0, mh, step):
            for j0 in range(0, mw, step):
                i1, j1 = min(i0 + step, mh), min(j0 + step, mw)
                top, left = math.floor(i0 * cell), math.floor(j0 * cell)
                bottom, right = math.ceil(i1 * cell), math.ceil(j1 * cell)
                # Regions past the slide come back transparent, i.e. background: no clipping.
                rgba = np.asarray(
                    slide.read_region(
                        (round(left * level_downsample), round(top * level_downsample)),
                        read_level,
                        (right - left, bottom - top),
                    )
                )
                rgb = Image.fromarray(_composite(rgba, self._background))
                out[i0:i1, j0:j1] = np.asarray(rgb.resize((j1 - j0, i1 - i0), Image.Resampling.BOX))
        return out


def detect_tissue(rgb: np.ndarray) -> np.ndarray:
    """Tissue mask of a brightfield RGB thumbnail (stained tissue on a bright background).

    Stained tissue is coloured, background glass is grey-white: pixels whose HSV saturation
    (median-filtered 3x3) exceeds Otsu's threshold, clamped to [0.05, 0.15] so that a blank
    slide gives nothing and an all-tissue slide gives everything, are tissue. Connected
    components smaller than 1/5000 of the image (dust, specks) are dropped and holes are
    filled (lumens and tears are left to the model).

    Args:
        rgb: uint8 array (h, w, 3).

    Returns:
        Bool array (h, w).
    """
    colour = rgb.astype(np.float32)
    brightest, darkest = colour.max(axis=-1), colour.min(axis=-1)
    saturation = np.where(brightest > 0, (brightest - darkest) / np.maximum(brightest, 1.0), 0.0)
    saturation = ndimage.median_filter(saturation, size=3)
    threshold = float(np.clip(otsu_threshold(saturation), MIN_TISSUE_SATURATION, MAX_TISSUE_SATURATION))
    tissue = saturation > threshold
    labels, count = ndimage.label(tissue)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(4, tissue.size // 5000)
        keep[0] = False
        tissue = keep[labels]
    return ndimage.binary_fill_holes(tissue)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising between-class variance.

    Args:
        values: Array of values in [0, 1].
        bins: Histogram bins.

    Returns:
        The threshold; 1.0 when the values are all in one bin (nothing to separate).
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass_low / weight_low
        mean_high = (mass_low[-1] - mass_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.where((weight_low > 0) & (weight_high > 0), between, -1.0)
    if between.max() < 0:
        return 1.0
    # Every cut inside an empty gap between the classes scores the same: take the middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[(int(best[0]) + int(best[-1])) // 2 + 1])


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB of an (h, w, 4) RGBA image laid over a background colour."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return rgb
    bg = np.asarray(background, dtype=np.uint32)
    a = alpha.astype(np.uint32)
    mixed = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return mixed.astype(np.uint8)


def _background_colour(slide: Any) -> tuple[int, int, int]:
    """The slide's declared background colour (hex RRGGBB), white if it declares none."""
    value = slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
    if not value or len(value) != 6:
        return (255, 255, 255)
    return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))


def _microns_per_pixel(slide: Any) -> float | None:
    """Level-0 microns per pixel: the mean of the x and y values the slide declares."""
    values = []
    for name in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(slide.properties[name]))
        except (KeyError, ValueError):
            continue
    values = [v for v in values if v > 0]
    return sum(values) / len(values) if values else None
