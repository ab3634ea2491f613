"""One collection job against the bare model, single-image jobs and a MONAI loop, and its memory against N.

    python -m bench.collection [--images 32] [--size 2048] [--memory-counts 8 16 32]

N generated RGB GeoTIFFs of size² px (one seed each, written once) and the benchmarks' demo U-Net
(bench.common.SMALL_UNET, MobileNetV3 encoder, 512 tiles, overlap 64, batch 8), all measured in one run:

- job: one `segment_collection` over the N images in a fresh process, so that the embedded Ray start,
  the workers' start and each image's MLflow run (a sqlite store, created before the run) are counted;
  wall, start-up phase, the median of the manifest's per-image seconds, peak PSS of the process tree;
- bare: the model alone over as many tiles as the job computed, on tensors already in memory, same
  batch, all cores (as `bench.efficiency`). Efficiency is bare / job wall; target >= 0.85;
- singles: N `tessera segment IMG -m MODEL -o OUT.zarr --quiet` commands, one process each, as a user
  runs them one after another; their total wall against the job's process wall;
- MONAI loop: one process, the model loaded once (before the clock starts), then for each image: read
  the GeoTIFF, `sliding_window_inference` (gaussian, same tile, overlap and batch), argmax, write scores
  and mask to Zarr (as `bench.job.run_monai`, without reloading the model). Target: job >= 1.1x;
- memory: the same job over each of --memory-counts images, peak PSS of the process tree; flat when the
  largest count's peak is within 1.1x of the smallest's.

Two sub-commands run the measured processes themselves and print one JSON line (`bench.scheduler`
uses the first one too):

    python -m bench.collection job FOLDER MODEL ROOT --count N [--tracking-uri URI]
    python -m bench.collection monai FOLDER MODEL ROOT --count N

Results go to bench/results/collection.json, rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio
import torch
import zarr
from rasterio.windows import Window

from bench.common import CPUS, QUICK, demo_like_bundle, save, table_row, write_large_scene
from pipeline.collection import CollectionItem
from pipeline.execution import SegmentConfig, segment_collection
from pipeline.memory import PeakMemory
from pipeline.models.bundle import ModelBundle
from pipeline.tracking import Tracking, mlflow_client

ROOT_DIR = Path(__file__).parents[1]
BATCH = SegmentConfig(source="", model="", output="").batch_size
EFFICIENCY_TARGET = 0.85
MONAI_TARGET = 1.1
FLAT_WITHIN = 1.1  # memory is called flat when the largest count's peak is within this of the smallest's


# -- the measured processes -----------------------------------------------------------------------


def scenes(folder: Path, count: int) -> list[Path]:
    """The first `count` GeoTIFFs of `folder`, by name."""
    paths = sorted(folder.glob("*.tif"))[:count]
    if len(paths) < count:
        raise SystemExit(f"{folder} holds {len(paths)} GeoTIFFs, fewer than --count {count}")
    return paths


def run_job(folder: Path, model: str, root: str, count: int, tracking_uri: str | None) -> dict[str, Any]:
    """One collection job over the first `count` images of `folder`; its figures."""
    items = [CollectionItem(str(p), p.stem) for p in scenes(folder, count)]
    tracking = Tracking(uri=tracking_uri) if tracking_uri else Tracking(enabled=False)
    config = SegmentConfig(source="", model=model, output=root, device="cpu", progress=False, tracking=tracking)
    summary = segment_collection(config, items, root)
    if summary.count("done") != count:
        errors = "; ".join(f"{r.item.source}: {r.error}" for r in summary.failed)
        raise SystemExit(f"{summary.count('done')} of {count} images done: {errors}")
    with (Path(root) / "manifest.csv").open(newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f) if row["status"] == "done"]
    phases = [r.summary.as_dict()["phases"] for r in summary.images if r.summary]
    names = sorted({k for p in phases for k in p if k != "startup"})
    return {
        "images": count, "wall_seconds": summary.wall_seconds, "phases": summary.phases, "workers": summary.workers,
        "tiles": sum(r.work for r in summary.images),
        "megapixels": sum(float(r.summary.as_dict()["megapixels"]) for r in summary.images if r.summary),
        "manifest_seconds_median": statistics.median(seconds),
        "image_phase_medians": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in names},
        "driver_peak_rss_mib": own_peak_rss_mib(),
        "engine_peak_pss_mib": summary.peak_memory_mib,
    }


def own_peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage: its ru_maxrss keeps the parent's peak across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def run_monai_loop(folder: Path, model: str, root: str, count: int) -> dict[str, Any]:
    """MONAI's sliding window over the first `count` images of `folder`, the model loaded once."""
    from monai.inferers import sliding_window_inference

    bundle = ModelBundle.load(model)
    net = bundle.model.eval()
    torch.set_num_threads(CPUS)
    tile, overlap = bundle.spec.tile_size, bundle.spec.overlap
    start = time.perf_counter()
    for path in scenes(folder, count):
        with rasterio.open(path) as ds:
            image = ds.read(list(bundle.spec.bands))
        x = bundle.spec.normalization.apply(torch.from_numpy(image[None]).float())
        with torch.inference_mode():
            scores = sliding_window_inference(x, (tile, tile), BATCH, net, overlap=overlap / tile, mode="gaussian",
                                              sigma_scale=0.125)[0]  # type: ignore[index]
        mask = scores.argmax(0).to(torch.uint8).numpy()
        group = zarr.open_group(str(Path(root) / f"{path.stem}.zarr"), mode="w")
        c, h, w = scores.shape
        group.create_array("scores", shape=(c, h, w), chunks=(c, 512, 512), dtype="float16")[:] = scores.half().numpy()
        group.create_array("mask", shape=(h, w), chunks=(512, 512), dtype="uint8")[:] = mask
    return {"images": count, "seconds": time.perf_counter() - start}


