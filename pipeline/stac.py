"""Images described by STAC: the items of a STAC file or an API search, and which asset of each to read.

A STAC item lists its files as assets ("B04", "visual", "thumbnail"...). Each item becomes one
`StacImage`: the asset asked for, or several stacked as bands, or by default the item's one data
asset. Nothing here opens an image; hrefs come back absolute, as STAC writes them (URLs, s3://, paths).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pipeline.errors import ConfigError, SourceNotFoundError

if TYPE_CHECKING:
    import pystac

__all__ = ["SEARCH_PARAMETERS", "STAC_SUFFIXES", "StacImage", "is_search_url", "is_stac_file", "stac_images"]

STAC_SUFFIXES = (".json", ".geojson")
SEARCH_PARAMETERS = ("collections", "bbox", "datetime", "ids", "max_items", "limit")
# GeoTIFF and COG media types ("image/tiff; application=geotiff; profile=cloud-optimized"), and STAC 0.x's.
_RASTER_MEDIA = ("image/tiff", "image/vnd.stac.geotiff")
_HTTP = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True)
class StacImage:
    """The image one STAC item stands for: one asset, or several to stack as bands in this order."""

    item_id: str
    assets: tuple[str, ...]
    hrefs: tuple[str, ...]


def is_search_url(source: str) -> bool:
    """An http(s) URL whose path ends in /search: a STAC API item search, filters in the query string."""
    return bool(_HTTP.match(source)) and urlsplit(source).path.rstrip("/").endswith("/search")


def is_stac_file(source: str) -> bool:
    """A .json or .geojson file, local or at an http(s) URL (no image has those suffixes)."""
    path = urlsplit(source).path if _HTTP.match(source) else source
    return "://" not in path and path.lower().endswith(STAC_SUFFIXES)


def stac_images(source: str, assets: Sequence[str] = ()) -> list[StacImage]:
    """The images of a STAC file (ItemCollection or Item) or STAC API search URL, one per item.

    Args:
        source: A local .json/.geojson file, one at an http(s) URL, or a search URL such as
            `https://host/api/search?collections=sentinel-2-l2a&bbox=9,45,10,46&max_items=20`
            (parameters: collections, bbox, datetime, ids, max_items, limit).
        assets: Asset keys to read; several are stacked as bands in this order. Empty: the item's only
            asset with role "data", else its only GeoTIFF asset.

    Returns:
        One `StacImage` per item, hrefs absolute (relative ones resolved against the item's self link,
        else the STAC file).

    Raises:
        SourceNotFoundError: The local STAC file does not exist.
        ConfigError: The file is not STAC items, the search fails or finds nothing, or an item lacks an
            asset asked for or has no single default asset.
    """
    if is_search_url(source):
        base, items = source, _search(source)
    else:
        base = source if _HTTP.match(source) else str(Path(source).expanduser().resolve())
        items = _read_file(base)
    return [_image(item, item.get_self_href() or base, tuple(assets)) for item in items]


def _read_file(href: str) -> list[pystac.Item]:
    """The items of a STAC ItemCollection or Item file: an absolute local path or a URL."""
    import pystac

    if not _HTTP.match(href) and not Path(href).is_file():
        raise SourceNotFoundError(f"STAC file {href} does not exist; check the path (relative paths are "
                                  f"resolved from {Path.cwd()})")
    try:
        document = pystac.StacIO.default().read_json(href)
    except Exception as e:  # pystac raises a bare Exception for HTTP errors, ValueError for bad JSON
        raise ConfigError(f"cannot read STAC file {href}: {e}; check that it is reachable and holds JSON") from e
    kind = document.get("type") if isinstance(document, dict) else None
    if kind not in ("FeatureCollection", "Feature"):
        raise ConfigError(f"{href} is a STAC {kind or 'document of unknown type'}, not an ItemCollection or an "
                          "Item; pass a file of items (e.g. a saved search result) or a search URL")
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(document, preserve_dict=False).items)
        else:
            items = [pystac.Item.from_dict(document, preserve_dict=False)]
    except (pystac.STACError, pystac.STACTypeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{href} is not a valid STAC ItemCollection or Item: {e!r}; fix or regenerate it") from e
    if not items:
        raise ConfigError(f"STAC file {href} holds no items; pass one with at least one item")
    return items


def _search(url: str) -> list[pystac.Item]:
    """The items a search URL finds: the API is the URL without /search, the filters its query string."""
    import pystac_client

    parts = urlsplit(url)
    api = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/").removesuffix("/search"), "", ""))
    filters = _search_filters(url, parse_qs(parts.query, keep_blank_values=True))
    try:
        items = list(pystac_client.Client.open(api).search(method="GET", **filters).items())
    except Exception as e:  # requests errors, APIError, DoesNotConformTo, pystac errors: one story for the user
        raise ConfigError(f"STAC search {url} failed: {e}; check the URL, that {api} is a STAC API with item "
                          "search, and that it is reachable") from e
    if not items:
        raise ConfigError(f"STAC search {url} found no items; widen its filters (collections, bbox, datetime)")
    return items


def _search_filters(url: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """pystac_client's search arguments from a search URL's query string."""
    unknown = sorted(set(query) - set(SEARCH_PARAMETERS))
    if unknown:
        raise ConfigError(f"STAC search {url}: unknown parameter(s) {', '.join(unknown)}; use only "
                          f"{', '.join(SEARCH_PARAMETERS)}")
    if not query:
        raise ConfigError(f"STAC search {url} has no filters and would list the whole catalogue; add "
                          "collections=, bbox=, datetime=, ids= or max_items= to the query")

    def listed(key: str) -> list[str]:
        return [v.strip() for value in query.get(key, []) for v in value.split(",") if v.strip()]

    def count(key: str) -> int | None:
        if key not in query:
            return None
        text = query[key][-1]
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"STAC search {url}: {key}={text!r} is not a count; write a whole number >= 1")
        return int(text)

    filters: dict[str, Any] = {key: listed(key) for key in ("collections", "ids") if key in query}
    if "datetime" in query:
        filters["datetime"] = query["datetime"][-1]
    if "bbox" in query:
        try:
            bbox = [float(v) for v in listed("bbox")]
        except ValueError:
            bbox = []
        if len(bbox) not in (4, 6):
            raise ConfigError(f"STAC search {url}: bbox={query['bbox'][-1]!r} is not a bounding box; write "
                              "bbox=west,south,east,north in degrees")
        filters["bbox"] = bbox
    # In a URL, limit=N reads as "N items"; for the API it is the page size. Honour both.
    limit, max_items = count("limit"), count("max_items")
    filters["max_items"] = max_items if max_items is not None else limit
    if limit is not None:
        filters["limit"] = limit
    return filters


def _image(item: pystac.Item, base: str, assets: tuple[str, ...]) -> StacImage:
    import pystac.utils

    keys = _chosen_assets(item, assets)
    hrefs = tuple(pystac.utils.make_absolute_href(item.assets[k].href, base) for k in keys)
    return StacImage(item.id, keys, hrefs)


def _chosen_assets(item: pystac.Item, assets: tuple[str, ...]) -> tuple[str, ...]:
    """The asset keys to read from `item`: those asked for, else its one data (or GeoTIFF) asset."""
    keys = ", ".join(item.assets) or "none"
    if assets:
        missing = [k for k in assets if k not in item.assets]
        if missing:
            raise ConfigError(f"STAC item {item.id!r} has no asset {', '.join(missing)}; its assets are {keys}; "
                              "pass --asset with one of those")
        return assets
    data = [k for k, a in item.assets.items() if "data" in (a.roles or [])]
    rasters = [k for k, a in item.assets.items() if (a.media_type or "").lower().startswith(_RASTER_MEDIA)]
    candidates = data or rasters
    if not candidates:
        raise ConfigError(f"STAC item {item.id!r} has no asset with role 'data' or a GeoTIFF media type to read "
                          f"by default; its assets are {keys}. Pass --asset KEY to choose one")
    if len(candidates) > 1:
        kind = "role 'data'" if data else "a GeoTIFF media type"
        raise ConfigError(f"STAC item {item.id!r} has several assets with {kind} ({', '.join(candidates)}), so "
                          f"which to read is ambiguous; its assets are {keys}. Pass --asset KEY to choose one "
                          "(several --asset options stack them as bands)")
    return (candidates[0],)
