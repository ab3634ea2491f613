"""`GeoTiffSource`: GeoTIFF, COG and any other raster GDAL reads, through rasterio."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import CRSError, NotGeoreferencedWarning
from rasterio.windows import Window

from pipeline.errors import SourceReadError
from pipeline.sources.base import Level, RasterSource, SourceInfo, grow_mask
from pipeline.storage.gdal import configure_for

FOREGROUND_CACHE_MB = 64  # GDAL block cache while scanning the dataset mask


class GeoTiffSource(RasterSource):
    """A raster read through rasterio (GDAL): GeoTIFF, COG, or any format GDAL opens.

    Levels are level 0 plus the file's overviews (internal or ``.ovr``), in GDAL's order; a
    working level above 0 is read from its overview directly. Validity is GDAL's dataset
    mask, which combines nodata values, alpha bands and internal/external mask bands.
    ``crs`` and ``transform`` come from the file (``transform`` is None when the file has no
    geotransform); ``mpp`` is always None.

    Args:
        path: File path or GDAL-readable URL.
        level: Working level (0 = full resolution, k = k-th overview).

    Example:
        >>> with GeoTiffSource("scene.tif") as source:
        ...     tile = source.read(0, 0, 512, 512)
    """

    reader: ClassVar[str] = "rasterio"
    driver: ClassVar[str | None] = None  # the one GDAL driver tried on the file (None: every one)

    def _open(self) -> tuple[Any, SourceInfo]:
        with warnings.catch_warnings():
            # Plain images (no geotransform) are legitimate here; `transform` reports None.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            configure_for(self.path)  # an image on s3:// is read through GDAL's /vsis3/
            full = rasterio.open(self.path, driver=self.driver)
            try:
                info = self._describe(full)
                self._require_level(info.levels)
            except BaseException:
                full.close()
                raise
            if self.level == 0:
                return full, info
            full.close()
            return rasterio.open(self.path, driver=self.driver, overview_level=self.level - 1), info

    def _describe(self, full: Any) -> SourceInfo:
        """The file's levels, bands and georeferencing, read from the level-0 dataset."""
        if len(set(full.dtypes)) != 1:
            raise SourceReadError(
                f"{self.path} has bands of different data types {full.dtypes}; tessera reads "
                "all bands as one array. Convert it with e.g. `gdal_translate -ot Float32`."
            )
        levels = [Level(full.height, full.width, 1.0)]
        for k in range(len(full.overviews(1))):
            with rasterio.open(self.path, driver=self.driver, overview_level=k) as overview:
                levels.append(
                    Level(
                        overview.height,
                        overview.width,
                        _mean_ratio(full.height, full.width, overview.height, overview.width),
                    )
                )
        georeferenced = full.crs is not None or full.transform != Affine.identity()
        return SourceInfo(
            levels=tuple(levels),
            bands=full.count,
            dtype=np.dtype(full.dtypes[0]),
            crs=full.crs.to_wkt() if full.crs is not None else None,
            transform0=full.transform if georeferenced else None,
            metres_per_unit=_metres_per_unit(full.crs),
            nodata=None if full.nodata is None else float(full.nodata),
        )

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def _read_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        assert self._handle is not None
        return self._handle.read(window=Window(x0, y0, w, h))

    def _valid_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        assert self._handle is not None
        return self._handle.dataset_mask(window=Window(x0, y0, w, h)) > 0

    def foreground(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """Where the raster has valid data, at low resolution.

        With overviews, the dataset mask (nodata, alpha, mask bands) is read decimated with
        ``out_shape``, which GDAL serves from the smallest sufficient overview. Without them the
        full-resolution mask is read once, in strips of ``factor``-aligned rows, and a mask cell is
        valid when any of its pixels is: no block is read twice and GDAL's cache stays small (its
        default, 5% of RAM, kept 800 MB of a 16k x 16k scan in memory). The result is grown by one
        mask pixel, since decimation samples one pixel per cell and a cell with a little valid data
        must still count.

        Arguments, result and errors as in `RasterSource.foreground`.
        """
        factor, mh, mw = self._foreground_grid(max_size)
        self._ensure_open()
        assert self._handle is not None
        overviews = bool(self._handle.overviews(1))
        strip = factor * max(1, math.ceil(self._handle.block_shapes[0][0] / factor))

        def read_mask(y0: int, x0: int, h: int, w: int) -> np.ndarray:
            assert self._handle is not None
            if overviews or factor == 1:
                return self._handle.dataset_mask(window=Window(x0, y0, w, h), out_shape=(mh, mw)) > 0
            cells = np.zeros((mh, mw), bool)
            for top in range(0, h, strip):
                rows = min(strip, h - top)
                full = np.zeros((math.ceil(rows / factor) * factor, mw * factor), bool)
                full[:rows, :w] = self._handle.dataset_mask(window=Window(x0, y0 + top, w, rows)) > 0
                cells[top // factor : top // factor + full.shape[0] // factor] = (
                    full.reshape(-1, factor, mw, factor).any(axis=(1, 3))
                )
            return cells

        with rasterio.Env(GDAL_CACHEMAX=FOREGROUND_CACHE_MB):
            mask = self._guarded(read_mask, 0, 0, self.height, self.width)
        return grow_mask(mask), float(factor)


def _mean_ratio(height0: int, width0: int, height: int, width: int) -> float:
    """A level's downsample as the mean of its two axis ratios (OpenSlide's convention)."""
    return (height0 / height + width0 / width) / 2


def _metres_per_unit(crs: Any) -> float | None:
    """Metres per CRS unit for projected CRSs, None for geographic or missing ones."""
    if crs is None or crs.is_geographic:
        return None
    try:
        return float(crs.linear_units_factor[1])
    except CRSError:
        return None
