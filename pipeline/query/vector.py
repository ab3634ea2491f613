"""The class mask of a region as GeoJSON polygons (rasterio.features.shapes, shapely to simplify)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine

from pipeline.errors import GivenUpError, RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.region import read_window
from pipeline.query.window import (
    WGS84,
    RegionTooLargeError,
    Window,
    check_crs,
    check_size,
    level_transform,
    pixel_size,
    reprojected,
    resolve,
    units,
    window_transform,
)
from pipeline.stitching import nodata_class

# Polygons of more than 16 Mpx at once would build millions of vertices in memory.
MAX_VECTOR_PIXELS = 4096 * 4096
CHECK_EVERY = 256  # features between two looks at the cancellation flag
FIX = "ask for a coarser level, a smaller region, simplify=, or fewer classes"


@dataclass(frozen=True)
class VectorLimits:
    """The most one answer of polygons may hold (the service's `Limits` sets them)."""

    features: int
    vertices: int
    bytes: int
    bytes_per_vertex: int = 40  # GeoJSON text of one vertex, a feature's share of its properties aside
    bytes_per_feature: int = 150


@dataclass(frozen=True)
class PolygonCount:
    """What polygons a mask will give, counted from the mask before any polygon is made."""

    features: int
    vertices: int

    def bytes(self, limits: VectorLimits) -> int:
        return self.vertices * limits.bytes_per_vertex + self.features * limits.bytes_per_feature


def count_polygons(mask: np.ndarray, keep: np.ndarray) -> PolygonCount:
    """The features (4-connected areas of a class) and the vertices (corners where a boundary turns, once
    for each area that turns there, and each outer ring's closing one) that `vectorize` makes of the `keep`
    pixels: exact but for the closings of holes (measured against rasterio's shapes on noisy and scene masks).

    O(pixels): a few boolean passes over the pixel corners and one `scipy.ndimage.label` per class.
    """
    from scipy import ndimage

    nodata = nodata_class(mask.dtype)  # 255, or 65535 for a uint16 mask
    values = np.pad(np.where(keep, mask, nodata), 1, constant_values=nodata)
    kept = values != nodata
    # At each pixel corner, the four pixels a b / c d and the four boundary edges between them.
    a, b, c, d = values[:-1, :-1], values[:-1, 1:], values[1:, :-1], values[1:, 1:]
    ka, kb, kc, kd = kept[:-1, :-1], kept[:-1, 1:], kept[1:, :-1], kept[1:, 1:]
    top, bottom, left, right = a != b, c != d, a != c, b != d
    # A pixel whose two edges at the corner are both boundaries is its area's convex corner there.
    convex = (top & left & ka).sum() + (top & right & kb).sum() + (bottom & left & kc).sum() + (
        bottom & right & kd).sum()
    # Where exactly two edges meet at a right angle, the three pixels on the other side turn too (concave).
    edges = top.astype(np.uint8) + bottom + left + right
    turn = (edges == 2) & ~(top & bottom) & ~(left & right)
    concave = (turn & ((~top & ~left & ka) | (~top & ~right & kb) | (~bottom & ~left & kc)
                       | (~bottom & ~right & kd))).sum()
    features = sum(int(ndimage.label(mask == k)[1]) for k in np.unique(mask[keep]))
    return PolygonCount(features=features, vertices=int(convex + concave) + features)


@dataclass(frozen=True)
class Polygon:
    """One 4-connected area of one class: its geometry (a GeoJSON mapping) and its area in the mosaic's
    units squared, measured before simplification."""

    cls: int
    geometry: dict[str, Any]
    area: float


@dataclass(frozen=True)
class Polygons:
    """The polygons of a region, made one at a time as `shapes` is iterated (limits checked as they come)."""

    window: Window
    crs: str | None  # of the coordinates; None for pixels and for slides
    units: str  # of the coordinates: a CRS unit, "deg", "um" or "px"
    simplify: float
    shapes: Iterator[Polygon]


def vectorize(
    m: Mosaic,
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    classes: Sequence[str] | None = None,
    simplify: float = 0.0,
    out_crs: str | None = None,
    max_pixels: int | None = MAX_VECTOR_PIXELS,
    limits: VectorLimits | None = None,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """Connected areas of each class as a GeoJSON FeatureCollection.

    Each feature is one 4-connected area of one class (holes kept), with properties `class` (id),
    `name` and `area` (in the mosaic's units squared, before simplification). Pixels are assigned to
    the polygon that contains their centre, so rasterising the unsimplified polygons at the same
    level gives back the mask exactly.

    Args:
        classes: class names to keep (default: all); nodata is never vectorised.
        simplify: Douglas-Peucker tolerance in the mosaic's units (topology of each polygon kept;
            neighbouring polygons may no longer share edges exactly).
        out_crs: the CRS of the output coordinates (e.g. "EPSG:4326"); default the mosaic's.
        window, bbox, crs, level, resolution: the region, as for `read_region`.
        limits: refuse an answer of more features, vertices or bytes; counted from the mask first
            (`count_polygons`, before any polygon is made), and again while the polygons are made.
        cancelled: when set (the client has gone), the work stops with `GivenUpError`.

    Raises:
        RegionTooLargeError: a region over `max_pixels`, or polygons over `limits`.
    """
    made = polygons(m, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution, classes=classes,
                    simplify=simplify, out_crs=out_crs, max_pixels=max_pixels, limits=limits, cancelled=cancelled)
    names = [c.name for c in m.layout.classes]
    features = [{"type": "Feature", "geometry": p.geometry,
                 "properties": {"class": p.cls, "name": names[p.cls], "area": p.area}} for p in made.shapes]
    return {"type": "FeatureCollection", "features": features, "tessera": describe(made)}


def describe(made: Polygons) -> dict[str, Any]:
    """Where a collection's polygons come from, as its `tessera` member."""
    w = made.window
    return {"level": w.level, "window": [w.rect.y0, w.rect.x0, w.rect.y1, w.rect.x1], "crs": made.crs,
            "units": made.units, "simplify": made.simplify}


def polygons(
    m: Mosaic,
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    classes: Sequence[str] | None = None,
    simplify: float = 0.0,
    out_crs: str | None = None,
    pixels: bool = False,
    downsample: float = 1.0,
    max_pixels: int | None = MAX_VECTOR_PIXELS,
    limits: VectorLimits | None = None,
    cancelled: threading.Event | None = None,
) -> Polygons:
    """The region is resolved, read and its polygons counted against `limits` now; the polygons themselves
    are made as `shapes` is iterated. Arguments as for `vectorize`, and:

    Args:
        pixels: coordinates in pixels of the full-resolution image (level 0; x right, y down, origin at
            the top-left corner of the image) whatever the level read, as QuPath expects; polygons of a
            coarser level are clipped to the image. `simplify` stays in the mosaic's units.
        downsample: with `pixels`, the size of the mosaic's level-0 pixels in the pixels wanted (those of
            the source's full resolution, when the mosaic was segmented from a coarser source level).
    """
    layout = m.layout
    names = [c.name for c in layout.classes]
    wanted = set(range(len(names)))
    if classes is not None:
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise RegionError(f"unknown classes {', '.join(unknown)}: this mosaic has {', '.join(names)}")
        wanted = {names.index(c) for c in classes}
    if simplify < 0:
        raise RegionError(f"simplify {simplify}: give a tolerance >= 0 in {units(layout)}")
    target = None
    if out_crs is not None:
        if pixels:
            raise RegionError(f"out_crs {out_crs!r}: these coordinates are pixels of the full-resolution image; "
                              "leave out_crs out")
        if layout.crs is None:
            raise RegionError(f"out_crs {out_crs!r}: this mosaic has no CRS (a slide); its coordinates are "
                              f"{'micrometres' if layout.mpp else 'pixels'}")
        check_crs(out_crs)
        target = out_crs
    win = resolve(layout, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution)
    check_size(win, max_pixels)
    mask = read_window(m, win, "mask")
    keep = np.isin(mask, list(wanted)) & (mask != layout.mask_nodata)
    if limits is not None:
        _check(count_polygons(mask, keep), limits, "would have")
    if pixels:
        if not downsample > 0:
            raise RegionError(f"downsample {downsample}: give the source level's downsample, a number > 0")
        f = downsample * 2**win.level
        transform = Affine.scale(f) @ Affine.translation(win.rect.x0, win.rect.y0)
        area_scale = abs(level_transform(layout, 0).determinant) / downsample**2
        tolerance = simplify / pixel_size(layout, 0) * downsample
        clip = (layout.width * downsample, layout.height * downsample) if win.level > 0 else None
        made = Polygons(win, None, "px", simplify, _shapes(mask, keep, transform, area_scale, tolerance, None,
                                                            layout.crs, clip, limits, cancelled))
    else:
        made = Polygons(win, target or layout.crs, "deg" if target == WGS84 else units(layout), simplify,
                        _shapes(mask, keep, window_transform(layout, win), 1.0, simplify, target, layout.crs, None,
                                limits, cancelled))
    return made


def _shapes(mask: np.ndarray, keep: np.ndarray, transform: Affine, area_scale: float, tolerance: float,
            target: str | None, source_crs: str | None, clip: tuple[float, float] | None, limits: VectorLimits | None,
            cancelled: threading.Event | None) -> Iterator[Polygon]:
    """The polygons of the `keep` pixels of `mask` under `transform`, simplified, clipped to `clip` (width,
    height) and reprojected to `target`, with the limits checked on the true counts."""
    from rasterio.features import shapes
    from shapely import clip_by_rect
    from shapely.geometry import mapping, shape

    vertices = 0
    for index, (geom, value) in enumerate(shapes(mask, mask=keep, connectivity=4, transform=transform)):
        if cancelled is not None and index % CHECK_EVERY == 0 and cancelled.is_set():
            raise GivenUpError("the polygons were given up: the client has gone")
        polygon = shape(geom)
        area = float(polygon.area) * area_scale
        if tolerance > 0:
            polygon = polygon.simplify(tolerance, preserve_topology=True)
        if clip is not None:  # a coarser level's last row and column of pixels reach past the image
            polygon = clip_by_rect(polygon, 0, 0, *clip)
        out = dict(mapping(polygon))
        if target is not None:
            from rasterio.warp import transform_geom

            out = dict(reprojected("a polygon", target, transform_geom, source_crs, target, out))
        if limits is not None:  # the count from the mask is an estimate: the true one may still pass a limit
            vertices += _vertices(out)
            _check(PolygonCount(index + 1, vertices), limits, "have at least")
        yield Polygon(int(value), out, area)


def _vertices(geometry: Mapping[str, Any]) -> int:
    if geometry["type"] == "Polygon":
        return sum(len(ring) for ring in geometry["coordinates"])
    return sum(len(ring) for part in geometry["coordinates"] for ring in part)


def _check(count: PolygonCount, limits: VectorLimits, verb: str) -> None:
    """Refuse polygons over a limit, naming it and the way to a smaller answer."""
    for what, have, most in (("features", count.features, limits.features),
                             ("vertices", count.vertices, limits.vertices),
                             ("bytes of GeoJSON", count.bytes(limits), limits.bytes)):
        if have > most:
            raise RegionTooLargeError(f"the polygons of this region {verb} {have} {what}, over the limit of "
                                      f"{most}: {FIX}")
