"""A small RGBA preview of a mosaic's source image, for the viewer's base layer.

The source is found through the mosaic's lineage (`lineage.source.path` and `level`). The preview is
read from the source's coarsest level that is still at least `max_size` px on its longer side, in
blocks of about 1024 px, each decimated as it is read, so memory stays bounded by one block whatever
the size of the source. A source whose coarsest level is over 16 times the preview's size on a side
(no overviews) is refused rather than read whole. Pixels where the source has no data are transparent.

With `allowed` (the service), the preview reads only a file that cannot lead anywhere else: a local
TIFF inside the allowed folders, opened by GDAL's GTiff driver alone (so a VRT, whose XML may name any
file, a raw file or a /vsicurl/ URL, is never parsed: it is not a TIFF), every file GDAL then lists for
it (.ovr, .msk, .aux.xml beside it) resolving inside the allowed folders too, under `OFFLINE_GDAL`.
TIFFs only OpenSlide or tifffile decode get no preview there: those readers follow files a slide or an
OME-TIFF names (MIRAX folders, multi-file OME series) with no way to confine them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

from pipeline.errors import ContainmentError, RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.window import level_transform
from pipeline.sources.base import RasterSource
from pipeline.sources.display import apply_stretch, stretch_limits
from pipeline.sources.geotiff import GeoTiffSource
from pipeline.tiling import Rect

STRIP = 1024  # the preview reads the source in blocks of about this edge, px
MAX_READ_FACTOR = 16  # refuse a preview that would read a level over 16 x its size on a side
# GDAL with no way out of the local disk: no raw-file VRT bands, no /vsicurl/ (nor /vsis3/ and the
# other network file systems built on it: no extension matches), no PROJ grid downloads. For the
# service only (`tessera serve` sets them for its whole process); jobs read object storage through GDAL.
OFFLINE_GDAL = {
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tessera-no-network",
    "GDAL_HTTP_MAX_RETRY": "0",
    "PROJ_NETWORK": "OFF",
}


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
        allowed: folders the source (and every file it leads GDAL to) must lie in; the service passes
            its own, and then only single-file TIFFs GDAL's GTiff driver reads are previewed (see above).
            None allows any source any reader opens.

    Raises:
        RegionError: the mosaic does not record its source, the source is not readable here, or its
            coarsest level is so large that a preview would read more than `MAX_READ_FACTOR`^2 times
            the preview's pixels (add overviews to it).
        ContainmentError: with `allowed`, the source lies outside them, is not a local TIFF, or names
            a file outside them.
    """
    with opened_source(m, allowed) as (source, name):
        raw, valid, stride, h, w = read_coarse(source, name, max_size)
    return coarse_preview(m, raw, valid, stride, (h, w), stretch_limits(raw, valid))


def coarse_preview(m: Mosaic, raw: np.ndarray, valid: np.ndarray, stride: int, size: tuple[int, int],
                   limits: np.ndarray) -> SourcePreview:
    """`read_coarse`'s values (read at `stride` from a level of `size`) stretched by `limits`, as a preview
    covering the same ground as mosaic level 0 (the source's working level)."""
    layout = m.layout
    h, w = size
    frame = level_transform(layout, 0) @ Affine.scale(stride * layout.width / w, stride * layout.height / h)
    return SourcePreview(rgba(raw, valid, limits), frame, layout.crs)


