"""Fine-tuning on the real SpaceNet Atlanta sample from a bundle trained on generated scenes (`init=`),
against training from scratch, scored on a held-out area through the production tiling and blending
(a module of its own, so that `make test` runs it beside the defaults' run in test_spacenet.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetune import pretrain, run
from pipeline.training import TrainConfig


@pytest.mark.slow(seconds=150)
def test_fine_tuning_from_generated_scenes_gets_there_in_fewer_steps(shared_data: Path, tmp_path: Path) -> None:
    # The benchmark's recipe (bench/finetune.py), seed 0, with the small U-Net from scratch (the training
    # default before the ImageNet encoder): a bundle trained on a generated scene in grey levels; then the
    # sample for 150 steps (half the default 300) from that bundle (a fresh head for the sample's two
    # classes, the encoder at a fifth of the learning rate) and from scratch.
    # The pretraining is shorter than the benchmark's (a 1024 px scene for 200 steps against 1536 px for
    # 400), to keep `make test` within its budget: measured on this machine, init= then scores 0.136.
    generated = pretrain(tmp_path, size=1024, steps=200)
    half = TrainConfig(image="i", labels="l", output="o").steps // 2
    tuned = run(tmp_path, "init", 0, half, generated)  # each run prints its figures and curves
    short = run(tmp_path, "scratch-half", 0, half, None)
    # Measured on this machine with the benchmark's pretraining, seeds 0, 1, 2 (docs/training.md): init=
    # 0.167, 0.146, 0.155 against 0.092, 0.142, 0.121 from scratch with the same 150 steps, and 0.172,
    # 0.145, 0.061 from scratch with 300. The bundle from generated scenes is ahead at equal steps in every
    # seed (and was before training took the channels_last layout), and with this shorter pretraining
    # (0.136 against 0.092); so that is asserted here, with a bar of 0.10 below every init= run. The
    # holdout holds six buildings: which of init= at 150 and scratch at 300 is ahead changes with the seed
    # (scratch in seed 0, this one), so that comparison is the benchmark's, over the seeds' medians (0.155
    # against 0.145).
    assert tuned["holdout_building_iou"] >= short["holdout_building_iou"]
    assert tuned["holdout_building_iou"] > 0.10
