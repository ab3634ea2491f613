"""Truth read by window: a label raster (at any size over the image) or polygons rasterised per window.

A training image can be far larger than memory, so its truth is never read whole. Each kind answers
``read(y0, x0, h, w)`` with the (h, w) uint8 class ids of that window of the image's working grid
(255 = unlabelled), `label_map` applied:

- `RasterTruth`: a label raster or mask image. On the image's grid it is read window by window; at
  another size (a mask covering a whole slide, labels at level 0 of an image read at a coarser level)
  the matching window is read and scaled by nearest neighbour.
- `PolygonTruth`: polygons (GeoJSON) already in the image's coordinates, the ones that touch a window
  found through a spatial index and burnt with `rasterio.features`; pixels outside every polygon are 0.

Both pickle without their file handles, so Ray workers and data-loader processes open their own.
Each has a ``key``, a string that changes when the truth does (file, version, mapping, grid): the
class index (`pipeline.training.data`) is cached under it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import rasterio
import rasterio.features
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.storage import Location, stamp, storage_for
from pipeline.storage.gdal import configure_for
from pipeline.training.metrics import IGNORE_INDEX

# Polygons are burnt in tiles of POLYGON_TILE px on a fixed grid, of which the last POLYGON_CACHE used in a
# process are kept (16 MiB at most, whatever the number of images): a training window reads from up to four.
POLYGON_TILE, POLYGON_CACHE = 512, 64
_TILES: OrderedDict[tuple[str, int, int, int], np.ndarray] = OrderedDict()
_EMPTY: dict[int, np.ndarray] = {}


def _empty(side: int) -> np.ndarray:
    """A read-only tile of class 0, one per side, shared by every tile without polygons (so costs no memory)."""
    tile = _EMPTY.get(side)
    if tile is None:
        tile = _EMPTY[side] = np.zeros((side, side), np.uint8)
        tile.flags.writeable = False
    return tile

__all__ = ["PolygonTruth", "RasterTruth", "as_class_ids", "as_label_map", "map_labels", "open_raster"]


class RasterTruth:
    """Class ids from a single-band raster covering the image, read by window.

    Args:
        path: The label raster or mask (GeoTIFF, PNG, ... anything GDAL reads; local or on object storage).
        shape: (rows, cols) of the image's working grid; a raster of another size is scaled onto it.
        label_map: Label values to class ids, applied to every window.
        role: "labels" (band 1 is read) or "mask" (a mask image, which must have one band).
    """

    def __init__(self, path: str, shape: tuple[int, int], label_map: Mapping[int, int] | None = None,
                 role: str = "labels") -> None:
        self.path = path
        self.role = role
        self.shape = (int(shape[0]), int(shape[1]))
        self.label_map = dict(label_map or {})
        self._table = _mapping_table(self.label_map)
        self._src: rasterio.DatasetReader | None = None
        location = Location.parse(path)
        self.key = _digest("raster", location.url, stamp(location), self.shape, sorted(self.label_map.items()))

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w) uint8 class ids of a window inside the image's grid."""
        src = self._open()
        if (src.height, src.width) == self.shape:
            data = src.read(1, window=Window(x0, y0, w, h))
        else:  # nearest neighbour onto the image's grid: the window's pixel centres, scaled
            sy, sx = src.height / self.shape[0], src.width / self.shape[1]
            data = src.read(1, window=Window(x0 * sx, y0 * sy, w * sx, h * sy), out_shape=(h, w),
                            resampling=Resampling.nearest)
        return self._table[as_class_ids(data, self.path)] if self._table is not None else as_class_ids(data, self.path)

    def _open(self) -> rasterio.DatasetReader:
        if self._src is None:
            src = open_raster(self.path, self.role)
            if self.role == "mask" and src.count != 1:
                src.close()
                raise ConfigError(f"Mask {self.path} has {src.count} bands (a colour image); expected one band of "
                                  f"class ids, {IGNORE_INDEX} unlabelled.")
            self._src = src
        return self._src

    def reopened(self) -> RasterTruth:
        """The same truth with a file handle of its own."""
        return copy.copy(self)._forget()

    def _forget(self) -> RasterTruth:
        self._src = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_src": None}


