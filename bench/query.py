"""Query latency: a 1024 x 1024 region read and a map tile, on a local mosaic, in-process and over HTTP.

    python -m bench.query [--size 8192] [--requests 200]

The mosaic is written by the same block-and-pyramid code as a segment job (`write_label_mosaic`, the
format's default 512 px chunks in 2048 px shards, 5 classes of float16 scores) from a generated scene,
mirrored to `--size`. Each request picks a random window or tile (seeded), so reads hit different
chunks; the operating system's file cache is warm, as on a server that has been up a while.

- region: `read_region` of a 1024 x 1024 level-0 window (mask, and scores for all classes), and
  `GET region.png` (the mask as a paletted PNG) and `GET region.npy` (the mask) from `tessera serve`;
- tile: `xyz_tile` of a random 256 px Web Mercator tile over the mosaic at the top three zooms, and
  `GET tiles/{z}/{x}/{y}.png` (mask, then the source preview) from `tessera serve`.

HTTP requests go over one kept-alive connection from this process to the server process on
127.0.0.1. Results go to bench/results/query.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save, table_row
from pipeline.mosaic import Mosaic
from pipeline.query import read_region, xyz_tile
from pipeline.query.tiles import MosaicLayer
from pipeline.synthetic import generate_scene, write_label_mosaic, write_scene
from tests.servers.ports import http_answers, start_server

REGION = 1024


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[math.ceil(0.95 * len(ms)) - 1], 2),
            "max_ms": round(ms[-1], 2), "n": len(ms)}


def timed(calls: list[Callable[[], Any]]) -> dict[str, float]:
    calls[0]()  # one warm-up request (imports, first connection)
    samples = []
    for call in calls:
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def mirrored(labels: np.ndarray, size: int) -> np.ndarray:
    reps = math.ceil(size / labels.shape[0])
    tile = np.block([[labels, labels[:, ::-1]], [labels[::-1], labels[::-1, ::-1]]])
    return np.tile(tile, (reps, reps))[:size, :size]


def tile_of(lon: float, lat: float, z: int) -> tuple[int, int]:
    n = 2**z
    return int((lon + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=8192, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200,
                        help="random requests per measurement (default: %(default)s)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        motif = generate_scene(min(args.size, 2048), min(args.size, 2048), seed=5)
        write_scene(motif, root / "motif.tif", root / "motif_labels.tif")
        start = time.perf_counter()
        m = write_label_mosaic(mirrored(motif.labels, args.size), root / "scene.zarr", chunk=512, shard=2048,
                               lineage={"source": {"path": str(root / "motif.tif"), "level": 0}})
        print(f"mosaic {args.size}^2 written in {time.perf_counter() - start:.0f} s")
        m = Mosaic.open(root / "scene.zarr")
        windows = [(int(y), int(x), int(y) + REGION, int(x) + REGION)
                   for y, x in rng.integers(0, args.size - REGION, (args.requests, 2))]
        from pipeline.query.info import mosaic_info

        w, s, e, n = mosaic_info(m)["bounds_wgs84"]
        from pipeline.service.app import tile_scheme

        top = tile_scheme("scene.zarr", m)["max_zoom"]
        tiles = []
        for _ in range(args.requests):
            z = top - int(rng.integers(0, 3))
            x, y = tile_of(rng.uniform(w, e), rng.uniform(s, n), z)
            tiles.append((z, x, y))
        layer = MosaicLayer(m)
        results: dict[str, dict[str, float]] = {
            "region mask, read_region": timed([lambda w=w: read_region(m, window=w) for w in windows]),
            "region scores, read_region": timed([lambda w=w: read_region(m, "scores", window=w) for w in windows]),
            "tile mask, xyz_tile": timed([lambda t=t: xyz_tile(layer, *t) for t in tiles]),
        }
        # A free port, and the server answering there checked to be the one started here.
        server, port = start_server(lambda port: subprocess.Popen(
            [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
            stdout=subprocess.DEVNULL), http_answers("/api/mosaics"))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

            def get(path: str) -> None:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200, (path, response.status, body[:200])

            api = "/api/mosaics/scene.zarr"
            win = ",".join
            results["region mask, GET region.png"] = timed(
                [lambda w=w: get(f"{api}/region.png?window={win(map(str, w))}") for w in windows])
            results["region mask, GET region.npy"] = timed(
                [lambda w=w: get(f"{api}/region.npy?window={win(map(str, w))}") for w in windows])
            results["tile mask, GET tiles"] = timed([lambda t=t: get(f"{api}/tiles/{t[0]}/{t[1]}/{t[2]}.png")
                                                     for t in tiles])
            results["tile source, GET tiles"] = timed(
                [lambda t=t: get(f"{api}/tiles/{t[0]}/{t[1]}/{t[2]}.png?layer=source") for t in tiles])
            conn.close()
        finally:
            server.terminate()
            server.wait()
    rows = [{"measure": k, "size": args.size, **v} for k, v in results.items()]
    for row in rows:
        print(f"{row['measure']:32s} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  "
              f"max {row['max_ms']:7.2f}")
    save("query", rows)
    workload = f"{args.size}^2 mosaic (512 px chunks, 2048 px shards, 5 classes), {args.requests} random requests"
    for row in rows:
        table_row("query", f"{workload}: {row['measure']}", f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms")


if __name__ == "__main__":
    main()
