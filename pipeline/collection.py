"""A collection: the images one job segments, each with the name of its own output mosaic.

What a user passes as source(s) becomes a list of `CollectionItem`s once, here, before anything runs:

- a path or URL: one image (`s3://`, `gs://` and `http(s)://` become GDAL's `/vsis3/`, `/vsigs/` and
  `/vsicurl/` paths);
- a folder: its images (the usual raster and slide suffixes, or a glob pattern);
- a list file (`.csv`, `.txt`, `.lst`): one image per row, with an optional output name and pyramid level;
- a STAC file (`.json`, `.geojson`) or a STAC API search URL (`https://host/api/search?collections=...`):
  one image per STAC item (see `pipeline.stac`), several assets stacked as bands through a VRT
  (see `pipeline.band_stack`).

A collection writes `ROOT/<name>.zarr` per image and the manifest `ROOT/manifest.csv` (`pipeline.manifest`,
re-exported here). Nothing here imports Ray, Zarr or torch.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pipeline.band_stack import write_band_stack
from pipeline.errors import ConfigError, SourceNotFoundError
from pipeline.manifest import STATUSES, Manifest, ManifestRow
from pipeline.stac import is_search_url, is_stac_file, stac_images
from pipeline.storage import Location

__all__ = [
    "IMAGE_SUFFIXES",
    "LIST_SUFFIXES",
    "STATUSES",
    "BandStack",
    "CollectionItem",
    "Manifest",
    "ManifestRow",
    "SourceKind",
    "gdal_path",
    "is_collection",
    "materialise",
    "output_path",
    "resolve_collection",
    "source_kind",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu",
                  ".bif", ".svslide")
LIST_SUFFIXES = (".csv", ".txt", ".lst")

SourceKind = Literal["image", "folder", "list", "stac-file", "stac-search"]

# Second suffixes that only qualify the format, dropped with the last one: "a.ome.tif" is image "a".
_FORMAT_QUALIFIERS = (".ome", ".cog")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_VSI_PREFIX = {"s3": "/vsis3/", "gs": "/vsigs/"}
_HEADER_PATH = ("path", "source", "input")  # a list file's first row is a header when it starts with one


@dataclass(frozen=True)
class CollectionItem:
    """One image of a collection and the name of its output mosaic.

    Attributes:
        source: What to open: a local path made absolute, or a URL / GDAL virtual path as is (for a
            stack, the VRT that `materialise` writes).
        name: The output mosaic's name without ".zarr", unique within the collection.
        level: The pyramid level a list file asked for; None means the job's setting.
        stack: The STAC assets `source` stacks as bands, or None for an image read as it is.
    """

    source: str
    name: str
    level: int | None = None
    stack: BandStack | None = None


@dataclass(frozen=True)
class BandStack:
    """STAC assets to stack as the bands of one image, in a VRT written when the image is prepared (so an
    unreadable asset fails that image only, and a long collection does not wait on every asset's header)."""

    item_id: str
    keys: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    """An item before names are checked; `origin` says where it came from, for error messages."""

    origin: str
    name: str
    target: CollectionItem


def resolve_collection(sources: Sequence[str], *, pattern: str | None = None, assets: Sequence[str] = (),
                       stacking_dir: Path | None = None) -> list[CollectionItem]:
    """Turn what the user passed as source(s) into the images to segment, each with a unique output name.

    Only folders, list files and STAC documents are read; a local image that does not exist is still an
    item, so the job records it as failed rather than refusing the whole collection. Stacked assets are
    read when their image is prepared (`materialise`), so an unreadable asset fails that image only.

    Args:
        sources: Paths, URLs, folders, list files (.csv/.txt/.lst), STAC files (.json/.geojson) or STAC
            API search URLs (path ending in /search, filters in the query string).
        pattern: For folders: a glob such as "*.png" or "**/*.tif" (recursive). Default: the files whose
            suffix is one of `IMAGE_SUFFIXES` in any case, not recursive. Hidden files are skipped.
        assets: For STAC items: the asset key to read; several keys are stacked as bands in this order.
            Empty: the item's only asset with role "data", else its only GeoTIFF asset.
        stacking_dir: Where the VRTs of stacked assets will be written (`<name>.vrt`); needed only then.

    Returns:
        The items in the order of `sources`; a folder's files sorted, list rows and STAC items in order.

    Raises:
        ConfigError: An empty folder, list or search; a bad row in a list file; a missing or ambiguous
            STAC asset; two images with one output name; no images.
        SourceNotFoundError: A list or STAC file does not exist.

    Example:
        >>> items = resolve_collection(["scenes/", "s3://bucket/extra.tif"])
        >>> [(item.source, output_path("out", item)) for item in items]
        [('/home/me/scenes/a.tif', 'out/a.zarr'), ('/vsis3/bucket/extra.tif', 'out/extra.zarr')]
    """
    entries = [entry for source in sources for entry in _entries(source, pattern, tuple(assets))]
    if not entries:
        raise ConfigError("no images to segment: pass at least one image, folder, list file or STAC source")
    _check_unique_names(entries)
    stacks = [entry.target.stack for entry in entries if entry.target.stack is not None]
    if not stacks:
        return [entry.target for entry in entries]
    if stacking_dir is None:
        raise ConfigError(f"stacking the assets {', '.join(stacks[0].keys)} as bands needs a folder for the VRT "
                          "files that combine them; pass stacking_dir")
    folder = stacking_dir.absolute()
    return [dataclasses.replace(entry.target, source=str(folder / f"{entry.name}.vrt")) if entry.target.stack
            else entry.target for entry in entries]


def materialise(item: CollectionItem) -> str:
    """What to open for `item`: its source, after writing the VRT of its stacked assets if it has some.

    Raises:
        SourceNotFoundError, SourceReadError, ConfigError: As `band_stack.write_band_stack`: an asset is
            missing or unreadable, or the assets are not on one grid.
    """
    if item.stack is not None:
        write_band_stack(Path(item.source), item.stack.files, item.stack.keys, f"STAC item {item.stack.item_id!r}")
    return item.source


def output_path(root: str, item: CollectionItem) -> str:
    """The mosaic that `item` is written to inside the collection's output root."""
    return Location.parse(root).join(f"{item.name}.zarr").url


def is_collection(sources: Sequence[str], out: str) -> bool:
    """Whether a job writes a collection (`out` is a root folder of mosaics) rather than one mosaic.

    Only exactly one source naming one image, with `out` ending in ".zarr", is a single-mosaic job.
    """
    if len(sources) != 1 or source_kind(sources[0]) != "image":
        return True
    return not out.rstrip("/").endswith(".zarr")


def source_kind(source: str) -> SourceKind:
    """What one entry of the sources is, from its text and, for a local path, whether it is a folder."""
    if is_search_url(source):
        return "stac-search"
    if is_stac_file(source):
        return "stac-file"
    if _SCHEME.match(source) or source.startswith("/vsi"):
        return "image"
    if Path(source).suffix.lower() in LIST_SUFFIXES:
        return "list"
    return "folder" if Path(source).expanduser().is_dir() else "image"


def gdal_path(location: str, base: Path | None = None) -> str:
    """What GDAL opens for `location`.

    s3:// and gs:// become /vsis3/ and /vsigs/; http(s):// is read through /vsicurl/; file:// and local
    paths become absolute (relative ones from `base`, else the working directory); GDAL virtual paths
    and other URLs stay as they are.
    """
    if location.startswith("/vsi"):
        return location
    scheme = _SCHEME.match(location)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name in _VSI_PREFIX:
            return _VSI_PREFIX[name] + location[scheme.end():]
        if name in ("http", "https"):
            return "/vsicurl/" + location
        if name != "file":
            return location
        location = unquote(urlsplit(location).path)
    path = Path(location).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path.resolve())


