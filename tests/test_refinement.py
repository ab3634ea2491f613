"""Dense CRF refinement: the CRF itself on generated scenes, and the refine job over a real mosaic on Ray."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.crf import ColourScale, CRFSettings, refine, unary_energy
from pipeline.errors import ConfigError, MosaicError, OutputExistsError
from pipeline.mosaic import Mosaic
from pipeline.refinement import (
    RefineConfig,
    RefineSummary,
    colour_scale,
    recorded_source,
    refine_mosaic,
    with_halo,
)
from pipeline.sources import open_source
from pipeline.synthetic import CLASSES, coarse_logits, generate_scene, write_label_mosaic, write_scene
from pipeline.tiling import Rect
from pipeline.tracking import Tracking, find_runs
from tests.conftest import write_geotiff

SMALL_CRF = CRFSettings(bilateral_sxy=20.0)  # halo 80 px: blocks of 128 px still see well past their edges


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` px of a change of class in `labels` (the trimap of DeepLab's evaluation)."""
    edges = ndimage.morphological_gradient(labels, size=3) > 0
    return ndimage.binary_dilation(edges, iterations=width)


def test_crf_raises_boundary_accuracy_on_a_generated_scene() -> None:
    scene = generate_scene(384, 384, seed=11)
    logits = coarse_logits(scene.labels, len(CLASSES), sigma=4.0, noise=1.0, seed=2)
    q = refine(logits, "logits", ColourScale().apply(scene.image), (0, 0), CRFSettings())
    band = boundary_band(scene.labels, 3)
    before, after = logits.argmax(0) == scene.labels, q.argmax(0) == scene.labels
    assert band.mean() > 0.1  # the scene has boundaries enough to measure
    assert after[band].mean() > before[band].mean() + 0.04, (before[band].mean(), after[band].mean())
    assert after.mean() > before.mean()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)


def test_unary_energy_is_minus_log_softmax_and_nodata_has_no_opinion() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 5, 6)).astype(np.float32)
    logits[:, 2, 3] = np.nan
    energy = unary_energy(logits, "logits").reshape(4, 5, 6)
    expected = -torch.log_softmax(torch.from_numpy(np.nan_to_num(logits)), dim=0).numpy()
    valid = ~np.isnan(logits[0])
    np.testing.assert_allclose(energy[:, valid], expected[:, valid], atol=1e-5)
    assert (energy[:, 2, 3] == 0).all()
    probabilities = np.full((2, 1, 2), 0.5, np.float32)
    np.testing.assert_allclose(unary_energy(probabilities, "probabilities"), np.log(2), atol=1e-6)


def test_refine_keeps_nodata_and_follows_image_edges() -> None:
    # Left half red, right half blue; the logits put the class boundary 6 px too far right.
    image = np.zeros((3, 32, 64), np.uint8)
    image[0, :, :32] = 200
    image[2, :, 32:] = 200
    logits = np.zeros((2, 32, 64), np.float32)
    logits[0, :, :38], logits[1, :, 38:] = 1.0, 1.0
    logits[:, :, :2] = np.nan
    q = refine(logits, "logits", ColourScale().apply(image), (0, 0), CRFSettings(bilateral_sxy=10))
    assert np.isnan(q[:, :, :2]).all() and not np.isnan(q[:, :, 2:]).any()
    mask = q[:, :, 2:].argmax(0)
    assert (mask[:, :30] == 0).all() and (mask[:, 30:] == 1).all()  # the boundary moved to the colour edge


def test_colour_scale_of_a_16_bit_source_is_fixed_by_the_whole_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(300, 4000, (4, 512, 512)).astype(np.uint16)
    image[:, :40, :] = 0  # nodata
    path = write_geotiff(tmp_path / "pan.tif", image, nodata=0)
    scale = colour_scale(open_source(path))
    valid = image[:, 40:, :].reshape(4, -1)  # 8 x 8 windows of 64 px cover this image whole
    assert scale == ColourScale.from_sample(valid)
    assert scale.low[0] == pytest.approx(np.percentile(valid[0], 2)) and scale.high[2] > 3800


