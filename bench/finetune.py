"""Fine-tuning on real data: SpaceNet Atlanta from scratch against `init=` a bundle trained on
generated scenes, holdout building IoU over several seeds.

    python -m bench.finetune [--seeds 0 1 2] [--steps 300] [--pretrain-steps 400] [--pretrain-size 1536]

The model is the small U-Net from scratch (bench.common.SMALL_UNET, the training default until an ImageNet
encoder became it), the other settings the defaults of the day the figures were measured (`RECIPE`: 16
windows of 128 px a step in float32; balanced class weights). The pretrained bundle: a generated scene
(pipeline.synthetic) in grey levels (the sample is panchromatic), its five classes. Then, for each seed,
the sample's catalog (conf/data/spacenet_atlanta.yaml, rows 60/20/20), three ways: from scratch for `--steps`,
from scratch for half of that, and from the bundle (`init=`, the encoder at `FINE_TUNE`'s share of the
learning rate) for half of that. Each run's holdout curve (the current model scored on the holdout after
every epoch) and its best-by-validation holdout IoU are recorded. tests/training/test_finetune.py runs
seed 0 of the same recipe with a shorter pretraining (1024 px, 200 steps). Needs ../shared/data.
Results go to bench/results/finetune.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import SMALL_UNET, save, table_row
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.training import TrainConfig, TrainResult, train

REPO = Path(__file__).resolve().parents[1]
SAMPLE = dict(image=None, labels=None, catalog="spacenet_atlanta", holdout_fraction=0.2)  # the defaults otherwise
# The defaults when these figures were measured (2026-11-30): 16 windows of 128 px a step, in float32.
RECIPE: dict[str, Any] = {"tile_size": 128, "batch_size": 16, "precision": "fp32"}
# Fine-tuning changes one setting: the encoder, which starts from features already learnt, moves at a
# fifth of the learning rate while the decoder and the fresh head move at the full rate.
FINE_TUNE = dict(encoder_lr_scale=0.2)


PRETRAIN_SIZE, PRETRAIN_STEPS = 1536, 400


def pretrain(folder: Path, size: int = PRETRAIN_SIZE, steps: int = PRETRAIN_STEPS) -> Path:
    """The small U-Net trained on a generated scene in grey levels (the sample is panchromatic), validated
    once at the end; its path."""
    write_scene(generate_scene(size, size, seed=5), folder / "grey.tif", folder / "labels.tif", grey=True)
    result = train(TrainConfig(image=str(folder / "grey.tif"), labels=str(folder / "labels.tif"),
                               output=str(folder / "generated.bundle"), classes=CLASSES, arch_args=SMALL_UNET,
                               **RECIPE, steps=steps, steps_per_epoch=steps, val_fraction=0.05, threads=2),
                   progress=False)
    print(f"pretrained on generated scenes: val IoU {[round(v, 3) for v in result.val_iou]}", flush=True)
    return folder / "generated.bundle"


def figures(result: TrainResult) -> dict[str, Any]:
    """A run's holdout building IoU (the bundle validation picked) and its curves (the current model on
    the holdout and on validation after every epoch)."""
    assert result.holdout is not None
    return {"holdout_building_iou": result.holdout["iou"][1],
            "holdout_curve": [(int(h["step"]), round(h["holdout_iou_building"], 4)) for h in result.history],
            "val_curve": [(int(h["step"]), round(h["val_iou_building"], 4)) for h in result.history],
            "seconds": result.seconds}


def run(folder: Path, arm: str, seed: int, steps: int, init: Path | None) -> dict[str, Any]:
    """The small U-Net on the sample for `steps`, from scratch or fine-tuned from `init`; its row."""
    settings: dict[str, Any] = {**SAMPLE, **RECIPE, "arch_args": SMALL_UNET, "steps": steps, "seed": seed,
                                "threads": 2}
    if init is not None:
        settings.update(init=str(init), **FINE_TUNE)
    result = train(TrainConfig(output=str(folder / f"{arm}-{seed}.bundle"), **settings), progress=False)
    row = {"arm": arm, "seed": seed, "steps": steps, **figures(result)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=300, help="default: %(default)s")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS, help="default: %(default)s")
    parser.add_argument("--pretrain-size", type=int, default=PRETRAIN_SIZE, help="default: %(default)s")
    args = parser.parse_args()
    os.chdir(REPO)  # the catalog's paths are relative to the repository
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generated = pretrain(folder, args.pretrain_size, args.pretrain_steps)
        for seed in args.seeds:
            rows.append(run(folder, "scratch", seed, args.steps, None))
            rows.append(run(folder, "scratch-half", seed, args.steps // 2, None))
            rows.append(run(folder, "init", seed, args.steps // 2, generated))
    save("finetune", rows)
    init = f"init= bundle from generated grey scenes, encoder_lr_scale={FINE_TUNE['encoder_lr_scale']}"
    for arm, steps, start in (("scratch", args.steps, "from scratch"),
                              ("scratch-half", args.steps // 2, "from scratch"), ("init", args.steps // 2, init)):
        ious = [r["holdout_building_iou"] for r in rows if r["arm"] == arm]
        table_row("fine-tuning, SpaceNet Atlanta sample", f"{start}, the small U-Net, "
                  f"{steps} steps, seeds {args.seeds}",
                  f"holdout building IoU median {statistics.median(ious):.3f} "
                  f"({', '.join(f'{v:.3f}' for v in ious)})")


if __name__ == "__main__":
    main()
