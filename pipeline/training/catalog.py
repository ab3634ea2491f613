"""The training catalog: labelled pairs named in `conf/data/<name>.yaml`, each read onto its image's grid.

A pair is an image and its truth, in one of three forms:

- ``image`` + ``labels``: a label raster of class ids (255 = unlabelled) on the image's grid;
- ``image`` + ``polygons``: GeoJSON polygons in any CRS (the file's ``crs`` member, else WGS84 as
  RFC 7946 says), reprojected and rasterised onto the image's grid; on an image without a CRS (a
  slide) in level-0 pixel coordinates, as QuPath exports annotations, classed by their
  ``classification`` name; pixels outside every polygon are class 0;
- ``image`` + ``mask``: a whole-slide image and a mask image of class ids covering the whole slide
  at any size, scaled (nearest neighbour) onto the slide level that is read.

Images are read window by window at the catalog's ``resolution`` (the pyramid level closest to it, or
level 0), their truth too (`pipeline.training.truth`), so a pair may be far larger than memory. Each
pair records when it arrived (``added``, else its newest file's modification time), which the
nightly job uses to find new data. A relative path in a catalog file is read from the file's folder.

Example (a catalog file)::

    task: buildings
    classes: [{name: background, color: [0, 0, 0]}, {name: building, color: [230, 60, 60]}]
    pairs:
      - {image: /data/atlanta.tif, polygons: /data/atlanta_buildings.geojson}
      - {image: /data/tile_7.tif, labels: /data/tile_7_labels.tif, added: 2026-11-20}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import rasterio.warp
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.models import ClassInfo
from pipeline.sources import RasterSource, open_source
from pipeline.storage import Location, stamp, storage_for
from pipeline.storage.gdal import local_env
from pipeline.training.data import LabelledImage, Truth, open_labelled_image, select_bands
from pipeline.training.metrics import IGNORE_INDEX
from pipeline.training.truth import PolygonTruth, RasterTruth, map_labels

__all__ = ["Catalog", "LabelledPair", "check_class_ids", "open_pair"]

_TRUTH_KINDS = ("labels", "polygons", "mask")


@dataclass(frozen=True)
class LabelledPair:
    """One image and its truth; exactly one of ``labels``, ``polygons`` and ``mask`` is set.

    Attributes:
        image: Image raster or whole-slide image.
        labels: Label raster of class ids on the image's grid.
        polygons: GeoJSON FeatureCollection of class polygons.
        mask: Mask image of class ids covering the whole slide.
        class_property: For polygons: the feature property holding the class (an id or a class
            name); None burns every polygon as ``burn``.
        burn: For polygons without ``class_property``: the class id of every polygon.
        added: ISO date the pair arrived; None takes its newest file's modification time.
    """

    image: str
    labels: str | None = None
    polygons: str | None = None
    mask: str | None = None
    class_property: str | None = None
    burn: int = 1
    added: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _TRUTH_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Pair for image {self.image!r} gives {given or 'no truth'}; give exactly one of "
                f"labels (a label raster), polygons (GeoJSON) or mask (a slide's mask image)."
            )
        if self.added is not None:
            try:
                dt.date.fromisoformat(str(self.added))
            except ValueError:
                raise ConfigError(f"added={self.added!r} for {self.image!r} is not a date; use YYYY-MM-DD.") from None

    @property
    def truth(self) -> str:
        """The path of the truth file, whichever its kind."""
        return str(self.labels or self.polygons or self.mask)

    def arrived(self) -> dt.datetime:
        """When the pair arrived (UTC): the end of its ``added`` day, else the newest file's mtime.

        A date has no time of day, so a pair added on a day a nightly run already ran counts as new
        for the next night: the doubt goes toward training on it once more, never toward missing it.
        """
        if self.added is not None:
            day = dt.date.fromisoformat(str(self.added)) + dt.timedelta(days=1)
            return dt.datetime.combine(day, dt.time(), dt.timezone.utc)
        newest = max(_modified(_require(p)) for p in (self.image, self.truth))
        return dt.datetime.fromtimestamp(newest, dt.timezone.utc)


@dataclass(frozen=True)
class Catalog:
    """The labelled pairs of one task, the classes they use, and how to read them.

    Attributes:
        task: Names the MLflow experiment and the registered model.
        classes: One ClassInfo per class id.
        pairs: The labelled pairs.
        bands: 1-based image bands to read; None reads all.
        resolution: Pixel size to sample at (metres for rasters, micrometres for slides); None
            reads level 0.
    """

    task: str
    classes: tuple[ClassInfo, ...]
    pairs: tuple[LabelledPair, ...]
    bands: tuple[int, ...] | None = None
    resolution: float | None = None

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError(
                f"The catalog of task {self.task!r} has no labelled pairs; add entries under `pairs:` "
                "(image with labels, polygons or mask)."
            )
        if len(self.classes) < 2:
            raise ConfigError(f"The catalog of task {self.task!r} needs at least 2 classes, got {len(self.classes)}.")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Location | None = None) -> Catalog:
        """Build from a parsed catalog file (Hydra/OmegaConf container or plain dict).

        A pair's relative path is resolved from `base`, the catalog file's folder (local or on object
        storage), so a catalog reads the same from any working folder; without `base`, from the working
        folder.

        Raises:
            ConfigError: A key is unknown or missing, or a value has the wrong shape.
        """
        known = {"task", "classes", "pairs", "bands", "resolution"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown catalog keys {unknown}; expected some of {sorted(known)}.")
        try:
            classes = tuple(ClassInfo(name=str(c["name"]), color=tuple(c["color"])) for c in data["classes"])
            pairs = tuple(LabelledPair(**_resolved(dict(p), base)) for p in (data.get("pairs") or ()))
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"The catalog is malformed ({exc}); expected task, classes: [{{name, color}}, ...] and "
                "pairs: [{image, labels | polygons | mask, ...}, ...]."
            ) from exc
        bands = data.get("bands")
        resolution = data.get("resolution")
        return cls(
            task=str(data.get("task") or "segmentation"), classes=classes, pairs=pairs,
            bands=tuple(int(b) for b in bands) if bands is not None else None,
            resolution=float(resolution) if resolution is not None else None,
        )

    def since(self, when: dt.datetime) -> tuple[LabelledPair, ...]:
        """The pairs that arrived after `when`."""
        return tuple(p for p in self.pairs if p.arrived() > when)

    def open(self, pairs: Sequence[LabelledPair] | None = None,
             label_map: Mapping[int, int] | None = None) -> list[LabelledImage]:
        """Open `pairs` (default: all) on their images' grids, `label_map` applied (headers only)."""
        chosen = self.pairs if pairs is None else pairs
        return [open_pair(p, self.classes, self.bands, self.resolution, label_map) for p in chosen]


