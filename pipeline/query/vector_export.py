"""Polygons of a mosaic in other people's tools: QuPath's GeoJSON (objects with a classification), and
GeoPackage and FlatGeobuf for GIS (written by pyogrio), beside the plain GeoJSON of `vectorize`.

QuPath (0.4 and later) reads a FeatureCollection whose features carry `properties.objectType`
("annotation" or "detection") and `properties.classification` = `{"name": ..., "color": [r, g, b]}`
(its `GsonTools.PathClassTypeAdapter` refuses a classification with a name but no colour), in pixels of
the full-resolution image, y down. Files are written to a hidden name beside the output and renamed
when whole; an existing file is replaced only when asked.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, MissingDependencyError, OutputExistsError, OutputFolderError, RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.vector import MAX_VECTOR_PIXELS, VectorLimits, describe, polygons, vectorize

VECTOR_FORMATS = ("geojson", "qupath", "gpkg", "fgb")
QUPATH_OBJECTS = ("annotation", "detection")
# What each format's file is called, and what a name's ending says about its format.
SUFFIXES = {"geojson": ".geojson", "qupath": ".geojson", "gpkg": ".gpkg", "fgb": ".fgb"}
OGR_DRIVERS = {"gpkg": "GPKG", "fgb": "FlatGeobuf"}
FORMAT_OF_SUFFIX = {".gpkg": "gpkg", ".fgb": "fgb", ".geojson": "geojson", ".json": "geojson"}


def qupath_objects(
    m: Mosaic,
    *,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    classes: Sequence[str] | None = None,
    background: bool = False,
    simplify: float = 0.0,
    object_type: str = "annotation",
    downsample: float | None = None,
    max_pixels: int | None = MAX_VECTOR_PIXELS,
    limits: VectorLimits | None = None,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """The class mask of a region as QuPath objects: a GeoJSON FeatureCollection that QuPath imports
    (File > Import objects from file, or dropped on the viewer).

    Each feature is one 4-connected area of one class (a Polygon with its holes), with properties
    `objectType` and `classification` (`name`: the class name, `color`: its RGB colour). Coordinates are
    pixels of the full-resolution image (level 0; x right, y down, origin at the image's top-left
    corner), for slides and georeferenced mosaics alike, whatever `level` is read: polygons of level k
    have corners on multiples of 2^k, clipped to the image.

    Args:
        classes: class names to keep; by default every class but class 0 (the background).
        background: with `classes` left out, keep class 0 too.
        simplify: Douglas-Peucker tolerance in the mosaic's units (metres, micrometres...).
        object_type: "annotation" (editable regions, the default) or "detection" (lighter, for many objects).
        downsample: the downsample of the source level the mosaic was segmented from (its lineage's
            `source.level`), so that coordinates are the source's full-resolution pixels. Needed only
            when that level is not 0: the mosaic does not record it, and the source is not opened here.
        window, bbox, crs, level, resolution, max_pixels, limits, cancelled: as for `vectorize`.

    Raises:
        RegionError: an unknown class, a bad region or tolerance.
        RegionTooLargeError: a region over `max_pixels`, or polygons over `limits`.

    Example:
        >>> collection = qupath_objects(Mosaic.open("slide.zarr"), level=2)  # doctest: +SKIP
    """
    if object_type not in QUPATH_OBJECTS:
        raise ConfigError(f"object type {object_type!r}: QuPath objects are {' or '.join(QUPATH_OBJECTS)}")
    layout = m.layout
    if classes is None and not background:
        classes = [c.name for c in layout.classes[1:]]
    scale = source_downsample(m, downsample)
    made = polygons(m, window=window, bbox=bbox, crs=crs, level=level, resolution=resolution, classes=classes,
                    simplify=simplify, pixels=True, downsample=scale, max_pixels=max_pixels, limits=limits,
                    cancelled=cancelled)
    kinds = [{"name": c.name, "color": [int(v) for v in c.color[:3]]} for c in layout.classes]
    features = [{"type": "Feature", "geometry": p.geometry,
                 "properties": {"objectType": object_type, "classification": kinds[p.cls]}} for p in made.shapes]
    return {"type": "FeatureCollection", "features": features,
            "tessera": describe(made) | {"coordinates": "pixels of the source's level 0, y down", "downsample": scale}}


def source_downsample(m: Mosaic, downsample: float | None) -> float:
    """How many of the source's full-resolution pixels one mosaic pixel spans: `downsample` when given, 1 when
    the mosaic was segmented from the source's level 0 (or its lineage names no level)."""
    level = (m.lineage.get("source") or {}).get("level") or 0
    if downsample is not None:
        return downsample
    if level == 0:
        return 1.0
    raise RegionError(f"this mosaic was segmented from level {level} of its source, and QuPath places objects in "
                      "the source's full-resolution pixels: give that level's downsample (downsample=, --downsample; "
                      "QuPath's Image tab lists the source's levels)")


