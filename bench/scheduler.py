"""The engine's own cost per image: many tiny images through one collection job, with a trivial model.

    python -m bench.scheduler [--counts 100 500 2000] [--track-max 2000]

256 x 256 px RGB GeoTIFFs (one tile, one block each, no seams; uncompressed, written once, the first
N of them taken for each count) and a 1-layer, 4-channel FCN with tile 256 and overlap 32, so that
what is left is the engine: planning, locks, creating each mosaic, scheduling a unit, its pyramid,
metadata and manifest. For each count, one collection job in a fresh process
(`python -m bench.collection job`), with tracking off, and again with MLflow tracking into a sqlite
store (created before the run) up to --track-max images:

- per-image overhead in ms: (job wall - start-up phase) / images; target under 100 ms and flat
  (the largest count within 1.5x of the smallest);
- driver memory: peak RSS of the driver process itself; and peak PSS of the whole process tree.

Results go to bench/results/scheduler.json, rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

from bench.collection import load, measured, verdict, warm_store
from bench.common import save, table_row
from pipeline.models.bundle import BundleSpec, ClassInfo, ModelBundle, Normalization
from pipeline.synthetic import generate_scene

SIZE = 256
OVERHEAD_TARGET_MS = 100.0
FLAT_WITHIN = 1.5


def trivial_bundle(path: Path) -> Path:
    """`bench.common.tiny_bundle`'s FCN with one tile per 256² image."""
    torch.manual_seed(0)
    spec = BundleSpec(
        architecture="fcn", arch_args={"depth": 1, "width": 4, "padding_mode": "reflect"},
        classes=(ClassInfo("background", (0, 0, 0)), ClassInfo("object", (230, 60, 60))), bands=(1, 2, 3),
        normalization=Normalization(), tile_size=SIZE, overlap=32,
    )
    ModelBundle.create(spec).save(path)
    return path


def write_tiny_images(folder: Path, count: int) -> None:
    """`count` 256² GeoTIFFs: one generated scene, shifted per file so that no two are the same."""
    scene = generate_scene(SIZE, SIZE, 7).image
    np.maximum(scene, 1, out=scene)  # no pixel reads as nodata
    profile = {"driver": "GTiff", "height": SIZE, "width": SIZE, "count": 3, "dtype": "uint8", "nodata": 0,
               "crs": "EPSG:32632", "transform": from_origin(500000.0, 5200000.0, 0.5, 0.5)}
    for i in range(count):
        with rasterio.open(folder / f"tiny_{i:05d}.tif", "w", **profile) as dst:
            dst.write(np.roll(scene, i, axis=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500, 2000], help="default: %(default)s")
    parser.add_argument("--track-max", type=int, default=2000, help="the largest count also run with tracking")
    args = parser.parse_args()
    counts = sorted(set(args.counts))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        folder = d / "images"
        folder.mkdir()
        tick = time.perf_counter()
        write_tiny_images(folder, max(counts))
        print(f"{max(counts)} images written in {time.perf_counter() - tick:.1f} s", flush=True)
        model = trivial_bundle(d / "model.bundle")
        for count in counts:
            for tracked in (False, True):
                if tracked and count > args.track_max:
                    continue
                root = d / f"{count}{'-tracked' if tracked else ''}"
                job = ["job", str(folder), str(model), str(root), "--count", str(count)]
                if tracked:
                    uri = f"sqlite:///{d / f'mlflow{count}.db'}"
                    warm_store(uri)
                    job += ["--tracking-uri", uri]
                result, peak, wall = measured(job)
                startup = result["phases"].get("startup", 0.0)
                rows.append({**result, "tracked": tracked, "peak_pss_mib": peak, "process_seconds": wall,
                             "load": load(),
                             "overhead_ms": 1000 * (result["wall_seconds"] - startup) / count})
                print(rows[-1], flush=True)
    save("scheduler", rows)
    for tracked in (False, True):
        runs = [r for r in rows if r["tracked"] == tracked]
        if not runs:
            continue
        flat = runs[-1]["overhead_ms"] / runs[0]["overhead_ms"]
        for r in runs:
            table_row(
                "scheduler", f"{r['images']} images of {SIZE}² px (1 tile, 1 block each), trivial FCN, "
                f"{r['workers']} workers, tracking {'sqlite' if tracked else 'off'}, 1 run",
                f"{r['overhead_ms']:.1f} ms per image (target {OVERHEAD_TARGET_MS:.0f} ms: "
                f"{verdict(r['overhead_ms'] < OVERHEAD_TARGET_MS)}); wall {r['wall_seconds']:.1f} s, start-up "
                f"{r['phases'].get('startup', 0.0):.1f} s, manifest median {1000 * r['manifest_seconds_median']:.0f} "
                f"ms per image; driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB, all processes "
                f"{r['peak_pss_mib'] / 1024:.2f} GiB PSS; load {r['load']:.1f}"
                + (f"; {flat:.2f}x the {runs[0]['images']}-image figure (target within {FLAT_WITHIN}x: "
                   f"{verdict(flat <= FLAT_WITHIN)})" if r is runs[-1] and len(runs) > 1 else ""),
            )


if __name__ == "__main__":
    main()
