"""The training catalog: labelled pairs named in `conf/data/<name>.yaml`, each read onto its image's grid.

A pair is an image and its truth, in one of three forms:

- ``image`` + ``labels``: a label raster of class ids (255 = unlabelled) on the image's grid;
- ``image`` + ``polygons``: GeoJSON polygons in any CRS (the file's ``crs`` member, else WGS84 as
  RFC 7946 says), reprojected and rasterised onto the image's grid; pixels outside every polygon
  are class 0;
- ``image`` + ``mask``: a whole-slide image and a mask image of class ids covering the whole slide
  at any size, scaled (nearest neighbour) onto the slide level that is read.

Images are read whole, at the catalog's ``resolution`` (the pyramid level closest to it, or level 0),
so one pair must fit in memory (see `pipeline.training.data`). Each pair records when it arrived
(``added``, else its newest file's modification time), which the nightly job uses to find new data.

Example (a catalog file)::

    task: buildings
    classes: [{name: background, color: [0, 0, 0]}, {name: building, color: [230, 60, 60]}]
    pairs:
      - {image: /data/atlanta.tif, polygons: /data/atlanta_buildings.geojson}
      - {image: /data/tile_7.tif, labels: /data/tile_7_labels.tif, added: 2026-11-20}
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
from PIL import Image
from rasterio.crs import CRS
from rasterio.errors import CRSError

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.models import ClassInfo
from pipeline.sources import open_source
from pipeline.storage import Location, storage_for
from pipeline.storage.cache import local_copy
from pipeline.training.data import LabelledRaster, as_class_ids, map_labels, read_labelled_raster
from pipeline.training.metrics import IGNORE_INDEX

__all__ = ["Catalog", "LabelledPair", "read_pair"]

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
    def from_mapping(cls, data: Mapping[str, Any]) -> Catalog:
        """Build from a parsed catalog file (Hydra/OmegaConf container or plain dict).

        Raises:
            ConfigError: A key is unknown or missing, or a value has the wrong shape.
        """
        known = {"task", "classes", "pairs", "bands", "resolution"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown catalog keys {unknown}; expected some of {sorted(known)}.")
        try:
            classes = tuple(ClassInfo(name=str(c["name"]), color=tuple(c["color"])) for c in data["classes"])
            pairs = tuple(LabelledPair(**dict(p)) for p in (data.get("pairs") or ()))
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

    def read(self, pairs: Sequence[LabelledPair] | None = None,
             label_map: Mapping[int, int] | None = None) -> list[LabelledRaster]:
        """Read `pairs` (default: all) onto their images' grids, `label_map` applied, checking every class id."""
        chosen = self.pairs if pairs is None else pairs
        return [read_pair(p, self.classes, self.bands, self.resolution, label_map) for p in chosen]


def read_pair(
    pair: LabelledPair, classes: Sequence[ClassInfo], bands: Sequence[int] | None = None,
    resolution: float | None = None, label_map: Mapping[int, int] | None = None,
) -> LabelledRaster:
    """One pair as an in-memory image and label array on the same grid.

    Raises:
        SourceNotFoundError: A file does not exist.
        SourceReadError: A file cannot be read.
        ConfigError: The truth does not overlap the image, or holds a class id outside `classes`.
    """
    if pair.labels is not None and resolution is None:
        raster = read_labelled_raster(pair.image, pair.labels, bands)
    else:
        image, transform, crs, pixel, unit = _read_image(pair.image, bands, resolution)
        h, w = image.shape[1:]
        if pair.polygons is not None:
            labels = _rasterise(pair, classes, (h, w), transform, crs)
        elif pair.mask is not None:
            labels = _scaled_mask(local_copy(_require(pair.mask)), (h, w))
        else:
            labels = _scaled_mask(local_copy(_require(str(pair.labels))), (h, w))
        chosen = tuple(bands) if bands is not None else tuple(range(1, image.shape[0] + 1))
        raster = LabelledRaster(image=image, labels=labels, bands=chosen, resolution=pixel, resolution_unit=unit)
    raster = dataclasses.replace(raster, labels=map_labels(raster.labels, label_map))
    _check_classes(raster.labels, classes, pair.truth)
    return raster


def _require(path: str) -> Location:
    """Where `path` is (a local path, or a URL on object storage); raises SourceNotFoundError if nothing is."""
    location = Location.parse(path)
    if not storage_for(location).exists(location):
        raise SourceNotFoundError(
            f"{path} does not exist; check the catalog (relative paths are resolved from {Path.cwd()})."
        )
    return location


def _modified(location: Location) -> float:
    """When the file was last written (seconds since the epoch)."""
    if location.is_local:
        return location.local_path().stat().st_mtime
    version = storage_for(location).version(location)
    # A store that does not say when: taken as new, so that the doubt goes toward training on it.
    return version.modified if version is not None and version.modified else time.time()


