"""`make bench`: every benchmark in turn, each appending its rows to docs/benchmarks.md.

    python -m bench [--quick]

`--quick` runs each at a small size to check that they work, and records nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

FULL = [
    ["bench.efficiency"],
    ["bench.memory"],
    ["bench.background"],
    ["bench.training"],
    ["bench.training", "--loading"],
    ["bench.training", "--memory"],
    ["bench.finetune"],
    ["bench.query"],
    ["bench.service_cost", "--max-memory", "1024"],
    ["bench.models"],
    ["bench.models", "--runtimes"],
    ["bench.refine"],
    ["bench.collection"],
    ["bench.scheduler"],
    ["bench.startup"],
    ["bench.storage"],
]
QUICK = [
    ["bench.efficiency", "--size", "1024", "--repeats", "1"],
    ["bench.memory", "--sizes", "1024", "2048"],
    ["bench.background", "--size", "1024", "--fractions", "1", "0.5"],
    ["bench.training", "--steps-per-epoch", "5", "--batch", "4", "--window", "64"],
    ["bench.training", "--loading", "--steps", "4"],
    ["bench.training", "--memory", "--sizes", "1024", "2048"],
    ["bench.finetune", "--seeds", "0", "--steps", "100", "--pretrain-steps", "30", "--pretrain-size", "512"],
    ["bench.query", "--size", "2048", "--requests", "20"],
    ["bench.service_cost", "--size", "1024", "--burst", "4"],
    ["bench.models", "--repeats", "1"],
    ["bench.models", "--runtimes", "--repeats", "1"],
    ["bench.refine", "--size", "1024", "--seeds", "1"],
    ["bench.collection", "--images", "3", "--size", "1024", "--memory-counts", "2", "3"],
    ["bench.scheduler", "--counts", "20", "50"],
    ["bench.startup", "--size", "1024", "--repeats", "1"],
    ["bench.storage", "--size", "1024", "--repeats", "1"],
]


def parser() -> argparse.ArgumentParser:
    """`python -m bench`'s options; its --help lists the benchmarks it runs."""
    plan = "\n".join(f"  python -m {' '.join(args)}" for args in FULL)
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Every benchmark in turn, each in its own process, appending its rows to docs/benchmarks.md "
                    "and its results to bench/results/ (the last full run's time is in docs/benchmarks.md).",
        epilog=f"The benchmarks, in order (each takes --help):\n{plan}\n  python -m bench.gpu, and "
               "python -m bench.models --runtimes --device cuda, where a GPU is present",
    )
    parser.add_argument("--quick", action="store_true",
                        help="each at a small size, to check that they work; records nothing")
    return parser


def main() -> None:
    options = parser().parse_args()
    import torch  # after parsing: `--help` starts nothing and returns at once

    plan = QUICK if options.quick else FULL
    if torch.cuda.is_available():
        plan = [*plan, ["bench.gpu"], ["bench.models", "--runtimes", "--device", "cuda"]]
    else:
        print("no GPU here: bench.gpu and the GPU runtimes skipped (run them on a GPU machine)")
    start = time.perf_counter()
    for args in plan:
        tick = time.perf_counter()
        env = {**os.environ, "TESSERA_BENCH_QUICK": "1"} if plan is QUICK else None
        subprocess.run([sys.executable, "-m", *args], check=True, env=env)
        print(f"{args[0]}: {time.perf_counter() - tick:.0f} s", flush=True)
    print(f"all benchmarks: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
