"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings) at the defaults, scored on a
held-out area through the production tiling and blending; and fine-tuning there from a bundle trained on
generated scenes (`init=`), against training from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetune import SAMPLE, figures, pretrain, run
from pipeline.training import TrainConfig, TrainResult, train

# SAMPLE: conf/data/spacenet_atlanta.yaml, the 900 x 900 px, 0.5 m panchromatic sample and its 43
# footprints, burnt onto the image window by window, rows split 60 / 20 / 20: train, validation, holdout.
# Nothing but the catalog and the holdout is set: what `tessera train catalog=spacenet_atlanta
# holdout_fraction=0.2` trains (in this process rather than a Ray worker).


@pytest.fixture(scope="module")
def scratch(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The defaults from scratch: 300 steps."""
    output = tmp_path_factory.mktemp("scratch") / "buildings.bundle"
    return train(TrainConfig(output=str(output), **SAMPLE), progress=False)  # type: ignore[arg-type]


@pytest.mark.slow(seconds=100)
def test_buildings_are_found_on_the_held_out_area_at_the_defaults(scratch: TrainResult) -> None:
    assert scratch.holdout is not None
    background, building = scratch.holdout["iou"]
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


@pytest.mark.slow(seconds=250)
def test_fine_tuning_from_generated_scenes_gets_there_in_fewer_steps(
    scratch: TrainResult, tmp_path: Path
) -> None:
    # The benchmark's recipe (bench/finetune.py), seed 0: a bundle trained at the defaults on a generated
    # scene in grey levels; then the sample at the defaults for half the steps, from that bundle (a fresh
    # head for the sample's two classes, the encoder at a fifth of the learning rate) and from scratch.
    generated = pretrain(tmp_path)
    half = int(scratch.history[-1]["step"]) // 2
    tuned = run(tmp_path, "init", 0, half, generated)  # each run prints its figures and curves
    short = run(tmp_path, "scratch-half", 0, half, None)
    print("scratch, the defaults:", figures(scratch))
    # Measured on this machine, seeds 0, 1, 2 (docs/training.md): init= 0.156, 0.160, 0.157 against
    # 0.140, 0.145, 0.138 from scratch with the same 150 steps, and 0.205, 0.131, 0.126 from scratch with
    # 300. The bundle from generated scenes is ahead at equal steps in every seed; so it is asserted here,
    # with the bar the scratch test sets after twice the steps. The holdout holds six buildings: which of
    # init= at 150 and scratch at 300 is ahead changes with the seed (scratch in seed 0, this one), so
    # that comparison is the benchmark's, over the seeds' medians (0.157 against 0.131).
    assert tuned["holdout_building_iou"] >= short["holdout_building_iou"]
    assert tuned["holdout_building_iou"] > 0.10
