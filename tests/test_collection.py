"""Sources to collections: paths, folders, list files, STAC files and searches, names, stacked assets."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
import pystac
import pytest
import rasterio

from pipeline.collection import CollectionItem, is_collection, materialise, output_path, resolve_collection
from pipeline.errors import ConfigError, SourceNotFoundError
from tests.conftest import free_port, smooth_image, write_geotiff

COG = pystac.MediaType.COG


def touch(path: Path) -> Path:
    """An empty file: resolving a collection opens no image, so names and paths are all that matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ---- paths, folders, list files ------------------------------------------------------------------------


def test_paths_are_items_named_after_their_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "scene.tif")
    touch(tmp_path / "slides" / "a.ome.tif")
    touch(tmp_path / "dated.2023.05.tif")
    monkeypatch.chdir(tmp_path)
    items = resolve_collection(["scene.tif", str(tmp_path / "slides" / "a.ome.tif"), "slides/../dated.2023.05.tif"])
    assert items == [
        CollectionItem(str(tmp_path / "scene.tif"), "scene"),
        CollectionItem(str(tmp_path / "slides" / "a.ome.tif"), "a"),
        CollectionItem(str(tmp_path / "dated.2023.05.tif"), "dated.2023.05"),
    ]


def test_a_missing_path_is_still_an_item(tmp_path: Path) -> None:
    missing = tmp_path / "not-there.tif"
    assert resolve_collection([str(missing)]) == [CollectionItem(str(missing), "not-there")]


def test_object_storage_and_http_become_gdal_paths() -> None:
    items = resolve_collection(["s3://bucket/tiles/scene.tif", "https://example.org/data/b.tif?token=x&sig=y",
                                "gs://bucket/c.tif", "/vsizip//data/archive.zip/d.tif"])
    assert [(i.source, i.name) for i in items] == [
        ("/vsis3/bucket/tiles/scene.tif", "scene"),
        ("/vsicurl/https://example.org/data/b.tif?token=x&sig=y", "b"),
        ("/vsigs/bucket/c.tif", "c"),
        ("/vsizip//data/archive.zip/d.tif", "d"),
    ]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for name in ("b.tif", "a.TIF", "c.svs", "notes.txt", "d.png", ".hidden.tif", "deeper/e.tif"):
        touch(folder / name)
    (folder / "old.zarr").mkdir()
    return folder


def test_a_folder_gives_its_images_sorted_not_recursively(image_folder: Path) -> None:
    items = resolve_collection([str(image_folder)])
    assert [(Path(i.source).name, i.name) for i in items] == [("a.TIF", "a"), ("b.tif", "b"), ("c.svs", "c")]
    assert all(Path(i.source).parent == image_folder for i in items)


def test_a_folder_with_a_glob_pattern(image_folder: Path) -> None:
    recursive = resolve_collection([str(image_folder)], pattern="**/*.tif")
    assert [Path(i.source).relative_to(image_folder).as_posix() for i in recursive] == ["b.tif", "deeper/e.tif"]
    assert [i.name for i in resolve_collection([str(image_folder)], pattern="*.png")] == ["d"]


def test_a_folder_without_matches_is_refused_naming_folder_and_pattern(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"images.*'\*\.jpg'"):
        resolve_collection([str(image_folder)], pattern="*.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty has no files matching the default suffixes"):
        resolve_collection([str(tmp_path / "empty")])


