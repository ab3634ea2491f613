"""Exports: a region or the whole mosaic to a Cloud-Optimised GeoTIFF, or to PNG in the class colours.

Both write to a temporary name beside the output and rename it at the end, so a file at the
output path is always whole. The COG is written strip by strip (memory bounded by one strip)
into a tiled GeoTIFF, which GDAL's COG driver then copies with overviews.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import RegionError
from pipeline.files import write_atomically
from pipeline.mosaic import OPTIONAL_LAYERS, Mosaic
from pipeline.query.region import check_layer, read_window
from pipeline.query.window import MAX_PIXELS, Window, check_size, full, resolve, window_transform
from pipeline.stitching import nodata_class
from pipeline.tiling import Rect

COG_LAYERS = ("mask", "confidence", *OPTIONAL_LAYERS)
GREY_LAYERS = ("confidence", *OPTIONAL_LAYERS)  # values in [0, 1], shown in grey
STRIP = 2048  # rows read and written at a time by the COG export


def export_cog(
    m: Mosaic,
    path: str | Path,
    layer: str = "mask",
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
) -> Path:
    """Write a region (default: the whole image) of a georeferenced mosaic as a COG with overviews.

    `mask` is written as class ids with the class colour table (uint8, nodata 255; uint16, nodata 65535
    for models of over 254 classes), with nearest-neighbour overviews; `confidence` (and `uncertainty`,
    `spread` where the mosaic has them) as float32, nodata NaN (averaged overviews).

    Raises:
        RegionError: the mosaic has no CRS (slides: use `export_png`), or a bad region or layer.
    """
    import rasterio
    from rasterio.shutil import copy as gdal_copy

    layout = m.layout
    if layout.crs is None or layout.transform is None:
        raise RegionError("a COG needs a georeferenced mosaic; this one has no CRS (export a PNG instead)")
    check_layer(m, layer, COG_LAYERS)
    win = resolve(layout, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution)
    out = Path(path)
    if out.is_dir():
        raise RegionError(f"{out} is a folder: give a file name such as {out / 'mask.tif'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype, nodata, resampling = (layout.mask_dtype, layout.mask_nodata, "NEAREST") if layer == "mask" else (
        "float32", float("nan"), "AVERAGE")
    staging = out.with_name(f".{out.name}.strips.tif")
    partial = out.with_name(f".{out.name}.partial")
    profile = {
        "driver": "GTiff", "height": win.rect.height, "width": win.rect.width, "count": 1, "dtype": dtype,
        "crs": layout.crs, "transform": window_transform(layout, win), "nodata": nodata,
        "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }
    try:
        with rasterio.open(staging, "w", **profile) as dst:
            for y in range(0, win.rect.height, STRIP):
                strip = Window(win.level, Rect(win.rect.y0 + y, win.rect.x0,
                                               min(win.rect.y0 + y + STRIP, win.rect.y1), win.rect.x1))
                values = read_window(m, strip, layer).astype(dtype)
                dst.write(values, 1, window=rasterio.windows.Window(0, y, values.shape[1], values.shape[0]))
            if layer == "mask":
                dst.write_colormap(1, {i: (*c.color, 255) for i, c in enumerate(layout.classes)}
                                   | {layout.mask_nodata: (0, 0, 0, 0)})
            dst.update_tags(classes=",".join(c.name for c in layout.classes), level=str(win.level),
                            source=str(m.path))
        gdal_copy(staging, partial, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE="512",
                  OVERVIEW_RESAMPLING=resampling, BIGTIFF="IF_SAFER")
        os.replace(partial, out)
    finally:
        for leftover in (staging, partial):
            leftover.unlink(missing_ok=True)
    return out


def mask_png(mask: np.ndarray, palette: np.ndarray) -> bytes:
    """A PNG of a class mask coloured by `palette` (`Mosaic.palette`), nodata transparent.

    A uint8 mask gives a paletted PNG whose pixel values are the class ids (nodata 255); a uint16 mask
    (over 254 classes: more than a PNG palette holds) gives RGBA, nodata (65535) with alpha 0.
    """
    from PIL import Image

    buffer = io.BytesIO()
    nodata = nodata_class(mask.dtype)
    if mask.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(mask), mode="P")
        image.putpalette(palette[:256].ravel().tolist())
        alpha = bytes(0 if i == nodata else 255 for i in range(256))
        image.save(buffer, format="PNG", transparency=alpha, compress_level=1)
    else:
        rgba = np.dstack([palette[mask], np.where(mask == nodata, 0, 255).astype(np.uint8)])
        Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grey_png(values: np.ndarray) -> bytes:
    """A PNG of values in [0, 1] (confidence) as grey levels; NaN is transparent."""
    from PIL import Image

    valid = np.isfinite(values)
    grey = (np.clip(np.nan_to_num(values.astype(np.float32)), 0, 1) * 255).astype(np.uint8)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def export_png(
    m: Mosaic,
    path: str | Path,
    *,
    layer: str = "mask",
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> Path:
    """Write a region as PNG: the mask in the class colours (`mask_png`, nodata transparent) or the
    confidence (or uncertainty, spread) in grey. Without a region or level, the whole image at the
    finest level whose longer side fits in sqrt(`max_pixels`)."""
    win = resolve(m.layout, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution)
    if window is None and bbox is None and level is None and resolution is None and max_pixels is not None:
        win = full(m.layout, m.preview_level(math.isqrt(max_pixels)))  # the finest level that fits
    check_size(win, max_pixels)
    png = render_png(m, win, layer)
    return write_atomically(path, png)


def render_png(m: Mosaic, win: Window, layer: str) -> bytes:
    if layer == "mask":
        return mask_png(read_window(m, win, "mask"), m.palette)
    return grey_png(read_window(m, win, check_layer(m, layer, ("mask", *GREY_LAYERS))))


def npy_bytes(values: np.ndarray) -> bytes:
    """An array in NumPy's .npy format."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()

