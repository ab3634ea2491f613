"""The web viewer in headless Chromium (Debian's, driven by Playwright): it loads, shows the mask and
source tiles, and a click on a known pixel reports that pixel's class. Saves a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from rasterio.warp import transform as warp_points
from scipy import ndimage

from pipeline.mosaic import Mosaic
from tests.query.conftest import GEO_CRS, GEO_TRANSFORM, Served

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "viewer.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, with no network: no sandbox, no background connections to Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def pixel_deep_inside(mask: np.ndarray, cls: int) -> tuple[int, int]:
    """A pixel of class `cls` at least 8 px from any other class, so a click a pixel off still hits it."""
    inside = ndimage.binary_erosion(mask == cls, iterations=8)
    rows, cols = np.nonzero(inside)
    assert len(rows), f"no large area of class {cls}"
    i = len(rows) // 2
    return int(rows[i]), int(cols[i])


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (`make test` installs it)")
def test_viewer_shows_tiles_and_reports_the_class_under_a_click(served: Served, geo_mosaic: Mosaic) -> None:
    from playwright.sync_api import sync_playwright

    mask = geo_mosaic.read("mask", 0)
    water = pixel_deep_inside(mask, 1)
    building = pixel_deep_inside(mask, 3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{served.url}/view/scene.zarr")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        # Predicates are functions: a bare expression is run with eval, which the service's policy refuses.
        # Both layers' tiles arrive: the source preview and the class mask.
        for layer in ("source", "mask"):
            page.wait_for_function(
                f"() => document.querySelectorAll('img.leaflet-tile-loaded[src*=\"layer={layer}\"]').length > 0",
                timeout=30_000)
        legend = page.locator("#legend li").all_inner_texts()
        assert legend == [c.name for c in geo_mosaic.layout.classes]
        for (row, col), name in ((water, "water"), (building, "building")):
            x, y = Affine(*GEO_TRANSFORM) @ (col + 0.5, row + 0.5)
            (lon,), (lat,) = warp_points(GEO_CRS, "EPSG:4326", [x], [y])
            point = page.evaluate(f"tessera.containerPoint({lon}, {lat})")
            box = page.locator("#map").bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])
            page.wait_for_function(f"() => document.getElementById('info').dataset.name === '{name}'",
                                   timeout=10_000)
            shown = page.locator("#info").inner_text()
            assert name in shown and "confidence 0." in shown
        # The opacity slider reaches the mask layer.
        page.locator("#opacity").fill("25")
        assert page.evaluate("tessera.layers.mask.getContainer().style.opacity") == "0.25"
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        browser.close()
    assert not errors, errors
    assert SCREENSHOT.stat().st_size > 10_000