def test_a_csv_list_with_header_names_and_levels(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    touch(tmp_path / "data" / "first.tif")
    (lists).mkdir()
    (lists / "batch.csv").write_text(
        "input,level,name\n"
        "../data/first.tif,2,north\n"
        "\n"
        "# skipped\n"
        f"{tmp_path / 'data' / 'second.tif'},,\n"
        '"s3://bucket/with,comma.tif",0,"south.zarr"\n'
    )
    items = resolve_collection([str(lists / "batch.csv")])
    assert items == [
        CollectionItem(str(tmp_path / "data" / "first.tif"), "north", 2),
        CollectionItem(str(tmp_path / "data" / "second.tif"), "second", None),
        CollectionItem("/vsis3/bucket/with,comma.tif", "south", 0),
    ]


def test_a_csv_list_without_header_is_path_name_level(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("x.tif,first,1\ny.tif\n")
    items = resolve_collection([str(tmp_path / "list.csv")])
    assert items == [CollectionItem(str(tmp_path / "x.tif"), "first", 1), CollectionItem(str(tmp_path / "y.tif"), "y")]


def test_a_text_list_with_comments_commas_and_tabs(tmp_path: Path) -> None:
    (tmp_path / "scenes.txt").write_text(
        "# scenes for the spring run\n"
        "\n"
        "  one.tif  \n"
        "two.tif, second , 3\n"
        "three.tif\tthird\t\n"
        "https://example.org/four.tif\n"
    )
    items = resolve_collection([str(tmp_path / "scenes.txt")])
    assert items == [
        CollectionItem(str(tmp_path / "one.tif"), "one"),
        CollectionItem(str(tmp_path / "two.tif"), "second", 3),
        CollectionItem(str(tmp_path / "three.tif"), "third"),
        CollectionItem("/vsicurl/https://example.org/four.tif", "four"),
    ]


@pytest.mark.parametrize("level", ["-1", "two", "1.5"])
def test_a_bad_level_is_refused_with_its_line_number(tmp_path: Path, level: str) -> None:
    (tmp_path / "scenes.lst").write_text(f"# header comment\na.tif\nb.tif,b,{level}\n")
    with pytest.raises(ConfigError, match=rf"scenes\.lst, line 3: level '{level}'"):
        resolve_collection([str(tmp_path / "scenes.lst")])


def test_a_name_with_a_slash_is_refused(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("path,name\na.tif,sub/a\n")
    with pytest.raises(ConfigError, match="line 2: output name 'sub/a'"):
        resolve_collection([str(tmp_path / "list.csv")])


def test_a_missing_or_empty_list_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=r"gone.csv"):
        resolve_collection([str(tmp_path / "gone.csv")])
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.txt names no images"):
        resolve_collection([str(tmp_path / "empty.txt")])


def test_name_clashes_are_refused_listing_every_input(tmp_path: Path) -> None:
    touch(tmp_path / "2023" / "scene.tif")
    touch(tmp_path / "2024" / "Scene.tiff")
    with pytest.raises(ConfigError, match="same output mosaic") as caught:
        resolve_collection([str(tmp_path / "2023"), str(tmp_path / "2024"), str(tmp_path / "other.tif")])
    message = str(caught.value)
    assert str(tmp_path / "2023" / "scene.tif") in message and str(tmp_path / "2024" / "Scene.tiff") in message
    assert "other.tif" not in message and "path,name" in message


def test_an_empty_collection_is_refused() -> None:
    with pytest.raises(ConfigError, match="no images"):
        resolve_collection([])


def test_output_path_is_the_name_under_the_root() -> None:
    assert output_path("/out/run", CollectionItem("/data/a.tif", "a")) == "/out/run/a.zarr"


def test_is_collection_only_false_for_one_image_into_one_mosaic(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("a.tif\n")
    image = str(image_folder / "b.tif")
    assert not is_collection([image], "out/b.zarr")
    assert not is_collection(["s3://bucket/b.tif"], "out/b.zarr/")
    assert is_collection([image], "out")
    assert is_collection([image, image], "out/b.zarr")
    assert is_collection([str(image_folder)], "out.zarr")
    assert is_collection([str(tmp_path / "list.csv")], "out.zarr")
    assert is_collection([str(tmp_path / "items.json")], "out.zarr")
    assert is_collection(["https://stac.example.org/api/search?collections=c"], "out.zarr")


# ---- STAC ----------------------------------------------------------------------------------------------


def stac_item(item_id: str, assets: dict[str, tuple[str, list[str] | None, str | None]]) -> pystac.Item:
    """An item over the test rasters' footprint; each asset given as (href, roles, media type)."""
    item = pystac.Item(item_id, geometry={"type": "Point", "coordinates": [9.0, 46.0]}, bbox=[9, 46, 9, 46],
                       datetime=None, properties={"start_datetime": "2024-05-01T00:00:00Z",
                                                  "end_datetime": "2024-05-01T00:00:00Z"})
    for key, (href, roles, media_type) in assets.items():
        item.add_asset(key, pystac.Asset(href, media_type=media_type, roles=roles))
    return item


def write_item_collection(path: Path, items: list[pystac.Item]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pystac.ItemCollection(items).save_object(str(path))
    return path


@pytest.fixture
def band_files(tmp_path: Path) -> dict[str, np.ndarray]:
    """Per scene, a uint8 "red" and a uint16 "nir" single-band GeoTIFF on one grid (scene 2's nir on a coarser one)."""
    arrays = {}
    (tmp_path / "stac" / "data").mkdir(parents=True)
    for n, scene in enumerate(("scene-1", "scene-2")):
        red = smooth_image(48, 64, bands=1, seed=2 * n)
        nir = smooth_image(48, 64, bands=1, seed=2 * n + 1).astype(np.uint16) * 200
        write_geotiff(tmp_path / "stac" / "data" / f"{scene}_red.tif", red)
        write_geotiff(tmp_path / "stac" / "data" / f"{scene}_nir.tif", nir)
        arrays[f"{scene}_red"], arrays[f"{scene}_nir"] = red, nir
    write_geotiff(tmp_path / "stac" / "data" / "scene-2_coarse.tif", arrays["scene-2_nir"], pixel=4.0)
    write_geotiff(tmp_path / "stac" / "data" / "scene-2_small.tif", arrays["scene-2_nir"][:, :40, :60])
    return arrays


@pytest.fixture
def stac_file(tmp_path: Path, band_files: dict[str, np.ndarray]) -> Path:
    """An ItemCollection beside the rasters, its asset hrefs relative to the file."""
    items = [
        stac_item(item_id, {
            "red": (f"data/{scene}_red.tif", ["data"], COG),
            "nir": (f"./data/{scene}_nir.tif", ["data"], COG),
            "coarse": ("data/scene-2_coarse.tif", None, COG),
            "small": ("data/scene-2_small.tif", None, COG),
            "thumbnail": (f"data/{scene}.png", ["thumbnail"], pystac.MediaType.PNG),
        })
        for item_id, scene in (("scene-1", "scene-1"), ("tile/2", "scene-2"))
    ]
    path = write_item_collection(tmp_path / "stac" / "items.json", items)
    assert json.loads(path.read_text())["features"][0]["assets"]["red"]["href"] == "data/scene-1_red.tif"
    return path


def test_stac_items_read_the_chosen_asset_with_absolute_paths(stac_file: Path) -> None:
    items = resolve_collection([str(stac_file)], assets=["red"])
    data = stac_file.parent / "data"
    assert items == [CollectionItem(str(data / "scene-1_red.tif"), "scene-1"),
                     CollectionItem(str(data / "scene-2_red.tif"), "tile_2")]


def test_a_stac_item_without_the_asset_is_refused_listing_its_assets(stac_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"'scene-1' has no asset swir; its assets are red, nir, coarse"):
        resolve_collection([str(stac_file)], assets=["red", "swir"])


def test_ambiguous_default_assets_are_refused_listing_the_keys(stac_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"several assets with role 'data' \(red, nir\).*--asset KEY"):
        resolve_collection([str(stac_file)])


def test_the_default_asset_is_the_one_data_asset_else_the_one_geotiff(tmp_path: Path) -> None:
    path = write_item_collection(tmp_path / "items.geojson", [
        stac_item("by-role", {"image": ("by-role.jp2", ["data"], None), "overview": ("o.tif", ["overview"], COG),
                              "thumbnail": ("t.png", ["thumbnail"], pystac.MediaType.PNG)}),
        stac_item("by-type", {"visual": ("https://example.org/visual.tif", ["visual"], COG),
                              "metadata": ("meta.xml", ["metadata"], pystac.MediaType.XML)}),
    ])
    items = resolve_collection([str(path)])
    assert items == [CollectionItem(str(tmp_path / "by-role.jp2"), "by-role"),
                     CollectionItem("/vsicurl/https://example.org/visual.tif", "by-type")]
    lone = write_item_collection(tmp_path / "lone.json", [stac_item("lone", {"t": ("t.png", None, None)})])
    with pytest.raises(ConfigError, match=r"'lone' has no asset with role 'data' or a GeoTIFF.*assets are t"):
        resolve_collection([str(lone)])


def test_a_single_stac_item_file_and_s3_hrefs(tmp_path: Path) -> None:
    item = stac_item("one", {"image": ("s3://bucket/one.tif", ["data"], COG)})
    item.save_object(include_self_link=False, dest_href=str(tmp_path / "one.json"))
    assert resolve_collection([str(tmp_path / "one.json")]) == [CollectionItem("/vsis3/bucket/one.tif", "one")]


def test_a_stac_catalog_is_refused(tmp_path: Path) -> None:
    catalog = pystac.Catalog("cat", "a catalog")
    catalog.normalize_and_save(str(tmp_path / "catalog"), pystac.CatalogType.SELF_CONTAINED)
    with pytest.raises(ConfigError, match="is a STAC Catalog, not an ItemCollection"):
        resolve_collection([str(tmp_path / "catalog" / "catalog.json")])


@pytest.mark.parametrize("order", [("red", "nir"), ("nir", "red")])
def test_several_assets_are_stacked_into_a_vrt(stac_file: Path, band_files: dict[str, np.ndarray], tmp_path: Path,
                                               order: tuple[str, str]) -> None:
    stacks = tmp_path / "out" / "stacks"
    items = resolve_collection([str(stac_file)], assets=order, stacking_dir=stacks)
    assert [(item.source, item.name) for item in items] == [(str(stacks / "scene-1.vrt"), "scene-1"),
                                                            (str(stacks / "tile_2.vrt"), "tile_2")]
    assert not stacks.exists()  # each VRT is written when its image is prepared
    for item, scene in zip(items, ("scene-1", "scene-2"), strict=True):
        red_file = stac_file.parent / "data" / f"{scene}_red.tif"
        with rasterio.open(materialise(item)) as vrt, rasterio.open(red_file) as red:
            assert vrt.count == 2 and vrt.descriptions == order
            assert (vrt.crs, vrt.transform, vrt.shape) == (red.crs, red.transform, red.shape)
            pixels = vrt.read()
        assert pixels.dtype == np.uint16  # the wider of red's uint8 and nir's uint16, whichever comes first
        for band, key in zip(pixels, order, strict=True):
            np.testing.assert_array_equal(band, band_files[f"{scene}_{key}"][0])
    assert sorted(p.name for p in stacks.iterdir()) == ["scene-1.vrt", "tile_2.vrt"]  # no temporary files left


@pytest.mark.parametrize(("other", "differs"), [("coarse", "transform"), ("small", "size")])
def test_assets_on_different_grids_are_refused(stac_file: Path, tmp_path: Path, other: str, differs: str) -> None:
    items = resolve_collection([str(stac_file)], assets=["red", other], stacking_dir=tmp_path / "stacks")
    with pytest.raises(ConfigError, match=rf"item 'scene-1': '{other}' has {differs} .* 'red' has .*one pixel grid"):
        materialise(items[0])
    assert not (tmp_path / "stacks" / "scene-1.vrt").exists()


def test_stacking_needs_a_folder(stac_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"stacking the assets red, nir .* pass stacking_dir"):
        resolve_collection([str(stac_file)], assets=["red", "nir"])


def test_a_name_clash_is_refused_before_any_vrt_is_written(stac_file: Path, tmp_path: Path) -> None:
    touch(tmp_path / "elsewhere" / "scene-1.tif")
    stacks = tmp_path / "stacks"
    with pytest.raises(ConfigError, match=r"'scene-1' from item 'scene-1' of .*items.json, .*elsewhere/scene-1.tif"):
        resolve_collection([str(stac_file), str(tmp_path / "elsewhere" / "scene-1.tif")], assets=["red", "nir"],
                           stacking_dir=stacks)
    assert not stacks.exists()


# ---- STAC API search -----------------------------------------------------------------------------------


class StacApi:
    """A STAC API on 127.0.0.1 serving a landing page and a paged GET /search over fixed items."""

    def __init__(self, items: list[pystac.Item]) -> None:
        self.items = [item.to_dict() for item in items]
        self.searches: list[dict[str, list[str]]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/api":
                    self.reply(api.landing_page())
                elif url.path == "/api/search":
                    query = parse_qs(url.query)
                    api.searches.append(query)
                    self.reply(api.search_page(query))
                else:
                    self.send_error(404)

            def reply(self, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_port}/api"

    def landing_page(self) -> dict[str, Any]:
        return {
            "type": "Catalog", "stac_version": "1.0.0", "id": "test-api", "description": "items for tests",
            "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
            "links": [{"rel": "self", "href": self.root}, {"rel": "root", "href": self.root},
                      {"rel": "search", "href": f"{self.root}/search", "type": "application/geo+json",
                       "method": "GET"}],
        }

    def search_page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = set(query.get("collections", [""])[0].split(","))
        found = [item for item in self.items if item["collection"] in wanted]
        size, start = int(query.get("limit", ["10"])[0]), int(query.get("page", ["0"])[0])
        links = []
        if start + size < len(found):
            following = urlencode({**{k: v[0] for k, v in query.items()}, "page": start + size})
            links.append({"rel": "next", "href": f"{self.root}/search?{following}"})
        return {"type": "FeatureCollection", "features": found[start:start + size], "links": links}

    def __enter__(self) -> StacApi:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stac_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[StacApi]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # requests must not send a local server's traffic to a proxy
    items = [stac_item(f"s{k}", {"image": (f"https://data.example.org/s{k}.tif", ["data"], COG)}) for k in range(3)]
    # An item's relative hrefs are relative to its self link.
    items[1].assets["image"].href = "s1.tif"
    items[1].set_self_href("https://data.example.org/items/s1.json")
    items.append(stac_item("other", {"image": ("https://data.example.org/other.tif", ["data"], COG)}))
    for item in items:
        item.collection_id = "other" if item.id == "other" else "sentinel"
    with StacApi(items) as api:
        yield api


def test_a_stac_api_search_url_gives_the_items_found(stac_api: StacApi) -> None:
    url = (f"{stac_api.root}/search?collections=sentinel&bbox=8,45,10,47&datetime=2024-05-01/2024-05-31"
           "&max_items=3&limit=2")
    items = resolve_collection([url])
    assert items == [CollectionItem("/vsicurl/https://data.example.org/s0.tif", "s0"),
                     CollectionItem("/vsicurl/https://data.example.org/items/s1.tif", "s1"),
                     CollectionItem("/vsicurl/https://data.example.org/s2.tif", "s2")]
    assert len(stac_api.searches) == 2  # two pages of two
    first = stac_api.searches[0]
    assert first["collections"] == ["sentinel"]
    assert [float(v) for v in first["bbox"][0].split(",")] == [8, 45, 10, 47]
    assert first["datetime"][0].startswith("2024-05-01")


def test_a_search_limit_alone_caps_the_items(stac_api: StacApi) -> None:
    items = resolve_collection([f"{stac_api.root}/search?collections=sentinel&limit=2"])
    assert [i.name for i in items] == ["s0", "s1"]


def test_a_search_that_finds_nothing_is_refused(stac_api: StacApi) -> None:
    with pytest.raises(ConfigError, match="found no items"):
        resolve_collection([f"{stac_api.root}/search?collections=landsat"])


def test_an_unreachable_stac_api_is_refused_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/search?collections=sentinel"
    with pytest.raises(ConfigError, match=f"STAC search {re.escape(url)} failed"):
        resolve_collection([url])


@pytest.mark.parametrize(("query", "complaint"), [
    ("", "has no filters"),
    ("collection=a", "unknown parameter"),
    ("bbox=1,2,3", "not a bounding box"),
    ("collections=a&max_items=0", "not a count"),
])
def test_bad_search_urls_are_refused_before_asking(query: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        resolve_collection([f"http://127.0.0.1:9/api/search?{query}"])