def export_vectors(
    m: Mosaic,
    path: str | Path,
    format: str | None = None,
    *,
    overwrite: bool = False,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
    crs: str | None = None,
    level: int | None = None,
    resolution: float | None = None,
    classes: Sequence[str] | None = None,
    background: bool = False,
    simplify: float = 0.0,
    out_crs: str | None = None,
    object_type: str = "annotation",
    downsample: float | None = None,
    max_pixels: int | None = MAX_VECTOR_PIXELS,
    limits: VectorLimits | None = None,
) -> tuple[Path, int]:
    """Write the polygons of a region to a file: GeoJSON (`vectorize`), QuPath GeoJSON (`qupath_objects`),
    GeoPackage or FlatGeobuf.

    GeoPackage and FlatGeobuf hold one layer of Polygons with the attributes `class` (id), `name` and
    `area` (mosaic units squared, before simplification), in the mosaic's CRS or `out_crs`. A slide has
    no CRS: its coordinates are micrometres from the image's top-left corner, y down (pixels when the
    mosaic has no pixel size), written in the layer's description (FlatGeobuf) or metadata (GeoPackage).

    Args:
        format: one of `VECTOR_FORMATS`; by default from the name's ending (.gpkg, .fgb), else GeoJSON.
        overwrite: replace an existing file (refused otherwise).
        background: QuPath only (class 0 is left out of QuPath files unless named or asked for).
        object_type, downsample: QuPath only, as for `qupath_objects`.
        the rest: as for `vectorize`.

    Returns:
        The path written and the number of polygons.

    Raises:
        ConfigError: an unknown format, or one that does not match the name's ending.
        OutputExistsError: the file exists and `overwrite` is false.
        FileNotFoundError: the folder of `path` does not exist (it is not made).
    """
    out = Path(path)
    fmt = vector_format(out, format)
    check_output(out, overwrite)
    region: dict[str, Any] = {"window": window, "bbox": bbox, "crs": crs, "level": level, "resolution": resolution,
              "classes": classes, "simplify": simplify, "max_pixels": max_pixels, "limits": limits}
    if fmt in OGR_DRIVERS:
        return _write_ogr(m, out, fmt, overwrite, out_crs, region)
    collection = vector_collection(m, fmt, out_crs=out_crs, background=background, object_type=object_type,
                                   downsample=downsample, **region)
    return _write_text(out, json.dumps(collection), overwrite), len(collection["features"])


def vector_collection(m: Mosaic, format: str, *, out_crs: str | None = None, background: bool = False,
                      object_type: str = "annotation", downsample: float | None = None,
                      **region: Any) -> dict[str, Any]:
    """The polygons of a region as a GeoJSON FeatureCollection: QuPath's (`qupath_objects`) for "qupath",
    else the plain one (`vectorize`); `region`: the keywords both take (window, classes, limits...).

    Raises:
        ConfigError: `out_crs` with "qupath" (its coordinates are pixels).
    """
    if format == "qupath":
        if out_crs is not None:
            raise ConfigError(f"out_crs {out_crs!r}: QuPath's coordinates are pixels of the full-resolution "
                              "image; leave out_crs out")
        return qupath_objects(m, background=background, object_type=object_type, downsample=downsample, **region)
    return vectorize(m, out_crs=out_crs, **region)