def measured(args: list[str], module: str = "bench.collection") -> tuple[dict[str, Any], float, float]:
    """Run `python -m MODULE ARGS` in a fresh process: its JSON line, peak PSS of its tree (MiB), process wall."""
    cmd = [sys.executable, "-m", module, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR)
    with PeakMemory(proc.pid, interval=0.2) as memory:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), memory.peak_mib, wall


def warm_store(uri: str) -> None:
    """Create the MLflow sqlite store (its schema migrations take seconds) before anything is timed."""
    mlflow_client(uri).search_experiments()


def load() -> float:
    return os.getloadavg()[0]


# -- the comparisons ------------------------------------------------------------------------------


def bare_seconds(model: Path, image: Path, tiles: int) -> float:
    """The model alone over `tiles` tiles of `image`'s first tile, in batches of BATCH, all cores."""
    bundle = ModelBundle.load(model)
    torch.set_num_threads(CPUS)
    tile = bundle.spec.tile_size
    with rasterio.open(image) as ds:
        window = ds.read(list(bundle.spec.bands), window=Window(0, 0, tile, tile))
    x = bundle.spec.normalization.apply(torch.from_numpy(window[None]).float().repeat(BATCH, 1, 1, 1))
    net = bundle.model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, tiles, BATCH):
            net(x[: min(BATCH, tiles - i)])
    return time.perf_counter() - start


def single_jobs(images: list[Path], model: Path, out: Path, tracking_uri: str) -> float:
    """Total wall of one `tessera segment` command per image, one after another."""
    tessera = Path(sys.executable).with_name("tessera")
    start = time.perf_counter()
    for path in images:
        cmd = [str(tessera), "segment", str(path), "-m", str(model), "-o", str(out / f"{path.stem}.zarr"),
               "--quiet", "--device", "cpu", "--tracking-uri", tracking_uri]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT_DIR)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--size", type=int, default=2048, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--memory-counts", type=int, nargs="+", default=[8, 16, 32], help="default: %(default)s")
    sub = parser.add_subparsers(dest="command")
    for name in ("job", "monai"):
        child = sub.add_parser(name, help=f"run one measured {name} process and print its JSON line")
        child.add_argument("folder", type=Path)
        child.add_argument("model")
        child.add_argument("root")
        child.add_argument("--count", type=int, required=True)
        if name == "job":
            child.add_argument("--tracking-uri", help="sqlite:///... (default: tracking off)")
    args = parser.parse_args()
    if args.command == "job":
        print(json.dumps(run_job(args.folder, args.model, args.root, args.count, args.tracking_uri)))
    elif args.command == "monai":
        print(json.dumps(run_monai_loop(args.folder, args.model, args.root, args.count)))
    else:
        benchmark(args.images, args.size, sorted(set(args.memory_counts)))


