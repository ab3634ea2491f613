"""A small RGBA preview of a mosaic's source image, for the viewer's base layer.

The source is found through the mosaic's lineage (`lineage.source.path` and `level`). The preview is
read from the source's coarsest level that is still at least `max_size` px on its longer side, in
strips of rows, each decimated as it is read, so memory stays bounded by one strip whatever the size
of the source. Pixels where the source has no data are transparent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from pipeline.errors import RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.window import level_transform
from pipeline.sources.display import display_rgb
from pipeline.tiling import Rect

STRIP_ROWS = 512  # source rows read at a time


@dataclass
class SourcePreview:
    """The preview as a one-level `Pyramid` (see tiles.py): (4, h, w) uint8 RGBA in the mosaic's frame."""

    rgba: np.ndarray
    frame: Affine  # pixel -> coordinates of the preview
    crs: str | None
    num_levels: int = 1
    bands: int = 4
    nodata: float = 0.0

    def __post_init__(self) -> None:
        self.dtype = np.dtype(np.uint8)

    def shape(self, level: int) -> tuple[int, int]:
        return self.rgba.shape[1], self.rgba.shape[2]

    def transform(self, level: int) -> Affine:
        return self.frame

    def read(self, level: int, rect: Rect) -> np.ndarray:
        return self.rgba[:, rect.y0 : rect.y1, rect.x0 : rect.x1]


def source_preview(m: Mosaic, max_size: int = 2048) -> SourcePreview:
    """Read the preview of a mosaic's source.

    Raises:
        RegionError: the mosaic does not record its source, or the source cannot be read here.
    """
    from pipeline.errors import TesseraError
    from pipeline.sources import open_source

    src = m.lineage.get("source") or {}
    path = src.get("path")
    if not path or not Path(path).exists():
        raise RegionError(f"the source image of {m.path} ({path or 'not recorded'}) is not readable here")
    layout = m.layout
    try:
        source = open_source(path, int(src.get("level", 0)))
        levels = source.levels
        working = levels[source.level]
        # The coarsest file level still at least max_size px (or the working level if none is).
        candidates = [i for i, lv in enumerate(levels)
                      if i >= source.level and max(lv.height, lv.width) >= min(max_size, max(working.height,
                                                                                              working.width))]
        coarse = source.at_level(max(candidates)) if candidates else source
        h, w = coarse.height, coarse.width
        stride = max(1, math.ceil(max(h, w) / max_size))
        rows, cols = math.ceil(h / stride), math.ceil(w / stride)
        raw = np.zeros((coarse.bands, rows, cols), coarse.dtype)
        valid = np.zeros((rows, cols), bool)
        step = max(stride, STRIP_ROWS // stride * stride)
        for y in range(0, h, step):
            n = min(step, h - y)
            raw[:, y // stride : (y + n + stride - 1) // stride] = coarse.read(y, 0, n, w)[:, ::stride, ::stride]
            valid[y // stride : (y + n + stride - 1) // stride] = coarse.valid(y, 0, n, w)[::stride, ::stride]
    except TesseraError as e:
        raise RegionError(f"the source image {path} cannot be read for a preview: {e}") from None
    rgba = np.concatenate([display_rgb(raw, valid).transpose(2, 0, 1), valid[None].astype(np.uint8) * 255])
    # The preview covers the same ground as mosaic level 0 (the source's working level).
    frame = level_transform(layout, 0) @ Affine.scale(stride * layout.width / w, stride * layout.height / h)
    return SourcePreview(rgba, frame, layout.crs)
