"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings) at the defaults, scored on a
held-out area through the production tiling and blending; and fine-tuning there from a bundle trained on
generated scenes (`init=`), against training from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetune import SAMPLE, figures, pretrain, run
from pipeline.training import TrainConfig, train

# SAMPLE: conf/data/spacenet_atlanta.yaml, the 900 x 900 px, 0.5 m panchromatic sample and its 43
# footprints, burnt onto the image window by window, rows split 60 / 20 / 20: train, validation, holdout.
# Nothing but the catalog and the holdout is set: what `tessera train catalog=spacenet_atlanta
# holdout_fraction=0.2` trains (in this process rather than a Ray worker).


@pytest.mark.slow(seconds=200)
def test_buildings_are_found_on_the_held_out_area_at_the_defaults(tmp_path: Path, shared_data: Path) -> None:
    result = train(TrainConfig(output=str(tmp_path / "buildings.bundle"), **SAMPLE), progress=False)  # type: ignore[arg-type]
    print("the defaults:", figures(result))
    assert result.holdout is not None
    background, building = result.holdout["iou"]
    # Predicting background everywhere scores a building IoU of 0, and predicting buildings everywhere
    # 0.024 (3,828 of 162,000 holdout pixels: six buildings, most under trees). At the defaults (a U-Net
    # whose EfficientNet-Lite0 encoder starts from ImageNet, 300 steps of 16 windows of 128 px, balanced
    # class weights) this run measured 0.310 on this machine, seeds 1 and 2 0.375 and 0.335 (median 0.335;
    # the target, 0.35, is reached in one seed of three, docs/training.md "Quality at defaults").
    # The old default, the small U-Net from scratch, measured 0.205, 0.131 and 0.126, and a ResNet-18 U-Net
    # from scratch at twice the time 0.251, 0.196 and 0.241. 0.28 is above all of those and below every
    # seed at the defaults, so the test fails if the defaults lose what the ImageNet start gained.
    assert building > 0.28
    # A background IoU above 0.85 rules out a model that finds buildings by painting everything.
    assert background > 0.85


@pytest.mark.slow(seconds=250)
def test_fine_tuning_from_generated_scenes_gets_there_in_fewer_steps(shared_data: Path, tmp_path: Path) -> None:
    # The benchmark's recipe (bench/finetune.py), seed 0, with the small U-Net from scratch (the training
    # default before the ImageNet encoder): a bundle trained on a generated scene in grey levels; then the
    # sample for 150 steps (half the default 300) from that bundle (a fresh head for the sample's two
    # classes, the encoder at a fifth of the learning rate) and from scratch.
    generated = pretrain(tmp_path)
    half = TrainConfig(image="i", labels="l", output="o").steps // 2
    tuned = run(tmp_path, "init", 0, half, generated)  # each run prints its figures and curves
    short = run(tmp_path, "scratch-half", 0, half, None)
    # Measured on this machine, seeds 0, 1, 2 (docs/training.md): init= 0.156, 0.160, 0.157 against
    # 0.140, 0.145, 0.138 from scratch with the same 150 steps, and 0.205, 0.131, 0.126 from scratch with
    # 300. The bundle from generated scenes is ahead at equal steps in every seed; so it is asserted here,
    # with the bar below every 300-step run from scratch with balanced class weights and above every one
    # with equal weights (0.075, 0.054, 0.054). The holdout holds six buildings: which of init= at 150 and
    # scratch at 300 is ahead changes with the seed (scratch in seed 0), so that comparison is the
    # benchmark's, over the seeds' medians (0.157 against 0.131).
    assert tuned["holdout_building_iou"] >= short["holdout_building_iou"]
    assert tuned["holdout_building_iou"] > 0.10
