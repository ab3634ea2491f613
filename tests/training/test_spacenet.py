"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings), scored on a held-out area."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.training import TrainConfig, train


@pytest.mark.slow
def test_buildings_are_found_on_the_held_out_area(shared_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # conf/data/spacenet_atlanta.yaml: the 900 x 900 px, 0.5 m panchromatic sample and its 43
    # footprints, rasterised onto the image. Rows split 60 / 20 / 20: train, validation, holdout.
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the catalog's paths are relative to the repo
    config = TrainConfig(
        image=None, labels=None, output=str(tmp_path / "buildings.bundle"), catalog="spacenet_atlanta",
        tile_size=256, batch_size=4, steps=200, steps_per_epoch=50, val_fraction=0.2, holdout_fraction=0.2,
        class_weights="balanced", elastic=0.0, threads=2,
    )
    result = train(config, progress=False)
    assert result.holdout is not None
    background, building = result.holdout["iou"]
    # Predicting background everywhere scores a building IoU of 0. This small U-Net, trained from
    # scratch for 200 steps on 540 rows (about 25 buildings), measured 0.133 on the holdout (six
    # buildings); 300 steps measured 0.111 to 0.191 over seeds 0-2 (bench.finetune), so the sample's
    # noise is larger than the gain of the last 100 steps. 0.08 leaves room for that noise while being
    # clearly above the baseline, and the background stays right.
    assert building > 0.08
    assert background > 0.85
