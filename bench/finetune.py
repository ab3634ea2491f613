"""Fine-tuning on real data: SpaceNet Atlanta from scratch against `init=` a bundle trained on
generated scenes, holdout building IoU over several seeds.

    python -m bench.finetune [--seeds 0 1 2] [--steps 300] [--pretrain-steps 600] [--pretrain-size 1536]

The pretrained bundle: a generated scene (pipeline.synthetic) turned grey (the sample is panchromatic),
its five classes, trained at the defaults (`TrainConfig`'s: the small U-Net, 16 windows of 128 px a
step, balanced class weights). Then, for each seed, the sample's catalog (conf/data/spacenet_atlanta.yaml,
rows 60/20/20) is trained at the defaults from scratch for `--steps` and from the bundle for half of
that, nothing else changed. Each run's holdout curve (the current model scored on
the holdout after every epoch) and its best-by-validation holdout IoU are recorded. Needs ../shared/data.
Results go to bench/results/finetune.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from bench.common import save, table_row
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SAMPLE = dict(catalog="spacenet_atlanta", holdout_fraction=0.2, threads=2)  # the defaults otherwise


def pretrain(folder: Path, size: int, steps: int) -> Path:
    """A bundle trained on a generated scene in grey levels; its path."""
    write_scene(generate_scene(size, size, seed=5), folder / "rgb.tif", folder / "labels.tif")
    with rasterio.open(folder / "rgb.tif") as src:
        profile, grey = src.profile, src.read().astype(np.float32).mean(axis=0, keepdims=True)
    profile.update(count=1, photometric="minisblack")
    with rasterio.open(folder / "grey.tif", "w", **profile) as dst:
        dst.write(grey.round().astype(np.uint8))
    result = train(TrainConfig(image=str(folder / "grey.tif"), labels=str(folder / "labels.tif"),
                               output=str(folder / "generated.bundle"), classes=CLASSES, steps=steps, threads=2),
                   progress=False)
    print(f"pretrained on generated scenes: val IoU {[round(v, 3) for v in result.val_iou]}", flush=True)
    return folder / "generated.bundle"


def run(folder: Path, arm: str, seed: int, steps: int, init: Path | None) -> dict[str, Any]:
    result = train(TrainConfig(image=None, labels=None, output=str(folder / f"{arm}-{seed}.bundle"), steps=steps,
                               seed=seed, init=str(init) if init else None, **SAMPLE), progress=False)  # type: ignore[arg-type]
    assert result.holdout is not None
    row = {"arm": arm, "seed": seed, "steps": steps, "holdout_building_iou": result.holdout["iou"][1],
           "holdout_curve": [(int(h["step"]), round(h["holdout_iou_building"], 4)) for h in result.history],
           "val_curve": [(int(h["step"]), round(h["val_iou_building"], 4)) for h in result.history],
           "seconds": result.seconds}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=300, help="default: %(default)s")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="default: %(default)s")
    parser.add_argument("--pretrain-size", type=int, default=1536, help="default: %(default)s")
    args = parser.parse_args()
    os.chdir(REPO)  # the catalog's paths are relative to the repository
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generated = pretrain(folder, args.pretrain_size, args.pretrain_steps)
        for seed in args.seeds:
            rows.append(run(folder, "scratch", seed, args.steps, None))
            rows.append(run(folder, "init", seed, args.steps // 2, generated))
    save("finetune", rows)
    for arm, steps in (("scratch", args.steps), ("init", args.steps // 2)):
        ious = [r["holdout_building_iou"] for r in rows if r["arm"] == arm]
        start = "from scratch" if arm == "scratch" else "init= bundle from generated grey scenes"
        table_row("fine-tuning, SpaceNet Atlanta sample", f"{start}, the training defaults, "
                  f"{steps} steps, seeds {args.seeds}",
                  f"holdout building IoU median {statistics.median(ious):.3f} "
                  f"({', '.join(f'{v:.3f}' for v in ious)})")


if __name__ == "__main__":
    main()
