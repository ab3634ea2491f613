"""One image from several single-band rasters on one pixel grid: a GDAL VRT whose band i reads file i.

Satellite products often ship each band as its own file (a STAC item's "B04", "B08" assets); a model
that wants them together reads the VRT, which GDAL and rasterio open like any raster without copying
pixels. Overviews of the files serve as the VRT's own, so pyramid levels keep working.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.sources.base import is_local_file

__all__ = ["write_band_stack"]


@dataclass(frozen=True)
class _BandFile:
    """What the VRT needs to know about one file."""

    label: str
    path: str
    width: int
    height: int
    crs: Any  # rasterio.crs.CRS | None
    transform: Any  # affine.Affine
    dtype: str
    nodata: float | None
    block: tuple[int, int]


def write_band_stack(path: Path, files: Sequence[str], labels: Sequence[str], owner: str) -> Path:
    """Write a VRT at `path` whose band i is band 1 of `files[i]`, all on the first file's grid.

    Args:
        path: The VRT to write (replaced atomically if it exists; its folder is created).
        files: Local paths or GDAL paths (/vsis3/..., /vsicurl/...) of single-band rasters.
        labels: One name per file (a STAC asset key), kept as the band's description and used in errors.
        owner: What the stack is, for error messages ("STAC item 'S2A_...'").

    Returns:
        `path`, made absolute.

    Raises:
        SourceNotFoundError: A local file does not exist.
        SourceReadError: A file cannot be read.
        ConfigError: A file has more than one band, or the files differ in size, CRS or transform.

    Example:
        >>> write_band_stack(Path("stacks/scene.vrt"), ["/data/B04.tif", "/data/B08.tif"], ["B04", "B08"],
        ...                  "scene")
    """
    if not files or len(files) != len(labels):
        raise ConfigError(f"{owner}: a band stack needs one label per file, got {len(files)} file(s) and "
                          f"{len(labels)} label(s); pass one label for each file")
    bands = [_read_band_file(file, label, owner) for file, label in zip(files, labels, strict=True)]
    first = bands[0]
    for band in bands[1:]:
        for what, same in (("size", (band.width, band.height) == (first.width, first.height)),
                           ("CRS", band.crs == first.crs),
                           ("transform", band.transform.almost_equals(first.transform))):
            if not same:
                raise ConfigError(
                    f"{owner}: {band.label!r} has {what} {_describe(band, what)} but {first.label!r} has "
                    f"{_describe(first, what)}; stacked bands must share one pixel grid, so choose inputs of one "
                    "resolution and projection (e.g. other --asset keys) or resample them first")
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # not mkstemp: its files are private (0600)
    try:
        with temp.open("x", encoding="utf-8") as f:
            f.write(_vrt_xml(bands))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _read_band_file(file: str, label: str, owner: str) -> _BandFile:
    import rasterio
    from rasterio.errors import RasterioIOError

    if is_local_file(file) and not Path(file).exists():
        raise SourceNotFoundError(f"{owner}: {label!r} ({file}) does not exist; check its path")
    try:
        with rasterio.open(file) as ds:
            if ds.count != 1:
                raise ConfigError(f"{owner}: {label!r} ({file}) has {ds.count} bands; a band stack takes one band "
                                  "per file, so stack single-band files or read this one on its own")
            return _BandFile(label, file, ds.width, ds.height, ds.crs, ds.transform, ds.dtypes[0], ds.nodata,
                             ds.block_shapes[0])
    except RasterioIOError as e:
        raise SourceReadError(f"{owner}: {label!r} ({file}) cannot be read: {e}") from e


def _describe(band: _BandFile, what: str) -> str:
    if what == "size":
        return f"{band.width}x{band.height}"
    if what == "CRS":
        return str(band.crs.to_string() if band.crs is not None else None)
    return str(tuple(round(v, 6) for v in band.transform[:6]))


def _vrt_xml(bands: Sequence[_BandFile]) -> str:
    """The VRT document; every band gets the widest data type of the files, so the image reads as one array."""
    import numpy as np
    from rasterio.dtypes import dtype_rev, typename_fwd

    def gdal_type(dtype: str) -> str:
        return typename_fwd[dtype_rev[dtype]]

    first = bands[0]
    dtype = np.result_type(*[b.dtype for b in bands]).name
    root = ET.Element("VRTDataset", rasterXSize=str(first.width), rasterYSize=str(first.height))
    if first.crs is not None:
        ET.SubElement(root, "SRS").text = first.crs.to_wkt()
    if first.crs is not None or not first.transform.is_identity:
        ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in first.transform.to_gdal())
    window = {"xOff": "0", "yOff": "0", "xSize": str(first.width), "ySize": str(first.height)}
    for index, band in enumerate(bands, start=1):
        element = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type(dtype), band=str(index))
        ET.SubElement(element, "Description").text = band.label
        if band.nodata is not None:
            ET.SubElement(element, "NoDataValue").text = repr(float(band.nodata))
        source = ET.SubElement(element, "SimpleSource")
        ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = band.path
        ET.SubElement(source, "SourceBand").text = "1"
        ET.SubElement(source, "SourceProperties", RasterXSize=str(band.width), RasterYSize=str(band.height),
                      DataType=gdal_type(band.dtype), BlockXSize=str(band.block[1]), BlockYSize=str(band.block[0]))
        ET.SubElement(source, "SrcRect", window)
        ET.SubElement(source, "DstRect", window)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"
