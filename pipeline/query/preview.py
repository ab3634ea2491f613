"""A small RGBA preview of a mosaic's source image, for the viewer's base layer.

The source is found through the mosaic's lineage (`lineage.source.path` and `level`). The preview is
read from the source's coarsest level that is still at least `max_size` px on its longer side, in
blocks of about 1024 px, each decimated as it is read, so memory stays bounded by one block whatever
the size of the source. A source whose coarsest level is over 16 times the preview's size on a side
(no overviews) is refused rather than read whole. Pixels where the source has no data are transparent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from pipeline.errors import RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.window import level_transform
from pipeline.sources.display import display_rgb
from pipeline.tiling import Rect

STRIP = 1024  # the preview reads the source in blocks of about this edge, px
MAX_READ_FACTOR = 16  # refuse a preview that would read a level over 16 x its size on a side


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


def source_preview(m: Mosaic, max_size: int = 2048, allowed: Sequence[Path] | None = None) -> SourcePreview:
    """Read the preview of a mosaic's source.

    Args:
        max_size: the preview's longer side, px.
        allowed: folders the source must lie in (the service passes its own); None allows any.

    Raises:
        RegionError: the mosaic does not record its source, the source is not readable here or lies
            outside `allowed`, or its coarsest level is so large that a preview would read more than
            `MAX_READ_FACTOR`^2 times the preview's pixels (add overviews to it).
    """
    from pipeline.errors import TesseraError
    from pipeline.sources import open_source

    src = m.lineage.get("source") or {}
    path = src.get("path")
    if not path or not Path(path).exists():
        raise RegionError(f"the source image of {m.path} ({path or 'not recorded'}) is not readable here")
    if allowed is not None and not any(Path(path).resolve().is_relative_to(folder) for folder in allowed):
        raise RegionError(f"the source image {path} lies outside the served folders: "
                          "pass its folder with `tessera serve --sources FOLDER` to preview it")
    layout = m.layout
    try:
        source = open_source(path, int(src.get("level", 0)))
        levels = source.levels
        working = levels[source.level]
        # The coarsest file level still at least max_size px (or the working level if none is).
        floor = min(max_size, max(working.height, working.width))
        candidates = [i for i, lv in enumerate(levels) if i >= source.level and max(lv.height, lv.width) >= floor]
        coarse = source.at_level(max(candidates)) if candidates else source
        h, w = coarse.height, coarse.width
        if max(h, w) > MAX_READ_FACTOR * max_size:
            raise RegionError(f"the source image {path} has no level under {MAX_READ_FACTOR * max_size} px "
                              f"(its coarsest is {h} x {w}): add overviews (e.g. gdaladdo) for a preview")
        stride = max(1, math.ceil(max(h, w) / max_size))
        rows, cols = math.ceil(h / stride), math.ceil(w / stride)
        raw = np.zeros((coarse.bands, rows, cols), coarse.dtype)
        valid = np.zeros((rows, cols), bool)
        step = max(stride, STRIP // stride * stride)  # a multiple of the stride, so samples stay on the grid
        for y in range(0, h, step):
            for x in range(0, w, step):
                n, k = min(step, h - y), min(step, w - x)
                out = (slice(y // stride, -(-(y + n) // stride)), slice(x // stride, -(-(x + k) // stride)))
                raw[(slice(None), *out)] = coarse.read(y, x, n, k)[:, ::stride, ::stride]
                valid[out] = coarse.valid(y, x, n, k)[::stride, ::stride]
    except TesseraError as e:
        raise RegionError(f"the source image {path} cannot be read for a preview: {e}") from None
    rgba = np.concatenate([display_rgb(raw, valid).transpose(2, 0, 1), valid[None].astype(np.uint8) * 255])
    # The preview covers the same ground as mosaic level 0 (the source's working level).
    frame = level_transform(layout, 0) @ Affine.scale(stride * layout.width / w, stride * layout.height / h)
    return SourcePreview(rgba, frame, layout.crs)
