"""The source image under a mosaic at every zoom, read from the source's own pyramid.

`SourcePyramid` is a `Pyramid` (see tiles.py) whose levels are the source file's own: its working
level (the one the mosaic was computed from, which covers the mosaic's level 0) and every coarser
level the file has (a COG's or GeoTIFF's overviews, a tiled pyramidal TIFF's reduced-resolution
images). A map tile reads one window of the level whose pixels match the tile's (tiles.py picks it),
so at the deepest zoom the viewer shows the source's own full-resolution pixels, and memory is one
window of at most `MAX_TILE_FACTOR` x the tile's size on a side, whatever the size of the source.

Raw values become display bytes through one stretch per source (2nd to 98th percentile of each band,
`pipeline.sources.display`), computed once from a low-resolution read, `read_coarse` at
`STRETCH_SIZE` px: every tile of a source shares it, so tiles match at their seams and across zooms.
That read is also kept as the coarsest level when the file has no level that coarse (a source without
overviews): low zooms then show it, as the old preview did, rather than read the whole image.

Sources are opened as previews are (`opened_source`): with `allowed` (the service), only a local TIFF
inside the allowed folders, through GDAL's GTiff driver alone, every file it names inside them too,
under `OFFLINE_GDAL`. Each level's open file handles are kept in a small pool, one per request at a
time (a GDAL handle is not shared between threads), every new handle checked as the first was.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from pipeline.errors import ContainmentError, RegionError, TesseraError
from pipeline.mosaic import Mosaic
from pipeline.query.preview import OFFLINE_GDAL, SourcePreview, coarse_preview, opened_source, read_coarse, rgba
from pipeline.query.window import level_transform
from pipeline.sources.base import RasterSource
from pipeline.sources.display import stretch_limits
from pipeline.tiling import Rect

STRETCH_SIZE = 2048  # the low-resolution read the stretch is computed from, px on its longer side
POOL = 4  # open handles kept per level


@dataclass
class SourcePyramid:
    """A mosaic's source image as a `Pyramid` of (4, h, w) uint8 RGBA in the mosaic's frame.

    Level k of the pyramid is the source's file level `file_levels[k]`; a last, in-memory level
    (`coarse`) is there when the file has nothing as coarse.
    """

    source: RasterSource  # at its working level, probed and kept open (its levels are read from it)
    name: str  # the file's name, for messages
    frame: Affine  # the mosaic's level-0 transform
    size: tuple[int, int]  # the mosaic's level-0 (height, width)
    crs: str | None
    limits: np.ndarray  # (3, 2): the display stretch, low and high of each shown band
    offline: bool  # read under OFFLINE_GDAL (the service)
    coarse: SourcePreview | None = None
    bands: int = 4
    nodata: float = 0.0
    _pool: dict[int, list[RasterSource]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.dtype = np.dtype(np.uint8)
        self.file_levels = list(range(self.source.level, len(self.source.levels)))
        self.num_levels = len(self.file_levels) + (self.coarse is not None)

    def shape(self, level: int) -> tuple[int, int]:
        if level == len(self.file_levels):
            assert self.coarse is not None
            return self.coarse.shape(0)
        lv = self.source.levels[self.file_levels[level]]
        return lv.height, lv.width

    def transform(self, level: int) -> Affine:
        if level == len(self.file_levels):
            assert self.coarse is not None
            return self.coarse.frame
        h, w = self.shape(level)
        return self.frame @ Affine.scale(self.size[1] / w, self.size[0] / h)  # same ground as mosaic level 0

    def read(self, level: int, rect: Rect) -> np.ndarray:
        """The window `rect` of `level` (inside it), stretched for display, transparent where no data."""
        if level == len(self.file_levels):
            assert self.coarse is not None
            return self.coarse.read(0, rect)
        with self._handle(self.file_levels[level]) as source:
            raw = source.read(rect.y0, rect.x0, rect.height, rect.width)
            valid = source.valid(rect.y0, rect.x0, rect.height, rect.width)
        return rgba(raw, valid, self.limits)

    @contextlib.contextmanager
    def _handle(self, file_level: int) -> Iterator[RasterSource]:
        """An open source at `file_level` for this thread alone, back to the pool afterwards."""
        with self._lock:
            free = self._pool.setdefault(file_level, [])
            source = free.pop() if free else self.source.at_level(file_level)
        try:
            with rasterio.Env(**OFFLINE_GDAL) if self.offline else contextlib.nullcontext():
                yield source
        except BaseException as e:  # whatever failed, this handle is closed, not pooled
            source.close()
            if isinstance(e, TesseraError) and not isinstance(e, ContainmentError):
                raise RegionError(f"the source image {self.name} cannot be read: "
                                  f"{str(e).replace(str(source.path), self.name)}") from None
            raise
        with self._lock:
            keep = len(free) < POOL
            if keep:
                free.append(source)
        if not keep:
            source.close()


def source_pyramid(m: Mosaic, allowed: Sequence[Path] | None = None) -> SourcePyramid:
    """The pyramid of a mosaic's source image, for map tiles: its levels described and its display
    stretch computed (one low-resolution read); pixels are read per tile.

    Args:
        allowed: as `source_preview`: the folders the source (and every file GDAL finds for it) must
            lie in; None (library use) opens any source any reader opens.

    Raises:
        RegionError: the mosaic does not record its source, the source is not readable here, or it
            has no level under 16 x `STRETCH_SIZE` px on a side (add overviews).
        ContainmentError: with `allowed`, the source lies outside them, is not a local TIFF, or names
            a file outside them.

    Example:
        >>> from pipeline.query.tiles import pixel_tile
        >>> tile = pixel_tile(source_pyramid(mosaic), z=3, x=1, y=2)  # (4, 256, 256) RGBA
    """
    layout = m.layout
    with opened_source(m, allowed) as (source, name):
        raw, valid, stride, h, w = read_coarse(source, name, STRETCH_SIZE)
    limits = stretch_limits(raw, valid)
    coarse = None
    coarsest = source.levels[-1]
    if stride > 1 and (h, w) == (coarsest.height, coarsest.width):  # the file has nothing this coarse
        coarse = coarse_preview(m, raw, valid, stride, (h, w), limits)
    return SourcePyramid(source, name, level_transform(layout, 0), (layout.height, layout.width), layout.crs,
                         limits, offline=allowed is not None, coarse=coarse)
