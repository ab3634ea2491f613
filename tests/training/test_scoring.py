"""Training scores a model the way the segment job segments: the same figures on the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.execution import SegmentConfig, segment
from pipeline.mosaic import Mosaic
from pipeline.synthetic import generate_scene, write_scene
from pipeline.training import TrainConfig, split_by_area, train
from pipeline.training.loop import score_holdout
from pipeline.training.metrics import SegmentationMetrics

pytestmark = pytest.mark.usefixtures("ray_session")


def test_validation_and_holdout_scores_are_those_of_the_mosaic_the_segment_job_writes(tmp_path: Path) -> None:
    image, labels = tmp_path / "scene.tif", tmp_path / "labels.tif"
    write_scene(generate_scene(330, 300, seed=5), image, labels)
    config = TrainConfig(str(image), str(labels), str(tmp_path / "m.bundle"), architecture="fcn",
                         arch_args={"depth": 3, "width": 16}, tile_size=64, inference_tile_size=128, overlap=16,
                         batch_size=8, steps=20, steps_per_epoch=10, lr=0.02, val_fraction=0.25,
                         holdout_fraction=0.25, threads=1)
    result = train(config, progress=False)
    # The whole image through the segment job, in 256 px blocks on 2 workers (tiles across block edges are
    # blended from seams), with the bundle's own tile and overlap.
    segment(SegmentConfig(source=str(image), model=result.bundle_path, output=str(tmp_path / "m.zarr"), chunk=128,
                          shard=256, block=256, workers=2, progress=False))
    mask = Mosaic.open(tmp_path / "m.zarr").read("mask")
    with rasterio.open(labels) as src:
        truth = src.read(1)
    split = split_by_area(330, 300, config.val_fraction, config.tile_size, config.holdout_fraction)

    def mosaic_scores(rows: slice) -> dict[str, object]:
        metrics = SegmentationMetrics(5)
        metrics.update(mask[rows], truth[rows])
        return metrics.compute()

    validation, holdout = mosaic_scores(split.val), mosaic_scores(split.holdout)
    assert 0.2 < holdout["miou"] < 1  # a model that learnt something, and not everything  # type: ignore[operator]
    # The best epoch's validation figures are those of the saved bundle's mosaic on the validation rows ...
    np.testing.assert_array_equal(result.val_iou, validation["iou"])
    assert result.val_miou == validation["miou"]
    # ... and its holdout figures (which the nightly job compares champion and challenger on) those on the
    # holdout rows.
    assert result.holdout is not None
    for key in ("iou", "dice", "miou", "pixel_accuracy"):
        np.testing.assert_array_equal(result.holdout[key], holdout[key])
        np.testing.assert_array_equal(score_holdout(result.bundle_path, config)[key], holdout[key])
