"""Dense CRF refinement: what it gains, how closely blocks match the whole, and what the job costs.

    python -m bench.refine [--size 4096] [--seeds 3]

1. Accuracy: generated scenes (1024 px, `--seeds` seeds) with `synthetic.coarse_logits` (one-hot
   truth blurred over 4 px plus noise, like a coarse decoder's), refined whole with the default
   settings; pixel accuracy, accuracy within 3 px of a class boundary (DeepLab's trimap) and mIoU,
   before and after. The same on the real SpaceNet Atlanta sample (panchromatic, building footprints)
   from ../shared/data when it is there.
2. Blocks against the whole: a 1024 px scene cut into 256 px blocks, each refined with a halo of 1 to
   4 times the bilateral sigma exactly as the job's tasks do, against the whole image refined at once.
3. A trained model: when `make demo` has left demo/scene.zarr (its U-Net on a 6000² generated scene)
   and the scene's truth, that mosaic refined with the defaults, scored before and after.
4. The job: `tessera refine` defaults (2048 px blocks, halo 200) on a `--size` scene on this machine,
   wall time, MPix/s and peak memory of all processes.
Results go to bench/results/refine.json and a row of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bench.common import DOCS, QUICK, save, table_row
from pipeline.crf import ColourScale, CRFSettings, refine
from pipeline.refinement import block_regions, with_halo
from pipeline.synthetic import CLASSES, coarse_logits, generate_scene, write_label_mosaic, write_scene

SPACENET = DOCS.parents[1] / "shared" / "data" / "geo" / "spacenet_atlanta"
DEMO = DOCS.parent / "demo"


def scores(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, float]:
    band = ndimage.binary_dilation(ndimage.morphological_gradient(truth, size=3) > 0, iterations=3)
    right = predicted == truth
    ious = [((predicted == c) & (truth == c)).sum() / max(((predicted == c) | (truth == c)).sum(), 1)
            for c in range(classes) if (truth == c).any()]
    return {"accuracy": float(right.mean()), "boundary_accuracy": float(right[band].mean()),
            "miou": float(np.mean(ious))}


def accuracy(seeds: int, settings: CRFSettings) -> dict[str, Any]:
    runs = []
    for seed in range(seeds):
        scene = generate_scene(1024, 1024, seed=100 + seed)
        logits = coarse_logits(scene.labels, len(CLASSES), seed=seed)
        q = refine(logits, "logits", ColourScale().apply(scene.image), (0, 0), settings)
        runs.append({"before": scores(scene.labels, logits.argmax(0), len(CLASSES)),
                     "after": scores(scene.labels, q.argmax(0), len(CLASSES))})
    median = {when: {k: statistics.median(r[when][k] for r in runs) for k in runs[0][when]}
              for when in ("before", "after")}
    return {"seeds": seeds, "median": median, "runs": runs}


def spacenet(settings: list[CRFSettings]) -> list[dict[str, Any]]:
    import rasterio

    if not SPACENET.is_dir():
        print(f"SpaceNet sample not found at {SPACENET}: skipped")
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mask file has no georeferencing
        image = rasterio.open(SPACENET / "sample_geotiff.tif").read()
        truth = (rasterio.open(SPACENET / "sample_fp_mask_from_geojson.tif").read(1) > 0).astype(np.uint8)
    colour = ColourScale.from_sample(image.reshape(image.shape[0], -1)).apply(image)
    logits = coarse_logits(truth, 2, seed=0)
    rows = []
    for s in settings:
        q = refine(logits, "logits", colour, (0, 0), s)
        iou = [float(((m == 1) & (truth == 1)).sum() / ((m == 1) | (truth == 1)).sum())
               for m in (logits.argmax(0), q.argmax(0))]
        rows.append({"settings": s.as_dict(), "building_iou_before": iou[0], "building_iou_after": iou[1],
                     **{f"{k}_after": v for k, v in scores(truth, q.argmax(0), 2).items()},
                     **{f"{k}_before": v for k, v in scores(truth, logits.argmax(0), 2).items()}})
    return rows


def halo_sweep(settings: CRFSettings, block: int = 256, size: int = 1024) -> list[dict[str, float]]:
    scene = generate_scene(size, size, seed=5)
    logits = coarse_logits(scene.labels, len(CLASSES), seed=1)
    colour = ColourScale().apply(scene.image)
    whole = refine(logits, "logits", colour, (0, 0), settings)
    rows = []
    for sigmas in (1, 2, 3, 4):
        halo = int(sigmas * settings.bilateral_sxy)
        out = np.empty_like(whole)
        for b in block_regions(size, size, block).values():  # as the job's tasks cut them
            o = with_halo(b, halo, size, size)
            q = refine(np.ascontiguousarray(logits[:, o.y0 : o.y1, o.x0 : o.x1]), "logits",
                       colour[o.y0 : o.y1, o.x0 : o.x1], (o.y0, o.x0), settings)
            out[:, b.y0 : b.y1, b.x0 : b.x1] = q[:, b.y0 - o.y0 : b.y1 - o.y0, b.x0 - o.x0 : b.x1 - o.x0]
        diff = np.abs(out - whole)
        row = {"halo": halo, "halo_sigmas": sigmas, "max_abs_diff": float(diff.max()),
               "mean_abs_diff": float(diff.mean()), "mask_agreement": float((out.argmax(0) == whole.argmax(0)).mean())}
        rows.append(row)
        print(f"halo {halo} px ({sigmas} sigma): max |dp| {row['max_abs_diff']:.4f}, mean {row['mean_abs_diff']:.1e}, "
              f"mask agreement {row['mask_agreement']:.6f}", flush=True)
    return rows


def demo_model() -> dict[str, Any] | None:
    """The demo's own mosaic (a trained U-Net's logits) refined with the defaults, against the scene's truth."""
    import rasterio

    from pipeline.mosaic import Mosaic
    from pipeline.refinement import RefineConfig, refine_mosaic
    from pipeline.tracking import Tracking

    if not (DEMO / "scene.zarr").is_dir() or not (DEMO / "scene_truth.tif").is_file():
        print(f"no demo mosaic in {DEMO}: run `make demo` first to measure a trained model; skipped")
        return None
    truth = rasterio.open(DEMO / "scene_truth.tif").read(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scene.crf.zarr"
        summary = refine_mosaic(RefineConfig(str(DEMO / "scene.zarr"), str(out), progress=False,
                                             tracking=Tracking(enabled=False)))
        before = scores(truth, Mosaic.open(DEMO / "scene.zarr").read("mask", 0), len(CLASSES))
        after = scores(truth, Mosaic.open(out).read("mask", 0), len(CLASSES))
    print("the demo's trained U-Net, 6000² scene:", ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before),
          f"({summary.wall_seconds:.0f} s)", flush=True)
    return {"before": before, "after": after, "summary": summary.as_dict()}


