"""Efficiency of the segment job: the bare model forward over the same tiles vs the whole job.

    python -m bench.efficiency [--size 4096] [--workers 1 2]

The bare figure is the model alone on tensors already in memory, in the same batches, with the same
torch threads: no reading, no blending, no Zarr, no Ray, no pyramid. The job figure is GeoTIFF in,
finished mosaic with pyramid out, including starting the embedded Ray. Both are measured in this run,
on this machine. Results go to bench/results/efficiency.json and a row in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.execution import SegmentConfig, prepare, segment
from pipeline.inference import InferenceOptions, Predictor
from pipeline.models.bundle import BundleSpec, ModelBundle, Normalization
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.training.loop import DEFAULT_ARCH_ARGS

RESULTS = Path(__file__).parent / "results"
TABLE = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def demo_like_bundle(path: Path) -> Path:
    """The demo's architecture, freshly initialised (speed does not depend on the weights)."""
    spec = BundleSpec(
        architecture="unet",
        arch_args=DEFAULT_ARCH_ARGS,
        classes=CLASSES, bands=(1, 2, 3), normalization=Normalization(), tile_size=512, overlap=64,
    )
    ModelBundle.create(spec).save(path)
    return path


def bare_forward_seconds(config: SegmentConfig, threads: int, repeats: int) -> tuple[float, int]:
    """Median time of the model alone over the job's tiles, and the number of tiles."""
    source, bundle, grid = prepare(config)
    torch.set_num_threads(threads)
    predictor = Predictor(bundle, InferenceOptions(device="cpu", batch_size=config.batch_size))
    n = len(grid)
    batch = torch.from_numpy(
        predictor.select_bands(source.read(0, 0, grid.tile, grid.tile))[None].repeat(config.batch_size, 0) * 1.0
    ).float()
    x = bundle.spec.normalization.apply(batch)
    model = bundle.model.eval()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, config.batch_size):
                model(x[: min(config.batch_size, n - i)])
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_scene(generate_scene(args.size, args.size, 11), d / "scene.tif", d / "truth.tif")
        bundle = demo_like_bundle(d / "model.bundle")
        rows = []
        for workers in args.workers:
            threads = max(1, cpus // workers)
            config = SegmentConfig(source=str(d / "scene.tif"), model=str(bundle), output=str(d / "m.zarr"),
                                   workers=workers, threads=threads, device="cpu", progress=False, overwrite=True)
            job = [segment(config) for _ in range(args.repeats)]
            wall = statistics.median(s.wall_seconds for s in job)
            bare, tiles = bare_forward_seconds(config, cpus, args.repeats)
            mpix = args.size**2 / 1e6
            rows.append({
                "size": args.size, "workers": workers, "threads_per_worker": threads, "tiles": tiles,
                "job_seconds_median": wall, "job_mpix_per_s": mpix / wall,
                "startup_seconds_median": statistics.median(s.phases["startup"] for s in job),
                "blocks_seconds_median": statistics.median(s.phases["blocks"] for s in job),
                "bare_seconds_median": bare, "bare_mpix_per_s": mpix / bare, "efficiency": bare / wall,
                "steady_efficiency": bare / statistics.median(s.phases["blocks"] for s in job),
                "recomputed_fraction": job[0].tiles_recomputed / max(job[0].tiles_computed, 1),
                "pyramid_seconds_median": statistics.median(s.pyramid_seconds for s in job),
                "peak_rss_mib_max": max(s.peak_rss_mib for s in job),
            })
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    machine = f"{platform.machine()}, {cpus} cores, torch {torch.__version__}, CPU"
    (RESULTS / "efficiency.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    with TABLE.open("a") as f:
        for r in rows:
            f.write(
                f"| efficiency | {time.strftime('%Y-%m-%d')} | {machine} | {r['size']}² px, {r['tiles']} tiles, "
                f"{r['workers']} worker(s) x {r['threads_per_worker']} threads | job {r['job_mpix_per_s']:.2f} MPix/s "
                f"({r['job_seconds_median']:.1f} s) vs bare forward {r['bare_mpix_per_s']:.2f} MPix/s "
                f"({r['bare_seconds_median']:.1f} s): efficiency {r['efficiency']:.2f} end to end, "
                f"{r['steady_efficiency']:.2f} bare/blocks phase (start-up {r['startup_seconds_median']:.1f} s); "
                f"recomputed {100 * r['recomputed_fraction']:.1f}%; peak {r['peak_rss_mib_max']:.0f} MiB |\n"
            )


if __name__ == "__main__":
    main()
