"""The viewer's tools in headless Chromium: class switches hide a class from the served mask tiles, the
confidence overlay comes and goes, the scale bar and the pointer's coordinates are in metres for a
georeferenced mosaic and micrometres for a slide, and `?compare=` swipes between two mosaics of the
same image (refused, with a message, for mosaics of different shapes).

Screenshots go to $TESSERA_SCREENSHOTS when set, else to the test's tmp_path; their paths are printed."""

from __future__ import annotations

import io
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from PIL import Image
from rasterio.warp import transform as warp_points

from pipeline.mosaic import Mosaic
from pipeline.synthetic import CLASSES, write_label_mosaic
from tests.query.conftest import GEO_CRS, GEO_TRANSFORM, Served, geo_labels
from tests.query.test_viewer import CHROMIUM, CHROMIUM_ARGS, pixel_deep_inside

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed (`make test` installs it)")]

WATER, BUILDING = 1, 3
# Every tile in and Leaflet's previous zoom's tiles gone (they overlap the new ones while it loads).
SETTLED = ("() => [...document.querySelectorAll('img.leaflet-tile')].every((i) => i.complete) && "
           "[...document.querySelectorAll('.leaflet-tile-container')].filter((c) => c.children.length).length <= "
           "document.querySelectorAll('.leaflet-layer').length")