def _entries(source: str, pattern: str | None, assets: tuple[str, ...]) -> list[_Entry]:
    """The items one entry of the sources stands for."""
    kind = source_kind(source)
    if kind == "folder":
        return _folder_entries(Path(source).expanduser(), pattern)
    if kind == "list":
        return _list_entries(Path(source).expanduser())
    if kind in ("stac-file", "stac-search"):
        return _stac_entries(source, assets)
    path = gdal_path(source)
    return [_Entry(source, _default_name(path), CollectionItem(path, _default_name(path)))]


def _folder_entries(folder: Path, pattern: str | None) -> list[_Entry]:
    candidates = folder.iterdir() if pattern is None else folder.glob(pattern)
    # Hidden files are never images to segment: macOS's "._scene.tif" companions, editors' temporaries.
    found = [p for p in candidates
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and (pattern is not None or p.suffix.lower() in IMAGE_SUFFIXES)]
    if not found:
        wanted = f"the pattern {pattern!r}" if pattern else f"the default suffixes ({' '.join(IMAGE_SUFFIXES)})"
        raise ConfigError(f"folder {folder} has no files matching {wanted}; pass a pattern that matches its "
                          "images, such as '*.png' or '**/*.tif' (recursive)")
    paths = sorted(gdal_path(str(p)) for p in found)
    return [_Entry(p, _default_name(p), CollectionItem(p, _default_name(p))) for p in paths]


