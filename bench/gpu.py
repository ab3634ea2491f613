"""On a GPU: the job's tiles/s against the bare model in bf16 on the same GPU, and GPU utilisation.

    python -m bench.gpu [--size 16384] [--layouts 1:on 1:off 2:on]

Layouts are ACTORS_PER_GPU:PIPELINED. The bare figure is the model alone under bf16 autocast and
channels_last on tensors already on the GPU, over as many tiles in the same batches. Utilisation is
sampled from nvidia-smi every 200 ms during each job's blocks phase and averaged. Results go to
bench/results/gpu.json and rows in docs/benchmarks.md. Without a GPU it says so and exits 0
(`--device cpu --size 1024` runs the same code on CPU, to check it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import demo_like_bundle, save, table_row, write_large_scene
from pipeline.execution import SegmentConfig, prepare, segment
from pipeline.inference import InferenceOptions, Predictor
from pipeline.tracking import Tracking


class GpuUtilisation:
    """Samples nvidia-smi's utilisation.gpu (percent) in a thread; empty where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuUtilisation:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200",
                 "-i", "0"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), float(line)))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None


def bare_tiles_per_second(config: SegmentConfig, tiles: int, repeats: int = 3) -> float:
    """The model alone in bf16 (autocast) and channels_last, inputs already on the device."""
    source, bundle, grid = prepare(config)
    predictor = Predictor(bundle, InferenceOptions(device=config.device, batch_size=config.batch_size))
    raw = predictor.select_bands(source.read(0, 0, grid.tile, grid.tile))[None].repeat(config.batch_size, 0)
    x = bundle.spec.normalization.apply(torch.from_numpy(raw).float()).to(predictor.device)
    if predictor.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        predictor._forward(x)  # warm-up: cuDNN autotuning, lazy initialisation
        for _ in range(repeats):
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(0, tiles, config.batch_size):
                predictor._forward(x)
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return tiles / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=16384,
                        help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--layouts", nargs="+", default=["1:on", "1:off", "2:on"], help="default: %(default)s")
    parser.add_argument("--device", default="cuda", help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no GPU on this machine, nothing measured")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        scene = write_large_scene(d / "scene.tif", args.size)
        bundle = demo_like_bundle(d / "model.bundle")
        for layout in args.layouts:
            per_gpu, pipelined = layout.split(":")
            config = SegmentConfig(
                source=str(scene), model=str(bundle), output=str(d / "m.zarr"), device=args.device,
                batch_size=args.batch_size, actors_per_gpu=int(per_gpu), pipelined=pipelined == "on",
                workers=int(per_gpu) if args.device == "cpu" else None, progress=False, overwrite=True,
                tracking=Tracking(enabled=False))
            with GpuUtilisation() as gpu:
                start = time.perf_counter()
                s = segment(config)
                end = time.perf_counter()
            blocks_end = end - s.phases["pyramid"]
            blocks_start = blocks_end - s.phases["blocks"]
            rows.append({
                "size": args.size, "actors_per_gpu": int(per_gpu), "pipelined": pipelined == "on",
                "tiles": s.tiles_computed, "seconds": s.wall_seconds, "blocks_seconds": s.phases["blocks"],
                "job_tiles_per_s": s.tiles_computed / s.wall_seconds,
                "blocks_tiles_per_s": s.tiles_computed / s.phases["blocks"],
                "gpu_utilisation_blocks": gpu.mean(max(start, blocks_start), blocks_end),
            })
            print(rows[-1], flush=True)
        bare = bare_tiles_per_second(config, rows[0]["tiles"])
    for r in rows:
        r.update(bare_tiles_per_s=bare, blocks_vs_bare=r["blocks_tiles_per_s"] / bare,
                 job_vs_bare=r["job_tiles_per_s"] / bare)
    save("gpu" if args.device == "cuda" else "gpu-on-cpu", rows)
    if args.device != "cuda":
        return
    for r in rows:
        util = r["gpu_utilisation_blocks"]
        table_row("GPU", f"{r['size']}² px, {r['tiles']} tiles, demo U-Net bf16, batch {args.batch_size}, "
                         f"{r['actors_per_gpu']} actor(s)/GPU, pipelined {'on' if r['pipelined'] else 'off'}",
                  f"blocks phase {r['blocks_tiles_per_s']:.0f} tiles/s = {r['blocks_vs_bare']:.2f}x bare bf16 "
                  f"({bare:.0f} tiles/s); end to end {r['job_tiles_per_s']:.0f} tiles/s ({r['seconds']:.1f} s); "
                  f"GPU utilisation {'n/a' if util is None else f'{util:.0f}%'} during blocks")


if __name__ == "__main__":
    main()
