"""`make demo`: generate a scene, fit the default model on another, segment it, score it against the truth.

Everything goes through the same code a user runs: the scene is a tiled GeoTIFF, the model a bundle
file, and segmentation is the real `segment` job (embedded Ray, blocks, Zarr mosaic, pyramid).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from pipeline.execution import SegmentConfig, SegmentSummary, segment
from pipeline.mosaic import Mosaic
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.tracking import Tracking
from pipeline.training import TrainConfig, train
from pipeline.training.metrics import confusion_matrix, iou_per_class, mean_iou

TRAIN_SEED, SCENE_SEED = 7, 2026
TRAIN_SIZE = 2048


def ensure_scene(workdir: Path, name: str, size: int, seed: int) -> tuple[Path, Path]:
    """Write a synthetic scene and its truth once; later runs reuse the files."""
    image, labels = workdir / f"{name}.tif", workdir / f"{name}_truth.tif"
    if not (image.exists() and labels.exists()):
        write_scene(generate_scene(size, size, seed), image, labels)
    return image, labels


def score(mosaic: Mosaic, truth: Path, num_classes: int) -> np.ndarray:
    """Confusion matrix of the mosaic's mask against a truth raster, read shard by shard."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    step = mosaic.layout.shard
    mask = mosaic.array("mask")
    with rasterio.open(truth) as src:
        for y in range(0, src.height, step):
            for x in range(0, src.width, step):
                win = rasterio.windows.Window(x, y, min(step, src.width - x), min(step, src.height - y))
                t = src.read(1, window=win)
                p = np.asarray(mask[y : y + t.shape[0], x : x + t.shape[1]])
                cm += confusion_matrix(p, t, num_classes)
    return cm


def write_preview(mosaic: Mosaic, image: Path, truth: Path, path: Path, max_size: int = 800) -> Path:
    """A PNG of image | truth | prediction, from the coarsest pyramid level that is at least max_size/2."""
    from PIL import Image

    level = mosaic.preview_level(max_size)
    pred = mosaic.render_mask(level)
    h, w = pred.shape[:2]
    palette = mosaic.palette
    with rasterio.open(image) as src:
        rgb = src.read((1, 2, 3), out_shape=(3, h, w), resampling=Resampling.average).transpose(1, 2, 0)
    with rasterio.open(truth) as src:
        t = src.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    gap = np.full((h, 8, 3), 255, np.uint8)
    Image.fromarray(np.hstack([rgb, gap, palette[t], gap, pred])).save(path)
    return path


def run_demo(
    workdir: Path, size: int = 6000, train_size: int = TRAIN_SIZE, steps: int | None = None
) -> tuple[SegmentSummary, float]:
    """Run the demo end to end and print what it measured; returns the summary and the mIoU.

    Args:
        workdir: folder for the scenes, bundle, mosaic and preview (scenes are reused if present).
        size: edge of the scene to segment; train_size: edge of the training scene.
        steps: training steps; None takes the trainer's default.
    """
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"1/4 scenes: {train_size} px training scene, {size} px scene to segment (synthetic, seeded)")
    train_image, train_truth = ensure_scene(workdir, "train_scene", train_size, TRAIN_SEED)
    image, truth = ensure_scene(workdir, "scene", size, SCENE_SEED)

    print("2/4 training the default U-Net on the training scene")
    bundle = workdir / "model.bundle"
    config = TrainConfig(image=str(train_image), labels=str(train_truth), output=str(bundle))
    if steps is not None:
        config = dataclasses.replace(config, steps=steps, steps_per_epoch=steps)
    trained = train(config)
    print(f"    validation mIoU {trained.val_miou:.3f} after {trained.seconds:.0f} s")

    print("3/4 segmenting the scene through the segment job (embedded Ray, Zarr mosaic)")
    tracking = Tracking(uri=f"sqlite:///{(workdir / 'mlflow.db').resolve()}")
    summary = segment(SegmentConfig(source=str(image), model=str(bundle), output=str(workdir / "scene.zarr"),
                                    overwrite=True, tracking=tracking))
    print(summary.describe())

    print("4/4 scoring the mosaic against the known truth")
    mosaic = Mosaic.open(summary.output)
    cm = score(mosaic, truth, len(CLASSES))
    ious = iou_per_class(cm)
    miou = mean_iou(cm)
    for c, iou in zip(CLASSES, ious, strict=True):
        print(f"    IoU {c.name:<11} {iou:.3f}")
    print(f"mIoU against the known truth: {miou:.3f}")
    preview = write_preview(mosaic, image, truth, workdir / "preview.png")
    print(f"preview (image | truth | prediction): {preview}")
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")
    print(f"look at it: tessera serve {workdir} (then open http://127.0.0.1:8000/view/scene.zarr)")
    return summary, miou
