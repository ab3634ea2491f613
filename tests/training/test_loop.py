"""The training loop end to end on tiny synthetic scenes, its loss, its validation, its job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from jobs.train import to_config
from pipeline.errors import ConfigError, SourceNotFoundError
from pipeline.models import ClassInfo, DeepSupervisionOutput, ModelBundle, Normalization, build_model
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.training import (
    DEFAULT_ARCH_ARGS,
    SegmentationLoss,
    TrainConfig,
    compute_normalization,
    predict_area,
    read_labelled_raster,
    split_by_area,
    train,
)

REPO = Path(__file__).resolve().parents[2]
TINY_FCN = {"depth": 3, "width": 16}


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("scene")
    image, labels = folder / "scene.tif", folder / "labels.tif"
    write_scene(generate_scene(256, 256, seed=11), image, labels)
    return str(image), str(labels)


def tiny_config(scene_files: tuple[str, str], output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "architecture": "fcn", "arch_args": TINY_FCN, "tile_size": 64, "inference_tile_size": 128,
        "overlap": 16, "batch_size": 8, "steps": 30, "lr": 0.02, "val_every": 10, "threads": 1,
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
    raster = read_labelled_raster(*scene_files)
    split = split_by_area(raster.height, raster.width, config.val_fraction, config.tile_size)
    assert bundle.spec.normalization == compute_normalization(raster.image[:, split.train])
    assert bundle.spec.classes == CLASSES
    assert bundle.spec.bands == (1, 2, 3)
    assert (bundle.spec.resolution, bundle.spec.resolution_unit) == (0.5, "m")
    assert (bundle.spec.architecture, dict(bundle.spec.arch_args)) == ("fcn", TINY_FCN)
    assert (bundle.spec.tile_size, bundle.spec.overlap) == (128, 16)


def test_same_seed_same_run(scene_files: tuple[str, str], tmp_path: Path) -> None:
    first = train(tiny_config(scene_files, tmp_path / "a.bundle", steps=4, val_every=2), progress=False)
    second = train(tiny_config(scene_files, tmp_path / "b.bundle", steps=4, val_every=2), progress=False)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert first.sha256 == second.sha256


def test_unet3plus_deep_supervision_trains(scene_files: tuple[str, str], tmp_path: Path) -> None:
    arch_args = {"encoder_name": "resnet18", "encoder_depth": 3, "cat_channels": 8}
    config = tiny_config(scene_files, tmp_path / "u3p.bundle", architecture="unet3plus",
                         arch_args=arch_args, batch_size=2, steps=2, val_every=2)
    result = train(config, progress=False)
    assert np.isfinite(result.history[-1]["loss"])
    assert ModelBundle.load(result.bundle_path).spec.architecture == "unet3plus"


def test_labels_beyond_the_synthetic_classes_get_generic_ones(tmp_path: Path) -> None:
    scene = generate_scene(128, 128, seed=0)
    labels = scene.labels.copy()
    labels[:8, :8] = 6
    write_scene(type(scene)(image=scene.image, labels=labels), tmp_path / "i.tif", tmp_path / "l.tif")
    files = (str(tmp_path / "i.tif"), str(tmp_path / "l.tif"))
    result = train(tiny_config(files, tmp_path / "m.bundle", steps=1, val_every=1), progress=False)
    classes = ModelBundle.load(result.bundle_path).spec.classes
    assert [c.name for c in classes] == [f"class_{i}" for i in range(7)]
    assert len({c.color for c in classes}) == 7
    with pytest.raises(ConfigError, match="class id 6 but only 5 classes"):
        train(tiny_config(files, tmp_path / "m.bundle", classes=CLASSES), progress=False)


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
    ],
)
def test_config_is_validated(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(image="i.tif", labels="l.tif", output="m.bundle", **overrides)  # type: ignore[arg-type]


def test_default_arch_args_depend_on_the_architecture() -> None:
    assert TrainConfig("i", "l", "o").arch_args == dict(DEFAULT_ARCH_ARGS)
    assert TrainConfig("i", "l", "o", architecture="fcn").arch_args == {}
    assert TrainConfig("i", "l", "o", arch_args={"encoder_name": "resnet34"}).arch_args == {
        "encoder_name": "resnet34"
    }


# Validation inference


def test_area_prediction_is_independent_of_the_tiling() -> None:
    # A per-pixel classifier (FCN of depth 0) gives the same answer however the area is tiled.
    torch.manual_seed(0)
    model = build_model("fcn", in_channels=3, classes=5, depth=0)
    image = np.random.default_rng(0).integers(0, 256, (3, 50, 70), dtype=np.uint8)
    norm = Normalization()
    whole = model.eval()(norm.apply(torch.from_numpy(image)[None])).argmax(1)[0].numpy()
    for tile in (32, 64, 512):
        np.testing.assert_array_equal(predict_area(model, image, norm, tile), whole)


# The loss


def test_loss_is_cross_entropy_plus_dice_and_ignores_255() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    loss = SegmentationLoss()
    plain = SegmentationLoss(dice_weight=0.0)
    assert float(plain(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target)))
    assert float(loss(logits, target)) > float(plain(logits, target))
    ignored = target.clone()
    ignored[:, :4] = 255
    changed = logits.clone()
    changed[:, :, :4] = 100.0  # whatever the model says on unlabelled pixels does not matter
    assert float(loss(changed, ignored)) == pytest.approx(float(loss(logits, ignored)))
    assert float(loss(logits, torch.full_like(target, 255))) == 0.0


def test_deep_supervision_loss_is_the_mask_mean_plus_label_bce() -> None:
    torch.manual_seed(0)
    masks = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    labels = torch.randn(2, 1)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[1, 2, 2] = 2  # image 0 is all background, image 1 holds foreground
    loss = SegmentationLoss(label_weight=0.5)
    expected = (loss(masks[0], target) + loss(masks[1], target)) / 2
    expected = expected + 0.5 * F.binary_cross_entropy_with_logits(labels[:, 0], torch.tensor([0.0, 1.0]))
    actual = loss(DeepSupervisionOutput(masks=masks, labels=labels), target)
    assert float(actual) == pytest.approx(float(expected))
    without_labels = loss(DeepSupervisionOutput(masks=masks, labels=None), target)
    mask_mean = (loss(masks[0], target) + loss(masks[1], target)) / 2
    assert float(without_labels) == pytest.approx(float(mask_mean))


# The job


def run_job(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_job_trains_and_leaves_nothing_else_behind(scene_files: tuple[str, str], tmp_path: Path) -> None:
    image, labels = scene_files
    run = run_job(
        [f"image={image}", f"labels={labels}", "output=model.bundle", "architecture=fcn",
         "arch_args={depth: 1, width: 4}", "tile_size=64", "batch_size=2", "steps=2", "val_every=2",
         "threads=1", "progress=false"],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "validation mIoU" in run.stdout
    assert os.listdir(tmp_path) == ["model.bundle"]
    assert ModelBundle.load(tmp_path / "model.bundle").spec.arch_args == {"depth": 1, "width": 4}


def test_job_reports_user_errors_on_one_line(scene_files: tuple[str, str], tmp_path: Path) -> None:
    run = run_job([f"image={tmp_path / 'nope.tif'}", f"labels={scene_files[1]}", "output=m.bundle"], tmp_path)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nope.tif" in errors[0] and "does not exist" in errors[0]
    assert os.listdir(tmp_path) == []


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


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
    # Every setting in conf/train.yaml but `progress` is a TrainConfig field with the same default.
    defaults = TrainConfig("i.tif", "l.tif", "m.bundle")
    assert to_config(compose_train(["image=i.tif", "labels=l.tif", "output=m.bundle"])) == defaults


def test_job_config_without_a_required_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="image is not set"):
        to_config(compose_train(["labels=l.tif", "output=m.bundle"]))
    with pytest.raises(ConfigError, match="classes"):
        to_config(compose_train(["image=i", "labels=l", "output=o", "classes=[{title: x}]"]))
