"""Issue 19's layers end to end: a uint16 mask for models of over 254 classes, and the optional
uncertainty (and TTA spread) layers, each segmented on a real embedded Ray and read back through the
query API and a real `tessera serve`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from PIL import Image
from rasterio.warp import transform as warp_points
from scipy.special import softmax

from pipeline import query
from pipeline.blending import tile_window
from pipeline.execution import SegmentConfig, prepare, segment
from pipeline.inference import InferenceOptions, Predictor
from pipeline.models.bundle import ModelBundle
from pipeline.mosaic import Mosaic
from pipeline.query.region import read_window
from pipeline.query.tiles import tile_bounds
from pipeline.query.window import Window
from pipeline.tiling import Rect
from tests.conftest import make_bundle, smooth_image, write_geotiff
from tests.servers.ports import http_answers, start_server
from tests.test_execution import reference_blend

pytestmark = pytest.mark.usefixtures("ray_session")

HIGH, LOW = 299, 7  # the 300-class model's two winners: HIGH where band 1 is bright, LOW elsewhere
SMALL = {"chunk": 64, "shard": 128, "block": 128, "workers": 2, "progress": False}


def run(source: Path, bundle: Path, out: Path, **kw: object) -> Mosaic:
    segment(SegmentConfig(source=str(source), model=str(bundle), output=str(out), **kw))  # type: ignore[arg-type]
    return Mosaic.open(out)


def normalised_entropy(logits: np.ndarray) -> np.ndarray:
    """H(softmax) / log(C) straight from the definition, in float64."""
    p = softmax(logits.astype(np.float64), axis=0)
    return -(p * np.log(p)).sum(0) / np.log(len(logits))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layers")


@pytest.fixture(scope="module")
def image(root: Path) -> Path:
    return write_geotiff(root / "image.tif", smooth_image(192, 256, seed=5))


@pytest.fixture(scope="module")
def bundle_300(root: Path) -> Path:
    """300 classes, a per-pixel linear model (FCN of depth 0): logits +-4 x (band 1, normalised) for HIGH
    and LOW, -20 for the other 298, so HIGH wins exactly where band 1 is above mid-grey."""
    path = make_bundle(root / "c300.bundle", classes=300, tile=64, overlap=16, arch_args={"depth": 0})
    bundle = ModelBundle.load(path)
    head = bundle.model.head  # type: ignore[union-attr]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.weight[HIGH, 0] = 4.0
        head.weight[LOW, 0] = -4.0
        head.bias[HIGH] = head.bias[LOW] = 0.0
    bundle.save(path)
    return path


@pytest.fixture(scope="module")
def mosaic_300(root: Path, image: Path, bundle_300: Path) -> Mosaic:
    return run(image, bundle_300, root / "c300.zarr", **SMALL)


@pytest.fixture(scope="module")
def sharp_bundle(root: Path) -> Path:
    """A 3-class FCN whose logits are scaled up (x20) so its entropy varies over the image (0.3 to 0.8 or
    so; the plain random FCN is nearly uniform everywhere), with two classes winning in places."""
    path = make_bundle(root / "sharp.bundle", seed=2, arch_args={"depth": 2, "width": 8, "padding_mode": "reflect"})
    bundle = ModelBundle.load(path)
    head = bundle.model.head  # type: ignore[union-attr]
    with torch.no_grad():
        head.weight.mul_(20.0)
        head.bias.mul_(20.0)
    bundle.save(path)
    return path


@pytest.fixture(scope="module")
def uncertain(root: Path, image: Path, sharp_bundle: Path) -> Mosaic:
    return run(image, sharp_bundle, root / "uncertain.zarr", tile=128, overlap=32, uncertainty=True,
               scores_dtype="float32", **SMALL)


@dataclass
class Server:
    url: str

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str) -> dict:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(root: Path, mosaic_300: Mosaic, uncertain: Mosaic) -> Iterator[Server]:
    """`tessera serve ROOT` as a real process on 127.0.0.1, serving both mosaics."""
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    url = f"http://127.0.0.1:{port}"
    yield Server(url)
    server.terminate()
    server.wait(timeout=20)


def open_band(path: Path) -> np.ndarray:
    """Band 1 of a GeoTIFF, as float64."""
    import rasterio

    with rasterio.open(path) as src:
        return np.asarray(src.read(1), np.float64)


def tile_at(m: Mosaic, row: int, col: int, z: int = 18) -> tuple[int, int, int, int, int]:
    """The XYZ tile (z, x, y) over level-0 pixel (row, col) of a georeferenced mosaic, and where in the tile it is."""
    x, y = Affine(*m.layout.transform) @ (col + 0.5, row + 0.5)  # type: ignore[misc]
    (mx,), (my,) = warp_points(m.layout.crs, "EPSG:3857", [x], [y])
    span = 40075016.68557849 / 2**z
    tx, ty = int((mx + 20037508.342789244) / span), int((20037508.342789244 - my) / span)
    minx, _, maxx, maxy = tile_bounds(z, tx, ty)
    return z, tx, ty, int((mx - minx) / (maxx - minx) * 256), int((maxy - my) / (maxx - minx) * 256)


def test_a_300_class_model_writes_a_uint16_mask_and_the_query_and_viewer_read_it(
    mosaic_300: Mosaic, image: Path, served: Server
) -> None:
    m = mosaic_300
    assert m.complete and m.layout.mask_dtype == "uint16" and m.layout.mask_nodata == 65535
    assert m.meta["layout"]["mask_dtype"] == "uint16"  # recorded for every reader
    mask = m.read("mask")
    assert mask.dtype == np.uint16
    band = open_band(image)
    expected = np.where(band > 127.5, HIGH, LOW)  # the model's logits are +-4 (band / 255 - 0.5) / 0.25
    np.testing.assert_array_equal(mask, expected)
    assert 0.2 < (mask == HIGH).mean() < 0.8
    for k in range(1, m.layout.num_levels):  # level 1 from the block tasks, level 2 from dask
        scores = m.read("scores", k).astype(np.float32)
        np.testing.assert_array_equal(m.read("mask", k), scores.argmax(0))
        assert m.read("mask", k).dtype == np.uint16
    colours = m.palette
    assert colours.shape == (65536, 3) and tuple(colours[HIGH]) != tuple(colours[LOW])

    assert query.read_region(m, as_xarray=True).rio.nodata == 65535
    stats = query.mosaic_stats(m).to_dict()
    pixels = {c["name"]: c["pixels"] for c in stats["classes"]}
    assert pixels[f"class{HIGH}"] == (mask == HIGH).sum() and pixels[f"class{LOW}"] == (mask == LOW).sum()
    assert stats["nodata_pixels"] == 0

    mid = "c300.zarr"
    info = served.json(f"/api/mosaics/{mid}")
    assert info["mask_dtype"] == "uint16" and info["mask_nodata"] == 65535
    assert info["layers"] == ["mask", "confidence"]
    status, body = served.get(f"/api/mosaics/{mid}/region.npy?window=0,0,96,128")
    assert status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), mask[:96, :128])
    areas = served.json(f"/api/mosaics/{mid}/stats")
    assert {c["name"]: c["pixels"] for c in areas["classes"]}[f"class{HIGH}"] == (mask == HIGH).sum()
    row, col = np.argwhere(mask == HIGH)[len(np.argwhere(mask == HIGH)) // 2]
    x, y = Affine(*m.layout.transform) @ (col + 0.5, row + 0.5)  # type: ignore[misc]
    at = served.json(f"/api/mosaics/{mid}/point?x={x}&y={y}")
    assert at["class"] == HIGH and at["name"] == f"class{HIGH}" and (at["row"], at["col"]) == (row, col)
    # A map tile as the viewer asks for it: RGBA in the class colours, the pixel under (row, col) HIGH's.
    z, tx, ty, px, py = tile_at(m, int(row), int(col))
    status, body = served.get(f"/api/mosaics/{mid}/tiles/{z}/{tx}/{ty}.png")
    assert status == 200
    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    assert tuple(tile[py, px]) == (*colours[HIGH], 255)
    shown = {tuple(p[:3]) for p in tile.reshape(-1, 4) if p[3]}
    assert shown <= {tuple(colours[HIGH]), tuple(colours[LOW])}
    status, body = served.get(f"/api/mosaics/{mid}/region.npy?layer=uncertainty")
    assert status == 422 and b"no uncertainty layer" in body and b"--uncertainty" in body


def test_the_uncertainty_layer_equals_a_direct_computation_on_a_small_image(
    uncertain: Mosaic, image: Path, sharp_bundle: Path, served: Server
) -> None:
    m = uncertain
    assert m.complete and m.layout.layers == ("uncertainty",)
    assert m.meta["job"]["uncertainty"] is True
    reference = reference_blend(image, sharp_bundle, 128, 32)  # a plain single-process global blend
    stored = m.read("uncertainty")
    assert stored.dtype == np.float16 and stored.shape == (192, 256)
    np.testing.assert_allclose(stored.astype(np.float64), normalised_entropy(reference), atol=1e-3)
    assert np.nanmin(stored) >= 0 and np.nanmax(stored) <= 1 and np.ptp(stored) > 0.2
    # Lower levels as documented: the entropy of that level's (2x2 averaged) scores, like confidence.
    assert m.layout.block_levels == 1 and m.layout.num_levels == 3  # level 1 by blocks, level 2 by dask
    for k in (1, 2):
        np.testing.assert_allclose(m.read("uncertainty", k).astype(np.float64),
                                   normalised_entropy(m.read("scores", k)), atol=1e-3)

    np.testing.assert_array_equal(read_window(m, Window(1, Rect(0, 0, 96, 128)), "uncertainty"),
                                  m.read("uncertainty", 1))
    mid = "uncertain.zarr"
    assert served.json(f"/api/mosaics/{mid}")["layers"] == ["mask", "confidence", "uncertainty"]
    status, body = served.get(f"/api/mosaics/{mid}/region.npy?layer=uncertainty&level=1")
    assert status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), m.read("uncertainty", 1))
    row, col = 100, 150
    z, tx, ty, px, py = tile_at(m, row, col)
    status, body = served.get(f"/api/mosaics/{mid}/tiles/{z}/{tx}/{ty}.png?layer=uncertainty")
    assert status == 200
    grey, alpha = np.asarray(Image.open(io.BytesIO(body)).convert("LA")).transpose(2, 0, 1)
    assert alpha[py, px] == 255 and abs(int(grey[py, px]) - int(float(stored[row, col]) * 255)) <= 1
    status, body = served.get(f"/api/mosaics/{mid}/region.png?layer=uncertainty&level=2")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 48)


def test_the_tta_spread_is_exact_across_blocks_and_workers(image: Path, fcn_bundle: Path, tmp_path: Path) -> None:
    """Each tile's spread of the 8 views, blended with the tiles' weights: equal to a single-process blend."""
    m = run(image, fcn_bundle, tmp_path / "tta.zarr", tile=128, overlap=32, uncertainty=True, tta=True,
            scores_dtype="float32", **SMALL)
    assert m.layout.layers == ("uncertainty", "spread")
    config = SegmentConfig(source=str(image), model=str(fcn_bundle), output="/nonexistent.zarr", tile=128, overlap=32)
    source, bundle, grid = prepare(config)
    predictor = Predictor(bundle, InferenceOptions(device="cpu", tta=True, spread=True))
    total = np.zeros((predictor.channels, grid.height, grid.width))
    weight = np.zeros((grid.height, grid.width))
    for t in grid:
        r = grid.rect(t)
        raw = predictor.select_bands(source.read(r.y0, r.x0, r.height, r.width))[None]
        values, w = predictor(raw)[0], tile_window("gaussian", 128, grid.edges(t))
        h, wd = min(r.y1, grid.height) - r.y0, min(r.x1, grid.width) - r.x0
        total[:, r.y0 : r.y0 + h, r.x0 : r.x0 + wd] += values[:, :h, :wd] * w[:h, :wd]
        weight[r.y0 : r.y0 + h, r.x0 : r.x0 + wd] += w[:h, :wd]
    blended = total / weight
    np.testing.assert_allclose(m.read("scores"), blended[:-1], atol=1e-4)
    np.testing.assert_allclose(m.read("spread").astype(np.float64), blended[-1], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(m.read("uncertainty").astype(np.float64), normalised_entropy(blended[:-1]), atol=1e-3)
    assert np.nanmin(m.read("spread")) > 0  # the views disagree, a little, everywhere
    level1 = m.read("spread", 1).astype(np.float64)
    np.testing.assert_allclose(level1, m.read("spread", 0).astype(np.float64).reshape(96, 2, 128, 2).mean((1, 3)),
                               rtol=2e-3, atol=1e-7)


def test_the_predictors_spread_is_the_views_mean_class_standard_deviation(fcn_bundle: Path) -> None:
    from pipeline.inference import d4_inverse, d4_transforms

    bundle = ModelBundle.load(fcn_bundle)
    tiles = smooth_image(32, 32, seed=1)[None].astype(np.float32)
    out = Predictor(bundle, InferenceOptions(device="cpu", tta=True, spread=True))(tiles)
    plain = Predictor(bundle, InferenceOptions(device="cpu"))
    views = d4_inverse([torch.from_numpy(plain(v.numpy())) for v in d4_transforms(torch.from_numpy(tiles))])
    logits = np.stack([v.numpy() for v in views])  # (8, 1, C, h, w), each view back in the tile's frame
    assert out.shape == (1, 4, 32, 32)
    np.testing.assert_allclose(out[:, :-1], logits.mean(0), atol=1e-5)
    np.testing.assert_allclose(out[:, -1], softmax(logits, axis=2).std(0).mean(1), atol=1e-6)


def test_a_mosaic_of_few_classes_keeps_its_metadata_as_before(mosaic_300: Mosaic, uncertain: Mosaic) -> None:
    """Nothing new is written where nothing changes: a uint8 mask without optional layers records neither."""
    layout = uncertain.meta["layout"]
    assert "mask_dtype" not in layout and uncertain.read("mask").dtype == np.uint8
    assert "layers" not in mosaic_300.meta["layout"] and "uncertainty" not in mosaic_300.meta["job"]


def test_the_shell_reads_and_exports_both(mosaic_300: Mosaic, uncertain: Mosaic, tmp_path: Path) -> None:
    """`tessera query region --layer uncertainty`, and COG / PNG exports of a uint16 mask and of uncertainty."""
    import rasterio
    from typer.testing import CliRunner

    from pipeline.cli import app

    def run_cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["query", *args])
        return result.exit_code, result.output

    code, out = run_cli("region", str(uncertain.path), "--layer", "uncertainty", "--level", "1",
                        "-o", str(tmp_path / "u.npy"))
    assert code == 0 and json.loads(out)["shape"] == [96, 128]
    np.testing.assert_array_equal(np.load(tmp_path / "u.npy"), uncertain.read("uncertainty", 1))
    code, out = run_cli("region", str(mosaic_300.path), "--layer", "uncertainty")
    assert code != 0 and "no uncertainty layer" in out
    code, out = run_cli("region", str(mosaic_300.path), "--window", "0,0,64,64")
    mask = mosaic_300.read("mask")[:64, :64]
    assert code == 0 and json.loads(out)["pixels"][f"class{HIGH}"] == (mask == HIGH).sum()

    assert run_cli("export", str(mosaic_300.path), "-o", str(tmp_path / "mask.tif"))[0] == 0
    with rasterio.open(tmp_path / "mask.tif") as cog:
        assert cog.dtypes[0] == "uint16" and cog.nodata == 65535  # too small for overviews
        np.testing.assert_array_equal(cog.read(1), mosaic_300.read("mask"))
        assert cog.colormap(1)[HIGH][:3] == tuple(mosaic_300.palette[HIGH])
    assert run_cli("export", str(uncertain.path), "-o", str(tmp_path / "u.tif"), "--layer", "uncertainty")[0] == 0
    with rasterio.open(tmp_path / "u.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), uncertain.read("uncertainty").astype(np.float32))
    assert run_cli("export", str(mosaic_300.path), "-o", str(tmp_path / "mask.png"))[0] == 0
    rgba = np.asarray(Image.open(tmp_path / "mask.png").convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., :3], mosaic_300.palette[mosaic_300.read("mask")])


def test_refinement_keeps_the_uint16_mask_and_the_uncertainty_layer(mosaic_300: Mosaic, uncertain: Mosaic,
                                                                    tmp_path: Path) -> None:
    from pipeline.crf import CRFSettings
    from pipeline.refinement import RefineConfig, refine_mosaic

    crf = CRFSettings(bilateral_sxy=10.0, iterations=2)
    for m, name in ((mosaic_300, "c300"), (uncertain, "uncertain")):
        out = tmp_path / f"{name}.zarr"
        refine_mosaic(RefineConfig(str(m.path), str(out), crf=crf, progress=False))
        refined = Mosaic.open(out)
        assert refined.complete and refined.layout.mask_dtype == m.layout.mask_dtype
        assert refined.layout.layers == m.layout.layers
        for k in range(refined.layout.num_levels):
            scores = refined.read("scores", k).astype(np.float32)
            np.testing.assert_array_equal(refined.read("mask", k), scores.argmax(0))
            if refined.layout.layers:
                p = np.clip(scores.astype(np.float64), 1e-30, 1)
                direct = -(p * np.log(p)).sum(0) / np.log(len(p))
                np.testing.assert_allclose(refined.read("uncertainty", k).astype(np.float64), direct, atol=2e-3)
