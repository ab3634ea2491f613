"""Where a question points in a mosaic: a pixel window at one pyramid level.

Every query (region, areas, polygons, exports, tiles) first turns what the user gave (a pixel window,
a bounding box in any CRS, a polygon, a target resolution) into a `Window`: a level and a rectangle
of that level's pixels, clipped to the image. The maps between pixels and coordinates live here too:

- georeferenced mosaics: the level-0 affine transform of the source, scaled by 2^level;
- slides: micrometres from the top-left corner (y down), `mpp * 2^level` per pixel;
- neither: pixels of level 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from affine import Affine

from pipeline.errors import RegionError
from pipeline.mosaic import Mosaic, MosaicLayout
from pipeline.tiling import Rect

WGS84 = "EPSG:4326"
# A read that returns an array is refused beyond this many pixels unless the caller raises it:
# 8192 x 8192 at level 0 is 64 Mpx, 256 MiB of float32 scores per class.
MAX_PIXELS = 8192 * 8192

BBox = tuple[float, float, float, float]  # (min x, min y, max x, max y)


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels at one pyramid level of a mosaic, inside the image."""

    level: int
    rect: Rect

    @property
    def pixels(self) -> int:
        return self.rect.area


def units(layout: MosaicLayout) -> str:
    """Linear unit of the mosaic's coordinates: "m", "deg", a CRS unit name, "um" (slides) or "px"."""
    if layout.crs is not None and layout.transform is not None:
        return _crs_units(layout.crs)
    return "um" if layout.mpp is not None else "px"


@cache
def _crs_units(wkt: str) -> str:
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    if crs.is_geographic:
        return "deg"
    name = crs.axis_info[0].unit_name if crs.axis_info else "unknown"
    return "m" if name in ("metre", "meter") else name


def level_transform(layout: MosaicLayout, level: int) -> Affine:
    """Affine map from (col, row) pixel corners of a level to the mosaic's coordinates."""
    f = 2**level
    if layout.transform is not None:
        return Affine(*layout.transform[:6]) @ Affine.scale(f)
    return Affine.scale((layout.mpp or 1.0) * f)


def window_transform(layout: MosaicLayout, window: Window) -> Affine:
    """Affine map of the window's own pixels (its top-left pixel is (0, 0))."""
    return level_transform(layout, window.level) @ Affine.translation(window.rect.x0, window.rect.y0)


def pixel_size(layout: MosaicLayout, level: int = 0) -> float:
    """Edge of a pixel at a level in the mosaic's units (the larger of its two edges)."""
    t = level_transform(layout, level)
    return max(math.hypot(t.a, t.d), math.hypot(t.b, t.e))


def coarsest_level(base: float, size: float, num_levels: int) -> int:
    """Of `num_levels` levels with pixels of `base` * 2^k, the coarsest whose pixels are no larger than
    `size` (level 0 if none is)."""
    if size <= base:
        return 0
    return min(math.floor(math.log2(size / base) + 1e-9), num_levels - 1)


def level_for_resolution(layout: MosaicLayout, resolution: float) -> int:
    """The coarsest level whose pixels are no larger than `resolution` (level 0 if none is)."""
    if not resolution > 0:
        raise RegionError(f"resolution {resolution}: give a positive pixel size in {units(layout)}")
    return coarsest_level(pixel_size(layout, 0), resolution, layout.num_levels)


def check_level(layout: MosaicLayout, level: int) -> int:
    if not 0 <= level < layout.num_levels:
        raise RegionError(f"level {level} does not exist: this mosaic has levels 0 to {layout.num_levels - 1}")
    return level


def full(layout: MosaicLayout, level: int = 0) -> Window:
    h, w = layout.level_shape(check_level(layout, level))
    return Window(level, Rect(0, 0, h, w))


def to_mosaic_crs(layout: MosaicLayout, crs: str | None) -> str | None:
    """The CRS a bbox or polygon must be transformed from, or None when it is already the mosaic's."""
    if crs is None:
        return None
    if layout.crs is None:
        raise RegionError(
            f"crs {crs!r} given, but this mosaic has no CRS: give coordinates in "
            f"{'micrometres' if layout.mpp else 'pixels'} and no crs"
        )
    if _same_crs(crs, layout.crs):
        return None
    return crs


@cache
def _same_crs(a: str, b: str) -> bool:
    from pyproj import CRS

    return bool(check_crs(a) == CRS.from_user_input(b))


