"""What every benchmark shares: the machine line, scenes and models, peak memory, results and table rows."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipeline.memory import PeakMemory
from pipeline.models.bundle import BundleSpec, ClassInfo, ModelBundle, Normalization
from pipeline.synthetic import CLASSES, generate_scene

RESULTS = Path(__file__).parent / "results"
TABLE = Path(__file__).parents[1] / "docs" / "benchmarks.md"
DOCS = Path(__file__).parents[1] / "docs"
CPUS = os.cpu_count() or 1
QUICK = os.environ.get("TESSERA_BENCH_QUICK") == "1"  # `python -m bench --quick`: check only, record nothing


SMALL_UNET = {"encoder_name": "tu-mobilenetv3_small_100", "encoder_depth": 3, "decoder_channels": (32, 16, 8)}
"""The small U-Net (a MobileNetV3-small encoder cut after stride 8, from scratch): the training default until
2026-11-30, and still the segment benchmarks' model, so that their rows stay comparable ("demo U-Net" in
docs/benchmarks.md)."""


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {CPUS} cores, torch {torch.__version__}, {gpu}"


def demo_like_bundle(path: Path) -> Path:
    """The benchmarks' demo U-Net (`SMALL_UNET`), freshly initialised (speed does not depend on the weights)."""
    spec = BundleSpec(
        architecture="unet", arch_args=SMALL_UNET, classes=CLASSES, bands=(1, 2, 3),
        normalization=Normalization(), tile_size=512, overlap=64,
    )
    ModelBundle.create(spec).save(path)
    return path


def tiny_bundle(path: Path) -> Path:
    """A 1-layer, 4-channel FCN with 2 classes: the job's own costs dominate, not the model's."""
    torch.manual_seed(0)
    spec = BundleSpec(
        architecture="fcn", arch_args={"depth": 1, "width": 4, "padding_mode": "reflect"},
        classes=(ClassInfo("background", (0, 0, 0)), ClassInfo("object", (230, 60, 60))), bands=(1, 2, 3),
        normalization=Normalization(), tile_size=512, overlap=64,
    )
    ModelBundle.create(spec).save(path)
    return path


def write_large_scene(path: Path, size: int, *, foreground: float = 1.0, seed: int = 11, motif: int = 2048) -> Path:
    """A size x size RGB GeoTIFF built from one generated motif, mirrored so that it has no edges.

    Written window by window (never whole in memory), tiled 512, uncompressed so that writing it is
    quick. Rows below `foreground` x size are nodata (0), for the background-skipping benchmark.
    """
    image = generate_scene(min(motif, size), min(motif, size), seed).image
    m = image.shape[-1]
    fg_rows = round(foreground * size)
    profile = {
        "driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "tiled": True,
        "blockxsize": 512, "blockysize": 512, "crs": "EPSG:32632", "nodata": 0,
        "transform": from_origin(500000.0, 5200000.0, 0.5, 0.5), "BIGTIFF": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for i, y0 in enumerate(range(0, size, m)):
            for j, x0 in enumerate(range(0, size, m)):
                block = image[:, :: -1 if i % 2 else 1, :: -1 if j % 2 else 1]
                h, w = min(m, size - y0), min(m, size - x0)
                block = np.ascontiguousarray(block[:, :h, :w])
                valid_rows = max(0, min(h, fg_rows - y0))
                np.maximum(block[:, :valid_rows], 1, out=block[:, :valid_rows])  # no valid pixel reads as 0
                block[:, valid_rows:] = 0
                dst.write(block, window=Window(x0, y0, w, h))
    return path


def run_sampled(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run `python -m bench.job ARGS` in a fresh process; its JSON result and its peak PSS in MiB."""
    cmd = [sys.executable, "-m", "bench.job", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, **(env or {})})
    with PeakMemory(proc.pid, interval=0.2) as memory:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, memory.peak_mib


def save(name: str, rows: list[dict[str, Any]]) -> None:
    if QUICK:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                                      "rows": rows}, indent=2))


def table_row(benchmark: str, workload: str, result: str) -> None:
    if QUICK:
        print(f"(quick, not recorded) {benchmark} | {workload} | {result}")
        return
    with TABLE.open("a") as f:
        f.write(f"| {benchmark} | {time.strftime('%Y-%m-%d')} | {machine()} | {workload} | {result} |\n")
