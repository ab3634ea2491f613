"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings) at the defaults, scored on a
held-out area through the production tiling and blending."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.training import TrainConfig, train


@pytest.mark.slow
def test_buildings_are_found_on_the_held_out_area_at_the_defaults(shared_data: Path, tmp_path: Path) -> None:
    # conf/data/spacenet_atlanta.yaml: the 900 x 900 px, 0.5 m panchromatic sample and its 43
    # footprints, burnt onto the image window by window. Rows split 60 / 20 / 20: train, validation,
    # holdout. Nothing but the catalog and the holdout is set: what `tessera train
    # catalog=spacenet_atlanta holdout_fraction=0.2` trains (in this process rather than a Ray worker).
    config = TrainConfig(image=None, labels=None, output=str(tmp_path / "buildings.bundle"),
                         catalog="spacenet_atlanta", holdout_fraction=0.2)
    result = train(config, progress=False)
    assert result.holdout is not None
    background, building = result.holdout["iou"]
    # Predicting background everywhere scores a building IoU of 0, and predicting buildings everywhere
    # 0.024 (3,828 of 162,000 holdout pixels: six buildings, most under trees). At the defaults (the
    # small U-Net from scratch, 300 steps of 16 windows of 128 px, balanced class weights) this run
    # measured 0.205 on this machine, seeds 1 and 2 0.131 and 0.126; with equal class weights, the old
    # default, 0.075, 0.054 and 0.054. 0.10 is above every equal-weights run and below every balanced
    # one, so the test fails if the defaults lose what balancing gained. The target, 0.35, is
    # not reached from scratch on 25 training buildings (docs/training.md, "Quality at defaults").
    assert building > 0.10
    # A background IoU above 0.85 rules out a model that finds buildings by painting everything.
    assert background > 0.85
