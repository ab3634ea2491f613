"""The training loop end to end on tiny synthetic scenes, its loss, its validation, its job."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from omegaconf import DictConfig
from rasterio.transform import from_origin

from jobs.train import to_config
from pipeline.cli import compose
from pipeline.errors import ConfigError, SourceNotFoundError, StorageError
from pipeline.models import ClassInfo, ModelBundle
from pipeline.storage import Location, storage_for
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.training import (
    DEFAULT_ARCH_ARGS,
    TrainConfig,
    balanced_weights,
    compute_normalization,
    open_labelled_image,
    sample_pixels,
    split_by_area,
    train,
)
from pipeline.training.loop import uses_bf16
from tests.servers.ports import start_server

REPO = Path(__file__).resolve().parents[2]
TINY_FCN = {"depth": 3, "width": 16}


def tiny_config(scene_files: tuple[str, str], output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "architecture": "fcn", "arch_args": TINY_FCN, "tile_size": 64, "inference_tile_size": 128,
        "overlap": 16, "batch_size": 8, "steps": 30, "lr": 0.02, "steps_per_epoch": 10, "threads": 1,
    }
    settings.update(overrides)
    return TrainConfig(image=scene_files[0], labels=scene_files[1], output=str(output), **settings)  # type: ignore[arg-type]


# The loop


def test_tiny_run_learns_and_writes_a_loadable_bundle(scene_files: tuple[str, str], tmp_path: Path) -> None:
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    config = tiny_config(scene_files, tmp_path / "out" / "model.bundle")
    result = train(config, progress=False)

    assert [h["step"] for h in result.history] == [10, 20, 30]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.val_miou == max(h["val_miou"] for h in result.history)
    assert len(result.val_iou) == len(CLASSES) and result.seconds > 0
    # train() leaves the caller's torch settings alone.
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)

    bundle = ModelBundle.load(result.bundle_path)
    assert bundle.sha256 == result.sha256
    raster = open_labelled_image(*scene_files)
    split = split_by_area(raster.height, raster.width, config.val_fraction, config.tile_size)
    assert bundle.spec.normalization == compute_normalization(sample_pixels(raster, split.train))
    assert bundle.spec.classes == CLASSES
    assert bundle.spec.bands == (1, 2, 3)
    assert (bundle.spec.resolution, bundle.spec.resolution_unit) == (0.5, "m")
    assert (bundle.spec.architecture, dict(bundle.spec.arch_args)) == ("fcn", TINY_FCN)
    assert (bundle.spec.tile_size, bundle.spec.overlap) == (128, 16)


def test_same_seed_same_run(scene_files: tuple[str, str], tmp_path: Path) -> None:
    first = train(tiny_config(scene_files, tmp_path / "a.bundle", steps=4, steps_per_epoch=2), progress=False)
    second = train(tiny_config(scene_files, tmp_path / "b.bundle", steps=4, steps_per_epoch=2), progress=False)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert first.sha256 == second.sha256


def test_training_data_and_bundle_on_object_storage_train_as_local_files(
    scene_files: tuple[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    urls = []
    for path in scene_files:
        url = Location.parse(f"{s3_bucket}/train/{Path(path).name}")
        storage_for(url).write_bytes(url, Path(path).read_bytes())
        urls.append(url.url)
    # And a web server (its own process: GDAL's reads would wait on a server thread in this one).
    server, port = start_server(lambda port: subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
         str(Path(scene_files[0]).parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), seconds=20)
    web = [f"http://127.0.0.1:{port}/{Path(path).name}" for path in scene_files]
    local = train(tiny_config(scene_files, tmp_path / "a.bundle", steps=4, steps_per_epoch=2), progress=False)
    output = f"{s3_bucket}/models/m.bundle"
    remote = train(tiny_config((urls[0], urls[1]), output, steps=4, steps_per_epoch=2), progress=False)  # type: ignore[arg-type]
    assert [h["loss"] for h in remote.history] == [h["loss"] for h in local.history]
    assert remote.bundle_path == output and ModelBundle.load(output).sha256 == remote.sha256 == local.sha256
    try:
        over_http = train(tiny_config((web[0], web[1]), tmp_path / "w.bundle", steps=4, steps_per_epoch=2),  # type: ignore[arg-type]
                          progress=False)
        assert over_http.sha256 == local.sha256
        with pytest.raises(SourceNotFoundError, match="does not exist"):
            train(tiny_config((web[0] + ".missing", web[1]), tmp_path / "x.bundle", steps=4), progress=False)  # type: ignore[arg-type]
    finally:
        server.terminate()
        server.wait(10)
    with pytest.raises(StorageError, match="does not exist: create it"):  # at once, not after the training
        train(tiny_config(scene_files, f"{s3_bucket}-missing/m.bundle", steps=4), progress=False)  # type: ignore[arg-type]


def test_unet3plus_deep_supervision_trains(scene_files: tuple[str, str], tmp_path: Path) -> None:
    arch_args = {"encoder_name": "resnet18", "encoder_depth": 3, "cat_channels": 8}
    config = tiny_config(scene_files, tmp_path / "u3p.bundle", architecture="unet3plus",
                         arch_args=arch_args, batch_size=2, steps=2, steps_per_epoch=2)
    result = train(config, progress=False)
    assert np.isfinite(result.history[-1]["loss"])
    assert ModelBundle.load(result.bundle_path).spec.architecture == "unet3plus"


def test_labels_beyond_the_synthetic_classes_get_generic_ones(tmp_path: Path) -> None:
    scene = generate_scene(128, 128, seed=0)
    labels = scene.labels.copy()
    labels[:8, :8] = 6
    write_scene(type(scene)(image=scene.image, labels=labels), tmp_path / "i.tif", tmp_path / "l.tif")
    files = (str(tmp_path / "i.tif"), str(tmp_path / "l.tif"))
    result = train(tiny_config(files, tmp_path / "m.bundle", steps=1, steps_per_epoch=1), progress=False)
    classes = ModelBundle.load(result.bundle_path).spec.classes
    assert [c.name for c in classes] == [f"class_{i}" for i in range(7)]
    assert len({c.color for c in classes}) == 7
    with pytest.raises(ConfigError, match=r"values \[0, 1, 2, 3, 4, 6\], class ids up to 6, but only 5 classes.*"
                                          r"label_map=\{6: 4\}"):
        train(tiny_config(files, tmp_path / "m.bundle", classes=CLASSES), progress=False)


def test_precision_sets_the_arithmetic_of_the_step(scene_files: tuple[str, str], tmp_path: Path) -> None:
    runs = {p: train(tiny_config(scene_files, tmp_path / f"{p}.bundle", steps=2, steps_per_epoch=2, precision=p),
                     progress=False) for p in ("fp32", "bf16")}
    losses = {p: run.history[-1]["loss"] for p, run in runs.items()}
    assert all(np.isfinite(loss) for loss in losses.values())
    assert losses["fp32"] != losses["bf16"]  # bf16 autocast took effect (on CPU too)
    assert ModelBundle.load(runs["bf16"].bundle_path).model.state_dict()["head.weight"].dtype == torch.float32
    # auto: bf16 on GPUs (no GPU needed to ask); on a CPU, where it has bfloat16 instructions.
    assert uses_bf16("auto", torch.device("cuda")) and not uses_bf16("fp32", torch.device("cuda"))


def test_missing_raster_is_source_not_found(scene_files: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        train(tiny_config((str(tmp_path / "nope.tif"), scene_files[1]), tmp_path / "m.bundle"))
    assert not (tmp_path / "m.bundle").exists()


def test_unlabelled_validation_area_is_a_config_error(tmp_path: Path) -> None:
    scene = generate_scene(128, 128, seed=0)
    labels = scene.labels.copy()
    labels[100:] = 255
    write_scene(type(scene)(image=scene.image, labels=labels), tmp_path / "i.tif", tmp_path / "l.tif")
    with pytest.raises(ConfigError, match=r"validation area .* holds no labelled pixel"):
        train(tiny_config((str(tmp_path / "i.tif"), str(tmp_path / "l.tif")), tmp_path / "m.bundle"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tile_size": 100}, "tile_size=100"),
        ({"inference_tile_size": 0}, "inference_tile_size=0"),
        ({"overlap": 65, "inference_tile_size": 128}, "overlap=65"),
        ({"steps": 0}, "steps=0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"threads": 0}, "threads=0"),
        ({"polygons": "p.geojson"}, "exactly one of labels"),
        ({"class_weights": "inverse"}, "class_weights='inverse'"),
        ({"loss": "hybrid"}, "Unknown loss preset"),
        ({"holdout_fraction": 1.5}, "holdout_fraction=1.5"),
        ({"holdout_fraction": 0.5, "val_fraction": 0.5}, "leave no training rows"),
        ({"precision": "fp16"}, "precision='fp16' is invalid; use one of auto, bf16, fp32"),
    ],
)
def test_config_is_validated(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(image="i.tif", labels="l.tif", output="m.bundle", **overrides)  # type: ignore[arg-type]


def bright_squares(folder: Path, size: int = 256) -> tuple[str, str]:
    """A GeoTIFF of bright squares on a noisy dark ground, and the squares as GeoJSON in its CRS."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60, (1, size, size)).astype(np.uint16)
    features = []
    origin_x, origin_y, pixel = 500_000.0, 4_000_000.0, 0.5
    for _ in range(40):
        y, x = rng.integers(0, size - 12, 2)
        image[0, y : y + 12, x : x + 12] += 150
        x0, y0 = origin_x + x * pixel, origin_y - y * pixel
        ring = [[x0, y0], [x0 + 6, y0], [x0 + 6, y0 - 6], [x0, y0 - 6], [x0, y0]]
        features.append({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path = folder / "squares.tif"
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=1, dtype="uint16",
                       crs="EPSG:32616", transform=from_origin(origin_x, origin_y, pixel, pixel)) as dst:
        dst.write(image)
    geojson = folder / "squares.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features,
                                   "crs": {"type": "name", "properties": {"name": "EPSG:32616"}}}))
    return str(path), str(geojson)