def open_pair(
    pair: LabelledPair, classes: Sequence[ClassInfo], bands: Sequence[int] | None = None,
    resolution: float | None = None, label_map: Mapping[int, int] | None = None,
) -> LabelledImage:
    """One pair as a `LabelledImage`: its image at the level closest to `resolution` and its truth on that grid.

    Nothing but headers (and a GeoJSON file) is read; class ids are checked when the truth is indexed.

    Raises:
        SourceNotFoundError: A file does not exist.
        SourceReadError: A file cannot be read.
        ConfigError: A band is out of range, or the polygons do not overlap the image or name unknown classes.
    """
    if pair.labels is not None and resolution is None:
        return open_labelled_image(pair.image, pair.labels, bands, label_map)
    _require(pair.image)
    source = open_source(pair.image)
    unit = "m" if source.crs is not None else "um"
    if resolution is not None:
        source = source.at_level(source.best_level(resolution, unit))
    selected = select_bands(source, bands, pair.image)
    truth: Truth
    if pair.polygons is not None:
        truth = _polygons(pair, classes, source, label_map)
    else:
        truth = RasterTruth(_require(pair.truth).url, (source.height, source.width), label_map,
                            role="mask" if pair.mask is not None else "labels")
    return LabelledImage(source, truth, selected, source.pixel_size(unit), unit, pair.truth)


def _resolved(pair: dict[str, Any], base: Location | None) -> dict[str, Any]:
    """`pair` with its relative file paths resolved from `base` (URLs and absolute paths as they are)."""
    if base is None:
        return pair
    for key in ("image", *_TRUTH_KINDS):
        path = pair.get(key)
        if isinstance(path, str) and path and "://" not in path and not os.path.isabs(os.path.expanduser(path)):
            if base.is_local:
                pair[key] = os.path.normpath(os.path.join(base.path, path))
            else:
                pair[key] = Location(base.scheme, posixpath.normpath(posixpath.join(base.path, path))).url
    return pair


