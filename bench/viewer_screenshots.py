"""Screenshots of the web viewer for the docs, from generated data.

    python -m bench.viewer_screenshots [--out bench/results/viewer]

Writes a generated 1300 x 1500 scene (a GeoTIFF with overviews, 0.5 m pixels in UTM) and two mosaics
of it written from its labels without a model (`write_label_mosaic`): `scene.zarr`, and `relabelled.zarr`,
a copy whose buildings are relabelled road, standing in for a second model's answer; and a slide-like
mosaic at 0.25 um/px over a plain TIFF. Serves them with `tessera serve` on 127.0.0.1 and saves, with
Debian's Chromium driven by Playwright:

- viewer-geo.png: the scene zoomed in to its full resolution (source pixels from level 0 under the mask,
  one class hidden, the scale bar and the pointer's coordinates in metres);
- viewer-slide.png: the slide, scale bar and coordinates in micrometres, the confidence overlay on;
- viewer-compare.png: `/view/scene.zarr?compare=relabelled.zarr`, the swipe divider at 60%.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "viewer"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SETTLED = ("() => [...document.querySelectorAll('img.leaflet-tile')].every((i) => i.complete) && "
           "[...document.querySelectorAll('.leaflet-tile-container')].filter((c) => c.children.length).length <= "
           "document.querySelectorAll('.leaflet-layer').length")


def write_data(root: Path) -> None:
    """The scene (with overviews), its two mosaics, and the slide-like mosaic over its own TIFF."""
    import rasterio
    from rasterio.enums import Resampling

    from pipeline.synthetic import generate_scene, write_label_mosaic, write_scene

    scene = generate_scene(1300, 1500, seed=11)
    write_scene(scene, root / "scene.tif", root / "scene_labels.tif", pixel_size=0.5, crs="EPSG:32632",
                origin=(500000.0, 5200000.0))
    with rasterio.open(root / "scene.tif", "r+") as dst:
        dst.build_overviews([2, 4, 8], Resampling.average)
    transform = (0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)
    lineage = {"source": {"path": str(root / "scene.tif"), "level": 0}}
    write_label_mosaic(scene.labels, root / "scene.zarr", transform=transform, lineage=lineage)
    relabelled = scene.labels.copy()
    relabelled[relabelled == 3] = 2
    write_label_mosaic(relabelled, root / "relabelled.zarr", transform=transform, lineage=lineage)

    slide = generate_scene(700, 900, seed=12)
    with rasterio.open(root / "slide.tif", "w", driver="GTiff", width=900, height=700, count=3, dtype="uint8",
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(slide.image)
        dst.build_overviews([2, 4], Resampling.average)
    write_label_mosaic(slide.labels, root / "slide.zarr", crs=None, transform=None, mpp=0.25,
                       lineage={"source": {"path": str(root / "slide.tif"), "level": 0}})


def serve(root: Path, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen([str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/mosaics", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("tessera serve did not start") from None
            time.sleep(0.3)


def shoot(page: Any, url: str, path: Path, actions: list[str]) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    for action in actions:
        page.evaluate(action)
    page.wait_for_function("() => document.querySelectorAll('img.leaflet-tile-loaded').length > 0", timeout=30_000)
    page.wait_for_function(SETTLED, timeout=30_000)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    from PIL import Image

    Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)  # a palette: under 300 KB for the repo
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port of the temporary server on 127.0.0.1")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                        help="Chromium executable (default: %(default)s)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_data(root)
        server = serve(root, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1000, "height": 620})
                page.on("response", lambda r: r.status >= 400 and print(f"{r.status} {r.url}", file=sys.stderr))
                mouse = "(x, y) => tessera.map.fire('mousemove', {latlng: tessera.map.containerPointToLatLng([x, y])})"
                shoot(page, f"{url}/view/scene.zarr", args.out / "viewer-geo.png", [
                    "(() => { const b = tessera.meta.tiles.bounds; tessera.map.setView([(b[1] + b[3]) / 2, "
                    "(b[0] + b[2]) / 2], tessera.meta.tiles.max_zoom, {animate: false}); })()",
                    "document.querySelector('#legend input[data-class-id=\"4\"]').click()",
                    f"({mouse})(350, 300)",
                ])
                shoot(page, f"{url}/view/slide.zarr", args.out / "viewer-slide.png", [
                    "document.querySelector('#layers input[data-layer=\"confidence\"]').click()",
                    f"({mouse})(350, 300)",
                ])
                shoot(page, f"{url}/view/scene.zarr?compare=relabelled.zarr", args.out / "viewer-compare.png", [
                    "document.querySelector('#layers input[data-layer=\"source\"]').click()",
                    "tessera.compare.swipe.set(0.6)",
                ])
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=20)


if __name__ == "__main__":
    main()
