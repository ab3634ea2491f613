"""Source tiles come from the source's own pyramid, against a real `tessera serve`: at the deepest zoom
a tile is the source's full-resolution pixels, at lower zooms its overviews', all through one stretch.

The pixel-space source is uint16 noise whose overviews are GDAL's *average* of level 0, so an overview
pixel differs from a decimated level-0 pixel: a tile that equals the overview was read from it."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.enums import Resampling

from pipeline.mosaic import Mosaic
from pipeline.query.source_tiles import STRETCH_SIZE, rgba
from pipeline.query.tiles import pixel_max_zoom, xyz_tile
from pipeline.query.window import level_transform
from pipeline.sources.display import stretch_limits
from pipeline.synthetic import write_label_mosaic
from tests.query.conftest import Served
from tests.servers.ports import http_answers, start_server

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

HEIGHT, WIDTH = 768, 1024  # 4 x 3 tiles at the top zoom (2)
FACTORS = (2, 4, 8)


@dataclass
class Pyramidal:
    url: str
    source: Path


def get_png(url: str) -> np.ndarray:
    """A tile as (4, h, w) uint8 RGBA."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGBA")).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def pyramidal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pyramidal]:
    """A slide-like mosaic over a tiled uint16 TIFF with averaged internal overviews, served."""
    root = tmp_path_factory.mktemp("pyramidal")
    rng = np.random.default_rng(19)
    values = rng.integers(1000, 4000, (3, HEIGHT, WIDTH), dtype=np.uint16)
    source = root / "slide.tif"
    with rasterio.open(source, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=3, dtype="uint16",
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(values)
        dst.build_overviews(list(FACTORS), Resampling.average)
    write_label_mosaic(np.zeros((HEIGHT, WIDTH), np.uint8), root / "slide.zarr", crs=None, transform=None,
                       mpp=0.5, lineage={"source": {"path": str(source), "level": 0}})
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    url = f"http://127.0.0.1:{port}"
    yield Pyramidal(url, source)
    server.terminate()
    server.wait(timeout=20)


def test_source_tiles_are_the_source_levels_own_pixels(pyramidal: Pyramidal) -> None:
    with rasterio.open(pyramidal.source) as full:
        level0 = full.read()
    # The stretch: from the coarsest level at least STRETCH_SIZE px (here level 0 itself), all valid.
    assert max(HEIGHT, WIDTH) <= STRETCH_SIZE
    limits = stretch_limits(level0)
    top = pixel_max_zoom((HEIGHT, WIDTH))
    assert top == 2
    tile_url = pyramidal.url + "/api/mosaics/slide.zarr/tiles/{}/{}/{}.png?layer=source"
    # Deepest zoom: tile (x=1, y=2) is level-0 pixels [512:768, 256:512], one to one.
    expected = rgba(level0[:, 512:768, 256:512], np.ones((256, 256), bool), limits)
    np.testing.assert_array_equal(get_png(tile_url.format(top, 1, 2)), expected)
    # Zoom 0 (4 level-0 px per tile px) reads overview 2 (4x, 256 x 192), not a decimated level 0.
    with rasterio.open(pyramidal.source, overview_level=1) as overview:
        level2 = overview.read()
    assert level2.shape[1:] == (HEIGHT // 4, WIDTH // 4)
    tile = get_png(tile_url.format(0, 0, 0))
    shown = tile[:, : HEIGHT // 4, : WIDTH // 4]
    np.testing.assert_array_equal(shown, rgba(level2, np.ones(level2.shape[1:], bool), limits))
    decimated = rgba(level0[:, 2::4, 2::4], np.ones(level2.shape[1:], bool), limits)
    assert (shown != decimated).mean() > 0.5  # so the equality above says which level was read
    assert (tile[3, HEIGHT // 4 :] == 0).all() and (tile[3, :, WIDTH // 4 :] == 0).all()  # beyond the image
    # Zoom 1 reads overview 1 (2x): tile (1, 0) is its pixels [0:256, 256:512].
    with rasterio.open(pyramidal.source, overview_level=0) as overview:
        level1 = overview.read(window=rasterio.windows.Window(256, 0, 256, 256))
    np.testing.assert_array_equal(get_png(tile_url.format(1, 1, 0)), rgba(level1, np.ones((256, 256), bool), limits))


def test_geo_source_tiles_at_the_top_zoom_are_level_0_pixels(served: Served, geo_mosaic: Mosaic) -> None:
    """The georeferenced scene (no overviews): the top zoom's Web Mercator tile samples level 0 of the
    source, stretched once for the whole image, exactly as tiling the full-resolution image would."""
    with rasterio.open(served.root / "scene.tif") as src:
        image, valid = src.read(), src.dataset_mask() > 0

    @dataclass
    class Whole:
        """The source's level 0, whole, stretched: what the top zoom must show."""

        crs: str | None
        num_levels: int = 1
        bands: int = 4
        nodata: float = 0.0
        dtype = np.dtype(np.uint8)

        def shape(self, level: int) -> tuple[int, int]:
            return image.shape[1], image.shape[2]

        def transform(self, level: int) -> Affine:
            return level_transform(geo_mosaic.layout, 0)

        def read(self, level: int, rect: object) -> np.ndarray:
            return rgba(image, valid, stretch_limits(image, valid))[:, rect.y0 : rect.y1, rect.x0 : rect.x1]  # type: ignore[attr-defined]

    with urllib.request.urlopen(f"{served.url}/api/mosaics/scene.zarr", timeout=30) as r:
        scheme = json.load(r)["tiles"]
    z = scheme["max_zoom"]
    w, s, e, n = scheme["bounds"]
    lon, lat = (w + e) / 2, (s + n) / 2
    x = int((lon + 180) / 360 * 2**z)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * 2**z)
    served_tile = get_png(f"{served.url}/api/mosaics/scene.zarr/tiles/{z}/{x}/{y}.png?layer=source")
    expected = xyz_tile(Whole(geo_mosaic.layout.crs), z, x, y)
    assert (expected[3] > 0).mean() > 0.5
    np.testing.assert_array_equal(served_tile, expected)


def test_the_viewer_shows_the_source_levels_own_pixels_at_the_deepest_zoom(pyramidal: Pyramidal,
                                                                           tmp_path: Path) -> None:
    """In headless Chromium: zoomed all the way in, the source tiles the viewer draws are level 0's pixels,
    one to one (read back from the page's own images), not an upsampled preview; a screenshot is saved."""
    from playwright.sync_api import sync_playwright

    from tests.query.test_viewer import CHROMIUM, CHROMIUM_ARGS
    from tests.query.test_viewer_tools import screenshot

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    with rasterio.open(pyramidal.source) as full:
        level0 = full.read()
    limits = stretch_limits(level0)
    top = pixel_max_zoom((HEIGHT, WIDTH))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto(f"{pyramidal.url}/view/slide.zarr")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.evaluate(f"() => {{ const t = window.tessera; "
                      f"t.map.setView(t.map.unproject([384, 640], {top}), {top}); }}")
        fragment = f"/tiles/{top}/1/2.png?layer=source"
        page.wait_for_function(f"() => [...document.querySelectorAll('img.leaflet-tile-loaded')]"
                               f".some((i) => i.src.includes({fragment!r}))", timeout=30_000)
        drawn = page.evaluate(f"""() => {{
            const img = [...document.querySelectorAll('img.leaflet-tile-loaded')]
                .find((i) => i.src.includes({fragment!r}));
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
        }}""")
        screenshot(page, tmp_path, "viewer-source-deepest-zoom.png")
        browser.close()
    shown = np.asarray(drawn, np.uint8).reshape(256, 256, 4).transpose(2, 0, 1)
    # Tile (x=1, y=2) at the deepest zoom: level-0 pixels [512:768, 256:512], one to one.
    np.testing.assert_array_equal(shown, rgba(level0[:, 512:768, 256:512], np.ones((256, 256), bool), limits))
