"""The segment job end to end on a real embedded Ray: exactness, seams, skipping, real data."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.blending import tile_window
from pipeline.errors import ConfigError
from pipeline.execution import SegmentConfig, prepare, segment, worker_layout
from pipeline.inference import InferenceOptions, Predictor
from pipeline.models.bundle import ModelBundle
from pipeline.mosaic import Mosaic
from pipeline.sources import open_source
from tests.conftest import make_bundle, smooth_image, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_session")


def run(source: Path, bundle: Path, out: Path, **kw: object) -> Mosaic:
    settings: dict[str, object] = {"scores_dtype": "float32", "chunk": 128, "shard": 256, "block": 256, **kw}
    config = SegmentConfig(source=str(source), model=str(bundle), output=str(out), progress=False,
                           **settings)  # type: ignore[arg-type]
    segment(config)
    return Mosaic.open(out)


def reference_blend(source_path: Path, bundle_path: Path, tile: int, overlap: int) -> np.ndarray:
    """A plain single-process blend of every tile of the grid over whole-image arrays."""
    config = SegmentConfig(source=str(source_path), model=str(bundle_path), output="/nonexistent.zarr",
                           tile=tile, overlap=overlap)
    source, bundle, grid = prepare(config)
    predictor = Predictor(bundle, InferenceOptions(device="cpu"))
    total = np.zeros((bundle.spec.num_classes, grid.height, grid.width), np.float64)
    weight = np.zeros((grid.height, grid.width), np.float64)
    for t in grid:
        r = grid.rect(t)
        values = predictor(predictor.select_bands(source.read(r.y0, r.x0, r.height, r.width))[None])[0]
        w = tile_window("gaussian", tile, grid.edges(t))
        h, wd = min(r.y1, grid.height) - r.y0, min(r.x1, grid.width) - r.x0
        total[:, r.y0 : r.y0 + h, r.x0 : r.x0 + wd] += values[:, :h, :wd] * w[:h, :wd]
        weight[r.y0 : r.y0 + h, r.x0 : r.x0 + wd] += w[:h, :wd]
    return (total / weight).astype(np.float32)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_geotiff(tmp_path_factory.mktemp("scene") / "scene.tif", smooth_image(700, 900, seed=3))


@pytest.fixture(scope="module")
def reference(scene: Path, fcn_bundle: Path) -> np.ndarray:
    return reference_blend(scene, fcn_bundle, 128, 32)


@pytest.mark.parametrize(("workers", "block", "pipelined"),
                         [(1, 256, False), (2, 512, False), (3, 256, False), (2, 256, True)])
def test_mosaic_equals_single_process_reference(
    scene: Path, fcn_bundle: Path, reference: np.ndarray, tmp_path: Path, workers: int, block: int, pipelined: bool
) -> None:
    """Also with the GPU workers' read-ahead and write-behind threads, run here on CPU."""
    mosaic = run(scene, fcn_bundle, tmp_path / "m.zarr", workers=workers, block=block, pipelined=pipelined)
    scores = mosaic.read("scores")
    assert mosaic.complete
    assert np.abs(scores - reference).max() <= 1e-4
    np.testing.assert_array_equal(mosaic.read("mask"), reference.argmax(0).astype(np.uint8))
    summary = mosaic.lineage["summary"]
    assert summary["tiles_recomputed"] == 0
    assert summary["tiles_computed"] == summary["tiles_total"]