def screenshot(page: Any, tmp_path: Path, name: str, element: str | None = None) -> Path:
    folder = Path(os.environ.get("TESSERA_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    (page.locator(element) if element else page).screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def loaded(page: Any, fragment: str) -> list[str]:
    """The src of every loaded tile whose URL contains `fragment`."""
    return page.evaluate(f"() => [...document.querySelectorAll('img.leaflet-tile-loaded')]"
                         f".map((i) => i.src).filter((s) => s.includes({fragment!r}))")


def wait_loaded(page: Any, fragment: str) -> None:
    page.wait_for_function(f"() => [...document.querySelectorAll('img.leaflet-tile-loaded')]"
                           f".some((i) => i.src.includes({fragment!r}))", timeout=30_000)


def colour_count(urls: list[str], colour: tuple[int, int, int]) -> int:
    """Opaque pixels of `colour` in the tiles at `urls` (fetched again from the server)."""
    total = 0
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as r:
            tile = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGBA"))
        total += int(((tile[..., :3] == colour).all(-1) & (tile[..., 3] == 255)).sum())
    return total


@pytest.fixture(scope="module")
def refined(served: Served) -> Iterator[str]:
    """A second mosaic of the scene (a 'refined' copy: every building relabelled road), served beside it
    while this module runs (the server is the session's: other modules list its folder)."""
    labels = geo_labels()
    labels[labels == BUILDING] = 2
    lineage = {"source": {"path": str(served.root / "scene.tif"), "level": 0}}
    write_label_mosaic(labels, served.root / "refined.zarr", crs=GEO_CRS, transform=GEO_TRANSFORM, lineage=lineage)
    yield "refined.zarr"
    shutil.rmtree(served.root / "refined.zarr")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_viewer(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return page, errors


def test_geo_viewer_classes_overlay_scale_and_coordinates(served: Served, geo_mosaic: Mosaic, browser: Any,
                                                          tmp_path: Path) -> None:
    page, errors = open_viewer(browser, f"{served.url}/view/scene.zarr")
    wait_loaded(page, "layer=source")
    wait_loaded(page, "layer=mask")
    page.wait_for_function(SETTLED, timeout=30_000)  # every tile of the view, not only the first one in
    water = CLASSES[WATER].color
    assert colour_count(loaded(page, "layer=mask"), water) > 0

    # Hide water: the mask tiles are asked for again without it, and the served tiles leave it out.
    page.locator(f'#legend input[data-class-id="{WATER}"]').uncheck()
    wait_loaded(page, "hide=1")
    page.wait_for_function(SETTLED, timeout=30_000)
    hidden = [u for u in loaded(page, "layer=mask") if "hide=1" in u]
    assert hidden and colour_count(hidden, water) == 0
    assert colour_count(hidden, CLASSES[BUILDING].color) > 0  # the other classes still show

    # The confidence overlay, listed from the metadata's layers, comes and goes.
    assert page.locator("#layers input").evaluate_all("(boxes) => boxes.map((b) => b.dataset.layer)") == [
        "source", "confidence"]
    page.locator('#layers input[data-layer="confidence"]').check()
    wait_loaded(page, "layer=confidence")
    page.locator('#layers input[data-layer="confidence"]').uncheck()
    assert page.locator('img[src*="layer=confidence"]').count() == 0

    # Leaflet's scale bar, in metres.
    assert re.fullmatch(r"\d+ k?m", page.locator(".leaflet-control-scale-line").inner_text())

    # The pointer over a known pixel at the top zoom: its coordinates in the mosaic's CRS, in metres.
    mask = geo_mosaic.read("mask", 0)
    row, col = pixel_deep_inside(mask, BUILDING)
    x, y = Affine(*GEO_TRANSFORM) @ (col + 0.5, row + 0.5)
    (lon,), (lat,) = warp_points(GEO_CRS, "EPSG:4326", [x], [y])
    page.evaluate(f"tessera.map.setView([{lat}, {lon}], tessera.meta.tiles.max_zoom, {{animate: false}})")
    point = page.evaluate(f"tessera.containerPoint({lon}, {lat})")
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + point["x"], box["y"] + point["y"])
    page.wait_for_function("() => document.getElementById('coords').dataset.unit === 'm'", timeout=10_000)
    shown = page.locator("#coords").evaluate("(e) => [Number(e.dataset.x), Number(e.dataset.y)]")
    assert abs(shown[0] - x) < 1.0 and abs(shown[1] - y) < 1.0, (shown, x, y)  # a 0.5 m pixel, a pointer pixel
    text = page.locator("#coords").inner_text()
    assert f"row {row}, column {col}" in text or f"row {row}" in text, text
    assert text.startswith("x ") and " m\n" in text

    page.wait_for_function(SETTLED, timeout=30_000)
    screenshot(page, tmp_path, "viewer-geo.png")
    assert errors == []


def test_slide_viewer_scale_and_coordinates_are_in_micrometres(served: Served, slide_mosaic: Mosaic, browser: Any,
                                                               tmp_path: Path) -> None:
    page, errors = open_viewer(browser, f"{served.url}/view/slides/slide.zarr")
    wait_loaded(page, "layer=mask")
    label = page.locator(".tessera-scale .leaflet-control-scale-line")
    text = label.inner_text()
    assert re.fullmatch(r"\d+ (µm|mm)", text), text
    # The bar's length matches its label: 0.25 um a level-0 pixel, 2^(top - zoom) level-0 pixels a screen pixel.
    width = label.evaluate("(e) => e.getBoundingClientRect().width")
    zoom, top = page.evaluate("[tessera.map.getZoom(), tessera.meta.tiles.max_zoom]")
    um = float(text.split()[0]) * (1000 if text.endswith("mm") else 1)
    assert um / width == pytest.approx(0.25 * 2 ** (top - zoom), rel=0.02)
    # The pointer over level-0 pixel (400, 300): x 100 um, y 75 um.
    point = page.evaluate("tessera.containerPoint(400.5, 300.5)")
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + point["x"], box["y"] + point["y"])
    page.wait_for_function("() => document.getElementById('coords').dataset.unit === 'µm'", timeout=10_000)
    x, y = page.locator("#coords").evaluate("(e) => [Number(e.dataset.x), Number(e.dataset.y)]")
    pixel_um = 0.25 * 2 ** (top - zoom)  # one screen pixel
    assert abs(x - 100.125) <= pixel_um and abs(y - 75.125) <= pixel_um, (x, y)
    assert "µm" in page.locator("#coords").inner_text()
    page.wait_for_function(SETTLED, timeout=30_000)
    screenshot(page, tmp_path, "viewer-slide.png")
    assert errors == []


def test_compare_swipes_between_two_mosaics_of_one_image(served: Served, refined: str, browser: Any,
                                                        tmp_path: Path) -> None:
    page, errors = open_viewer(browser, f"{served.url}/view/scene.zarr?compare={refined}")
    assert page.evaluate("tessera.compare !== null")
    assert "refined.zarr" in page.locator("#compare-info").inner_text()
    # Only the masks, fully opaque, so the screenshot's colours are the classes'.
    page.locator('#layers input[data-layer="source"]').uncheck()
    page.locator("#opacity").fill("100")
    wait_loaded(page, "/scene.zarr/tiles")
    wait_loaded(page, "/refined.zarr/tiles")
    page.wait_for_function(SETTLED, timeout=30_000)
    # Drag the divider from the middle to 60% of the map's width.
    box = page.locator("#map").bounding_box()
    handle = page.locator(".swipe-divider").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    assert page.evaluate("tessera.compare.swipe.fraction") == pytest.approx(0.6, abs=0.01)
    path = screenshot(page, tmp_path, "viewer-compare.png", "#map")
    shot = np.asarray(Image.open(path).convert("RGB"))
    split = round(shot.shape[1] * 0.6)
    building = (shot == CLASSES[BUILDING].color).all(-1)
    # Left of the divider: the scene's mask, buildings and all; right of it: the copy, which has none.
    assert building[:, : split - 6].sum() > 500
    assert building[:, split + 6 :].sum() == 0
    assert errors == []


def test_compare_of_mosaics_of_different_shapes_is_refused(served: Served, slide_mosaic: Mosaic,
                                                           browser: Any) -> None:
    page, errors = open_viewer(browser, f"{served.url}/view/scene.zarr?compare=slides/slide.zarr")
    message = page.locator("#message")
    assert message.is_visible()
    assert re.search(r"cannot compare scene\.zarr \(1500 x 1300 px\) with slides/slide\.zarr \(900 x 700 px\)",
                     message.inner_text())
    assert page.evaluate("tessera.compare === null")
    assert page.locator(".swipe-divider").count() == 0
    assert errors == []