class PolygonTruth:
    """Class ids burnt from polygons in cached tiles, read window by window (class 0 outside every polygon).

    Args:
        shapes: (GeoJSON geometry, class id) pairs in the coordinates `transform` maps pixels to.
        transform: From (col, row) of the image's working grid to the polygons' coordinates (the
            image's geotransform, or a scale for slides annotated in level-0 pixels).
        key: What identifies these polygons (their file and version, the classes).
    """

    def __init__(self, shapes: Sequence[tuple[Mapping[str, Any], int]], transform: Affine, key: str,
                 tile: int = POLYGON_TILE) -> None:
        self.shapes = list(shapes)
        self.transform = transform
        self.key = _digest("polygons", key, tuple(transform))
        self.tile = tile
        self._tree: Any = None
        self._geometries: list[Any] = []

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w) uint8 class ids of a window of the image's grid, cut from tiles of a fixed grid burnt once
        each and kept in a small cache (the last `POLYGON_CACHE` tiles of the process, whatever the number of
        images): windows drawn near each other burn nothing again, and a burn costs a GDAL environment,
        which is a boto3 session where AWS credentials are set."""
        out = np.zeros((h, w), np.uint8)
        t = self.tile
        for ty in range(y0 // t * t, y0 + h, t):
            for tx in range(x0 // t * t, x0 + w, t):
                top, left = max(y0, ty), max(x0, tx)
                bottom, right = min(y0 + h, ty + t), min(x0 + w, tx + t)
                out[top - y0 : bottom - y0, left - x0 : right - x0] = self._tile(ty, tx)[
                    top - ty : bottom - ty, left - tx : right - tx]
        return out

    def _tile(self, y0: int, x0: int) -> np.ndarray:
        """The burnt tile whose corner is (y0, x0), from the process's cache or burnt now (read only)."""
        key = (self.key, self.tile, y0, x0)
        tile = _TILES.pop(key, None)
        if tile is None:
            t = self.tile
            hits = self._touching(y0, x0, t, t)
            if not hits:
                tile = _empty(t)
            else:  # rasterize starts a GDAL environment of its own whatever the caller's: hence the cache
                tile = rasterio.features.rasterize(
                    [(self._geometries[i], self.shapes[i][1]) for i in hits], out_shape=(t, t),
                    transform=self.transform * Affine.translation(x0, y0), fill=0, dtype="uint8")
                tile.flags.writeable = False
            while len(_TILES) >= POLYGON_CACHE:
                _TILES.popitem(last=False)  # the least recently used
        _TILES[key] = tile
        return tile

    def reopened(self) -> PolygonTruth:
        """Itself: polygons hold no file handle."""
        return self

    def overlaps(self, height: int, width: int) -> bool:
        """Whether any polygon touches the image (`height` x `width` on the working grid)."""
        return bool(self._touching(0, 0, height, width))

    def _touching(self, y0: int, x0: int, h: int, w: int) -> list[int]:
        """The polygons whose bounding boxes meet a window of the grid, in their order (an STRtree, built once)."""
        import shapely

        if self._tree is None:
            self._geometries = [shapely.geometry.shape(g) for g, _ in self.shapes]
            self._tree = shapely.STRtree(self._geometries)
        window = self.transform * Affine.translation(x0, y0)
        corners = [window * (c, r) for c, r in ((0, 0), (w, 0), (0, h), (w, h))]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return sorted(int(i) for i in self._tree.query(shapely.box(min(xs), min(ys), max(xs), max(ys))))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tree": None, "_geometries": []}


def open_raster(path: str | os.PathLike[str], role: str) -> rasterio.DatasetReader:
    """Open a raster, local or on object storage (read through GDAL's /vsis3/ and kin), mapping rasterio's
    errors onto tessera's."""
    location = Location.parse(path)
    if not storage_for(location).exists(location):
        raise SourceNotFoundError(
            f"The {role} raster {str(path)!r} does not exist; check the path (relative paths are "
            f"relative to {os.getcwd()!r})."
        )
    configure_for(location.url)
    try:
        with warnings.catch_warnings():  # a mask image (PNG) has no georeferencing, and needs none
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(location.url)
    except RasterioIOError as exc:
        raise SourceReadError(
            f"The {role} raster {str(path)!r} cannot be read ({exc}); expected a GeoTIFF or "
            "another format GDAL reads."
        ) from exc


def as_label_map(value: Mapping[Any, Any]) -> dict[int, int]:
    """`label_map` as label value -> class id, both in 0..255 (keys may come as strings from the command line).

    Raises:
        ConfigError: a key or value that is not an integer in 0..255.
    """
    try:
        mapping = {int(k): int(v) for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"label_map={value!r} is invalid; expected label values to class ids, e.g. "
                          f"label_map={{{IGNORE_INDEX}: 1}}.") from None
    bad = {k: v for k, v in mapping.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
    if bad:
        raise ConfigError(f"label_map entries {bad} are out of range; values and class ids are 0..255 "
                          f"({IGNORE_INDEX}: unlabelled).")
    return mapping


def map_labels(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """uint8 `labels` with `label_map` applied (values not in it are kept)."""
    table = _mapping_table(label_map)
    return labels if table is None else table[labels]


def as_class_ids(labels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Labels as uint8, or ConfigError if they are not integers in 0..255."""
    if labels.dtype == np.uint8:
        return labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"Labels {str(path)!r} have dtype {labels.dtype}; expected integer class ids (uint8, "
            f"with {IGNORE_INDEX} for unlabelled pixels)."
        )
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 255:
        raise ConfigError(
            f"Labels {str(path)!r} hold values {low}..{high}; expected class ids 0..254 and "
            f"{IGNORE_INDEX} for unlabelled pixels."
        )
    return labels.astype(np.uint8)


def _mapping_table(label_map: Mapping[int, int] | None) -> np.ndarray | None:
    if not label_map:
        return None
    table = np.arange(256, dtype=np.uint8)
    for value, class_id in label_map.items():
        table[value] = class_id
    return table


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]
