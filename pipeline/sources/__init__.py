"""Raster sources: one windowed, boundless reading interface over every image format we take.

`open_source` picks the reader for a file:

- whole-slide images that OpenSlide recognises as a vendor format (``.svs``, ``.ndpi``,
  ``.mrxs``, ``.scn``, ``.vms``, ``.vmu``, ``.bif``, vendor ``.tif``) -> `SlideSource`;
- OME-TIFF without a CRS -> `TiffSource` (tifffile);
- everything else (GeoTIFF, COG, plain TIFF, other GDAL formats) -> `GeoTiffSource`
  (rasterio), falling back to `TiffSource` for TIFFs GDAL cannot decode.
"""

from __future__ import annotations

import os
from pathlib import Path

import openslide

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.sources.base import Level, RasterSource, SourceInfo, reflect_indices
from pipeline.sources.geotiff import GeoTiffSource
from pipeline.sources.slide import SlideSource, detect_tissue
from pipeline.sources.tiff import TiffSource, describe_truncation, is_ome_tiff, is_tiff
from pipeline.storage import Location, storage_for

__all__ = [
    "GeoTiffSource",
    "Level",
    "RasterSource",
    "SlideSource",
    "SourceInfo",
    "TiffSource",
    "detect_tissue",
    "open_source",
    "reflect_indices",
]

# Slides of one file, read on object storage through a local copy (MIRAX and VMS have side files).
CACHED_SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".scn", ".bif", ".svslide"})
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})


def open_source(path: str | Path, level: int = 0) -> RasterSource:
    """Open an image as a `RasterSource`, choosing the reader and checking the file reads.

    The header is parsed and two small windows (the bottom-right and top-left corners of the
    working level) are read, and local TIFFs are checked for truncation, so a broken file
    fails here rather than later in a worker.

    Args:
        path: A local file, an object-storage URL (s3://bucket/key.tif, read in place through GDAL's
            /vsis3/; a single-file slide, s3://bucket/key.svs, through a local copy), another URL or a
            GDAL virtual path (read with rasterio).
        level: The working pyramid level (0 = full resolution).

    Returns:
        An open source; pass it to workers as is (it pickles as path + level).

    Raises:
        SourceNotFoundError: The file does not exist.
        SourceReadError: No reader can read it; the message gives each reader's complaint.
        ConfigError: The level does not exist (the message lists the levels that do).

    Example:
        >>> source = open_source("/data/CMU-1.svs", level=1)
        >>> source.mpp, source.height, source.width
    """
    name = str(path)
    if name.startswith("/vsi"):  # a GDAL virtual path, as the user wrote it
        return _first_readable(name, level, (GeoTiffSource,), {})
    location = Location.parse(name)
    if not location.is_local:
        signed = location.scheme in ("s3", "s3a") and os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() != "YES"
        if signed and not storage_for(location).exists(location):  # gs://, az://, public buckets: GDAL says
            raise SourceNotFoundError(f"{location.url} does not exist; check the bucket and the key "
                                      f"(`aws s3 ls {location.parent.url}/` lists what is there)")
        if location.scheme in ("http", "https") and not storage_for(location).exists(location):
            raise SourceNotFoundError(f"{location.url} does not exist (the server answers 404); check the address")
        if location.is_object_storage and Path(location.path).suffix.lower() in CACHED_SLIDE_SUFFIXES:
            return _first_readable(name, level, (SlideSource,), {})  # OpenSlide, on a local copy
        return _first_readable(name, level, (GeoTiffSource,), {})
    if not Path(name).exists():
        raise SourceNotFoundError(
            f"{name} does not exist; check the path (relative paths are resolved from {Path.cwd()})"
        )
    if Path(name).is_dir():
        raise SourceReadError(f"{name} is a directory; pass the image file inside it")
    if is_tiff(name):
        damage = describe_truncation(name)
        if damage is not None:
            raise SourceReadError(
                f"{name} is truncated or corrupt: {damage}. Copy or download it again, or "
                "re-export it from the original."
            )
    complaints: dict[str, str] = {}
    vendor = _slide_vendor(name, complaints)
    if vendor not in (None, "generic-tiff"):
        readers: tuple[type[RasterSource], ...] = (SlideSource,)
    elif is_ome_tiff(name) and not _has_crs(name):
        readers = (TiffSource, GeoTiffSource)
    else:
        readers = (GeoTiffSource, TiffSource)
    return _first_readable(name, level, readers, complaints)


def _first_readable(
    path: str,
    level: int,
    readers: tuple[type[RasterSource], ...],
    complaints: dict[str, str],
) -> RasterSource:
    """The first reader that opens and reads the file; SourceReadError listing all complaints."""
    for reader in readers:
        source = reader(path, level)
        try:
            source._probe()
            return source
        except (ConfigError, SourceNotFoundError):
            source.close()
            raise
        except Exception as exc:
            source.close()
            complaints[reader.reader] = str(exc.__cause__ or exc)
    listing = "\n".join(f"  {reader}: {complaint}" for reader, complaint in complaints.items())
    raise SourceReadError(
        f"cannot read {path}: no reader could open it.\n{listing}\nCheck that it is a complete "
        "raster image (GeoTIFF/COG, OME-TIFF, TIFF, or a whole-slide format OpenSlide "
        "supports); if it was copied or downloaded, fetch it again."
    )


def _slide_vendor(path: str, complaints: dict[str, str]) -> str | None:
    """OpenSlide's vendor for the file, noting a complaint when a slide file is not recognised."""
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except Exception as exc:
        vendor = None
        complaints["openslide"] = str(exc)
    if vendor is None and Path(path).suffix.lower() in SLIDE_SUFFIXES:
        complaints.setdefault("openslide", "not a whole-slide format OpenSlide recognises")
    return vendor


def _has_crs(path: str) -> bool:
    """True when rasterio reads a CRS from the file (a georeferenced OME-TIFF stays with GDAL)."""
    source = GeoTiffSource(path)
    try:
        return source.crs is not None
    except Exception:
        return False
    finally:
        source.close()