def test_the_next_job_in_this_process_runs_its_own_model_on_the_last_jobs_workers(
    scene: Path, fcn_bundle: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    """On a Ray the job did not start (this session's), its workers wait for the next job of the process
    (pipeline.warm_pool): no new processes, and each job's mosaic is its own model's."""
    import psutil

    from pipeline import warm_pool

    def block_workers() -> set[int]:
        found = set()
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone, or a zombie, between the listing and the look
                if process.status() != psutil.STATUS_ZOMBIE and "BlockWorker" in " ".join(process.cmdline()):
                    found.add(process.pid)
        return found

    other = make_bundle(tmp_path / "other.bundle", seed=7)  # the same architecture, other weights
    first = run(scene, other, tmp_path / "other.zarr", workers=2)
    kept = block_workers()
    assert len(kept) == 2
    second = run(scene, fcn_bundle, tmp_path / "m.zarr", workers=2)
    assert block_workers() == kept  # the same processes
    assert np.abs(second.read("scores") - reference).max() <= 1e-4  # and the second job's model
    assert np.abs(first.read("scores") - reference).max() > 0.1
    # An idle worker killed between jobs is restarted by Ray with the arguments it was created with
    # (the first job's setup); it loads the third job's own before computing.
    os.kill(min(kept), signal.SIGKILL)
    third = run(scene, fcn_bundle, tmp_path / "third.zarr", workers=2)
    np.testing.assert_array_equal(third.read("scores"), second.read("scores"))
    kept = block_workers()
    warm_pool.release()
    deadline = time.monotonic() + 30
    while block_workers() & kept:  # ray.kill returns before the processes have gone
        assert time.monotonic() < deadline, "released workers still run"
        time.sleep(0.1)


def test_stitched_logits_agree_with_one_whole_image_forward(
    scene: Path, fcn_bundle: Path, tmp_path: Path
) -> None:
    mosaic = run(scene, fcn_bundle, tmp_path / "m.zarr", workers=2)
    bundle = ModelBundle.load(fcn_bundle)
    assert bundle.model.receptive_field <= 32  # fits in the overlap
    image = open_source(scene).read(0, 0, 700, 900)
    whole = Predictor(bundle, InferenceOptions(device="cpu"))(image[None])[0]
    agreement = (mosaic.read("mask") == whole.argmax(0)).mean()
    assert agreement >= 0.9999
    diff = np.abs(mosaic.read("scores") - whole)
    assert np.quantile(diff, 0.999) < 0.01, "differences stay on the few pixels at inner tile edges"


def test_agrees_with_monai_sliding_window_where_grids_coincide(fcn_bundle: Path, tmp_path: Path) -> None:
    from monai.inferers import sliding_window_inference

    # 128 + 4 * 96 and 128 + 6 * 96: MONAI's stride int(128 * 0.75) = 96 matches our even spread.
    source = write_geotiff(tmp_path / "s.tif", smooth_image(512, 704, seed=5))
    mosaic = run(source, fcn_bundle, tmp_path / "m.zarr", workers=1, tile=128, overlap=32)
    ours = mosaic.read("scores")
    bundle = ModelBundle.load(fcn_bundle)
    model = bundle.model.eval()
    x = bundle.spec.normalization.apply(torch.from_numpy(open_source(source).read(0, 0, 512, 704)[None] * 1.0))
    window = torch.from_numpy(tile_window("gaussian", 128, (False,) * 4).copy())

    def monai(**kw: object) -> np.ndarray:
        with torch.no_grad():
            out = sliding_window_inference(x.float(), roi_size=(128, 128), sw_batch_size=8, predictor=model,
                                           overlap=0.25, **kw)  # type: ignore[arg-type]
        return out[0].numpy()  # type: ignore[index]

    # Same grid, same weights: the same numbers (our flat image-edge sides change nothing, since at
    # the image edge a single tile covers each pixel and its weight cancels in the normalisation).
    same_weights = monai(roi_weight_map=window)
    assert np.abs(ours - same_weights).max() <= 1e-4
    assert (ours.argmax(0) == same_weights.argmax(0)).mean() >= 0.9999
    # MONAI's own gaussian floors weights at 1e-3, which lets contaminated tile borders leak in:
    # tessera's stitch is at least as close to a whole-image forward pass.
    with torch.no_grad():
        whole = model(x.float())[0].numpy()
    theirs = monai(mode="gaussian", sigma_scale=0.125)
    assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.995
    assert (ours.argmax(0) == whole.argmax(0)).mean() >= (theirs.argmax(0) == whole.argmax(0)).mean()


def test_half_nodata_source_computes_about_half_the_tiles(fcn_bundle: Path, tmp_path: Path) -> None:
    image = smooth_image(1024, 1024, seed=9)
    image[:, :, :512] = 0
    source = write_geotiff(tmp_path / "half.tif", image, nodata=0)
    mosaic = run(source, fcn_bundle, tmp_path / "m.zarr", workers=2)
    s = mosaic.lineage["summary"]
    assert 0.4 <= s["tiles_computed"] / s["tiles_total"] <= 0.6
    assert s["tiles_skipped"] == s["tiles_total"] - s["tiles_computed"]
    mask = mosaic.read("mask")
    assert (mask[:, :512] == 255).all()
    assert (mask[:, 512:] != 255).all()
    assert np.isnan(mosaic.read("confidence")[:, :500]).all()


def test_pyramid_levels_are_consistent(scene: Path, fcn_bundle: Path, tmp_path: Path) -> None:
    mosaic = run(scene, fcn_bundle, tmp_path / "m.zarr", workers=1)
    assert mosaic.layout.num_levels >= 3
    s0 = mosaic.read("scores", 0)
    s1 = mosaic.read("scores", 1)
    assert s1.shape == (3, 350, 450)
    np.testing.assert_allclose(s1[:, 10, 20], s0[:, 20:22, 40:42].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(mosaic.read("mask", 1), s1.argmax(0))
    # Every level, everywhere (block edges, the odd image edge): the 2x2 mean of the level above.
    # Level 1 is written by the block tasks, the levels below by dask.
    assert mosaic.layout.block_levels == 1
    for k in range(1, mosaic.layout.num_levels):
        above = mosaic.read("scores", k - 1)
        c, h, w = above.shape
        padded = np.full((c, h + h % 2, w + w % 2), np.nan, np.float32)
        padded[:, :h, :w] = above
        expected = np.nanmean(padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2), axis=(2, 4))
        np.testing.assert_allclose(mosaic.read("scores", k), expected, atol=1e-5)
        np.testing.assert_array_equal(mosaic.read("mask", k), expected.argmax(0))
    top = mosaic.layout.num_levels - 1
    assert max(mosaic.read("mask", top).shape) <= 128


def test_geotiff_keeps_crs_transform_and_nodata(shared_data: Path, tmp_path: Path) -> None:
    import rasterio
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    path = shared_data / "geo" / "rasterio" / "RGB.byte.tif"
    bundle = make_bundle(tmp_path / "rgb.bundle", tile=128, overlap=16)
    mosaic = run(path, bundle, tmp_path / "rgb.zarr", workers=2)
    ds = xr.open_zarr(str(tmp_path / "rgb.zarr"), group="0", consolidated=False)
    with rasterio.open(path) as src:
        assert ds.rio.crs == src.crs
        assert ds.rio.transform() == src.transform
        valid = src.dataset_mask() > 0
    mask = mosaic.read("mask")
    assert (mask[~valid] == 255).all()
    assert (mask[valid] != 255).all()
    assert mosaic.to_xarray(1).mask.shape == mosaic.read("mask", 1).shape


def test_slide_keeps_mpp_and_reads_in_ome_zarr(shared_data: Path, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = shared_data / "slides" / "cmu-1-small-region.svs"
    bundle = make_bundle(tmp_path / "slide.bundle", tile=256, overlap=32)
    out = tmp_path / "slide.zarr"
    mosaic = run(path, bundle, out, workers=2, block=512)
    assert mosaic.layout.mpp == pytest.approx(0.499)
    s = mosaic.lineage["summary"]
    assert 0 < s["tiles_computed"] < s["tiles_total"], "tissue detection skips the glass"
    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert next(d.shape for d in image.data) == (3, 2967, 2220)
    assert image.metadata["coordinateTransformations"][0][0]["scale"][1] == pytest.approx(0.499)
    labels = [n for n in nodes if "labels/mask" in str(n.zarr)]
    assert labels and len(labels[0].data) == mosaic.layout.num_levels
    assert labels[0].metadata["color"][1] == pytest.approx([220 / 255, 40 / 255, 40 / 255, 1.0])
    assert labels[0].metadata["color"][255][3] == 0, "nodata is transparent"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without enough GPUs")
def test_more_gpu_workers_than_gpu_slots_are_refused(scene: Path, fcn_bundle: Path) -> None:
    config = SegmentConfig(source=str(scene), model=str(fcn_bundle), output="/nonexistent.zarr", workers=3,
                           actors_per_gpu=2)
    with pytest.raises(ConfigError, match="actors_per_gpu"):
        worker_layout(config, "cuda")
    with pytest.raises(ConfigError, match="actors_per_gpu"):
        SegmentConfig(source=str(scene), model=str(fcn_bundle), output="/nonexistent.zarr", actors_per_gpu=0)
