"""The same segment job writing its mosaic to a local disk and to an S3 server (issue 16).

    python -m bench.storage [--size 8192] [--repeats 3]

Runs `tessera segment scene.tif --out OUT --quiet` as a user does, in a fresh process each time, with
the tiny FCN (so that the job's own costs, writes among them, are not hidden behind the model's),
OUT alternating between a local folder and `s3://bench/m.zarr` on moto's S3 server, started here on
127.0.0.1 as its own process (a local S3-compatible server: requests are real HTTP, but no network
latency). Records, median of the repeats: process wall time, the blocks phase, time per block (blocks
phase / blocks written), and what was written: bytes and objects (files) of the finished mosaic.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import save, table_row, tiny_bundle, write_large_scene
from pipeline.mosaic import Mosaic
from tests.servers.ports import start_server, stop

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in its own process on a free port (checked to be the one answering there); the
    environment that points boto at it."""
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), seconds=30)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        yield env
    finally:
        stop(server)


def bucket_fs(env: dict[str, str]) -> Any:
    """An s3fs file system on the server `env` points at."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def written(out: str, env: dict[str, str]) -> tuple[int, int]:
    """(bytes, objects) of the mosaic at `out`, a folder or an s3:// URL."""
    if out.startswith("s3://"):
        fs = bucket_fs(env)
        sizes = [info["size"] for info in fs.find(out, detail=True).values()]
    else:
        sizes = [p.stat().st_size for p in Path(out).rglob("*") if p.is_file()]
    return sum(sizes), len(sizes)


def clear(out: str, env: dict[str, str]) -> None:
    if out.startswith("s3://"):
        fs = bucket_fs(env)
        if fs.exists(out):
            fs.rm(out, recursive=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


def run_once(scene: Path, model: Path, out: str, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    clear(out, env)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_"))}
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", str(scene), "--model", str(model), "--out", out,
           "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env={**clean, **env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        summary = Mosaic.open(out).lineage["summary"]
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    size, objects = written(out, env)
    blocks = summary["blocks_written"]
    return {"wall": wall, "blocks_phase": summary["phases"]["blocks"], "blocks": blocks,
            "seconds_per_block": summary["phases"]["blocks"] / blocks, "bytes": size, "objects": objects,
            "phases": summary["phases"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-storage-") as tmp, s3_server() as env:
        folder = Path(tmp)
        scene = write_large_scene(folder / "scene.tif", args.size)
        model = tiny_bundle(folder / "tiny.bundle")
        bucket_fs(env).mkdir("bench")
        targets = {"local": str(folder / "m.zarr"), "s3": "s3://bench/m.zarr"}
        local_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        run_once(scene, model, targets["local"], folder, local_env)  # the tracking store is made, unmeasured
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for _ in range(args.repeats):
            for name, out in targets.items():
                runs[name].append(run_once(scene, model, out, folder, {**local_env, **env}))
                print(name, {k: v for k, v in runs[name][-1].items() if k != "phases"}, flush=True)
    medians = {name: {key: statistics.median(r[key] for r in measured)
                      for key in ("wall", "blocks_phase", "seconds_per_block", "bytes", "objects")}
               for name, measured in runs.items()}
    local, s3 = medians["local"], medians["s3"]
    rows = [{"target": name, "size": args.size, "repeats": args.repeats, **medians[name], "runs": runs[name]}
            for name in runs]
    blocks = runs["local"][0]["blocks"]
    workload = (f"{args.size}² px RGB, tiny FCN, `tessera segment` in a fresh process, {blocks} blocks, "
                f"median of {args.repeats}")
    for name, m in medians.items():
        table_row("storage", f"{workload}, mosaic on {'a local disk' if name == 'local' else 'moto S3 on 127.0.0.1'}",
                  f"wall {m['wall']:.1f} s, blocks phase {m['blocks_phase']:.1f} s "
                  f"({m['seconds_per_block']:.2f} s per block), written {m['bytes'] / 2**20:.1f} MiB "
                  f"in {m['objects']:.0f} objects")
    table_row("storage", f"{workload}: S3 against local",
              f"wall {s3['wall'] / local['wall']:.2f}x, "
              f"time per block {s3['seconds_per_block'] / local['seconds_per_block']:.2f}x, "
              f"bytes {s3['bytes'] / local['bytes']:.3f}x")
    save("storage", rows)


if __name__ == "__main__":
    main()
