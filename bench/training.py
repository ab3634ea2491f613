"""Distributed training: time per epoch and holdout quality with 1 and 2 Ray Train workers.

    python -m bench.training [--workers 1 2] [--steps-per-epoch 50] [--batch 16] [--window 128]

A seeded synthetic 256 px scene, the tiny FCN, 3 epochs; the global batch is the same for every
number of workers (DDP splits it), so the runs have the same budget. One thread per worker; Ray is
started once and shared, so the wall time of a run is Ray Train's start plus the epochs.
Results go to bench/results/training.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import save, table_row
from pipeline.synthetic import generate_scene, write_scene
from pipeline.training import TrainConfig
from pipeline.training.distributed import Distributed, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=max(4, 2 * max(args.workers)), include_dashboard=False, logging_level=30)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_scene(generate_scene(256, 256, seed=11), d / "scene.tif", d / "labels.tif")
        for workers in args.workers:
            config = TrainConfig(
                image=str(d / "scene.tif"), labels=str(d / "labels.tif"), output=str(d / f"w{workers}.bundle"),
                architecture="fcn", arch_args={"depth": 3, "width": 16}, tile_size=args.window,
                inference_tile_size=128, overlap=16, batch_size=args.batch, steps=3 * args.steps_per_epoch,
                steps_per_epoch=args.steps_per_epoch, lr=0.02, holdout_fraction=0.2,
            )
            tick = time.perf_counter()
            result = fit(config, Distributed(workers=workers, storage=str(d / "checkpoints")))
            ends = [h["seconds"] for h in result.history]
            epochs = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
            assert result.holdout is not None
            rows.append({"workers": workers, "epoch_seconds": epochs, "median_epoch_seconds": statistics.median(epochs),
                         "holdout_miou": result.holdout["miou"], "wall_seconds": time.perf_counter() - tick,
                         "steps_per_epoch": args.steps_per_epoch, "global_batch": args.batch, "window": args.window})
            print(rows[-1], flush=True)
    ray.shutdown()
    save("training", rows)
    base = rows[0]["median_epoch_seconds"]
    for r in rows:
        table_row("training, Ray Train DDP (gloo)",
                  f"{r['workers']} worker(s) x 1 thread, tiny FCN, {r['steps_per_epoch']} steps x {r['global_batch']} "
                  f"windows of {r['window']} px per epoch, 3 epochs, 1 run",
                  f"{r['median_epoch_seconds']:.1f} s per epoch (median; {base / r['median_epoch_seconds']:.2f}x "
                  f"the first row), holdout mIoU {r['holdout_miou']:.3f}, {r['wall_seconds']:.0f} s with start-up")


if __name__ == "__main__":
    main()
