"""Read a region of a mosaic: by pixel window or bounding box, at a level or a resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import RegionError
from pipeline.mosaic import OPTIONAL_LAYERS, Mosaic
from pipeline.query.window import MAX_PIXELS, Window, check_size, resolve, units, window_transform

LAYERS = ("mask", "confidence", "scores")  # every mosaic's; some also have `OPTIONAL_LAYERS`
ALL_LAYERS = (*LAYERS, *OPTIONAL_LAYERS)


def check_layer(m: Mosaic, layer: str, allowed: tuple[str, ...] = ALL_LAYERS) -> str:
    """`layer` if the mosaic has it and it is one of `allowed`.

    Raises:
        RegionError: an unknown layer, or an optional one this mosaic was made without (naming the fix).
    """
    if layer not in allowed:
        raise RegionError(f"layer {layer!r}: choose one of {', '.join(allowed)}")
    if layer in OPTIONAL_LAYERS and layer not in m.layout.layers:
        how = "--uncertainty --tta" if layer == "spread" else "--uncertainty"
        raise RegionError(f"layer {layer!r}: this mosaic has no {layer} layer (it has "
                          f"{', '.join((*LAYERS, *m.layout.layers))}); segment the image with {how} to make one")
    return layer


def read_window(m: Mosaic, window: Window, layer: str = "mask") -> np.ndarray:
    """The stored values of a window: (h, w) for mask, confidence, uncertainty and spread, (classes, h, w)
    for scores."""
    return m.read(check_layer(m, layer), window.level, window.rect)


def read_region(
    m: Mosaic,
    layer: str = "mask",
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    as_xarray: bool = False,
    max_pixels: int | None = MAX_PIXELS,
) -> Any:
    """The values of a region, as numpy or as an xarray DataArray with coordinates and CRS.

    Args:
        layer: "mask" (class ids: uint8 with 255 = nodata, or uint16 with 65535 = nodata for models of over
            254 classes), "confidence", "scores" (one band per class), or the optional "uncertainty" and
            "spread" of a mosaic made with them.
        window: (y0, x0, y1, x1) in pixels of the chosen level.
        bbox: (min x, min y, max x, max y) in `crs`, or in the mosaic's coordinates.
        crs: the bbox's CRS (e.g. "EPSG:4326"); it is reprojected to the mosaic's, rounding outwards.
        level: pyramid level (0 = full resolution); or `resolution`, a pixel size in the mosaic's
            units, which picks the coarsest level no coarser than it.
        as_xarray: a DataArray with pixel-centre coordinates, the CRS and transform (rioxarray), and
            attributes level, resolution, units and classes.
        max_pixels: refuse larger regions (None: no limit).

    Raises:
        RegionError: a region outside the image, malformed, or larger than `max_pixels`.
    """
    win = resolve(m.layout, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution)
    check_size(win, max_pixels)
    values = read_window(m, win, layer)
    return to_dataarray(m, win, values, layer) if as_xarray else values


def to_dataarray(m: Mosaic, window: Window, values: np.ndarray, layer: str) -> Any:
    """A window's values as a DataArray: x/y pixel centres, CRS and transform written with rioxarray."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    layout = m.layout
    t = window_transform(layout, window)
    h, w = values.shape[-2:]
    xs = t.c + (np.arange(w) + 0.5) * t.a
    ys = t.f + (np.arange(h) + 0.5) * t.e
    dims = ("c", "y", "x") if values.ndim == 3 else ("y", "x")
    coords: dict[str, Any] = {"y": ys, "x": xs}
    if values.ndim == 3:
        coords["c"] = [c.name for c in layout.classes]
    attrs = {
        "level": window.level,
        "resolution": abs(t.a),
        "units": units(layout),
        "window": [window.rect.y0, window.rect.x0, window.rect.y1, window.rect.x1],
        "classes": [c.name for c in layout.classes],
    }
    arr = xr.DataArray(values, dims=dims, coords=coords, name=layer, attrs=attrs)
    if layer == "mask":
        arr = arr.rio.write_nodata(layout.mask_nodata)
    if layout.crs is not None:
        arr = arr.rio.write_crs(layout.crs).rio.write_transform(t)
    return arr
