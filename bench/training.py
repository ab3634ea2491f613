"""Training: Ray Train workers, loading beside compute, and peak memory against the image's size.

    python -m bench.training [--workers 1 2] [--steps-per-epoch 50] [--batch 16] [--window 128]
    python -m bench.training --loading [--steps 60] [--device cuda]
    python -m bench.training --memory [--sizes 2048 8192 16384]

Default: a seeded synthetic 256 px scene, the tiny FCN, 3 epochs; the global batch is the same for
every number of workers (DDP splits it), so the runs have the same budget. One thread per worker; Ray is
started once and shared, so the wall time of a run is Ray Train's start plus the epochs.

`--loading`: steps/s of the small U-Net (bench.common.SMALL_UNET; batch 16, 128 px windows, elastic
deformation and jitter) on a 2048 px scene, with 0, 1 and 2 loader processes beside a step of 1 and 2
torch threads (the second of two epochs, so that start-up is left out). With `--device cuda`: on the GPU
(bf16 autocast, as the loop does there), the default U-Net (DEFAULT_ARCH_ARGS without ImageNet weights:
speed does not depend on them) and the small U-Net, batches of 16 and 64 windows, with 0, 2 and 4 loader
processes; results in bench/results/training_loading_cuda.json.

`--memory`: the training job (tiny FCN, the same settings for every size) in its own process on
generated tiled GeoTIFFs of each size, and on a pyramidal OME-TIFF slide of the largest; its peak PSS
and wall time.

Results go to bench/results/training*.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import SMALL_UNET, save, table_row
from pipeline.memory import PeakMemory
from pipeline.synthetic import CLASSES, generate_scene, write_large_scene, write_large_slide, write_scene
from pipeline.training import DEFAULT_ARCH_ARGS, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
# The memory runs' settings: the same for every image size (the test in tests/training/test_large_images.py
# uses them too, with fewer steps).
MEMORY_SETTINGS = ["architecture=fcn", "arch_args={depth: 3, width: 16}", "tile_size=128", "inference_tile_size=256",
                   "overlap=32", "batch_size=8", "steps=40", "steps_per_epoch=40", "val_fraction=0.01",
                   "progress=false", "cluster.workers=0", "tracking.enabled=false", "cluster.threads=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--window", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--loading", action="store_true", help="steps/s with and without loader processes")
    parser.add_argument("--steps", type=int, default=60, help="--loading: steps per epoch (2 epochs)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="--loading: where the steps run")
    parser.add_argument("--memory", action="store_true", help="peak memory against the image's size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384],
                        help="edges of the generated images, px (default: %(default)s)")
    args = parser.parse_args()
    if args.device == "cuda" and not args.loading:
        parser.error("--device cuda goes with --loading: the other measurements run on CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible here; run it on a GPU machine, or leave --device out")
    if args.loading and args.device == "cuda":
        loading_device(args.steps, "cuda")
    elif args.loading:
        loading(args.steps)
    elif args.memory:
        memory(args.sizes)
    else:
        distributed(args)


def distributed(args: argparse.Namespace) -> None:
    import ray  # here: --loading and --memory need no Ray

    from pipeline.training.distributed import Distributed, fit

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


def loading(steps: int) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_large_scene(d / "scene.tif", d / "labels.tif", 2048, seed=1)
        for threads, loaders in ((2, 0), (2, 1), (2, 2), (1, 0), (1, 1)):
            config = TrainConfig(image=str(d / "scene.tif"), labels=str(d / "labels.tif"), output=str(d / "m.bundle"),
                                 arch_args=SMALL_UNET, tile_size=128, batch_size=16, precision="fp32",
                                 steps=2 * steps, steps_per_epoch=steps, val_fraction=0.02, threads=threads,
                                 loader_workers=loaders)
            result = train(config, progress=False)
            first, second = (h["seconds"] for h in result.history)
            rows.append({"threads": threads, "loader_workers": loaders, "steps_per_second": steps / (second - first),
                         "steps": steps})
            print(rows[-1], flush=True)
    save("training_loading", rows)
    for r in rows:
        base = next(b for b in rows if b["threads"] == r["threads"] and b["loader_workers"] == 0)
        table_row("training, loading beside compute",
                  f"small U-Net, batch 16 of 128 px windows (elastic, jitter), 2048 px scene, {r['threads']} torch "
                  f"thread(s), {r['loader_workers']} loader process(es), second epoch of {r['steps']} steps, 1 run",
                  f"{r['steps_per_second']:.2f} steps/s ({r['steps_per_second'] / base['steps_per_second']:.2f}x "
                  "no loader at the same threads)")


def loading_device(steps: int, device: str) -> None:
    """`--loading` on the GPU: steps/s of two models at two batch sizes with 0, 2 and 4 loader processes (the
    second of two epochs, its validation included, as on CPU). `device` "cpu" only checks this code."""
    from pipeline.training.loop import LocalSession, run_loop

    gpu = device == "cuda"
    models = {"default U-Net (no ImageNet weights)": {**DEFAULT_ARCH_ARGS, "encoder_weights": None},
              "small U-Net": dict(SMALL_UNET)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_large_scene(d / "scene.tif", d / "labels.tif", 2048, seed=1)
        for model, arch_args in models.items():
            for batch in (16, 64):
                for loaders in (0, 2, 4):
                    config = TrainConfig(image=str(d / "scene.tif"), labels=str(d / "labels.tif"),
                                         output=str(d / "m.bundle"), arch_args=arch_args, tile_size=128,
                                         batch_size=batch, steps=2 * steps, steps_per_epoch=steps, val_fraction=0.02,
                                         loader_workers=loaders)
                    if gpu:
                        torch.cuda.reset_peak_memory_stats()
                    metrics = run_loop(config, LocalSession(device), d / "m.bundle")
                    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
                    first, second = (h["seconds"] for h in metrics["history"])
                    rows.append({"model": model, "batch": batch, "window": config.tile_size, "loader_workers": loaders,
                                 "steps_per_second": steps / (second - first),
                                 "windows_per_second": steps * batch / (second - first), "steps": steps,
                                 "first_epoch_seconds": first, "torch_threads": torch.get_num_threads(),
                                 "peak_gpu_mib": peak})
                    print(rows[-1], flush=True)
    save(f"training_loading_{device}", rows)
    for r in rows:
        base = next(b for b in rows if (b["model"], b["batch"], b["loader_workers"]) == (r["model"], r["batch"], 0))
        table_row("training on the GPU, loading beside compute",
                  f"{r['model']}, batch {r['batch']} of {r['window']} px windows (elastic, jitter), bf16 autocast, "
                  f"2048 px scene, {r['torch_threads']} torch threads, {r['loader_workers']} loader process(es), "
                  f"second epoch of {r['steps']} steps, 1 run",
                  f"{r['steps_per_second']:.2f} steps/s, {r['windows_per_second']:.0f} windows/s "
                  f"({r['steps_per_second'] / base['steps_per_second']:.2f}x no loader)")


def memory(sizes: list[int]) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        runs: list[tuple[str, list[str]]] = []
        for size in sizes:
            write_large_scene(d / f"{size}.tif", d / f"{size}_labels.tif", size, seed=1)
            runs.append((f"{size} px GeoTIFF", [f"image={size}.tif", f"labels={size}_labels.tif"]))
        write_large_slide(d / "slide.ome.tif", d / "slide_mask.png", max(sizes), seed=1)
        classes = "[" + ", ".join(f"{{name: {c.name}, color: {list(c.color)}}}" for c in CLASSES) + "]"
        (d / "slide.yaml").write_text(f"task: slide\nclasses: {classes}\npairs:\n"
                                      "  - {image: slide.ome.tif, mask: slide_mask.png}\n")
        runs.append((f"{max(sizes)} px pyramidal OME-TIFF slide, mask at 1/16", ["catalog=slide.yaml"]))
        for name, inputs in runs:
            env = {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_CACHE": str(d / f"cache-{len(rows)}")}
            tick = time.perf_counter()
            job = subprocess.Popen([sys.executable, "-m", "jobs.train", *inputs, "output=m.bundle", *MEMORY_SETTINGS],
                                   cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with PeakMemory(job.pid, interval=0.1) as peak:
                output, _ = job.communicate()
            if job.returncode:
                raise RuntimeError(output[-3000:])
            rows.append({"image": name, "peak_mib": peak.peak_mib, "wall_seconds": time.perf_counter() - tick})
            print(rows[-1], flush=True)
    save("training_memory", rows)
    for r in rows:
        table_row("training memory", f"training job on a {r['image']}, tiny FCN, 40 steps of 8 windows of 128 px, "
                  "1 thread, no loader, validation on 1% of the rows, class index built (not cached)",
                  f"peak {r['peak_mib']:.0f} MiB PSS ({r['peak_mib'] / rows[0]['peak_mib']:.2f}x the first row), "
                  f"{r['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