def _read_image(
    path: str, bands: Sequence[int] | None, resolution: float | None
) -> tuple[np.ndarray, Any, str | None, float | None, str]:
    """The image at the level closest to `resolution`: (C, H, W) values, transform, CRS, pixel size and its unit."""
    _require(path)
    source = open_source(path)
    unit = "m" if source.crs is not None else "um"
    if resolution is not None:
        source = source.at_level(source.best_level(resolution, unit))
    image = source.read(0, 0, source.height, source.width)
    if bands is not None:
        bad = [b for b in bands if not 1 <= int(b) <= image.shape[0]]
        if bad:
            raise ConfigError(f"bands {bad} are out of range for {path}, which has {image.shape[0]} band(s).")
        image = image[[int(b) - 1 for b in bands]]
    return image, source.transform, source.crs, source.pixel_size(unit), unit


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
    if pair.class_property is None:
        return int(pair.burn)
    value = (feature.get("properties") or {}).get(pair.class_property)
    names = [c.name for c in classes]
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"A feature of {pair.polygons} has {pair.class_property}={value!r}, which is neither a class id "
            f"nor one of the class names {names}."
        ) from None


def _rasterise(
    pair: LabelledPair, classes: Sequence[ClassInfo], shape: tuple[int, int], transform: Any, crs: str | None
) -> np.ndarray:
    """Burn the pair's polygons onto the image grid (class 0 elsewhere)."""
    path = str(pair.polygons)
    try:
        location = _require(path)
        collection = json.loads(storage_for(location).read_bytes(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceReadError(f"{path} is not GeoJSON ({exc}); expected a FeatureCollection.") from exc
    if transform is None or crs is None:
        raise ConfigError(
            f"Image {pair.image} has no CRS or geotransform, so the polygons of {path} cannot be placed on it; "
            "use a georeferenced image, or a label raster or mask instead."
        )
    features = [f for f in collection.get("features", []) if f.get("geometry")]
    if not features:
        raise ConfigError(f"{path} holds no features with a geometry; expected polygons of the labelled objects.")
    src_crs = _geojson_crs(collection, path)
    shapes = []
    for feature in features:
        value = _class_of(feature, pair, classes)
        if not 0 <= value < len(classes):
            raise ConfigError(
                f"A feature of {path} has class id {value}, outside the {len(classes)} configured classes "
                f"0..{len(classes) - 1} ({[c.name for c in classes]}); fix the data or add the class."
            )
        shapes.append((rasterio.warp.transform_geom(src_crs, crs, feature["geometry"]), value))
    labels = rasterio.features.rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8")
    if not labels.any() and any(v for _, v in shapes):
        west, south, east, north = rasterio.features.bounds({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": g, "properties": {}} for g, _ in shapes]})
        raise ConfigError(
            f"The polygons of {path} ({src_crs.to_string()}) do not overlap image {pair.image} ({crs}): "
            f"in the image's CRS they span x {west:.1f}..{east:.1f}, y {south:.1f}..{north:.1f}. Check that the "
            "GeoJSON's CRS is right (RFC 7946 GeoJSON without a `crs` member is WGS84) and that they cover the image."
        )
    return labels


def _scaled_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A single-band class-id image scaled by nearest neighbour (pixel centres) to `shape` (rows, cols)."""
    try:
        with rasterio.open(path) as src:
            mask = src.read()
    except rasterio.errors.RasterioIOError:
        try:
            with Image.open(path) as im:
                mask = np.asarray(im)
        except OSError as exc:
            raise SourceReadError(f"{path} cannot be read as a mask image ({exc}); expected a PNG or TIFF.") from exc
    mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask
    if mask.ndim != 2:
        raise ConfigError(f"Mask {path} is a colour image; expected one band of class ids, {IGNORE_INDEX} unlabelled.")
    mask = as_class_ids(mask, path)
    if mask.shape != shape:
        rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64)
        cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64)
        mask = mask[rows[:, None], cols[None, :]]
    return mask


def _check_classes(labels: np.ndarray, classes: Sequence[ClassInfo], path: str) -> None:
    present = np.unique(labels)
    bad = [int(v) for v in present if v != IGNORE_INDEX and v >= len(classes)]
    if bad:
        raise ConfigError(
            f"{path} holds the values {[int(v) for v in present]}: class id(s) {bad} are outside the {len(classes)} "
            f"configured classes 0..{len(classes) - 1} ({[c.name for c in classes]}); add the classes, or map the "
            f"values with label_map (e.g. label_map={{{bad[0]}: {len(classes) - 1}}}; {IGNORE_INDEX} is unlabelled)."
        )


def catalog_path(name: str) -> Path:
    """`conf/data/<name>.yaml` in the repository, or `name` itself when it is a file."""
    if os.path.exists(name):
        return Path(name)
    return Path(__file__).resolve().parents[2] / "conf" / "data" / f"{name}.yaml"


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
    return Catalog.from_mapping(data)