def test_colour_scale_is_the_same_for_every_window() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(300, 4000, (4, 50, 60)).astype(np.uint16)
    scale = ColourScale.from_sample(image.reshape(4, -1))
    whole = scale.apply(image)
    np.testing.assert_array_equal(scale.apply(image[:, 10:30, 20:45]), whole[10:30, 20:45])
    assert whole.shape == (50, 60, 3)
    assert abs(np.percentile(whole[..., 0], 2)) < 1 and abs(np.percentile(whole[..., 0], 98) - 255) < 1
    grey = ColourScale().apply(image[:1].astype(np.uint8))
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("bad", [
    {"iterations": 0}, {"bilateral_sxy": 0.0}, {"gaussian_sxy": float("nan")}, {"bilateral_compat": -1.0},
    {"halo": -5},
])
def test_bad_crf_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        CRFSettings(**bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scene_mosaic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A 512 x 768 scene as a GeoTIFF, and a complete mosaic of coarse logits over it with nodata in its
    last column of 128 px blocks."""
    folder = tmp_path_factory.mktemp("refine")
    scene = generate_scene(512, 768, seed=7)
    image = folder / "scene.tif"
    write_scene(scene, image, folder / "labels.tif")
    labels = scene.labels.copy()
    labels[:, 640:] = 255
    logits = coarse_logits(scene.labels, len(CLASSES), seed=3)
    mosaic = folder / "coarse.zarr"
    write_label_mosaic(labels, mosaic, chunk=64, shard=128, scores=logits,
                       lineage={"source": {"path": str(image), "level": 0}})
    return mosaic, image, scene.image


@pytest.fixture(scope="module")
def refined(scene_mosaic: tuple[Path, Path, np.ndarray], ray_session: None) -> tuple[Path, RefineSummary]:
    mosaic, _, _ = scene_mosaic
    out = mosaic.parent / "refined.zarr"
    before = Mosaic.open(mosaic).checksum(_whole(mosaic))
    summary = refine_mosaic(RefineConfig(str(mosaic), str(out), crf=SMALL_CRF, progress=False))
    assert Mosaic.open(mosaic).checksum(_whole(mosaic)) == before  # the input is never written
    return out, summary


def _whole(path: Path) -> Rect:
    layout = Mosaic.open(path).layout
    return Rect(0, 0, layout.height, layout.width)


def test_block_by_block_equals_refining_the_whole(scene_mosaic: tuple[Path, Path, np.ndarray],
                                                   refined: tuple[Path, RefineSummary]) -> None:
    mosaic, _, image = scene_mosaic
    out, summary = refined
    stored = Mosaic.open(mosaic).read("scores", 0).astype(np.float32)
    whole = refine(stored, "logits", ColourScale().apply(image), (0, 0), SMALL_CRF)
    blocks = Mosaic.open(out).read("scores", 0).astype(np.float32)
    assert (summary.blocks_written, summary.blocks_empty, summary.blocks_total) == (20, 4, 24)
    halos = [with_halo(Rect(y, x, y + 128, x + 128), 80, 512, 768)
             for y in range(0, 512, 128) for x in range(0, 640, 128)]
    assert summary.halo_overhead == pytest.approx(sum(r.area for r in halos) / (20 * 128 * 128) - 1)
    valid = ~np.isnan(whole[0])
    assert np.array_equal(valid, ~np.isnan(blocks[0]))
    diff = np.abs(blocks[:, valid] - whole[:, valid])
    assert diff.max() < 0.03 and diff.mean() < 1e-4, (diff.max(), diff.mean())  # float16 storage: ~5e-4
    agree = (blocks.argmax(0) == whole.argmax(0))[valid].mean()
    assert agree > 0.9999, agree


def test_refined_mosaic_is_complete_self_describing_and_better(scene_mosaic: tuple[Path, Path, np.ndarray],
                                                               refined: tuple[Path, RefineSummary]) -> None:
    mosaic, image, _ = scene_mosaic
    out = refined[0]
    m, before = Mosaic.open(out), Mosaic.open(mosaic)
    assert m.complete and m.layout.scores_kind == "probabilities"
    assert dataclasses.replace(m.layout, scores_kind="logits") == before.layout
    assert m.lineage["refined"]["crf"] == SMALL_CRF.as_dict()
    assert m.lineage["refined"]["mosaic"] == str(mosaic.resolve())
    assert m.lineage["source"]["path"] == str(image.resolve())
    assert m.meta["job"]["crf"]["halo"] == 80
    scores = m.read("scores", 0).astype(np.float32)
    valid = ~np.isnan(scores[0])
    np.testing.assert_allclose(scores[:, valid].sum(0), 1.0, atol=3e-3)
    mask = m.read("mask", 0)
    assert (mask[:, 640:] == 255).all() and (mask[:, :640] != 255).all()
    np.testing.assert_array_equal(mask[valid], scores[:, valid].argmax(0))
    for k in range(1, m.layout.num_levels):  # the pyramid is there, at every level
        assert (m.read("mask", k) != 255).any()
    truth = generate_scene(512, 768, seed=7).labels
    band = boundary_band(truth, 3) & valid
    coarse = before.read("mask", 0)
    assert (mask == truth)[band].mean() > (coarse == truth)[band].mean() + 0.03
    assert find_runs(out, Tracking(experiment="tessera-refine"))


def test_an_interrupted_refinement_resumes(scene_mosaic: tuple[Path, Path, np.ndarray],
                                           refined: tuple[Path, RefineSummary], tmp_path: Path) -> None:
    import shutil

    mosaic, _, _ = scene_mosaic
    out = tmp_path / "resumed.zarr"
    shutil.copytree(refined[0], out)
    m = Mosaic.open(out, mode="r+")
    meta = m.meta
    meta["complete"] = False
    m.group.attrs["tessera"] = meta
    shutil.rmtree(out / "_tessera/blocks/1_2")  # a block whose marker never came
    m.array("scores", 0)[:, 384:512, 0:128] = 0  # a marked block whose data no longer matches its checksum
    summary = refine_mosaic(RefineConfig(str(mosaic), str(out), crf=SMALL_CRF, progress=False))
    assert (summary.blocks_written, summary.blocks_resumed) == (2, 18)
    np.testing.assert_array_equal(Mosaic.open(out).read("scores", 0), Mosaic.open(refined[0]).read("scores", 0))


def test_bad_refine_inputs_fail_before_anything_is_written(scene_mosaic: tuple[Path, Path, np.ndarray],
                                                           tmp_path: Path) -> None:
    mosaic, _, _ = scene_mosaic
    out = tmp_path / "out.zarr"
    with pytest.raises(ConfigError, match="--source"):
        other = tmp_path / "other.tif"
        write_scene(generate_scene(64, 64, seed=0), other, tmp_path / "other_labels.tif")
        refine_mosaic(RefineConfig(str(mosaic), str(out), source=str(other)))
    with pytest.raises(ConfigError, match="multiple of the mosaic's shard 128"):
        refine_mosaic(RefineConfig(str(mosaic), str(out), block=200))
    for inside in (mosaic, mosaic / "refined.zarr", mosaic.parent):
        with pytest.raises(ConfigError, match="beside it"):
            refine_mosaic(RefineConfig(str(mosaic), str(inside)))
    moved = tmp_path / "moved.zarr"
    write_label_mosaic(np.zeros((64, 64), np.uint8), moved, chunk=64, shard=64,
                       lineage={"source": {"path": str(tmp_path / "gone.tif"), "level": 0}})
    with pytest.raises(ConfigError, match="not there any more: pass --source"):
        refine_mosaic(RefineConfig(str(moved), str(out)))
    unfinished = tmp_path / "unfinished.zarr"
    write_label_mosaic(np.zeros((64, 64), np.uint8), unfinished, chunk=64, shard=64)
    m = Mosaic.open(unfinished, mode="r+")
    m.group.attrs["tessera"] = {**m.meta, "complete": False}
    with pytest.raises(MosaicError, match="not complete"):
        refine_mosaic(RefineConfig(str(unfinished), str(out)))
    assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a tessera mosaic"):
        refine_mosaic(RefineConfig(str(mosaic), str(tmp_path / "taken")))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_refine_reports_bad_input_and_the_job_config_maps(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "refine", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "o.zarr"),
         "--bilateral-sxy", "-3"], capture_output=True, text=True,
    )
    assert result.returncode == 2 and "bilateral_sxy=-3.0" in result.stderr
    from jobs.refine import to_config
    from pipeline.cli import compose

    cfg = compose("refine", ["mosaic=a.zarr", "output=b.zarr", "crf.bilateral_sxy=30", "block=4096"])
    config = to_config(cfg)
    assert config.crf == CRFSettings(bilateral_sxy=30.0) and config.block == 4096 and config.source is None


def test_the_source_is_found_by_its_absolute_path_when_the_lineage_has_a_relative_one(
        scene_mosaic: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    _, image, _ = scene_mosaic
    path = tmp_path / "typed.zarr"
    write_label_mosaic(np.zeros((64, 64), np.uint8), path, chunk=64, shard=64,
                       lineage={"source": {"path": "elsewhere/scene.tif", "level": 0}})
    m = Mosaic.open(path, mode="r+")
    with pytest.raises(ConfigError, match=r"elsewhere/scene\.tif.*--source"):
        recorded_source(m)
    m.group.attrs["tessera"] = {**m.meta, "job": {"source": str(image.resolve())}}  # as segment records it
    assert recorded_source(Mosaic.open(path)) == str(image.resolve())


def test_absolute_features_at_the_origin_give_the_library_s_own_2d_crf() -> None:
    from pydensecrf import densecrf

    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    logits = rng.normal(0, 2, (3, 40, 56)).astype(np.float32)
    ours = refine(logits, "logits", ColourScale().apply(image.transpose(2, 0, 1)), (0, 0), CRFSettings())
    crf = densecrf.DenseCRF2D(56, 40, 3)
    crf.setUnaryEnergy(unary_energy(logits, "logits"))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=13, rgbim=image, compat=10)
    np.testing.assert_allclose(ours, np.asarray(crf.inference(5)).reshape(3, 40, 56), atol=1e-6)


def test_refine_workers_and_mosaic_readers_do_not_load_torch() -> None:
    # Each refine task runs in a Ray worker of its own: torch and smp would add about 0.7 GiB to each.
    code = ("import sys, pipeline.refinement, pipeline.query.region, pipeline.query.tiles; "
            "print(sorted(m for m in ('torch', 'segmentation_models_pytorch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_a_collection_root_refines_on_the_same_engine(ray_session: None, tmp_path: Path) -> None:
    """`tessera refine ROOT -o OUT`: every complete mosaic under ROOT, one manifest row each, each equal to
    refining it alone; an unfinished mosaic is a failed row with its one-line error, and the others go on."""
    import shutil

    from pipeline.manifest import Manifest
    from pipeline.refinement import refine_inputs

    scene = generate_scene(256, 256, seed=8)  # four 128 px blocks: the engine's collection path, cheaply
    image = tmp_path / "scene.tif"
    write_scene(scene, image, tmp_path / "labels.tif")
    mosaic = tmp_path / "coarse.zarr"
    logits = coarse_logits(scene.labels, len(CLASSES), seed=3)
    write_label_mosaic(scene.labels, mosaic, chunk=64, shard=128, scores=logits,
                       lineage={"source": {"path": str(image), "level": 0}})
    alone = tmp_path / "alone.zarr"
    refine_mosaic(RefineConfig(str(mosaic), str(alone), crf=SMALL_CRF, progress=False))
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a", "b", "c"):
        shutil.copytree(mosaic, root / f"{name}.zarr")
    unfinished = Mosaic.open(root / "c.zarr", mode="r+")
    unfinished.group.attrs["tessera"] = {**unfinished.meta, "complete": False}
    (root / "notes.txt").write_text("not a mosaic")
    out = tmp_path / "refined"
    summary = refine_inputs(RefineConfig(str(root), str(out), crf=SMALL_CRF, progress=False))
    assert summary.count("done") == 2  # type: ignore[union-attr]
    (failed,) = summary.failed  # type: ignore[union-attr]
    assert failed.item.name == "c" and "not complete" in failed.error and not (out / "c.zarr").exists()
    expected = Mosaic.open(alone).read("scores", 0)
    for name in ("a", "b"):
        m = Mosaic.open(out / f"{name}.zarr")
        assert m.complete and m.lineage["refined"]["mosaic"] == str((root / f"{name}.zarr").resolve())
        np.testing.assert_array_equal(m.read("scores", 0), expected)
    rows = Manifest.read(out).rows
    assert sorted((Path(r.input).name, r.status) for r in rows) == [
        ("a.zarr", "done"), ("b.zarr", "done"), ("c.zarr", "failed")]
    again = refine_inputs(RefineConfig(str(root), str(out), crf=SMALL_CRF, progress=False))
    assert again.count("skipped") == 2 and len(again.failed) == 1  # type: ignore[union-attr]


def test_a_mosaic_on_object_storage_refines_into_object_storage(scene_mosaic: tuple[Path, Path, np.ndarray],
                                                                refined: tuple[Path, RefineSummary],
                                                                s3_bucket: str) -> None:
    import s3fs

    mosaic = scene_mosaic[0]
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(mosaic), f"{s3_bucket}/coarse.zarr", recursive=True)
    out = f"{s3_bucket}/refined.zarr"
    # The command, as users type it (its arguments are URLs, not paths).
    result = CliRunner().invoke(app, ["refine", f"{s3_bucket}/coarse.zarr", "--out", out, "--bilateral-sxy", "20",
                                      "--quiet", "--no-track"])
    assert result.exit_code == 0, result.output
    m, local = Mosaic.open(out), Mosaic.open(refined[0])
    assert m.complete and m.lineage["refined"]["mosaic"] == f"{s3_bucket}/coarse.zarr"
    for level in range(local.layout.num_levels):
        np.testing.assert_array_equal(m.read("scores", level), local.read("scores", level))
        np.testing.assert_array_equal(m.read("mask", level), local.read("mask", level))
    with pytest.raises(ConfigError, match="is, or is inside"):
        refine_mosaic(RefineConfig(out, f"{out}/again.zarr", crf=SMALL_CRF, progress=False))
