"""`TiffSource`: OME-TIFF and TIFFs that GDAL cannot decode, through tifffile + zarr."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tifffile
import zarr

from pipeline.errors import SourceReadError
from pipeline.sources.base import Level, RasterSource, SourceInfo

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

BAND_AXES = "CS"  # tifffile's channel and sample axes: both become bands

# Length units OME and ImageJ use, in microns.
MICRONS_PER_UNIT = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # Greek mu
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "\\u00B5m": 1.0,  # as ImageJ writes it
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}

# How many pages per pyramid level `describe_truncation` inspects (plus the last one, where a
# truncated file is broken); files with thousands of planes need not be parsed in full.
PAGES_CHECKED = 64


@dataclass
class _TiffHandle:
    """An open TIFF with the zarr view of the working level's series level."""

    tif: tifffile.TiffFile
    array: Any
    axes: str


class TiffSource(RasterSource):
    """A TIFF read through tifffile, windowed via ``series.aszarr(level=k)`` and zarr.

    Meant for OME-TIFF (pyramids as SubIFDs or as extra series levels) and for TIFFs GDAL
    cannot decode (e.g. some codecs only imagecodecs has). The first series is read; its
    channel and sample axes (``C``, ``S``) become bands and any other axis (``T``, ``Z``, ...)
    is read at index 0. ``mpp`` comes from the OME ``PhysicalSizeX`` or from ImageJ metadata
    (unit and XResolution), scaled to the working level; other TIFFs report None, because a
    bare resolution tag is usually a 72 dpi placeholder. Every pixel inside is valid
    (``nodata`` is None) and `foreground` is all True.

    Args:
        path: The TIFF file.
        level: Working level (0 = full resolution).

    Example:
        >>> with TiffSource("section.ome.tif", level=2) as source:
        ...     source.mpp, source.read(0, 0, 256, 256).shape
    """

    reader: ClassVar[str] = "tifffile"

    def _open(self) -> tuple[Any, SourceInfo]:
        tif = tifffile.TiffFile(self.path)
        try:
            series = tif.series[0]
            axes = series.axes
            if "Y" not in axes or "X" not in axes:
                raise SourceReadError(
                    f"{self.path}: its first image has axes {axes!r}, not an image with Y and X "
                    "axes; export the image plane as a 2-D (optionally multi-channel) TIFF"
                )
            y_axis, x_axis = axes.index("Y"), axes.index("X")
            height0, width0 = series.levels[0].shape[y_axis], series.levels[0].shape[x_axis]
            levels = tuple(
                Level(
                    lvl.shape[y_axis],
                    lvl.shape[x_axis],
                    (height0 / lvl.shape[y_axis] + width0 / lvl.shape[x_axis]) / 2,
                )
                for lvl in series.levels
            )
            self._require_level(levels)
            bands = math.prod(
                size for size, axis in zip(series.shape, axes, strict=True) if axis in BAND_AXES
            )
            info = SourceInfo(
                levels=levels,
                bands=bands,
                dtype=np.dtype(series.dtype),
                mpp0=_ome_microns_per_pixel(tif) or _imagej_microns_per_pixel(tif),
            )
            array = zarr.open_array(series.aszarr(level=self.level), mode="r")
        except BaseException:
            tif.close()
            raise
        return _TiffHandle(tif, array, axes), info

    def _close_handle(self, handle: Any) -> None:
        handle.tif.close()

    def _read_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        handle = self._handle
        assert isinstance(handle, _TiffHandle)
        index: list[slice | int] = []
        kept = ""
        for axis in handle.axes:
            if axis == "Y":
                index.append(slice(y0, y0 + h))
            elif axis == "X":
                index.append(slice(x0, x0 + w))
            elif axis in BAND_AXES:
                index.append(slice(None))
            else:
                index.append(0)
                continue
            kept += axis
        window = np.asarray(handle.array[tuple(index)])
        order = [i for i, axis in enumerate(kept) if axis in BAND_AXES]
        order += [kept.index("Y"), kept.index("X")]
        return np.ascontiguousarray(window.transpose(order).reshape(self.bands, h, w))

    def _valid_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return np.ones((h, w), dtype=bool)

    def foreground(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """All True: a generic TIFF carries no mask, and its content is unknown.

        Arguments, result and errors as in `RasterSource.foreground`.
        """
        factor, mh, mw = self._foreground_grid(max_size)
        return np.ones((mh, mw), dtype=bool), float(factor)


def is_tiff(path: str | Path) -> bool:
    """True when the file starts with a TIFF or BigTIFF signature.

    Args:
        path: A local file.

    Returns:
        Whether the first four bytes are a TIFF byte-order mark and version.
    """
    try:
        with open(path, "rb") as file:
            return file.read(4) in TIFF_MAGIC
    except OSError:
        return False


def is_ome_tiff(path: str | Path) -> bool:
    """True when the file is a TIFF whose first page carries OME-XML.

    Args:
        path: A local file.

    Returns:
        Whether tifffile recognises it as OME-TIFF; False for unreadable files.
    """
    if not is_tiff(path):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:
        return False


def describe_truncation(path: str | Path) -> str | None:
    """Say how a TIFF is cut short, if it is: image data or directories past the file's end.

    Only definite truncation is reported; a TIFF tifffile cannot parse at all is left to the
    readers to judge, since GDAL or OpenSlide may still read it.

    Args:
        path: A local TIFF file.

    Returns:
        A sentence describing the damage, or None if nothing is missing.
    """
    size = Path(path).stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                return "it has no readable image directory (the header points past the data)"
            for series in tif.series:
                for level in series.levels:
                    pages = [*level.pages[:PAGES_CHECKED], level.pages[-1]]
                    for page in pages:
                        if page is None or not len(page.dataoffsets):
                            continue
                        end = int(np.max(np.add(page.dataoffsets, page.databytecounts)))
                        if end > size:
                            return f"its image data runs to byte {end} but the file has only {size} bytes"
    except Exception:
        return None
    return None


def _ome_microns_per_pixel(tif: tifffile.TiffFile) -> float | None:
    """Level-0 microns per pixel from the first OME Pixels element's PhysicalSizeX."""
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        root = ElementTree.fromstring(tif.ome_metadata)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            size = element.get("PhysicalSizeX")
            factor = MICRONS_PER_UNIT.get(element.get("PhysicalSizeXUnit", "µm"))
            if size is None or factor is None or float(size) <= 0:
                return None
            return float(size) * factor
    return None


def _imagej_microns_per_pixel(tif: tifffile.TiffFile) -> float | None:
    """Level-0 microns per pixel from ImageJ's unit and the first page's XResolution."""
    metadata = tif.imagej_metadata
    if not metadata:
        return None
    factor = MICRONS_PER_UNIT.get(str(metadata.get("unit", "")))
    tag = tif.pages.first.tags.get("XResolution")
    if factor is None or tag is None:
        return None
    numerator, denominator = tag.value
    if numerator <= 0 or denominator <= 0:
        return None
    return factor * denominator / numerator