def test_polygons_train_and_the_best_model_is_scored_on_the_holdout(tmp_path: Path) -> None:
    image, polygons = bright_squares(tmp_path)
    config = TrainConfig(
        image=image, labels=None, polygons=polygons, output=str(tmp_path / "m.bundle"), architecture="fcn",
        arch_args=TINY_FCN, tile_size=64, inference_tile_size=128, overlap=16, batch_size=8, steps=40, lr=0.02,
        steps_per_epoch=20, threads=1, val_fraction=0.25, holdout_fraction=0.25, loss="unet3plus_hybrid",
        class_weights="balanced",
    )
    result = train(config, progress=False)
    assert ModelBundle.load(result.bundle_path).spec.classes[1].name == "object"
    assert result.holdout is not None and set(result.holdout) == {"miou", "iou", "dice", "pixel_accuracy"}
    # All-background scores 0 on the object class; bright squares are easy to find.
    assert result.holdout["iou"][1] > 0.5


def test_balanced_weights_are_inverse_frequency_with_mean_one() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[:2] = 1  # class 1 in the top 2 rows, class 0 below, class 2 absent
    labels[0, 0] = 255  # one unlabelled pixel: counts are 80 and 19
    w0, w1, w2 = balanced_weights(np.bincount(labels.ravel(), minlength=256), 3)
    assert w1 / w0 == pytest.approx(80 / 19)
    assert (w0 + w1) / 2 == pytest.approx(1.0) and w2 == 1.0