def _require(path: str) -> Location:
    """Where `path` is (a local path, or a URL on object storage); raises SourceNotFoundError if nothing is."""
    location = Location.parse(path)
    if not storage_for(location).exists(location):
        raise SourceNotFoundError(
            f"{path} does not exist; check the catalog's paths (a relative one is read from the catalog file's folder)."
        )
    return location


def _modified(location: Location) -> float:
    """When the file was last written (seconds since the epoch)."""
    if location.is_local:
        return location.local_path().stat().st_mtime
    version = storage_for(location).version(location)
    # A store that does not say when: taken as new, so that the doubt goes toward training on it.
    return version.modified if version is not None and version.modified else time.time()


def _geojson_crs(collection: Mapping[str, Any], path: str) -> CRS:
    """The CRS a GeoJSON names in its (pre-RFC 7946) `crs` member, else WGS84."""
    named = (collection.get("crs") or {}).get("properties", {}).get("name")
    if not named:
        return CRS.from_epsg(4326)
    try:
        return CRS.from_user_input(named)
    except CRSError as exc:
        raise ConfigError(f"{path} names the CRS {named!r}, which is not recognised: {exc}.") from exc


def _class_of(feature: Mapping[str, Any], pair: LabelledPair, classes: Sequence[ClassInfo]) -> int:
    """A feature's class id: from its `class_property` (an id or a class name), else from QuPath's
    ``classification`` (its name), else `burn`."""
    properties = feature.get("properties") or {}
    names = [c.name for c in classes]
    if pair.class_property is None:
        qupath = properties.get("classification")
        if not isinstance(qupath, Mapping) or "name" not in qupath:
            return int(pair.burn)
        if qupath["name"] in names:
            return names.index(qupath["name"])
        raise ConfigError(f"An annotation of {pair.polygons} is classified {qupath['name']!r}, which is not one of "
                          f"the class names {names}; add the class to the catalog, or rename it in QuPath.")
    value = properties.get(pair.class_property)
    if isinstance(value, Mapping):  # QuPath's classification named as the class property
        value = value.get("name")
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        class_id = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        class_id = -1
    if not 0 <= class_id <= 255:
        raise ConfigError(
            f"A feature of {pair.polygons} has {pair.class_property}={value!r}, which is neither a class id "
            f"nor one of the class names {names}."
        )
    return class_id


