"""The fixed part of one image's `tessera segment` command: everything but the blocks phase.

    python -m bench.startup [--size 4096] [--repeats 3] [--before PATH]

Runs `tessera segment scene.tif --out m.zarr` as a user does, in a fresh process each time, with the
demo's U-Net, default settings and MLflow tracking to a sqlite file made by a first, unmeasured run.
The fixed part is the process's wall time minus the blocks phase the mosaic's lineage records: the
imports, Ray's start, the workers' start and model load, opening and planning the image, the pyramid,
finishing the mosaic and tracking, Ray's shutdown. `--before PATH` measures another checkout of
tessera (e.g. a `git worktree` of an older commit) on the same files, alternating runs with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.collection import verdict
from bench.common import demo_like_bundle, save, table_row, write_large_scene
from pipeline.mosaic import Mosaic

REPO = Path(__file__).resolve().parents[1]


def run_once(repo: Path, scene: Path, model: Path, folder: Path) -> dict[str, Any]:
    """One `tessera segment` in a fresh process, from `repo`; its wall time and recorded phases."""
    out = folder / "m.zarr"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", str(scene), "--model", str(model), "--out", str(out),
           "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    phases = Mosaic.open(out).lineage["summary"]["phases"]
    return {"wall": wall, "blocks": phases["blocks"], "fixed": wall - phases["blocks"], "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default: %(default)s)")
    parser.add_argument("--before", type=Path, help="another tessera checkout to measure on the same files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-startup-") as tmp:
        folder = Path(tmp)
        scene = write_large_scene(folder / "scene.tif", args.size)
        model = demo_like_bundle(folder / "demo.bundle")
        repos = {"after": REPO} | ({"before": args.before.resolve()} if args.before else {})
        for repo in repos.values():
            run_once(repo, scene, model, folder)  # the tracking store is created; a user's later runs find it
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in repos}
        for _ in range(args.repeats):
            for name, repo in repos.items():
                runs[name].append(run_once(repo, scene, model, folder))
                print(name, json.dumps(runs[name][-1]), flush=True)
    rows = []
    for name, measured in runs.items():
        fixed = statistics.median(r["fixed"] for r in measured)
        wall = statistics.median(r["wall"] for r in measured)
        phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in measured)
                  for k in measured[0]["phases"] if k != "blocks"}
        rows.append({"checkout": name, "repo": str(repos[name]), "size": args.size, "repeats": args.repeats,
                     "fixed_seconds": fixed, "wall_seconds": wall, "phases": phases, "runs": measured})
        named = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        table_row("startup", f"one {args.size}² px image, demo U-Net, `tessera segment` in a fresh process, "
                  f"defaults, {args.repeats} runs ({name}: {repos[name].name})",
                  f"fixed part (wall - blocks) median {fixed:.1f} s of {wall:.1f} s; recorded phases: {named} "
                  f"(target under 5 s: {verdict(fixed < 5)})")
    save("startup", rows)


if __name__ == "__main__":
    main()
