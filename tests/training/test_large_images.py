"""Training on images far larger than memory: the peak does not grow with the image.

A 16384 x 16384 px tiled GeoTIFF and a 16384 px whole-slide-like pyramidal OME-TIFF (with a class
mask at 1/16 of its size, as slides are labelled) train with the peak memory of a 2048 x 2048 image
under the same settings. Each run is the training job in its own process, its peak PSS sampled by
`pipeline.memory.PeakMemory`. The bound asserted is loose (1.3x); the figures for 2048, 8192 and 16384 px
are measured by `python -m bench.training --memory` (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.memory import PeakMemory
from pipeline.synthetic import CLASSES, write_large_scene, write_large_slide

REPO = Path(__file__).resolve().parents[2]
# Small and quick, the same for every image: the image's size is what changes.
SETTINGS = ["architecture=fcn", "arch_args={depth: 3, width: 16}", "tile_size=128", "inference_tile_size=256",
            "overlap=32", "batch_size=8", "steps=8", "steps_per_epoch=8", "val_fraction=0.01", "progress=false",
            "cluster.workers=0", "tracking.enabled=false", "cluster.threads=1"]


def peak_of_training(args: list[str], cwd: Path) -> float:
    """The training job's peak PSS in MiB (its class index built afresh: a cache of its own)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_CACHE": str(cwd / "cache")}
    job = subprocess.Popen([sys.executable, "-m", "jobs.train", *args, *SETTINGS], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(job.pid, interval=0.1) as peak:
        output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    assert "validation mIoU" in output
    return peak.peak_mib


@pytest.mark.slow(seconds=60)
def test_a_16384_px_geotiff_and_slide_train_in_the_memory_of_a_2048_px_image(tmp_path: Path) -> None:
    write_large_scene(tmp_path / "small.tif", tmp_path / "small_labels.tif", 2048, seed=1, compress=False)
    write_large_scene(tmp_path / "large.tif", tmp_path / "large_labels.tif", 16384, seed=1, compress=False)
    write_large_slide(tmp_path / "slide.ome.tif", tmp_path / "slide_mask.png", 16384, seed=1, levels=2, compress=False)
    catalog = {"task": "slide", "classes": [{"name": c.name, "color": list(c.color)} for c in CLASSES],
               "pairs": [{"image": "slide.ome.tif", "mask": "slide_mask.png"}]}
    (tmp_path / "slide.yaml").write_text(yaml.safe_dump(catalog))

    small = peak_of_training(["image=small.tif", "labels=small_labels.tif", "output=small.bundle"], tmp_path)
    large = peak_of_training(["image=large.tif", "labels=large_labels.tif", "output=large.bundle"], tmp_path)
    slide = peak_of_training(["catalog=slide.yaml", "output=slide.bundle"], tmp_path)
    # 64x the pixels; the whole large image would take 768 MiB for its values alone.
    assert large < 1.3 * small, (small, large)
    assert slide < 1.3 * small, (small, slide)