def _polygons(pair: LabelledPair, classes: Sequence[ClassInfo], source: RasterSource,
              label_map: Mapping[int, int] | None) -> PolygonTruth:
    """The pair's polygons on the image's grid: reprojected to a georeferenced image's CRS, or taken as
    level-0 pixel coordinates on an image without one (a slide annotated in QuPath, whose GeoJSON export
    names each annotation's class under ``classification``)."""
    path = str(pair.polygons)
    try:
        location = _require(path)
        collection = json.loads(storage_for(location).read_bytes(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceReadError(f"{path} is not GeoJSON ({exc}); expected a FeatureCollection.") from exc
    # QuPath exports a FeatureCollection, or (older versions) a bare list of features.
    listed = collection if isinstance(collection, list) else collection.get("features", [])
    features = [f for f in listed if isinstance(f, Mapping) and f.get("geometry")]
    if not features:
        raise ConfigError(f"{path} holds no features with a geometry; expected polygons of the labelled objects.")
    georeferenced = source.crs is not None and source.transform is not None
    named = isinstance(collection, Mapping) and collection.get("crs")
    src_crs = _geojson_crs(collection if isinstance(collection, Mapping) else {}, path)
    if not georeferenced and (named or _looks_like_degrees(features)):
        raise ConfigError(
            f"Image {pair.image} has no CRS, so the polygons of {path} are taken as its level-0 pixel coordinates "
            f"(as QuPath exports them), but they {'name a CRS' if named else 'look like longitudes and latitudes'}; "
            "give a georeferenced image for georeferenced polygons, or export the annotations in pixels."
        )
    table = map_labels(np.arange(256, dtype=np.uint8), label_map)
    shapes = []
    for feature in features:
        value = int(table[_class_of(feature, pair, classes)])
        if not 0 <= value < len(classes):
            raise ConfigError(
                f"A feature of {path} has class id {value}, outside the {len(classes)} configured classes "
                f"0..{len(classes) - 1} ({[c.name for c in classes]}); fix the data or add the class."
            )
        shapes.append((feature["geometry"], value))
    if georeferenced and shapes:
        with local_env():  # one GDAL environment, not one (and a boto3 session) per feature
            moved = rasterio.warp.transform_geom(src_crs, source.crs, [g for g, _ in shapes])
        shapes = [(g, v) for g, (_, v) in zip(moved, shapes, strict=True)]
    # A slide's polygons are in level-0 pixels: scaled to the working level.
    transform = source.transform if source.transform is not None and georeferenced \
        else Affine.scale(source.levels[source.level].downsample)
    key = (f"{location.url} {stamp(location)} {[c.name for c in classes]} {pair.class_property} {pair.burn} "
           f"{sorted((label_map or {}).items())} {source.crs} {source.height}x{source.width}")
    truth = PolygonTruth(shapes, transform, key)
    if not truth.overlaps(source.height, source.width):
        west, south, east, north = rasterio.features.bounds({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": g, "properties": {}} for g, _ in shapes]})
        where = (f"({src_crs.to_string()}) do not overlap image {pair.image} ({source.crs}): in the image's CRS"
                 if georeferenced else
                 f"(taken as level-0 pixel coordinates: {pair.image} has no CRS) do not overlap it:")
        fix = ("Check that the GeoJSON's CRS is right (RFC 7946 GeoJSON without a `crs` member is WGS84) and that "
               "they cover the image." if georeferenced else "Check that they were drawn on this image.")
        raise ConfigError(f"The polygons of {path} {where} they span x {west:.1f}..{east:.1f}, "
                          f"y {south:.1f}..{north:.1f}. {fix}")
    return truth


def _looks_like_degrees(features: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every vertex lies within longitudes -180..180 and latitudes -90..90 and no feature is QuPath's
    (an ``objectType`` or ``classification`` property): WGS84 polygons, not a slide's pixels."""
    if any({"objectType", "classification"} & set(f.get("properties") or {}) for f in features):
        return False
    west, south, east, north = rasterio.features.bounds({"type": "FeatureCollection", "features": list(features)})
    return west >= -180 and east <= 180 and south >= -90 and north <= 90


def check_class_ids(values: np.ndarray, classes: Sequence[ClassInfo], path: str) -> None:
    """ConfigError if the label `values` a truth holds (after `label_map`) go beyond the configured classes."""
    bad = [int(v) for v in values if v != IGNORE_INDEX and v >= len(classes)]
    if bad:
        raise ConfigError(
            f"{path} holds the values {[int(v) for v in values]}: class id(s) {bad} are outside the {len(classes)} "
            f"configured classes 0..{len(classes) - 1} ({[c.name for c in classes]}); add the classes, or map the "
            f"values with label_map (e.g. label_map={{{bad[0]}: {len(classes) - 1}}}; {IGNORE_INDEX} is unlabelled)."
        )


def catalog_path(name: str) -> Path:
    """`name` itself when it is a file, else `conf/data/<name>.yaml` in the working directory, else in the
    checkout tessera runs from (its sample catalogs; an installed tessera has none)."""
    if os.path.exists(name):
        return Path(name)
    here = Path("conf") / "data" / f"{name}.yaml"
    checkout = Path(__file__).resolve().parents[2] / "conf" / "data" / f"{name}.yaml"
    return here if here.is_file() or not checkout.is_file() else checkout


def load_catalog(name: str) -> Catalog:
    """The catalog in a YAML file, or in `conf/data/<name>.yaml`.

    Raises:
        ConfigError: The file does not exist or is malformed.
    """
    import yaml

    remote = Location.parse(name)
    if not remote.is_local:  # a catalog kept beside its data on object storage
        path: Path | Location = remote
        if not storage_for(remote).exists(remote):
            raise ConfigError(f"No catalog at {remote.url}; check the URL.")
        data = yaml.safe_load(storage_for(remote).read_bytes(remote))
    else:
        path = catalog_path(name)
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError(f"No catalog {name!r}: {path} does not exist; give a YAML file or one of {known}.")
        data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ConfigError(f"The catalog {path} is not a mapping of task, classes and pairs.")
    return Catalog.from_mapping(data, base=path.parent if isinstance(path, Location) else Location.parse(path.parent))
