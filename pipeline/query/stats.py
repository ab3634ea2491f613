"""How much of each class: areas in a window, a bbox or a polygon, and whole-mosaic statistics.

Areas are pixel counts times the area of a pixel: m^2 for projected CRSs (converted from the CRS's
unit), geodesic m^2 per row for geographic CRSs, um^2 for slides, px for mosaics with neither.
Whole-mosaic statistics stream the level's chunks through dask, so memory stays flat on any size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import dask.array as da
import numpy as np

from pipeline.mosaic import Mosaic, MosaicLayout
from pipeline.query.region import read_window
from pipeline.query.window import (
    MAX_PIXELS,
    Window,
    check_size,
    full,
    geometry_window,
    resolve,
    units,
    window_transform,
)
from pipeline.stitching import nodata_class


@dataclass(frozen=True)
class ClassAreas:
    """Per-class pixel counts and areas of a region (nodata excluded)."""

    unit: str  # "m2", "um2" or "px"
    level: int
    pixels: dict[str, int]
    areas: dict[str, float]
    nodata_pixels: int
    mean_confidence: dict[str, float | None] | None = None

    @property
    def total_area(self) -> float:
        return float(sum(self.areas.values()))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "unit": self.unit, "level": self.level, "total_area": self.total_area,
            "nodata_pixels": self.nodata_pixels,
            "classes": [{"name": n, "pixels": self.pixels[n], "area": self.areas[n],
                         **({"mean_confidence": self.mean_confidence[n]} if self.mean_confidence else {})}
                        for n in self.pixels],
        }
        return d


def area_unit(layout: MosaicLayout) -> str:
    u = units(layout)
    return {"um": "um2", "px": "px"}.get(u, "m2")


def row_areas(layout: MosaicLayout, window: Window) -> np.ndarray:
    """Area of one pixel in each row of a window, in `area_unit` (rows differ only for lat/lon CRSs)."""
    t = window_transform(layout, window)
    h = window.rect.height
    u = units(layout)
    if u == "deg":
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        rows = np.arange(h + 1)
        lats = t.f + rows * t.e  # assumes a north-up grid, as GeoTIFFs in lat/lon are
        lons = np.array([t.c, t.c + t.a])
        areas = [abs(geod.polygon_area_perimeter(
            [lons[0], lons[1], lons[1], lons[0]], [lats[i], lats[i], lats[i + 1], lats[i + 1]])[0]) for i in range(h)]
        return np.asarray(areas, np.float64)
    area = abs(t.a * t.e - t.b * t.d)
    if u not in ("m", "um", "px"):
        area *= _metres_per_unit(layout.crs or "") ** 2
    return np.full(h, area, np.float64)


@cache
def _metres_per_unit(wkt: str) -> float:
    from pyproj import CRS

    return float(CRS.from_wkt(wkt).axis_info[0].unit_conversion_factor)


def count(mask: np.ndarray, row_area: np.ndarray, inside: np.ndarray | None,
          classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pixel counts and areas per class (length `classes`) and the nodata count, of the pixels of a
    mask window that are `inside` (all of them when None); `row_area` is the pixel area per row.
    The mask is uint8 (nodata 255) or uint16 (nodata 65535)."""
    nodata = nodata_class(mask.dtype)
    labels = mask[inside] if inside is not None else mask.ravel()
    pixels = np.bincount(labels, minlength=nodata + 1)
    if np.all(row_area == row_area[0]):  # projected CRSs and slides: one pixel area for all
        areas = pixels * row_area[0]
    else:  # latitude/longitude: the area shrinks with each row; weight row by row
        areas = np.zeros(nodata + 1)
        for r in range(mask.shape[0]):
            row = mask[r] if inside is None else mask[r][inside[r]]
            areas += np.bincount(row, minlength=nodata + 1) * row_area[r]
    return pixels[:classes], areas[:classes], int(pixels[nodata])


def class_areas(
    m: Mosaic,
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    polygon: Mapping[str, Any] | None = None,
    crs: str | None = None,
    level: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> ClassAreas:
    """Per-class areas of a window, a bbox or a GeoJSON polygon (pixels whose centre is inside).

    `crs` is the CRS of the bbox or the polygon (default: the mosaic's). Level 0 gives exact counts;
    a coarser `level` is faster and approximate. Without a region, the whole image (see `mosaic_stats`
    for images too large to read at once).
    """
    layout = m.layout
    inside = None
    if polygon is not None:
        if window is not None or bbox is not None:
            from pipeline.errors import RegionError

            raise RegionError("give one of window, bbox or polygon")
        win, geom = geometry_window(layout, polygon, crs, level or 0)
        check_size(win, max_pixels)
        from rasterio.features import geometry_mask

        inside = geometry_mask([geom], out_shape=(win.rect.height, win.rect.width),
                               transform=window_transform(layout, win), invert=True)
    else:
        win = resolve(layout, window=window, bbox=bbox, crs=crs, level=level)
        check_size(win, max_pixels)
    mask = read_window(m, win, "mask")
    pixels, areas, nodata = count(mask, row_areas(layout, win), inside, len(layout.classes))
    names = [c.name for c in layout.classes]
    return ClassAreas(area_unit(layout), win.level, dict(zip(names, map(int, pixels), strict=True)),
                      dict(zip(names, map(float, areas), strict=True)), nodata)


def mosaic_stats(m: Mosaic, level: int = 0, num_workers: int | None = None) -> ClassAreas:
    """Per-class pixels, areas and mean confidence of a whole level, out of core (dask, chunk by chunk)."""
    layout = m.layout
    win = full(layout, level)
    mask = da.from_zarr(m.array("mask", level))
    conf = da.from_zarr(m.array("confidence", level))
    per_row = row_areas(layout, win)
    rows = da.from_array(per_row, chunks=(mask.chunks[0],))

    nodata = layout.mask_nodata
    # Classes, then nodata last: a uint16 mask's chunks count len(classes) + 1 bins, not 65536.
    bins = len(layout.classes) + 1

    def chunk_stats(mask_block: np.ndarray, conf_block: np.ndarray, row_block: np.ndarray) -> np.ndarray:
        flat = mask_block.ravel().astype(np.intp)
        flat[flat == nodata] = bins - 1
        c = np.nan_to_num(conf_block.astype(np.float64).ravel())
        out = np.stack([
            np.bincount(flat, minlength=bins),
            np.bincount(flat, weights=np.repeat(row_block, mask_block.shape[1]), minlength=bins),
            np.bincount(flat, weights=c, minlength=bins),
        ])
        return out[None, None]

    parts = da.map_blocks(chunk_stats, mask, conf, rows[:, None], dtype=np.float64, new_axis=[2, 3],
                          chunks=((1,) * mask.numblocks[0], (1,) * mask.numblocks[1], (3,), (bins,)))
    totals = parts.sum(axis=(0, 1)).compute(scheduler="threads", num_workers=num_workers)
    pixels, areas, conf_sum = totals[0], totals[1], totals[2]
    names = [c.name for c in layout.classes]
    mean_conf = {n: (float(conf_sum[i] / pixels[i]) if pixels[i] else None) for i, n in enumerate(names)}
    return ClassAreas(
        area_unit(layout), level,
        {n: int(pixels[i]) for i, n in enumerate(names)},
        {n: float(areas[i]) for i, n in enumerate(names)},
        int(pixels[bins - 1]),
        mean_conf,
    )
