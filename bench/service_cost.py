"""What hostile or careless requests cost `tessera serve`: a noisy polygons request and a burst of large
region reads, against a real server on 127.0.0.1.

    python -m bench.service_cost [--size 4096] [--burst 16] [--max-memory MIB]

Two mosaics of random classes (seeded, 5 classes: every pixel its own little polygon): 1024 x 1024 px,
for `GET polygons.geojson` of the whole window (time, status, body size, the server's peak PSS), and
`--size` px, for `--burst` concurrent `GET region.npy` of the whole level-0 mask (time, statuses, peak
and settled PSS), with a listing asked during the burst (its time). `--max-memory` is passed to
`tessera serve` (the heavy-request budget); without it, the server's default. Results go to
bench/results/service_cost.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save, table_row
from pipeline.memory import PeakMemory
from pipeline.synthetic import write_label_mosaic
from tests.servers.ports import http_answers, start_server


def get(url: str) -> tuple[int, int, float]:
    """(status, body bytes, seconds) of a GET."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=600) as answer:
            return answer.status, len(answer.read()), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, len(e.read()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--burst", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--max-memory", type=int, default=None, help="MiB, passed to tessera serve")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_label_mosaic(rng.integers(0, 5, (1024, 1024), dtype=np.uint8), root / "noisy.zarr", chunk=512, shard=1024)
        write_label_mosaic(rng.integers(0, 5, (args.size, args.size), dtype=np.uint8), root / "big.zarr",
                           chunk=512, shard=2048)
        budget = ["--max-memory", str(args.max_memory)] if args.max_memory else []
        server, port = start_server(lambda port: subprocess.Popen(
            [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port),
             "--max-region-pixels", str(args.size * args.size), *budget],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
        url = f"http://127.0.0.1:{port}"
        try:
            with PeakMemory(server.pid, 0.1) as idle:
                time.sleep(0.5)
            with PeakMemory(server.pid, 0.05) as noisy:
                status, size, seconds = get(f"{url}/api/mosaics/noisy.zarr/polygons.geojson?window=0,0,1024,1024")
            polygons = {"status": status, "bytes": size, "seconds": round(seconds, 2),
                        "peak_mib": round(noisy.peak_mib)}
            answers: list[tuple[int, int, float]] = []
            window = f"0,0,{args.size},{args.size}"
            threads = [threading.Thread(target=lambda: answers.append(get(f"{url}/api/mosaics/big.zarr/region.npy"
                                                                           f"?window={window}")))
                       for _ in range(args.burst)]
            with PeakMemory(server.pid, 0.05) as burst:
                start = time.perf_counter()
                for thread in threads:
                    thread.start()
                time.sleep(0.3)
                listing = get(f"{url}/api/mosaics")
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - start
            time.sleep(1)
            with PeakMemory(server.pid, 0.1) as after:
                time.sleep(0.5)
        finally:
            server.terminate()
            server.wait(timeout=20)
    row: dict[str, Any] = {
        "idle_mib": round(idle.peak_mib), "polygons": polygons,
        "burst": {"requests": args.burst, "size": args.size, "statuses": sorted(a[0] for a in answers),
                  "seconds": round(wall, 2), "peak_mib": round(burst.peak_mib), "settled_mib": round(after.peak_mib),
                  "listing_status": listing[0], "listing_seconds": round(listing[2], 3)},
        "max_memory_mib": args.max_memory,
    }
    print(row)
    save("service_cost", [row])
    table_row("service cost, noisy polygons", "1024² px of 5 random classes, GET polygons.geojson of it all",
              f"{status} in {polygons['seconds']} s, {size / 2**20:.1f} MiB body, server peak "
              f"{polygons['peak_mib']} MiB (idle {row['idle_mib']})")
    table_row("service cost, region burst",
              f"{args.burst} concurrent GET region.npy of {args.size}² px, --max-memory "
              f"{args.max_memory or 'default'}",
              f"statuses {sorted(set(row['burst']['statuses']))} in {row['burst']['seconds']} s, server peak "
              f"{row['burst']['peak_mib']} MiB, {row['burst']['settled_mib']} MiB after; a listing meanwhile "
              f"{listing[0]} in {row['burst']['listing_seconds']} s")


if __name__ == "__main__":
    main()