def vector_format(path: Path | None, format: str | None) -> str:
    """The format asked for, or the one the file name's ending says (GeoJSON by default)."""
    implied = FORMAT_OF_SUFFIX.get(path.suffix.lower()) if path is not None else None
    if format is None:
        return implied or "geojson"
    if format not in VECTOR_FORMATS:
        raise ConfigError(f"format {format!r}: choose one of {', '.join(VECTOR_FORMATS)}")
    if path is not None and implied is not None and SUFFIXES[format] != SUFFIXES[implied]:
        raise ConfigError(f"{path}: a {format} file should end in {SUFFIXES[format]}, not {path.suffix}")
    return format


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output whose folder is missing, that is a folder, or that exists (unless `overwrite`)."""
    if not out.parent.is_dir():
        raise OutputFolderError(f"{out}: the folder {out.parent} does not exist; make it first")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a folder: give a file name inside it")
    if out.exists() and not overwrite:
        raise OutputExistsError(exists_message(out))


def exists_message(out: Path) -> str:
    return f"{out} exists: give another name, or overwrite (--overwrite) to replace it"


def _write_text(out: Path, text: str, overwrite: bool) -> Path:
    partial = _partial(out)
    try:
        with open(partial, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        _publish(partial, out, overwrite)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _write_ogr(m: Mosaic, out: Path, fmt: str, overwrite: bool, out_crs: str | None,
               region: dict[str, Any]) -> tuple[Path, int]:
    """One layer of Polygons through pyogrio (GDAL's OGR drivers), written whole under a hidden name."""
    try:
        from pyogrio.raw import write
    except ImportError:
        raise MissingDependencyError(f"{fmt} files are written with pyogrio: pip install 'pyogrio>=0.10'") from None
    import numpy as np
    from shapely import to_wkb
    from shapely.geometry import shape

    made = polygons(m, out_crs=out_crs, **region)
    ids: list[int] = []
    areas: list[float] = []
    geometries: list[bytes] = []
    for p in made.shapes:
        ids.append(p.cls)
        areas.append(p.area)
        geometries.append(to_wkb(shape(p.geometry)))
    names = [c.name for c in m.layout.classes]
    fields = [np.asarray(ids, np.int32), np.asarray([names[i] for i in ids], dtype=object),
              np.asarray(areas, np.float64)]
    coordinates = (f"the layer's CRS, in {made.units}" if made.crs else
                   "micrometres from the image's top-left corner, y down" if made.units == "um" else
                   "pixels from the image's top-left corner, y down")
    about = (f"tessera polygons of {Path(str(m.path)).name}, level {made.window.level}, coordinates: "
             f"{coordinates}; area in {made.units} squared")
    options = ({"DESCRIPTION": about} if fmt == "fgb" else {})
    metadata = {"DESCRIPTION": about, "tessera_units": made.units} if fmt == "gpkg" else None
    partial = _partial(out)
    try:
        with warnings.catch_warnings():  # a slide has no CRS on purpose: its units are in the description
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
            write(str(partial), np.asarray(geometries, dtype=object), fields, ["class", "name", "area"],
                  layer=out.stem, driver=OGR_DRIVERS[fmt], geometry_type="Polygon", crs=made.crs,
                  layer_metadata=metadata, layer_options=options or None)
        _publish(partial, out, overwrite)
    finally:
        for ending in ("", "-journal", "-wal", "-shm"):  # SQLite's companions, should GDAL leave any
            partial.with_name(partial.name + ending).unlink(missing_ok=True)
    return out, len(ids)


def _partial(out: Path) -> Path:
    """A unique hidden name beside `out`, with its ending (GDAL picks a driver's habits by it)."""
    return out.with_name(f".{out.stem}.{uuid.uuid4().hex}.partial{out.suffix}")


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Move a whole file into place: replace what is there when allowed, else link it in only if `out`
    is still absent (so a file made meanwhile is never replaced)."""
    if overwrite:
        os.replace(partial, out)
        return
    try:
        os.link(partial, out)
    except FileExistsError:
        raise OutputExistsError(exists_message(out)) from None
    except OSError:  # a file system without hard links: the check before the rename is what there is
        if out.exists():
            raise OutputExistsError(exists_message(out)) from None
        os.replace(partial, out)
