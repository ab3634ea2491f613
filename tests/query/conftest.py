"""Mosaics of known content for the query tests: a georeferenced scene (with its source image on disk,
for the viewer's preview) and a slide-like mosaic in micrometres. Both are written by the same
block-and-pyramid code as a segment job, from seeded synthetic labels, without a model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.mosaic import Mosaic
from pipeline.synthetic import generate_scene, write_label_mosaic, write_scene
from tests.servers.ports import http_answers, start_server

GEO_SHAPE = (1300, 1500)  # not a multiple of the 256 px chunk, so edges are partial
GEO_CRS = "EPSG:32632"
GEO_TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)


def geo_labels() -> np.ndarray:
    labels = generate_scene(*GEO_SHAPE, seed=11).labels.copy()
    labels[:40, :300] = 255  # a strip of nodata, as outside a scene's footprint
    return labels


@pytest.fixture(scope="session")
def geo_mosaic(tmp_path_factory: pytest.TempPathFactory) -> Mosaic:
    root = tmp_path_factory.mktemp("served")
    scene = generate_scene(*GEO_SHAPE, seed=11)
    write_scene(scene, root / "scene.tif", root / "scene_labels.tif", pixel_size=0.5, crs=GEO_CRS,
                origin=(GEO_TRANSFORM[2], GEO_TRANSFORM[5]))
    lineage = {"source": {"path": str(root / "scene.tif"), "level": 0}}
    write_label_mosaic(geo_labels(), root / "scene.zarr", crs=GEO_CRS, transform=GEO_TRANSFORM, lineage=lineage)
    return Mosaic.open(root / "scene.zarr")


@pytest.fixture(scope="session")
def slide_mosaic(geo_mosaic: Mosaic) -> Mosaic:
    """Beside the geo mosaic (so the service serves both): 0.25 um/px, no CRS, no source on disk."""
    root = Path(geo_mosaic.path).parent
    labels = generate_scene(700, 900, seed=12).labels
    write_label_mosaic(labels, root / "slides" / "slide.zarr", crs=None, transform=None, mpp=0.25, chunk=128,
                       shard=256)
    return Mosaic.open(root / "slides" / "slide.zarr")


@dataclass
class Served:
    url: str
    root: Path
    outside: Path  # a mosaic outside ROOT, linked from inside it


@pytest.fixture(scope="session")
def served(geo_mosaic: Mosaic, slide_mosaic: Mosaic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`tessera serve ROOT` as a real process on 127.0.0.1, with a 1 Mpx region limit; stopped afterwards.

    ROOT holds the geo mosaic, slides/slide.zarr, and a symlink to a mosaic outside ROOT (never served).
    """
    root = Path(geo_mosaic.path).parent
    outside = tmp_path_factory.mktemp("outside") / "secret.zarr"
    write_label_mosaic(np.zeros((64, 64), np.uint8), outside, crs=None, transform=None, chunk=64, shard=64)
    (root / "outside.zarr").symlink_to(outside, target_is_directory=True)
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port),
         "--max-region-pixels", str(1000 * 1000)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ), http_answers("/api/mosaics"))
    url = f"http://127.0.0.1:{port}"
    yield Served(url, root, outside)
    server.terminate()
    server.wait(timeout=20)