@cache
def check_crs(crs: str) -> Any:
    """The pyproj CRS that `crs` names (EPSG:4326, WKT...), or a RegionError naming the fix."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(crs)
    except CRSError as e:
        raise RegionError(f"unknown CRS {crs!r}: give an EPSG code such as EPSG:4326, or WKT") from e


def reprojected(what: str, crs: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a rasterio reprojection, turning its failures (no transformation, out of the CRS's area)
    into a RegionError that names what was being reprojected."""
    from pyproj.exceptions import ProjError
    from rasterio._err import CPLE_BaseError  # GDAL's errors (rasterio exports no public base for them)
    from rasterio.errors import RasterioError

    try:
        return fn(*args, **kwargs)
    except (RasterioError, CPLE_BaseError, ProjError, ValueError) as e:
        raise RegionError(f"{what} cannot be reprojected between {crs} and the mosaic's CRS") from e


def bbox_window(layout: MosaicLayout, bbox: Sequence[float], crs: str | None = None, level: int = 0) -> Window:
    """The pixels of a level that a bounding box touches (rounded outwards), clipped to the image.

    Args:
        bbox: (min x, min y, max x, max y) in `crs`, or in the mosaic's coordinates when `crs` is None.
        crs: anything pyproj reads (EPSG:4326, WKT); the box is reprojected with densified edges.

    Raises:
        RegionError: a malformed box, or one that misses the image.
    """
    minx, miny, maxx, maxy = _check_bbox(bbox)
    source = to_mosaic_crs(layout, crs)
    if source is not None:
        from rasterio.warp import transform_bounds

        minx, miny, maxx, maxy = reprojected(f"bbox {tuple(bbox)}", source, transform_bounds, source, layout.crs,
                                             minx, miny, maxx, maxy, densify_pts=21)
        if not all(map(math.isfinite, (minx, miny, maxx, maxy))):
            raise RegionError(f"bbox {tuple(bbox)} in {crs} cannot be expressed in the mosaic's CRS")
    inv = ~level_transform(layout, check_level(layout, level))
    cols, rows = zip(*(inv @ (x, y) for x in (minx, maxx) for y in (miny, maxy)), strict=True)
    rect = Rect(_down(min(rows)), _down(min(cols)), _up(max(rows)), _up(max(cols)))
    return clip(layout, Window(level, rect), what=f"bbox {tuple(bbox)}" + (f" ({crs})" if crs else ""))


def geometry_window(layout: MosaicLayout, geometry: Mapping[str, Any], crs: str | None = None,
                    level: int = 0) -> tuple[Window, dict[str, Any]]:
    """The window around a GeoJSON geometry, and the geometry in the mosaic's coordinates."""
    geom = check_geometry(geometry)
    source = to_mosaic_crs(layout, crs)
    if source is not None:
        from rasterio.warp import transform_geom

        geom = dict(reprojected("the polygon", source, transform_geom, source, layout.crs, geom))
    from shapely.geometry import shape

    bounds = shape(geom).bounds
    if not all(map(math.isfinite, bounds)):
        raise RegionError("the polygon has no finite bounds in the mosaic's CRS")
    return bbox_window(layout, bounds, None, level), geom


def check_geometry(geometry: Mapping[str, Any]) -> dict[str, Any]:
    """A GeoJSON Polygon or MultiPolygon (a Feature's geometry is taken), checked for validity."""
    from shapely.geometry import shape

    inner = geometry.get("geometry", geometry) if isinstance(geometry, Mapping) else None
    geom = dict(inner) if isinstance(inner, Mapping) else None
    if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
        raise RegionError("polygon: give a GeoJSON Polygon or MultiPolygon (or a Feature holding one)")
    try:
        polygon = shape(geom)
    except Exception as e:  # shapely raises several types for malformed coordinates
        raise RegionError("polygon: malformed GeoJSON coordinates; give rings of [x, y] pairs") from e
    if polygon.is_empty or not polygon.is_valid or polygon.area <= 0:
        raise RegionError("polygon: empty, self-intersecting or of zero area; check its rings")
    return geom


def pixel_window(layout: MosaicLayout, rect: Sequence[int], level: int = 0) -> Window:
    """A window given as (y0, x0, y1, x1) pixels of a level, clipped to the image."""
    if len(rect) != 4 or not all(isinstance(v, (int, np.integer)) for v in rect):
        raise RegionError(f"window {tuple(rect)}: give four integers y0, x0, y1, x1")
    y0, x0, y1, x1 = (int(v) for v in rect)
    if y1 <= y0 or x1 <= x0:
        raise RegionError(f"window {tuple(rect)}: y1 must exceed y0 and x1 must exceed x0")
    return clip(layout, Window(check_level(layout, level), Rect(y0, x0, y1, x1)), what=f"window {tuple(rect)}")