def _list_entries(list_file: Path) -> list[_Entry]:
    """A list file's rows: a path, then optionally an output name and a pyramid level."""
    if not list_file.is_file():
        raise SourceNotFoundError(f"list file {list_file} does not exist; check the path (relative paths are "
                                  f"resolved from {Path.cwd()})")
    rows = list(_list_rows(list_file))
    columns = {"path": 0, "name": 1, "level": 2}
    if rows and rows[0][1][0].strip().lower() in _HEADER_PATH:
        header = [field.strip().lower() for field in rows.pop(0)[1]]
        columns = {"path": 0} | {key: header.index(key) for key in ("name", "level") if key in header}
    entries = []
    for line, fields in rows:
        given = {key: fields[k].strip() if k < len(fields) else "" for key, k in columns.items()}
        where = f"{list_file}, line {line}"
        if not given["path"]:
            raise ConfigError(f"{where}: the row has no path; put the image's path first, then its name and level")
        path = gdal_path(given["path"], base=list_file.parent.resolve())
        name = _given_name(given["name"], where) if given.get("name") else _default_name(path)
        level = _given_level(given.get("level", ""), where)
        entries.append(_Entry(f"{given['path']} ({where})", name, CollectionItem(path, name, level)))
    if not entries:
        raise ConfigError(f"list file {list_file} names no images; write one image path per line, optionally "
                          "followed by an output name and a pyramid level")
    return entries


def _list_rows(list_file: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each row that is neither blank nor a # comment."""
    with list_file.open(newline="", encoding="utf-8-sig") as f:
        if list_file.suffix.lower() == ".csv":
            reader = csv.reader(f)
            for fields in reader:
                if any(x.strip() for x in fields) and not fields[0].lstrip().startswith("#"):
                    yield reader.line_num, fields
            return
        for line, text in enumerate(f, start=1):
            text = text.strip()
            if text and not text.startswith("#"):
                yield line, text.split("\t") if "\t" in text else text.split(",")


def _given_level(text: str, where: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(f"{where}: level {text!r} is not a pyramid level; write a whole number >= 0 "
                          "(0 = full resolution) or leave it empty for the job's level")
    return int(text)


def _given_name(text: str, where: str) -> str:
    name = text.removesuffix(".zarr")
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: output name {text!r} is not a file name; write a name without slashes "
                          "(the mosaic is written to ROOT/<name>.zarr)")
    return name


def _stac_entries(source: str, assets: tuple[str, ...]) -> list[_Entry]:
    entries = []
    for image in stac_images(source, assets):
        name = _safe_name(image.item_id)
        files = tuple(gdal_path(href) for href in image.hrefs)
        stack = BandStack(image.item_id, image.assets, files) if len(files) > 1 else None
        entries.append(_Entry(f"item {image.item_id!r} of {source}", name, CollectionItem(files[0], name, stack=stack)))
    return entries


def _default_name(location: str) -> str:
    """The output name an image gets unless told otherwise: its file name without the suffix."""
    if "://" in location:  # a URL, perhaps inside a /vsicurl/ path: its query is not part of the name
        location = location.split("?", 1)[0].split("#", 1)[0]
    filename = location.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, _ = filename.rpartition(".")
    if dot and stem:
        inner, dot, qualifier = stem.rpartition(".")
        filename = inner if dot and inner and f".{qualifier.lower()}" in _FORMAT_QUALIFIERS else stem
    return _safe_name(filename)


def _safe_name(text: str) -> str:
    """`text` with anything but letters, digits, "-", "_" and "." replaced by "_", usable as a file name."""
    return re.sub(r"[^\w.-]+", "_", text).lstrip(".") or "image"


def _check_unique_names(entries: Sequence[_Entry]) -> None:
    """Refuse two images that would write one mosaic; names that differ only in case clash too (macOS, Windows)."""
    by_name: dict[str, list[_Entry]] = defaultdict(list)
    for entry in entries:
        by_name[entry.name.casefold()].append(entry)
    clashes = [group for group in by_name.values() if len(group) > 1]
    if clashes:
        listed = "; ".join(f"{group[0].name!r} from {', '.join(e.origin for e in group)}" for group in clashes)
        raise ConfigError(f"several images would write the same output mosaic: {listed}. Give each image its "
                          "own name in a list file (one 'path,name' row per image) and pass that instead")
