"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings) at the defaults, scored on a
held-out area through the production tiling and blending (fine-tuning there: test_finetune.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetune import SAMPLE, figures
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
    # class weights, channels_last) this run measured 0.351 on this machine, seeds 1 to 4 0.312, 0.339,
    # 0.300 and 0.323 (median 0.323; in the default memory layout 0.310, 0.375, 0.335: docs/training.md
    # "Quality at defaults"). The target is 0.35; this machine's 0.351 is not asserted, because
    # another CPU takes another path through training and the seeds show how far that moves the figure.
    # The old default, the small U-Net from scratch, measured 0.205, 0.131 and 0.126, and a ResNet-18
    # U-Net from scratch 0.251, 0.196 and 0.241. 0.28 is above all of those and below every seed at the
    # defaults on CPU in either layout, so the test fails if the defaults lose what the ImageNet start
    # gained.
    assert building > 0.28
    # A background IoU above 0.85 rules out a model that finds buildings by painting everything.
    assert background > 0.85