def job(size: int) -> dict[str, Any]:
    from pipeline.refinement import RefineConfig, refine_mosaic
    from pipeline.tracking import Tracking

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scene = generate_scene(size, size, seed=21)
        write_scene(scene, folder / "scene.tif", folder / "labels.tif")
        logits = coarse_logits(scene.labels, len(CLASSES), seed=2)
        write_label_mosaic(scene.labels, folder / "coarse.zarr", chunk=512, shard=2048, scores=logits,
                           lineage={"source": {"path": str(folder / "scene.tif"), "level": 0}})
        del logits
        summary = refine_mosaic(RefineConfig(str(folder / "coarse.zarr"), str(folder / "refined.zarr"),
                                             progress=False, tracking=Tracking(enabled=False)))
        print(summary.describe(), flush=True)
        return summary.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096, help="edge of the generated image, px (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="default: %(default)s")
    args = parser.parse_args()
    default = CRFSettings()
    gained = accuracy(args.seeds, default)
    before, after = gained["median"]["before"], gained["median"]["after"]
    print("generated scenes, median of", args.seeds, ":",
          ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before), flush=True)
    real = spacenet([default, CRFSettings(bilateral_sxy=5, bilateral_srgb=3, bilateral_compat=1, gaussian_compat=0)])
    for row in real:
        print(f"SpaceNet {row['settings']}: building IoU {row['building_iou_before']:.4f} -> "
              f"{row['building_iou_after']:.4f}", flush=True)
    sweep = halo_sweep(default)
    trained = None if QUICK else demo_model()
    result = job(args.size)
    save("refine", [{"accuracy": gained, "spacenet": real, "halo": sweep, "demo": trained, "job": result}])
    four = next(r for r in sweep if r["halo_sigmas"] == 4)
    table_row(
        "refine", f"dense CRF, defaults, {args.size}² generated scene, 2048 px blocks, halo 200",
        f"{result['mpix_per_second']:.2f} MPix/s, wall {result['wall_seconds']:.0f} s, peak "
        f"{result['peak_memory_mib']:.0f} MiB; boundary accuracy {before['boundary_accuracy']:.3f} -> "
        f"{after['boundary_accuracy']:.3f}; blocks vs whole: mask agreement {four['mask_agreement']:.6f}",
    )


if __name__ == "__main__":
    main()