def benchmark(n: int, size: int, memory_counts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        folder = d / "images"
        folder.mkdir()
        tick = time.perf_counter()
        count = max(n, *memory_counts)
        images = [write_large_scene(folder / f"scene_{i:04d}.tif", size, seed=100 + i) for i in range(count)]
        print(f"{count} scenes of {size}² px written in {time.perf_counter() - tick:.0f} s", flush=True)
        model = demo_like_bundle(d / "model.bundle")
        uri = f"sqlite:///{d / 'mlflow.db'}"
        warm_store(uri)

        def job(images_count: int) -> dict[str, Any]:
            result, peak, wall = measured(["job", str(folder), str(model), str(d / f"job{images_count}"),
                                           "--count", str(images_count), "--tracking-uri", uri])
            result.update(peak_pss_mib=peak, process_seconds=wall, load=load())
            print("job", result, flush=True)
            return result

        main_job = job(n)
        bare = bare_seconds(model, images[0], main_job["tiles"])
        bare_load = load()
        print(f"bare {bare:.1f} s over {main_job['tiles']} tiles", flush=True)
        monai, monai_peak, _ = measured(["monai", str(folder), str(model), str(d / "monai"), "--count", str(n)])
        monai.update(peak_pss_mib=monai_peak, load=load())
        print("monai", monai, flush=True)
        singles = single_jobs(images[:n], model, d / "singles", uri)
        singles_load = load()
        print(f"singles {singles:.1f} s", flush=True)
        memory = {c: main_job if c == n else job(c) for c in memory_counts}

    mpix = main_job["megapixels"]
    wall = main_job["wall_seconds"]
    efficiency = bare / wall
    vs_monai = monai["seconds"] / wall
    vs_singles = singles / main_job["process_seconds"]
    low, high = min(memory_counts), max(memory_counts)
    memory_ratio = memory[high]["peak_pss_mib"] / memory[low]["peak_pss_mib"]
    row = {
        "images": n, "size": size, "tiles": main_job["tiles"], "workers": main_job["workers"], "job": main_job,
        "bare_seconds": bare, "bare_load": bare_load, "efficiency": efficiency,
        "efficiency_met": efficiency >= EFFICIENCY_TARGET, "monai": monai, "vs_monai": vs_monai,
        "vs_monai_met": vs_monai >= MONAI_TARGET, "singles_seconds": singles, "singles_load": singles_load,
        "vs_singles": vs_singles,
        "memory": {str(c): {k: r[k] for k in ("peak_pss_mib", "driver_peak_rss_mib", "wall_seconds", "load")}
                   for c, r in memory.items()},
        "memory_ratio": memory_ratio, "memory_flat": memory_ratio <= FLAT_WITHIN,
    }
    save("collection", [row])
    workload = (f"{n} x {size}² px RGB GeoTIFFs, {main_job['tiles']} tiles of 512, demo U-Net, "
                f"{main_job['workers']} workers, MLflow sqlite, 1 run")
    phases = main_job["phases"]
    table_row("collection", f"{workload}: job vs bare model",
              f"job {mpix / wall:.2f} MPix/s ({wall:.1f} s, start-up {phases.get('startup', 0):.1f} s, per-image "
              f"median {main_job['manifest_seconds_median']:.1f} s in the manifest, peak "
              f"{main_job['peak_pss_mib'] / 1024:.2f} GiB PSS) vs bare forward {mpix / bare:.2f} MPix/s "
              f"({bare:.1f} s): efficiency {efficiency:.2f} (target {EFFICIENCY_TARGET}: "
              f"{verdict(row['efficiency_met'])}); load {main_job['load']:.1f} / {bare_load:.1f}")
    table_row("collection", f"{workload}: job vs MONAI loop",
              f"job {mpix / wall:.2f} MPix/s ({wall:.1f} s) vs a MONAI sliding_window_inference loop in one "
              f"process {mpix / monai['seconds']:.2f} MPix/s ({monai['seconds']:.1f} s, peak "
              f"{monai['peak_pss_mib'] / 1024:.2f} GiB): {vs_monai:.2f}x (target {MONAI_TARGET}x: "
              f"{verdict(row['vs_monai_met'])}); load {monai['load']:.1f}")
    table_row("collection", f"{workload}: job vs {n} single-image jobs",
              f"one collection command {main_job['process_seconds']:.1f} s (process, imports included) vs {n} "
              f"`tessera segment` commands {singles:.1f} s ({singles / n:.1f} s each): {vs_singles:.1f}x; "
              f"load {singles_load:.1f}")
    peaks = ", ".join(f"{memory[c]['peak_pss_mib'] / 1024:.2f} GiB at {c}" for c in memory_counts)
    table_row("collection", f"{size}² px images, demo U-Net: peak memory against the number of images",
              f"peak PSS of the job's processes {peaks}: {memory_ratio:.2f}x from {low} to {high} images "
              f"(target flat, within {FLAT_WITHIN}x: {verdict(row['memory_flat'])}); driver peak RSS "
              + ", ".join(f"{memory[c]['driver_peak_rss_mib']:.0f}" for c in memory_counts) + " MiB")
    if QUICK:
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
