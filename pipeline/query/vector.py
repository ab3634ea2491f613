"""The class mask of a region as GeoJSON polygons (rasterio.features.shapes, shapely to simplify)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.region import read_window
from pipeline.query.window import WGS84, check_crs, check_size, reprojected, resolve, units, window_transform
from pipeline.stitching import NODATA_CLASS

# Polygons of more than 16 Mpx at once would build millions of vertices in memory.
MAX_VECTOR_PIXELS = 4096 * 4096


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
    keep = np.isin(mask, list(wanted)) & (mask != NODATA_CLASS)
    features = []
    for geom, value in shapes(mask, mask=keep, connectivity=4, transform=window_transform(layout, win)):
        polygon = shape(geom)
        area = float(polygon.area)
        if simplify > 0:
            polygon = polygon.simplify(simplify, preserve_topology=True)
        out = mapping(polygon)
        if target is not None:
            from rasterio.warp import transform_geom

            out = reprojected("a polygon", target, transform_geom, layout.crs, target, out)
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
