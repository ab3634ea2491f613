"""What a mosaic is, in one dictionary: size, levels, units, bounds, classes, state, provenance."""

from __future__ import annotations

from typing import Any

from pipeline.mosaic import Mosaic
from pipeline.query.window import WGS84, bounds, bounds_in, pixel_size, units


def mosaic_summary(m: Mosaic) -> dict[str, Any]:
    """What a listing shows of a mosaic: state, kind, size, number of levels, classes (no reprojection)."""
    layout = m.layout
    return {
        "complete": m.complete,
        "kind": "geo" if layout.crs else "slide" if layout.mpp else "pixels",
        "height": layout.height,
        "width": layout.width,
        "num_levels": layout.num_levels,
        "layers": list(layout.map_layers),  # what tiles and region.png show: mask, confidence, optional ones
        "classes": [{"id": i, "name": c.name, "color": list(c.color)} for i, c in enumerate(layout.classes)],
    }


def mosaic_info(m: Mosaic) -> dict[str, Any]:
    """The facts a client needs before asking for regions (JSON-ready)."""
    layout = m.layout
    lineage = m.lineage
    return {
        **mosaic_summary(m),
        "levels": [{"level": k, "shape": list(layout.level_shape(k)), "resolution": pixel_size(layout, k)}
                   for k in range(layout.num_levels)],
        "units": units(layout),
        "crs": layout.crs,
        "transform": list(layout.transform) if layout.transform else None,
        "mpp": layout.mpp,
        "bounds": list(bounds(layout)),
        "bounds_wgs84": list(bounds_in(layout, WGS84)) if layout.crs else None,
        "scores_kind": layout.scores_kind,
        "mask_dtype": layout.mask_dtype,
        "mask_nodata": layout.mask_nodata,
        "source": (lineage.get("source") or {}).get("path"),
        "model": {k: v for k, v in (lineage.get("model") or {}).items() if k in ("path", "sha256", "registered")},
        "finished": lineage.get("finished"),
    }