def test_a_truth_is_required() -> None:
    with pytest.raises(ConfigError, match="exactly one of labels"):
        TrainConfig(image="i.tif", labels=None, output="m.bundle")


def test_default_arch_args_depend_on_the_architecture() -> None:
    assert TrainConfig("i", "l", "o").arch_args == dict(DEFAULT_ARCH_ARGS)
    assert TrainConfig("i", "l", "o", architecture="fcn").arch_args == {}
    assert TrainConfig("i", "l", "o", arch_args={"encoder_name": "resnet34"}).arch_args == {
        "encoder_name": "resnet34"
    }


# The job


def run_job(args: list[str], cwd: Path, default_store: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if default_store:  # tracking to ./mlflow.db, as a user's first run does
        env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_job_trains_and_leaves_nothing_else_behind(scene_files: tuple[str, str], tmp_path: Path) -> None:
    image, labels = scene_files
    run = run_job(
        [f"image={image}", f"labels={labels}", "output=model.bundle", "architecture=fcn",
         "arch_args={depth: 1, width: 4}", "tile_size=64", "batch_size=2", "steps=2", "steps_per_epoch=2",
         "cluster.threads=1", "progress=false", "cluster.workers=0"],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "validation mIoU" in run.stdout
    assert os.listdir(tmp_path) == ["model.bundle"]
    assert ModelBundle.load(tmp_path / "model.bundle").spec.arch_args == {"depth": 1, "width": 4}


def test_job_reports_user_errors_on_one_line(scene_files: tuple[str, str], tmp_path: Path) -> None:
    run = run_job([f"image={tmp_path / 'nope.tif'}", f"labels={scene_files[1]}", "output=m.bundle"], tmp_path,
                  default_store=True)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nope.tif" in errors[0] and "does not exist" in errors[0]
    assert os.listdir(tmp_path) == []  # no ./mlflow.db, no mlruns: the run is not opened for it


def compose_train(overrides: list[str]) -> DictConfig:
    return compose("train", overrides)


def test_job_config_becomes_a_train_config() -> None:
    cfg = compose_train([
        "image=i.tif", "labels=l.tif", "output=m.bundle", "bands=[3,1]", "steps=7",
        "classes=[{name: land, color: [1, 2, 3]}, {name: sea, color: [4, 5, 6]}]",
    ])
    config = to_config(cfg)
    assert (config.image, config.labels, config.output, config.steps) == ("i.tif", "l.tif", "m.bundle", 7)
    assert config.bands == (3, 1)
    assert config.classes == (ClassInfo("land", (1, 2, 3)), ClassInfo("sea", (4, 5, 6)))
    assert config.arch_args == dict(DEFAULT_ARCH_ARGS)
    # Every setting of the train job but `progress` is a TrainConfig field with the same default.
    defaults = TrainConfig("i.tif", "l.tif", "m.bundle")
    assert to_config(compose_train(["image=i.tif", "labels=l.tif", "output=m.bundle"])) == defaults


def test_job_config_without_a_required_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Give an image and exactly one of labels"):
        to_config(compose_train(["labels=l.tif", "output=m.bundle"]))
    with pytest.raises(ConfigError, match="output is not set"):
        to_config(compose_train(["image=i.tif", "labels=l.tif"]))
    with pytest.raises(ConfigError, match="classes"):
        to_config(compose_train(["image=i", "labels=l", "output=o", "classes=[{title: x}]"]))


def test_a_0_255_mask_is_refused_naming_label_map_and_trains_with_it(scene_files: tuple[str, str],
                                                                    tmp_path: Path) -> None:
    """The commonest mask in the wild: 255 is the object, but 255 means unlabelled in tessera."""
    with rasterio.open(scene_files[1]) as src:
        profile, labels = src.profile, src.read(1)
    mask = np.where(labels == 1, 255, 0).astype(np.uint8)  # one class as a 0/255 mask
    path = tmp_path / "mask.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mask, 1)
    files = (scene_files[0], str(path))
    with pytest.raises(ConfigError, match=r"values \[0, 255\].*label_map=\{255: 1\}"):
        train(tiny_config(files, tmp_path / "a.bundle", steps=2), progress=False)
    two = (ClassInfo("background", (0, 0, 0)), ClassInfo("building", (230, 60, 60)))
    with pytest.raises(ConfigError, match=r"\['building'\] have no labelled pixel in the training area.*"
                                          r"label_map=\{255: 1\}"):
        train(tiny_config(files, tmp_path / "b.bundle", steps=2, classes=two), progress=False)
    assert not (tmp_path / "a.bundle").exists() and not (tmp_path / "b.bundle").exists()
    # On Ray Train workers, the driver refuses it before any worker starts (no checkpoint folder is made).
    from pipeline.training.distributed import Distributed, fit

    with pytest.raises(ConfigError, match=r"label_map=\{255: 1\}"):
        fit(tiny_config(files, tmp_path / "d.bundle"), Distributed(workers=2, storage=str(tmp_path / "checkpoints")))
    assert not (tmp_path / "checkpoints").exists()

    cfg = compose_train([f"image={files[0]}", f"labels={files[1]}", f"output={tmp_path / 'c.bundle'}",
                         "label_map={255: 1}"])
    config = dataclasses.replace(tiny_config(files, tmp_path / "c.bundle", steps=4, steps_per_epoch=2),
                                 label_map=to_config(cfg).label_map)
    assert config.label_map == {255: 1}
    result = train(config, progress=False)
    bundle = ModelBundle.load(result.bundle_path)
    assert [c.name for c in bundle.spec.classes] == ["background", "water"]  # the synthetic names of ids 0, 1
    assert len(result.val_iou) == 2 and not np.isnan(result.val_iou).any()
    with pytest.raises(ConfigError, match="out of range"):
        dataclasses.replace(config, label_map={300: 1})


def test_loader_processes_give_the_batches_of_one_process(scene_files: tuple[str, str], tmp_path: Path) -> None:
    # Each step draws from its own seed, so two loader processes (reading and augmenting beside the step)
    # train the very same model as reading in this process.
    runs = [train(tiny_config(scene_files, tmp_path / f"{n}.bundle", steps=6, steps_per_epoch=3, loader_workers=n),
                  progress=False) for n in (0, 2)]
    assert runs[0].sha256 == runs[1].sha256
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
