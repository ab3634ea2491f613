"""The Zarr mosaic: create, write a block, build the pyramid, finish, open and read.

Layout (docs/FORMAT.md has the full description)::

    mosaic.zarr/                 attrs: tessera (format, classes, georef, lineage, complete), ome (multiscales)
      0/ 1/ ... N/               one group per pyramid level, each opens with xarray.open_zarr(group="k")
        scores      (c, y, x)    blended logits or probabilities, float16 (configurable), NaN = nodata
        confidence  (y, x)       top-class probability, float16, NaN = nodata
        uncertainty (y, x)       optional: normalised entropy of the class distribution, float16, NaN = nodata
        spread      (y, x)       optional (with TTA): blended spread of the 8 views, float16, NaN = nodata
        y, x                     pixel-centre coordinates (CRS units, or micrometres for slides)
        spatial_ref ()           CF grid mapping (crs_wkt, GeoTransform) for rioxarray; rasters only
      labels/mask/0 ... N        class mask, uint8 (255 = nodata), or uint16 (65535 = nodata) for models of
                                 over 254 classes; OME-Zarr labels with class colours

Georeferenced arrays also carry the GeoZarr `proj:` and `spatial:` attributes, and the root and
`labels/mask` a GeoZarr `multiscales` layout, which GDAL 3.13 reads as georeferencing and overviews.

Every array is sharded; a block of the job is a whole number of shards and is written exactly once.
The `ome` and `multiscales` metadata and `tessera.complete = true` are written last, so a mosaic
interrupted at any point is neither complete for tessera nor an image for OME or GeoZarr readers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from affine import Affine
from zarr.codecs import BloscCodec

from pipeline.classes import ClassInfo
from pipeline.errors import ConfigError, MosaicError, OutputExistsError
from pipeline.stitching import BlockOutput, derive, mask_dtype, nodata_class
from pipeline.storage import Location, storage_for
from pipeline.tiling import Rect

FORMAT = "tessera.mosaic"
BLOCKS = "_tessera/blocks"  # one small group per finished block: its checksum, for resume
FORMAT_VERSION = 1
# Per-pixel float16 layers a job may add beside confidence (`MosaicLayout.layers`, docs/FORMAT.md).
OPTIONAL_LAYERS = ("uncertainty", "spread")
# LZ4 with byte shuffle: blocks of the 8192² tiny-model job took 17-19 s against 24-33 s with zarr's
# default zstd, for a mosaic 9% larger (docs/benchmarks.md). Readers take the codec from the metadata.
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# The GeoZarr conventions written beside the CF and OME metadata, as their v0.1 schemas fix their
# registration in `zarr_conventions` (readers such as GDAL match the uuid). See docs/FORMAT.md.
GEOZARR_CONVENTIONS = {
    name: {
        "uuid": uuid, "name": name, "description": description,
        "schema_url": f"https://raw.githubusercontent.com/zarr-conventions/{name}/refs/tags/v0.1/schema.json",
        "spec_url": f"https://github.com/zarr-conventions/{name}/blob/v0.1/README.md",
    }
    for name, uuid, description in (
        ("proj", "f17cb550-5864-4468-aeb7-f3180cfb622f", "Coordinate reference system information for geospatial data"),
        ("spatial", "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4", "Spatial coordinate information"),
        ("multiscales", "d35379db-88df-4056-af3a-620245f8e347", "Multiscale layout of zarr datasets"),
    )
}


@dataclass(frozen=True)
class MosaicLayout:
    """Everything that fixes a mosaic's arrays before any block is written."""

    height: int
    width: int
    classes: tuple[ClassInfo, ...]
    scores_kind: str = "logits"
    scores_dtype: str = "float16"
    chunk: int = 512
    shard: int = 2048
    crs: str | None = None  # WKT
    transform: tuple[float, ...] | None = None  # affine (a, b, c, d, e, f) of level 0
    mpp: float | None = None  # microns per pixel of level 0
    layers: tuple[str, ...] = ()  # optional layers of `OPTIONAL_LAYERS`, in that order

    def __post_init__(self) -> None:
        check_storage(self.chunk, self.shard)
        if self.scores_dtype not in ("float16", "float32"):
            raise MosaicError(f"scores_dtype {self.scores_dtype!r}: choose float16 or float32")
        unknown = [name for name in self.layers if name not in OPTIONAL_LAYERS]
        if unknown:
            raise MosaicError(f"layers {unknown}: a mosaic's optional layers are {', '.join(OPTIONAL_LAYERS)}")
        object.__setattr__(self, "layers", tuple(n for n in OPTIONAL_LAYERS if n in self.layers))

    @property
    def mask_dtype(self) -> str:
        """The mask's data type, from the number of classes: "uint8" up to 254 classes, else "uint16"."""
        return mask_dtype(len(self.classes)).name

    @property
    def mask_nodata(self) -> int:
        """The mask's nodata class: 255 for uint8 masks, 65535 for uint16."""
        return nodata_class(self.mask_dtype)

    @property
    def map_layers(self) -> tuple[str, ...]:
        """The per-pixel layers a map shows: mask, confidence and the optional ones this mosaic has."""
        return ("mask", "confidence", *self.layers)

    @property
    def num_levels(self) -> int:
        """Levels halve the size until the image fits in one chunk."""
        return 1 + max(0, math.ceil(math.log2(max(self.height, self.width) / self.chunk)))

    @property
    def block_levels(self) -> int:
        """Levels 1..block_levels are written by the block tasks themselves (see `level_shard`)."""
        return min(int(math.log2(self.shard // self.chunk)), self.num_levels - 1)

    def level_shard(self, level: int) -> int:
        """Shard edge at a level: halved per level down to one chunk.

        So a level-0 block of whole shards covers whole shards of the levels below it, and the task
        that writes the block can write its part of those levels too, still as their only writer.
        """
        return max(self.shard >> level, self.chunk)

    def level_shape(self, level: int) -> tuple[int, int]:
        f = 2**level
        return math.ceil(self.height / f), math.ceil(self.width / f)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [{"name": c.name, "color": list(c.color)} for c in self.classes]
        # Written only where they differ from what a mosaic made before them has: its metadata stays as it was.
        # The mask type follows from the classes; it is recorded for readers that do not know that rule.
        if self.mask_dtype != "uint8":
            d["mask_dtype"] = self.mask_dtype
        if d["layers"]:
            d["layers"] = list(d["layers"])
        else:
            del d["layers"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MosaicLayout:
        d = dict(d)
        d["classes"] = tuple(ClassInfo(c["name"], tuple(c["color"])) for c in d["classes"])
        if d.get("transform") is not None:
            d["transform"] = tuple(d["transform"])
        d["layers"] = tuple(d.get("layers", ()))
        recorded = d.pop("mask_dtype", None)
        layout = cls(**d)
        if recorded not in (None, layout.mask_dtype):
            raise MosaicError(f"mask_dtype {recorded!r} does not fit {len(layout.classes)} classes and nodata: a "
                              f"mosaic of {len(layout.classes)} classes has a {layout.mask_dtype} mask")
        return layout


def check_storage(chunk: int, shard: int) -> None:
    """Chunk and shard edges a mosaic can use: shard = chunk * 2^n (the shard halves per level).

    Raises:
        ConfigError: otherwise, naming a valid choice.
    """
    if chunk <= 0 or shard < chunk or shard % chunk or (shard // chunk) & (shard // chunk - 1):
        raise ConfigError(
            f"shard {shard} must be chunk {chunk} times a power of two (e.g. {max(chunk, 1) * 4}): "
            "pyramid levels halve the shard down to one chunk"
        )


def is_mosaic(path: str | Path | Location) -> bool:
    """Whether `path` holds a tessera mosaic (complete or not), on a disk or object storage.

    Raises:
        StorageError: the object store cannot be reached or used.
    """
    location = Location.parse(path)
    try:
        document = storage_for(location).read_json(location.join("zarr.json"))
    except (ValueError, RecursionError, IsADirectoryError, NotADirectoryError):  # no JSON, or nested past parsing
        return False
    return is_mosaic_document(document)


def is_mosaic_document(document: Any) -> bool:
    """Whether a parsed root `zarr.json` is a tessera mosaic's (its attributes name the format)."""
    attrs = document.get("attributes", {}) if isinstance(document, dict) else {}
    tessera = attrs.get("tessera") if isinstance(attrs, dict) else None
    return isinstance(tessera, dict) and tessera.get("format") == FORMAT


OutputState = Literal["absent", "resume", "complete"]


def output_state(output: str | Path | Location, overwrite: bool, fingerprint: Mapping[str, Any]) -> OutputState:
    """What a job finds at its output, checked before any compute so that no one's data is lost:
    "absent" (create it; also an empty folder, or anything with `overwrite`), "resume" (an unfinished
    mosaic of the same job) or "complete" (a finished mosaic of the same job, kept as it is).

    Args:
        output: the mosaic to write.
        overwrite: a mosaic made or started with other settings may be replaced.
        fingerprint: the settings that fix the mosaic's content (the job kind's).

    Raises:
        OutputExistsError: the path holds something else, or a mosaic made or started with other
            settings, and `overwrite` is false.
    """
    p = Location.parse(output)
    storage = storage_for(p)
    if not storage.exists(p):
        return "absent"
    if not is_mosaic(p):
        if (not p.is_local or p.local_path().is_dir()) and not storage.list(p):
            return "absent"
        raise OutputExistsError(f"output {p} exists and is not a tessera mosaic: choose another output path or "
                                "remove it")
    if overwrite:
        return "absent"
    mosaic = Mosaic.open(p)
    before = mosaic.meta.get("job", {})
    if before != dict(fingerprint):
        changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        state = "a complete mosaic made" if mosaic.complete else "an unfinished mosaic started"
        raise OutputExistsError(
            f"output {p} is {state} with other settings ({', '.join(changed)}): run the same command to "
            f"{'keep' if mosaic.complete else 'resume'} it, or pass --overwrite to start over"
        )
    return "complete" if mosaic.complete else "resume"


class Mosaic:
    """A tessera mosaic on a local disk or object storage. Use `create` or `open`, not the constructor."""

    def __init__(self, location: Location, group: zarr.Group) -> None:
        self.location = location
        self.group = group
        meta: dict[str, Any] = dict(group.attrs.get("tessera", {}))  # type: ignore[arg-type]
        if meta.get("format") != FORMAT:
            raise MosaicError(f"{location} is not a tessera mosaic (no tessera metadata)")
        self.layout = MosaicLayout.from_dict(meta["layout"])
        self._arrays: dict[str, zarr.Array] = {}

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path | Location, layout: MosaicLayout, lineage: Mapping[str, Any],
        job: Mapping[str, Any] | None = None,
    ) -> Mosaic:
        """Create an empty, incomplete mosaic with all levels' arrays, replacing a tessera mosaic there.

        Call `output_state` first: this replaces whatever tessera mosaic is at `path`.
        """
        p = Location.parse(path)
        storage = storage_for(p)
        if is_mosaic(p):
            storage.delete(p, recursive=True)
        # Laid out in memory, then written object by object in parallel, the root document last: until it
        # is there, nothing here is a mosaic to resume. zarr's own creation checks every node's parents one
        # round trip at a time (3.7 s for three levels against a local S3 server, 1.0 s this way; on a
        # disk 0.3 s against 0.15 s for a 20,000 px mosaic).
        objects: dict[str, Any] = {}
        _lay_out(zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=3), layout, lineage, job)
        root = objects.pop("zarr.json")
        with ThreadPoolExecutor(16, thread_name_prefix="tessera-create") as pool:
            list(pool.map(lambda key: storage.write_bytes(p.join(key), objects[key].to_bytes()), objects))
        storage.write_bytes(p.join("zarr.json"), root.to_bytes())
        return cls(p, zarr.open_group(storage.zarr_store(p, read_only=False), mode="r+", zarr_format=3))

    @classmethod
    def open(cls, path: str | Path | Location, mode: str = "r",
             storage_options: Mapping[str, Any] | None = None) -> Mosaic:
        """Open an existing mosaic: a local folder, or a URL of object storage (s3://, gs://...) or any
        location fsspec reads (https://, memory://...).

        `storage_options` go to fsspec (e.g. endpoint_url, anon); credentials come from the environment.

        Raises:
            MosaicError: when `path` is not a tessera mosaic.
            StorageError: the object store cannot be reached or used.
        """
        location = Location.parse(path, storage_options)
        if not is_mosaic(location):
            raise MosaicError(f"{location} is not a tessera mosaic: expected a folder written by `tessera segment`")
        store = storage_for(location).zarr_store(location, read_only=mode == "r")
        return cls(location, zarr.open_group(store, mode=mode, zarr_format=3))  # type: ignore[arg-type]

    # -- state ----------------------------------------------------------------------------------

    @property
    def path(self) -> Path | str:
        """The local folder, or the URL of a mosaic on object storage."""
        return self.location.local_path() if self.location.is_local else self.location.url

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs["tessera"])  # type: ignore[arg-type]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def lineage(self) -> dict[str, Any]:
        return dict(self.meta.get("lineage", {}))

    def array(self, name: str, level: int = 0) -> zarr.Array:
        """One of `scores`, `confidence`, `mask` or an optional layer the mosaic has, at a pyramid level.

        Raises:
            MosaicError: an optional layer this mosaic does not have.
        """
        if name in OPTIONAL_LAYERS and name not in self.layout.layers:
            raise MosaicError(f"this mosaic has no {name} layer: segment the image with --uncertainty"
                              f"{' --tta' if name == 'spread' else ''} to make one")
        path = f"labels/mask/{level}" if name == "mask" else f"{level}/{name}"
        # Keep the handles: opening one reads its metadata, a round trip on object storage. Arrays never
        # change shape once created, so a handle stays valid for reads and writes alike.
        if path not in self._arrays:
            self._arrays[path] = self.group[path]  # type: ignore[assignment]
        return self._arrays[path]

    # -- writing --------------------------------------------------------------------------------

    def write_block(self, out: BlockOutput) -> str:
        """Write one shard-aligned block of level 0 and its part of levels 1..`block_levels`.

        The lower levels are pooled from the block's float32 scores in memory, so most of the pyramid
        is built in parallel by the block tasks; `build_pyramid` only adds the small levels below.

        Returns:
            The level-0 checksum for `mark_done`, taken from the very arrays written (no read-back).
        """
        r = out.region
        if r.y0 % self.layout.shard or r.x0 % self.layout.shard:
            raise MosaicError(f"block {r} is not aligned to the shard size {self.layout.shard}")
        layout = self.layout
        # Checked before anything is written (the lower levels are derived here, so level 0 decides).
        if out.mask.dtype != layout.mask_dtype:  # a cast would turn a uint8 mask's nodata (255) into a class
            raise MosaicError(f"block {r}: a {out.mask.dtype} mask for a mosaic of {layout.mask_dtype} masks; derive "
                              "it with stitching.summarise or derive")
        missing = [name for name in layout.layers if getattr(out, name) is None]
        if missing:
            raise MosaicError(f"block {r} has no {missing[0]} values, but the mosaic has the layer")
        stored = self._write_level(0, r.y0, r.x0, out)
        scores, spread = out.scores, out.spread
        for k in range(1, layout.block_levels + 1):
            scores = _pool2x2(scores)
            spread = _pool2x2(spread[None])[0] if spread is not None else None
            pooled = derive(out.region, scores, layout.scores_kind, uncertainty="uncertainty" in layout.layers,
                            spread=spread)
            self._write_level(k, r.y0 >> k, r.x0 >> k, pooled)
        return _crc(out.mask, stored)

    def checksum(self, region: Rect) -> str:
        """CRC-32 of a level-0 block as stored (mask and scores): what resume verifies."""
        return _crc(self.read("mask", 0, region), self.read("scores", 0, region))

    def mark_done(self, block: tuple[int, int], region: Rect, checksum: str) -> None:
        """Record a block written by `write_block`, with the checksum it returned (its own marker group:
        the block's writer is its only writer)."""
        r = region
        # One write (one PUT on object storage): the marker group's whole metadata document.
        marker = self.location.join(BLOCKS, f"{block[0]}_{block[1]}", "zarr.json")
        storage_for(marker).write_json(marker, {
            "zarr_format": 3, "node_type": "group",
            "attributes": {"region": [r.y0, r.x0, r.y1, r.x1], "checksum": checksum},
        })

    def marked_blocks(self) -> set[tuple[int, int]]:
        """Blocks with a done-marker, not verified (see `done_blocks`)."""
        if BLOCKS not in self.group:
            return set()
        return {_block_id(name) for name in self.group[BLOCKS].group_keys()}  # type: ignore[union-attr]

    def done_blocks(self) -> set[tuple[int, int]]:
        """Blocks with a marker whose checksum still matches what is stored."""
        if BLOCKS not in self.group:
            return set()
        done = set()
        for name, marker in self.group[BLOCKS].groups():  # type: ignore[union-attr]
            attrs = dict(marker.attrs)
            region = Rect(*attrs.get("region", (0, 0, 0, 0)))
            if not region.empty and attrs.get("checksum") == self.checksum(region):
                done.add(_block_id(name))
        return done

    def _write_level(self, level: int, y0: int, x0: int, out: BlockOutput) -> np.ndarray:
        """Write one level's part of a block (`out` at that level); returns the scores as stored (cast to
        `scores_dtype`)."""
        ys, xs = slice(y0, y0 + out.mask.shape[0]), slice(x0, x0 + out.mask.shape[1])
        stored = out.scores.astype(self.layout.scores_dtype)
        self.array("scores", level)[:, ys, xs] = stored
        self.array("confidence", level)[ys, xs] = out.confidence.astype(np.float16)
        self.array("mask", level)[ys, xs] = out.mask
        for name in self.layout.layers:
            self.array(name, level)[ys, xs] = getattr(out, name).astype(np.float16)
        return stored

    def build_pyramid(self, num_workers: int | None = None) -> None:
        """Fill the levels below `block_levels` out of core, one dask task per output shard.

        Scores are averaged over 2x2 pixels (ignoring nodata); mask, confidence and uncertainty are derived
        from the averaged scores exactly as for level 0, so every level is self-consistent. The TTA spread,
        a blended value itself, is averaged like the scores.
        """
        import dask.array as da  # here: a second of imports that block workers and readers never need

        layout = self.layout
        kind, uncertain = layout.scores_kind, "uncertainty" in layout.layers
        for k in range(layout.block_levels + 1, layout.num_levels):
            shard = layout.level_shard(k)
            prev = da.from_zarr(self.array("scores", k - 1), chunks=(-1, 2 * shard, 2 * shard))
            out_chunks = (prev.chunks[0], _halved(prev.chunks[1]), _halved(prev.chunks[2]))
            pooled = prev.map_blocks(_pool2x2, chunks=out_chunks, dtype=np.float32)
            # One task per chunk derives mask, confidence (and uncertainty) in one argmax and one softmax pass.
            summary = pooled.map_blocks(_summary_planes, kind, uncertain, dtype=np.float32,
                                        chunks=((2 + uncertain,), *out_chunks[1:]))
            sources: list[Any] = [pooled.astype(layout.scores_dtype), summary[1],
                                  summary[0].astype(layout.mask_dtype)]
            targets: list[Any] = [self.array("scores", k), self.array("confidence", k), self.array("mask", k)]
            if uncertain:
                sources.append(summary[2].astype(np.float16))
                targets.append(self.array("uncertainty", k))
            if "spread" in layout.layers:
                above = da.from_zarr(self.array("spread", k - 1), chunks=(2 * shard, 2 * shard))
                sources.append(above.map_blocks(lambda b: _pool2x2(b[None])[0].astype(np.float16),
                                                chunks=out_chunks[1:], dtype=np.float16))
                targets.append(self.array("spread", k))
            da.store(
                sources,
                targets,
                lock=False,
                scheduler="threads",
                num_workers=num_workers,
            )

    def finish(self, lineage: Mapping[str, Any]) -> None:
        """Record the final lineage, write the OME and GeoZarr multiscales metadata and mark the mosaic
        complete (last step)."""
        labels = self.group["labels"]
        labels.attrs["ome"] = {"version": "0.5", "labels": ["mask"]}
        mask = self.group["labels/mask"]
        mask.attrs["ome"] = {
            **_ome_multiscales(self.layout, "mask", with_channel=False, path="{k}"),
            "image-label": {
                "version": "0.5",
                "colors": [{"label-value": i, "rgba": [*c.color, 255]} for i, c in enumerate(self.layout.classes)]
                + [{"label-value": self.layout.mask_nodata, "rgba": [0, 0, 0, 0]}],
                "properties": [{"label-value": i, "class": c.name} for i, c in enumerate(self.layout.classes)],
                "source": {"image": "../../"},
            },
        }
        mask.attrs.update(_geozarr(self.layout))  # its levels are the arrays 0 ... N
        meta = self.meta
        meta["lineage"] = {**meta.get("lineage", {}), **lineage}
        meta["complete"] = True
        # One metadata write makes the mosaic an OME image, a GeoZarr pyramid and complete at the same
        # instant. (ome-zarr-py also reads a root `multiscales` as OME 0.4 where `ome` is missing, so an
        # unfinished mosaic must have neither.)
        self.group.attrs.update({
            "tessera": meta,
            "ome": _ome_multiscales(self.layout, "scores", with_channel=True, path="{k}/scores"),
            **_geozarr(self.layout),  # its levels are the groups 0 ... N
        })

    # -- reading --------------------------------------------------------------------------------

    def read(self, name: str, level: int = 0, rect: Rect | None = None) -> np.ndarray:
        """Read `scores`, `confidence`, `mask` or an optional layer at a level, optionally a window of it."""
        arr = self.array(name, level)
        if rect is None:
            return np.asarray(arr[...])
        sl = (slice(rect.y0, rect.y1), slice(rect.x0, rect.x1))
        return np.asarray(arr[(slice(None), *sl)] if name == "scores" else arr[sl])

    @property
    def palette(self) -> np.ndarray:
        """(256, 3) uint8 lookup table from class id to its colour, or (65536, 3) for a uint16 mask;
        nodata (255 or 65535) is black."""
        palette = np.zeros((self.layout.mask_nodata + 1, 3), np.uint8)
        for i, c in enumerate(self.layout.classes):
            palette[i] = c.color
        return palette

    def render_mask(self, level: int) -> np.ndarray:
        """The mask at a level in the class colours, (h, w, 3) uint8; nodata is black."""
        return self.palette[self.read("mask", level)]

    def preview_level(self, max_size: int) -> int:
        """The finest level whose longer side is at most `max_size` (the coarsest if none is)."""
        level = 0
        while level + 1 < self.layout.num_levels and max(self.layout.level_shape(level)) > max_size:
            level += 1
        return level

    def preview_png(self, max_size: int = 1024) -> bytes:
        """A PNG of the class mask at the preview level."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.render_mask(self.preview_level(max_size))).save(buffer, format="PNG")
        return buffer.getvalue()

    def to_xarray(self, level: int = 0) -> Any:
        """The level as an `xarray.Dataset` (lazy, dask-backed): scores, confidence, mask and the optional layers."""
        import dask.array as da
        import xarray as xr

        ds = xr.open_zarr(self.group.store, group=str(level), consolidated=False)
        mask = da.from_zarr(self.array("mask", level))
        return ds.assign(mask=(("y", "x"), mask))


def _lay_out(group: zarr.Group, layout: MosaicLayout, lineage: Mapping[str, Any],
             job: Mapping[str, Any] | None) -> None:
    """Write an empty, incomplete mosaic's metadata and coordinates into a new group."""
    group.attrs["tessera"] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "layout": layout.to_dict(),
        "lineage": dict(lineage),
        "job": dict(job or {}),
    }
    group.create_group(BLOCKS)
    c = len(layout.classes)
    for k in range(layout.num_levels):
        h, w = layout.level_shape(k)
        chunk, shard = layout.chunk, layout.level_shard(k)
        level = group.create_group(str(k))
        geo = _geozarr(layout, k)
        grid_attrs = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"} if layout.crs else {}
        scores = level.create_array(
            "scores", shape=(c, h, w), dtype=layout.scores_dtype, chunks=(c, chunk, chunk),
            shards=(c, shard, shard), fill_value=np.nan, dimension_names=("c", "y", "x"), compressors=COMPRESSOR,
        )
        scores.attrs.update({**grid_attrs, **geo, "kind": layout.scores_kind,
                             "classes": [cl.name for cl in layout.classes]})
        conf = level.create_array(
            "confidence", shape=(h, w), dtype="float16", chunks=(chunk, chunk),
            shards=(shard, shard), fill_value=np.nan, dimension_names=("y", "x"), compressors=COMPRESSOR,
        )
        conf.attrs.update({**grid_attrs, **geo})
        for name in layout.layers:
            extra = level.create_array(
                name, shape=(h, w), dtype="float16", chunks=(chunk, chunk),
                shards=(shard, shard), fill_value=np.nan, dimension_names=("y", "x"), compressors=COMPRESSOR,
            )
            extra.attrs.update({**grid_attrs, **geo})
        mask = group.create_array(
            f"labels/mask/{k}", shape=(h, w), dtype=layout.mask_dtype, chunks=(chunk, chunk),
            shards=(shard, shard), fill_value=layout.mask_nodata, dimension_names=("y", "x"),
            compressors=COMPRESSOR,
        )
        mask.attrs.update(geo)
        _write_coordinates(level, layout, k)


def _crc(mask: np.ndarray, scores: np.ndarray) -> str:
    crc = zlib.crc32(np.ascontiguousarray(mask).tobytes())
    return f"{zlib.crc32(np.ascontiguousarray(scores).tobytes(), crc):08x}"


def _summary_planes(scores: np.ndarray, kind: str, uncertainty: bool) -> np.ndarray:
    """(2 or 3, h, w) float32: the mask (class ids are exact in float32), confidence and, when asked, uncertainty."""
    out = derive(Rect(0, 0, *scores.shape[1:]), scores, kind, uncertainty=uncertainty)
    extra = () if out.uncertainty is None else (out.uncertainty,)
    return np.stack([out.mask, out.confidence, *extra]).astype(np.float32)


def _halved(chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(c / 2) for c in chunks)


def _pool2x2(block: np.ndarray) -> np.ndarray:
    """Mean over 2x2 pixels, ignoring nodata (NaN); odd edges are padded with nodata."""
    c, h, w = block.shape
    if h % 2 or w % 2:
        padded = np.full((c, h + h % 2, w + w % 2), np.nan, np.float32)
        padded[:, :h, :w] = block
        block = padded
    valid = ~np.isnan(block[0])  # nodata is NaN in every class at once
    filled = np.where(valid, block, np.float32(0))
    quads = ((slice(None), slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1))
    total = np.zeros((c, block.shape[1] // 2, block.shape[2] // 2), np.float32)
    count = np.zeros(total.shape[1:], np.float32)
    for q in quads:
        total += filled[q]
        count += valid[q[1:]]
    with np.errstate(invalid="ignore", divide="ignore"):  # all-nodata quads give NaN, as they should
        return total / count


def _pixel_size(layout: MosaicLayout) -> tuple[float, float, str | None]:
    """Level-0 pixel height and width, and the OME unit name when one applies."""
    if layout.transform is not None:
        a, _, _, _, e, _ = layout.transform[:6]
        unit = "meter" if layout.crs and _crs_in_metres(layout.crs) else None
        return abs(e), abs(a), unit
    if layout.mpp is not None:
        return layout.mpp, layout.mpp, "micrometer"
    return 1.0, 1.0, None


def _crs_in_metres(wkt: str) -> bool:
    from pyproj import CRS

    try:
        crs = CRS.from_wkt(wkt)
    except Exception:
        return False
    return crs.is_projected and all(a.unit_name in ("metre", "meter") for a in crs.axis_info)


def _ome_multiscales(layout: MosaicLayout, name: str, *, with_channel: bool, path: str) -> dict[str, Any]:
    py, px, unit = _pixel_size(layout)
    space = [{"name": ax, "type": "space", **({"unit": unit} if unit else {})} for ax in ("y", "x")]
    axes = ([{"name": "c", "type": "channel"}] if with_channel else []) + space
    datasets = []
    for k in range(layout.num_levels):
        f = 2**k
        scale = [py * f, px * f]
        shift = [py * (f - 1) / 2, px * (f - 1) / 2]  # keeps pixel centres aligned across levels
        if with_channel:
            scale, shift = [1.0, *scale], [0.0, *shift]
        datasets.append({
            "path": path.format(k=k),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": shift},
            ],
        })
    return {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}


def _geozarr(layout: MosaicLayout, level: int | None = None) -> dict[str, Any]:
    """GeoZarr attributes of one array of `level` or, without `level`, of a group whose children `0` ... `N`
    are the levels (the root, `labels/mask`), which also gets the `multiscales` layout of those levels.

    `proj:` and `spatial:` (CRS, transform, shape, extent) only where the mosaic is georeferenced. Level k's
    transform is level 0's scaled by 2^k with the same origin: its pixel (i, j) covers level-0 pixels
    [2^k i, 2^k (i+1)) x [2^k j, 2^k (j+1)).
    """
    from pyproj import CRS

    def grid(k: int) -> dict[str, Any]:
        if layout.crs is None or layout.transform is None:
            return {}
        t = Affine(*layout.transform[:6]) @ Affine.scale(2**k)
        return {"spatial:transform": list(t)[:6], "spatial:shape": list(layout.level_shape(k))}

    attrs = grid(level or 0)
    if attrs:
        crs = CRS.from_user_input(layout.crs)
        code = crs.to_authority(min_confidence=100)  # a code only for a CRS that is exactly the authority's
        (h, w), t = attrs["spatial:shape"], Affine(*attrs["spatial:transform"])
        xs, ys = zip(*(t * corner for corner in ((0, 0), (w, 0), (0, h), (w, h))), strict=True)
        attrs = {
            **({"proj:code": ":".join(code)} if code else {"proj:wkt2": crs.to_wkt("WKT2_2019")}),
            "spatial:dimensions": ["y", "x"],
            **attrs,
            "spatial:bbox": [min(xs), min(ys), max(xs), max(ys)],
        }
    if level is None:
        attrs["multiscales"] = {"layout": [
            {"asset": str(k), **({"derived_from": str(k - 1)} if k else {}),
             "transform": {"scale": [2.0 if k else 1.0] * 2, "translation": [0.0, 0.0]}, **grid(k)}
            for k in range(layout.num_levels)
        ]}
    used = [c for name, c in GEOZARR_CONVENTIONS.items() if any(key.startswith(name) for key in attrs)]
    return {"zarr_conventions": used, **attrs} if attrs else {}


def _write_coordinates(level: zarr.Group, layout: MosaicLayout, k: int) -> None:
    """Pixel-centre coordinates and, for georeferenced mosaics, the CF grid mapping rioxarray reads."""
    h, w = layout.level_shape(k)
    f = 2**k
    if layout.transform is not None:
        t = Affine(*layout.transform[:6]) @ Affine.scale(f)
        xs = t.c + (np.arange(w) + 0.5) * t.a
        ys = t.f + (np.arange(h) + 0.5) * t.e
        units = "metre" if layout.crs and _crs_in_metres(layout.crs) else ""
    else:
        step = (layout.mpp or 1.0) * f
        xs, ys = (np.arange(w) + 0.5) * step, (np.arange(h) + 0.5) * step
        units = "micrometre" if layout.mpp else "pixel"
    for name, values in (("y", ys), ("x", xs)):
        arr = level.create_array(name, shape=values.shape, dtype="float64", dimension_names=(name,))
        arr[:] = values
        arr.attrs.update({"units": units, "axis": name.upper()})
    if layout.crs is not None and layout.transform is not None:
        t = Affine(*layout.transform[:6]) @ Affine.scale(f)
        ref = level.create_array("spatial_ref", shape=(), dtype="int64", fill_value=0)
        ref.attrs.update({
            "crs_wkt": layout.crs,
            "spatial_ref": layout.crs,
            "GeoTransform": " ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e)),
        })


def _block_id(marker: str) -> tuple[int, int]:
    r, c = marker.split("_")
    return int(r), int(c)
