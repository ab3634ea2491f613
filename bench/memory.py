"""Peak memory of all processes against image size, tessera against MONAI, with a tiny model.

    python -m bench.memory [--sizes 4096 8192 16384 32768]

Each job runs in a fresh process (`bench.job`) whose whole process tree (embedded Ray included) is
sampled for summed PSS every 0.2 s. MONAI's `sliding_window_inference` holds the image, the output
and its weight sums in memory, so it is run only where its estimated need fits in half the RAM
(and, to keep `make bench` under 15 minutes, up to --monai-max).
Results go to bench/results/memory.json, rows in docs/benchmarks.md and docs/bench-memory.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.common import DOCS, QUICK, run_sampled, save, table_row, tiny_bundle, write_large_scene


def monai_need_mib(size: int, bands: int = 3, classes: int = 2) -> float:
    """Float32 image, output and count map, plus the uint8 read and the mask: MONAI's floor."""
    return size * size * (4 * bands + 4 * classes + 4 + bands + 1 + 2 * classes) / 2**20


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key in (("tessera", "tessera_peak_mib"), ("MONAI sliding window", "monai_peak_mib")):
        pts = [(r["size"], r[key] / 1024) for r in rows if r.get(key)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["size"] for r in rows], [f"{r['size'] // 1024}k²" for r in rows])
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("peak memory, all processes (GiB PSS)")
    ax.set_ylim(bottom=0)
    ax.set_title("Peak memory against image size (tiny model, CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                        help="edges of the generated images, px (default: %(default)s)")
    parser.add_argument("--monai-max", type=int, default=8192,
                        help="largest size MONAI runs at (16384 fits in 24 GiB but takes about 3 minutes)")
    args = parser.parse_args()
    budget = psutil.virtual_memory().total / 2**20 / 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = str(tiny_bundle(d / "tiny.bundle"))
        for size in args.sizes:
            source = str(write_large_scene(d / f"scene{size}.tif", size))
            tessera, tessera_peak = run_sampled(["tessera", source, model, str(d / "t.zarr")])
            row: dict[str, Any] = {"size": size, "tessera_seconds": tessera["seconds"],
                                   "tessera_peak_mib": tessera_peak, "workers": tessera["workers"],
                                   "monai_need_mib": monai_need_mib(size)}
            if row["monai_need_mib"] < budget and size <= args.monai_max:
                monai, monai_peak = run_sampled(["monai", source, model, str(d / "m.zarr")])
                row.update(monai_seconds=monai["seconds"], monai_peak_mib=monai_peak)
            rows.append(row)
            print(row, flush=True)
            for path in d.glob("scene*.tif"):
                path.unlink()
    base = rows[0]["tessera_peak_mib"]
    for r in rows:
        r["tessera_peak_vs_first"] = r["tessera_peak_mib"] / base
    save("memory", rows)
    if not QUICK:
        plot(rows, DOCS / "bench-memory.png")
    for r in rows:
        peer = (f"MONAI {r['monai_peak_mib'] / 1024:.2f} GiB in {r['monai_seconds']:.1f} s"
                 if "monai_peak_mib" in r else
                 f"MONAI not run: needs at least {r['monai_need_mib'] / 1024:.1f} GiB"
                 + (", over half this machine's RAM" if r["monai_need_mib"] >= budget
                    else f" (skipped: --monai-max {args.monai_max})"))
        table_row("peak memory", f"{r['size']}² px RGB, tiny FCN (1 layer, 2 classes), {r['workers']} workers",
                  f"tessera {r['tessera_peak_mib'] / 1024:.2f} GiB PSS all processes "
                  f"({r['tessera_peak_vs_first']:.2f}x the {args.sizes[0]}² peak) in {r['tessera_seconds']:.1f} s; "
                  f"{peer}")


if __name__ == "__main__":
    main()
