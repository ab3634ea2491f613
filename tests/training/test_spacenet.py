"""Training on the real SpaceNet Atlanta sample (image + GeoJSON buildings) at the defaults, scored on a
held-out area through the production tiling and blending (fine-tuning there: test_finetune.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.finetune import SAMPLE, figures
from pipeline.training import TrainConfig, train

# SAMPLE: conf/data/spacenet_atlanta.yaml, the 900 x 900 px, 0.5 m panchromatic sample and its 43
# footprints, burnt onto the image in tiles, rows split 60 / 20 / 20: train, validation, holdout.
# Nothing but the catalog, the holdout and 2 threads is set: what `tessera train catalog=spacenet_atlanta
# holdout_fraction=0.2` trains on a 2-core machine (in this process rather than a Ray worker).


@pytest.mark.slow(seconds=270)
def test_buildings_are_found_on_the_held_out_area_at_the_defaults(tmp_path: Path, shared_data: Path) -> None:
    # threads=2: what the defaults take on a 2-core machine, here on any (the thread count moves the figure).
    result = train(TrainConfig(output=str(tmp_path / "buildings.bundle"), threads=2, **SAMPLE),  # type: ignore[arg-type]
                   progress=False)
    print("the defaults:", figures(result))
    assert result.holdout is not None
    background, building = result.holdout["iou"]
    # Predicting background everywhere scores a building IoU of 0, and predicting buildings everywhere
    # 0.024 (3,828 of 162,000 holdout pixels: six buildings, most under trees). At the defaults (a U-Net
    # whose EfficientNet-Lite0 encoder starts from ImageNet, 300 steps of 8 windows of 256 px, balanced
    # class weights, channels_last, bf16 on a CPU with bfloat16 instructions) this run measured 0.373 on
    # this machine; seeds 1 to 4 0.259, 0.422, 0.318, 0.388 (median 0.373), and the same seed in float32,
    # the path of a CPU without bfloat16 instructions, 0.353 (docs/training.md "Quality at defaults").
    # The target, 0.35, is asserted: both CPU paths of this seed reach it. The seeds show how far
    # another path through training can move the figure (another CPU, another thread count); the small
    # U-Net from scratch, the old default, measured 0.205, 0.131 and 0.126.
    assert building >= 0.35
    # A background IoU above 0.85 rules out a model that finds buildings by painting everything.
    assert background > 0.85
