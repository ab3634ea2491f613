"""Throughput of the segment job against the bare model and against MONAI, for 1 and 2 workers.

    python -m bench.efficiency [--size 4096] [--workers 1 2] [--repeats 3] [--other-repeats 1]

All on one GeoTIFF with the benchmarks' demo U-Net (bench.common.SMALL_UNET, MobileNetV3 encoder, 512
tiles, overlap 64),
medians of `repeats` runs (`other-repeats` for worker counts other than the default, which is what
the plain job picks here), in this process:

- job: `segment` end to end (GeoTIFF in, finished mosaic with pyramid out, embedded Ray started);
- bare: the model alone on tensors already in memory, over as many tiles, same batch size, all
  cores; no reading, blending, Zarr, Ray or pyramid. Efficiency is bare / job;
- MONAI: read the GeoTIFF into memory, `sliding_window_inference` (gaussian, same model, tile,
  overlap and batch), argmax, write scores and mask to Zarr (`bench.job.run_monai`).

Results go to bench/results/efficiency.json, rows in docs/benchmarks.md, docs/bench-throughput.png.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import CPUS, DOCS, QUICK, demo_like_bundle, save, table_row
from bench.job import run_monai
from pipeline.execution import SegmentConfig, prepare, segment, worker_layout
from pipeline.inference import InferenceOptions, Predictor
from pipeline.synthetic import generate_scene, write_scene
from pipeline.tracking import Tracking


def bare_forward_seconds(config: SegmentConfig, repeats: int) -> tuple[float, int]:
    """Median time of the model alone over the job's tiles, and the number of tiles."""
    source, bundle, grid = prepare(config)
    torch.set_num_threads(CPUS)
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


def plot(rows: list[dict[str, Any]], bare: float, monai: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    workers = [r["workers"] for r in rows]
    ax.plot(workers, [r["job_mpix_per_s"] for r in rows], "o-", label="tessera job, end to end")
    ax.plot(workers, [r["blocks_mpix_per_s"] for r in rows], "s--", label="tessera, blocks phase")
    ax.axhline(bare, color="grey", linestyle=":", label="bare model forward (all cores)")
    ax.axhline(monai, color="tab:red", linestyle="-.", label="MONAI sliding window, end to end")
    ax.set_xticks(workers)
    ax.set_xlabel(f"workers (torch threads each = {CPUS} cores / workers)")
    ax.set_ylabel("MPix/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput on {rows[0]['size']}² px, {CPUS} CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="model workers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default: %(default)s)")
    parser.add_argument("--other-repeats", type=int, default=1, help="runs for the non-default worker counts")
    args = parser.parse_args()
    mpix = args.size**2 / 1e6
    default_workers, _ = worker_layout(SegmentConfig(source="", model="", output="", device="cpu"), "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        scene = d / "scene.tif"
        write_scene(generate_scene(args.size, args.size, 11), scene, d / "truth.tif")
        bundle = demo_like_bundle(d / "model.bundle")
        rows = []
        for workers in args.workers:
            config = SegmentConfig(source=str(scene), model=str(bundle), output=str(d / "m.zarr"), workers=workers,
                                   device="cpu", progress=False, overwrite=True,
                                   tracking=Tracking(uri=f"sqlite:///{d / 'mlflow.db'}"))
            repeats = args.repeats if workers == default_workers else args.other_repeats
            jobs = [segment(config) for _ in range(repeats)]
            wall = statistics.median(s.wall_seconds for s in jobs)
            blocks = statistics.median(s.phases["blocks"] for s in jobs)
            rows.append({
                "size": args.size, "workers": workers, "threads_per_worker": max(1, CPUS // workers),
                "tiles": jobs[0].tiles_computed, "runs": repeats, "job_seconds_median": wall,
                "job_mpix_per_s": mpix / wall,
                "startup_seconds_median": statistics.median(s.phases["startup"] for s in jobs),
                "blocks_seconds_median": blocks, "blocks_mpix_per_s": mpix / blocks,
                "pyramid_seconds_median": statistics.median(s.pyramid_seconds for s in jobs),
                "recomputed_fraction": jobs[0].tiles_recomputed / max(jobs[0].tiles_computed, 1),
            })
            print(rows[-1], flush=True)
        bare, tiles = bare_forward_seconds(config, args.repeats)
        monai = statistics.median(run_monai(str(scene), str(bundle), str(d / f"monai{i}.zarr"))["seconds"]
                                  for i in range(args.repeats))
    for r in rows:
        r.update(bare_seconds_median=bare, bare_mpix_per_s=mpix / bare, efficiency=bare / r["job_seconds_median"],
                 steady_efficiency=bare / r["blocks_seconds_median"], monai_seconds_median=monai,
                 monai_mpix_per_s=mpix / monai, vs_monai=monai / r["job_seconds_median"])
    save("efficiency", rows)
    if not QUICK:
        plot(rows, mpix / bare, mpix / monai, DOCS / "bench-throughput.png")
    workload = f"{args.size}² px, {tiles} tiles of 512, demo U-Net"
    for r in rows:
        layout = (f"{r['workers']} worker(s) x {r['threads_per_worker']} threads"
                  + (", default" if r["workers"] == default_workers else "")
                  + (f", {r['runs']} run" if r["runs"] == 1 else f", median of {r['runs']}"))
        table_row("efficiency", f"{workload}, {layout}",
                  f"job {r['job_mpix_per_s']:.2f} MPix/s ({r['job_seconds_median']:.1f} s) vs bare forward "
                  f"{r['bare_mpix_per_s']:.2f} MPix/s ({bare:.1f} s): efficiency {r['efficiency']:.2f} end to end, "
                  f"{r['steady_efficiency']:.2f} bare/blocks phase (start-up {r['startup_seconds_median']:.1f} s, "
                  f"pyramid {r['pyramid_seconds_median']:.1f} s); recomputed {100 * r['recomputed_fraction']:.1f}%")
        table_row("vs MONAI", f"{workload}, {layout}",
                  f"tessera {r['job_mpix_per_s']:.2f} MPix/s ({r['job_seconds_median']:.1f} s) vs MONAI "
                  f"sliding_window_inference {r['monai_mpix_per_s']:.2f} MPix/s ({monai:.1f} s), end to end: "
                  f"{r['vs_monai']:.2f}x")


if __name__ == "__main__":
    main()
