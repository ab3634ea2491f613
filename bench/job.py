"""One measured job in a fresh process, for `bench.common.run_sampled`; prints one JSON line.

    python -m bench.job tessera SOURCE MODEL OUT [--workers N]
    python -m bench.job monai SOURCE MODEL OUT

Timing starts after the imports, as a user's script would have them loaded, and covers GeoTIFF in
to finished output written: for tessera the whole `segment` call (embedded Ray start, workers,
pyramid), for MONAI reading the image into memory, `sliding_window_inference`, argmax and the same
Zarr arrays (scores float16 and mask, chunks of 512) with no pyramid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import zarr

from bench.common import CPUS
from pipeline.execution import SegmentConfig, segment
from pipeline.models.bundle import ModelBundle
from pipeline.tracking import Tracking


def run_tessera(source: str, model: str, out: str, workers: int | None) -> dict[str, float]:
    config = SegmentConfig(source=source, model=model, output=out, workers=workers, device="cpu", progress=False,
                           overwrite=True, tracking=Tracking(enabled=False))
    summary = segment(config)
    return {"seconds": summary.wall_seconds, "workers": summary.workers, "tiles": summary.tiles_computed,
            **{f"{k}_seconds": v for k, v in summary.phases.items()}}


def run_monai(source: str, model: str, out: str) -> dict[str, float]:
    from monai.inferers import sliding_window_inference

    bundle = ModelBundle.load(model)
    net = bundle.model.eval()
    torch.set_num_threads(CPUS)
    tile, overlap = bundle.spec.tile_size, bundle.spec.overlap
    start = time.perf_counter()
    with rasterio.open(source) as ds:
        image = ds.read(list(bundle.spec.bands))
    x = bundle.spec.normalization.apply(torch.from_numpy(image[None]).float())
    del image
    with torch.inference_mode():
        scores = sliding_window_inference(x, (tile, tile), 8, net, overlap=overlap / tile, mode="gaussian",
                                          sigma_scale=0.125)[0]  # type: ignore[index]
    del x
    mask = scores.argmax(0).to(torch.uint8).numpy()
    group = zarr.open_group(out, mode="w")
    c, h, w = scores.shape
    group.create_array("scores", shape=(c, h, w), chunks=(c, 512, 512), dtype="float16")[:] = scores.half().numpy()
    group.create_array("mask", shape=(h, w), chunks=(512, 512), dtype="uint8")[:] = mask
    return {"seconds": time.perf_counter() - start, "tiles": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["tessera", "monai"])
    parser.add_argument("source")
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "tessera":
        result = run_tessera(args.source, args.model, args.out, args.workers)
    else:
        result = run_monai(args.source, args.model, args.out)
    print(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
