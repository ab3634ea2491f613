"""The class mask of a region as GeoJSON polygons (rasterio.features.shapes, shapely to simplify)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import GivenUpError, RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.region import read_window
from pipeline.query.window import (
    WGS84,
    RegionTooLargeError,
    check_crs,
    check_size,
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
    from rasterio.features import shapes
    from shapely.geometry import mapping, shape

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
    features: list[dict[str, Any]] = []
    vertices = 0
    for geom, value in shapes(mask, mask=keep, connectivity=4, transform=window_transform(layout, win)):
        if cancelled is not None and len(features) % CHECK_EVERY == 0 and cancelled.is_set():
            raise GivenUpError("the polygons were given up: the client has gone")
        polygon = shape(geom)
        area = float(polygon.area)
        if simplify > 0:
            polygon = polygon.simplify(simplify, preserve_topology=True)
        out = mapping(polygon)
        if target is not None:
            from rasterio.warp import transform_geom

            out = reprojected("a polygon", target, transform_geom, layout.crs, target, out)
        if limits is not None:  # the count above is an estimate: the true one may still pass a limit
            vertices += sum(len(ring) for ring in out["coordinates"]) if out["type"] == "Polygon" else sum(
                len(ring) for part in out["coordinates"] for ring in part)
            _check(PolygonCount(len(features) + 1, vertices), limits, "have at least")
        cls = int(value)
        features.append({
            "type": "Feature",
            "geometry": dict(out),
            "properties": {"class": cls, "name": names[cls], "area": area},
        })
    return {
        "type": "FeatureCollection",
        "features": features,
        "tessera": {
            "level": win.level,
            "window": [win.rect.y0, win.rect.x0, win.rect.y1, win.rect.x1],
            "crs": target or layout.crs,
            "units": "deg" if target == WGS84 else units(layout),
            "simplify": simplify,
        },
    }


def _check(count: PolygonCount, limits: VectorLimits, verb: str) -> None:
    """Refuse polygons over a limit, naming it and the way to a smaller answer."""
    for what, have, most in (("features", count.features, limits.features),
                             ("vertices", count.vertices, limits.vertices),
                             ("bytes of GeoJSON", count.bytes(limits), limits.bytes)):
        if have > most:
            raise RegionTooLargeError(f"the polygons of this region {verb} {have} {what}, over the limit of "
                                      f"{most}: {FIX}")