def rgba(raw: np.ndarray, valid: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(4, h, w) uint8: `raw` (bands, h, w) stretched by `limits`, opaque where `valid`."""
    return np.concatenate([apply_stretch(raw, limits).transpose(2, 0, 1), valid[None].astype(np.uint8) * 255])


@contextlib.contextmanager
def opened_source(m: Mosaic, allowed: Sequence[Path] | None) -> Iterator[tuple[RasterSource, str]]:
    """The source of a mosaic at its working level, probed, and its file name for messages (never a
    server path); with `allowed`, checked and opened as the module's docstring says, the block run
    under `OFFLINE_GDAL`. A `TesseraError` of the block becomes a `RegionError` naming the file only.

    Raises:
        RegionError, ContainmentError: as `source_preview`.
    """
    from pipeline.errors import TesseraError
    from pipeline.sources import open_source

    src = m.lineage.get("source") or {}
    path = str(src.get("path") or "")
    name = Path(path).name or "not recorded"  # messages name the file, never a server path
    if path and allowed is not None:
        _check_local_inside(path, allowed)
    if not path or not Path(path).exists():
        raise RegionError(f"the source image of this mosaic ({name}) is not readable here")
    try:
        with rasterio.Env(**OFFLINE_GDAL) if allowed is not None else contextlib.nullcontext():
            source: RasterSource
            if allowed is None:
                source = open_source(path, int(src.get("level", 0)))
            else:
                single = _SingleTiff(Path(path).resolve(), 0, tuple(allowed))
                single._probe()
                source = single.at_level(min(int(src.get("level", 0)), len(single.levels) - 1))
            yield source, name
    except ContainmentError:
        raise
    except TesseraError as e:
        raise RegionError(f"the source image {name} cannot be read: {without_path(str(e), path)}") from None


def without_path(message: str, path: str) -> str:
    """`message` with the source's path (as given and resolved) replaced by its file name."""
    name = Path(path).name
    return message.replace(str(Path(path).resolve()), name).replace(path, name)


def read_coarse(source: RasterSource, name: str, max_size: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """The raw values and validity of an open source at about `max_size` px on its longer side, the
    stride they were sampled at, and the size of the level they were read from (the coarsest file
    level still at least `max_size` px, or the working level if none is), read in blocks."""
    levels = source.levels
    working = levels[source.level]
    floor = min(max_size, max(working.height, working.width))
    candidates = [i for i, lv in enumerate(levels) if i >= source.level and max(lv.height, lv.width) >= floor]
    coarse = source.at_level(max(candidates)) if candidates else source
    h, w = coarse.height, coarse.width
    if max(h, w) > MAX_READ_FACTOR * max_size:
        raise RegionError(f"the source image {name} has no level under {MAX_READ_FACTOR * max_size} px "
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
    return raw, valid, stride, h, w


def _check_local_inside(path: str, allowed: Sequence[Path]) -> None:
    """Refuse a source that is not a plain local path resolving inside one of `allowed`."""
    from pipeline.storage import Location

    name = Path(path).name or "not recorded"
    if path.startswith("/vsi") or not Location.parse(path).is_local:
        raise ContainmentError(f"the source image {name} of this mosaic is not a local file: the service "
                               "previews only files inside ROOT or a --sources folder")
    if not _inside(Path(path), allowed):
        raise ContainmentError(f"the source image {name} lies outside the served folders: pass its folder "
                               "with `tessera serve --sources FOLDER` to preview it")


def _inside(path: Path | str, allowed: Sequence[Path]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(folder) for folder in allowed)


class _SingleTiff(GeoTiffSource):
    """A GeoTiffSource GDAL opens with its GTiff driver alone, whose every file lies inside `allowed`."""

    driver = "GTiff"

    def __init__(self, path: str | Path, level: int = 0, allowed: tuple[Path, ...] = ()) -> None:
        super().__init__(path, level)
        self.allowed = allowed

    def at_level(self, level: int) -> _SingleTiff:
        self._require_level(self.levels, int(level))
        return _SingleTiff(self.path, int(level), self.allowed)

    def _open(self) -> tuple[Any, Any]:
        try:
            handle, info = super()._open()
        except rasterio.errors.RasterioIOError:
            raise ContainmentError(f"the source image {Path(self.path).name} is not a TIFF GDAL reads: the "
                                   "service previews only TIFF files (a VRT or another format that names other "
                                   "files is never opened)") from None
        outside = [f for f in handle.files if not _inside(f, self.allowed)]
        if outside:
            handle.close()
            raise ContainmentError(f"the source image {Path(self.path).name} leads to {len(outside)} file(s) "
                                   "outside the served folders (a link beside it?): it is not previewed")
        return handle, info