def clip(layout: MosaicLayout, window: Window, what: str) -> Window:
    h, w = layout.level_shape(window.level)
    rect = window.rect.intersect(Rect(0, 0, h, w))
    if rect.empty:
        raise RegionError(f"{what} lies outside the mosaic: level {window.level} is {h} x {w} px "
                          f"({describe_bounds(layout)})")
    return Window(window.level, rect)


def resolve(
    layout: MosaicLayout,
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
) -> Window:
    """One window from the ways a user may name a region (the whole image when none is given).

    `window` is in pixels of the chosen level; `bbox` in `crs` (default: the mosaic's coordinates).
    The level is `level`, else the coarsest one no coarser than `resolution`, else 0.
    """
    if level is not None and resolution is not None:
        raise RegionError("give a level or a resolution, not both")
    if window is not None and bbox is not None:
        raise RegionError("give a pixel window or a bbox, not both")
    if window is not None and crs is not None:
        raise RegionError("crs applies to a bbox; a window is in pixels")
    k = check_level(layout, level) if level is not None else (
        level_for_resolution(layout, resolution) if resolution is not None else 0
    )
    if window is not None:
        return pixel_window(layout, window, k)
    if bbox is not None:
        return bbox_window(layout, bbox, crs, k)
    return full(layout, k)


def check_size(window: Window, max_pixels: int | None) -> None:
    """Refuse a window larger than `max_pixels` before reading it."""
    if max_pixels is not None and window.pixels > max_pixels:
        h, w = window.rect.height, window.rect.width
        raise RegionTooLargeError(
            f"region of {h} x {w} px at level {window.level} exceeds the limit of {max_pixels} px: "
            "ask for a coarser level (or resolution) or a smaller region"
        )


class RegionTooLargeError(RegionError):
    """A region is larger than the caller allows to read at once."""


def bounds(layout: MosaicLayout) -> BBox:
    """(min x, min y, max x, max y) of the image in the mosaic's coordinates."""
    t = level_transform(layout, 0)
    xs, ys = zip(*(t @ (c, r) for c in (0, layout.width) for r in (0, layout.height)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def bounds_in(layout: MosaicLayout, crs: str) -> BBox:
    """The image's bounds reprojected to `crs` (densified edges)."""
    from rasterio.warp import transform_bounds

    if layout.crs is None:
        raise RegionError("this mosaic has no CRS")
    return tuple(transform_bounds(layout.crs, crs, *bounds(layout), densify_pts=21))  # type: ignore[return-value]


def describe_bounds(layout: MosaicLayout) -> str:
    minx, miny, maxx, maxy = bounds(layout)
    return f"bounds {minx:.6g}, {miny:.6g}, {maxx:.6g}, {maxy:.6g} {units(layout)}"


def parse_window(text: str | None) -> tuple[int, ...] | None:
    """A window typed as "y0,x0,y1,x1" (the CLI's and the service's form); None stays None."""
    return _parse(text, int, "window", "y0,x0,y1,x1")


def parse_bbox(text: str | None) -> tuple[float, ...] | None:
    """A bbox typed as "minx,miny,maxx,maxy"; None stays None."""
    return _parse(text, float, "bbox", "min x,min y,max x,max y")


def _parse(text: str | None, kind: type, name: str, form: str) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise RegionError(f"{name} {text!r}: give four comma-separated numbers {form}") from None


def _check_bbox(bbox: Sequence[float]) -> BBox:
    try:
        minx, miny, maxx, maxy = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise RegionError(f"bbox {bbox!r}: give four numbers min x, min y, max x, max y") from None
    if not all(map(math.isfinite, (minx, miny, maxx, maxy))) or maxx <= minx or maxy <= miny:
        raise RegionError(f"bbox {tuple(bbox)}: needs finite numbers with max x > min x and max y > min y")
    return minx, miny, maxx, maxy


# Pixel positions beyond this are clamped before rounding: a finite but huge box (1e308) must clip to
# the image, not overflow.
_FAR = float(2**52)


def _down(v: float) -> int:
    return math.floor(min(max(v, -_FAR), _FAR) + 1e-6)


def _up(v: float) -> int:
    return math.ceil(min(max(v, -_FAR), _FAR) - 1e-6)


def open_mosaic(uri: str | Mosaic, storage_options: Mapping[str, Any] | None = None) -> Mosaic:
    """A mosaic from a path or URI, or the mosaic itself."""
    return uri if isinstance(uri, Mosaic) else Mosaic.open(uri, storage_options=storage_options)
