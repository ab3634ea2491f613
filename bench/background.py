"""Background skipping: job time against the image's foreground fraction.

    python -m bench.background [--size 8192] [--fractions 1 0.5 0.25]

The same scene with its lower rows set to nodata, segmented end to end with the tiny model of the
memory benchmark and default settings (tiles without foreground are not computed). One run per
fraction; the fixed start-up is reported apart so that the part that scales with the foreground is
visible. 8192² px makes 16 blocks, so skipping is not hidden behind the few busy blocks of a small
image (at 4096² only 2 blocks stay busy below 50% foreground).
Results go to bench/results/background.json and rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import save, table_row, tiny_bundle, write_large_scene
from pipeline.execution import SegmentConfig, segment
from pipeline.tracking import Tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=8192, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="default: %(default)s")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bundle = tiny_bundle(d / "tiny.bundle")
        for fraction in args.fractions:
            scene = write_large_scene(d / f"scene{fraction}.tif", args.size, foreground=fraction)
            s = segment(SegmentConfig(source=str(scene), model=str(bundle), output=str(d / "m.zarr"), device="cpu",
                                      progress=False, overwrite=True, tracking=Tracking(enabled=False)))
            rows.append({"size": args.size, "foreground": fraction, "seconds": s.wall_seconds,
                         "startup_seconds": s.phases["startup"], "blocks_seconds": s.phases["blocks"],
                         "tiles_total": s.tiles_total, "tiles_computed": s.tiles_computed,
                         "tiles_skipped": s.tiles_skipped, "workers": s.workers})
            print(rows[-1], flush=True)
    full = rows[0]["blocks_seconds"]
    for r in rows:
        r["blocks_vs_full"] = r["blocks_seconds"] / full
    save("background", rows)
    for r in rows:
        table_row("background skipping", f"{r['size']}² px, {100 * r['foreground']:.0f}% foreground, tiny FCN, "
                                         f"{r['workers']} workers, 1 run",
                  f"{r['tiles_computed']} of {r['tiles_total']} tiles computed; job {r['seconds']:.1f} s "
                  f"(start-up {r['startup_seconds']:.1f} s, blocks {r['blocks_seconds']:.1f} s = "
                  f"{r['blocks_vs_full']:.2f}x the {100 * rows[0]['foreground']:.0f}% case)")


if __name__ == "__main__":
    main()
