"""Refine a finished mosaic with a dense CRF, block by block on Ray, into a new mosaic.

The refine job reads a complete mosaic (its level-0 blended scores) and the source image it was
made from, and writes a second, complete mosaic in the same format whose scores are the CRF's class
probabilities (`scores_kind = "probabilities"`), with mask, confidence and pyramid derived from them
as usual. The input is never written: its logits stay as they were, for comparison or another
refinement with other settings.

Each output block is one unit of the job engine (`pipeline.engine`), which runs refine exactly as it
runs segment: one pool of workers, a collection of mosaics, lock, resume, tracking, pyramid. A unit
reads the input's scores and the source over the block plus a
halo (`CRFSettings.reach`), refines that window (`crf.refine`) and writes only its own block of the
output, with its levels and its done-marker: one writer per block, no read-modify-write, idempotent,
so retries and resume are safe. The result equals a refinement of the
whole image up to the context the halo leaves out (measured in tests/test_refinement.py and
docs/models.md). Blocks with no data in the input are not computed, and stay nodata.

The halo is computed by both blocks beside it: with 2048 px blocks and the default 200 px halo, each
task refines 43% more pixels than it writes (`RefineSummary.halo_overhead`). Larger blocks waste less
but need more memory per worker (about 400 B per pixel refined, with 5 classes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline import lineage as lineage_info
from pipeline.collection import CollectionItem
from pipeline.crf import ColourScale, CRFSettings, require
from pipeline.engine import (
    CollectionSummary,
    ImageFigures,
    ImageJob,
    JobBase,
    UnitGraph,
    UnitReport,
    WorkerLayout,
    run_collection,
    run_image,
)
from pipeline.errors import ConfigError, MosaicError
from pipeline.mosaic import Mosaic, MosaicLayout, is_mosaic
from pipeline.settings import RefineConfig
from pipeline.sources import RasterSource, open_source
from pipeline.sources.base import is_local_file
from pipeline.stitching import derive
from pipeline.storage import Location
from pipeline.tiling import Rect
from pipeline.tracking import flat_params

log = logging.getLogger(__name__)

# pydensecrf2's peak per pixel refined, on a 2448² generated scene: 210 B with 2 classes, 248 with 5, 350
# with 10 (about 175 + 17.5 per class); on pure noise, whose colours spread the lattice, 520 with 5.
# The estimate sits between the two so that a worker count from it leaves room for noisy images.
CRF_BYTES_BASE = 300
CRF_BYTES_PER_CLASS = 20
SAMPLE_WINDOWS = 8  # the colour scale of a non-8-bit source is taken from 8 x 8 windows spread over it
SAMPLE_EDGE = 64


@dataclass(frozen=True)
class RefineSummary:
    """What a finished refine job reports; also stored in the refined mosaic's lineage."""

    output: str
    input: str
    height: int
    width: int
    blocks_total: int
    blocks_written: int
    blocks_resumed: int
    blocks_empty: int
    halo_overhead: float  # pixels refined / pixels written - 1, over the blocks written
    workers: int
    wall_seconds: float
    phases: dict[str, float]
    peak_memory_mib: float
    worker_peak_rss_mib: float
    run_id: str | None = None
    kept: bool = False  # finished before by the same job and kept as it was

    @property
    def mpix_per_second(self) -> float:
        return self.height * self.width / 1e6 / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mpix_per_second": self.mpix_per_second}

    def describe(self) -> str:
        from pipeline.execution import cost_lines

        return "\n".join([
            f"mosaic      {self.output} (dense CRF of {self.input})"
            + (" (complete already: kept as it is; --overwrite computes it again)" if self.kept else ""),
            f"image       {self.width} x {self.height} px",
            f"blocks      {self.blocks_written} refined of {self.blocks_total}"
            + (f" ({self.blocks_resumed} verified from an earlier run)" if self.blocks_resumed else "")
            + (f", {self.blocks_empty} without data" if self.blocks_empty else "")
            + f", {self.workers} worker(s); halos add {100 * self.halo_overhead:.0f}% of pixels refined",
            *cost_lines(self.mpix_per_second, self.wall_seconds, self.phases, self.peak_memory_mib,
                        self.worker_peak_rss_mib, self.run_id),
        ])


@dataclass(frozen=True)
class RefineSpec:
    """What a worker needs of one image, shipped once to each worker that refines a block of it."""

    mosaic: str
    output: str
    source: RasterSource  # pickles as (path, level); each worker opens its own handle
    colour: ColourScale
    crf: CRFSettings
    kind: str
    blocks: dict[tuple[int, int], Rect]


@dataclass
class RefineHandles:
    spec: RefineSpec
    coarse: Mosaic
    out: Mosaic


class RefineSetup:
    """Refine workers keep nothing warm but their process (no model): the CRF is built per block."""

    def start(self) -> RefineRunner:
        return RefineRunner()


class RefineRunner:
    """The refine job's one kind of unit: a block, refined with its halo and written by this unit alone."""

    def open(self, spec: RefineSpec) -> RefineHandles:
        require()
        return RefineHandles(spec, Mosaic.open(spec.mosaic), Mosaic.open(spec.output, mode="r+"))

    def seam(self, image: RefineHandles, index: int) -> tuple[list[Any], UnitReport]:
        raise NotImplementedError("the refine job has no seams")

    def block(self, image: RefineHandles, block: tuple[int, int], parts: Sequence[Any]) -> UnitReport:
        """Refine one block with its halo of context and write it, its levels and its marker."""
        from pipeline.crf import refine

        start = time.perf_counter()
        spec, region = image.spec, image.spec.blocks[block]
        outer = with_halo(region, spec.crf.reach, image.coarse.layout.height, image.coarse.layout.width)
        scores = image.coarse.read("scores", 0, outer).astype(np.float32)
        colour = spec.colour.apply(spec.source.read(outer.y0, outer.x0, outer.height, outer.width))
        q = refine(scores, spec.kind, colour, (outer.y0, outer.x0), spec.crf)
        inner = (slice(None), slice(region.y0 - outer.y0, region.y1 - outer.y0),
                 slice(region.x0 - outer.x0, region.x1 - outer.x0))
        probabilities = np.ascontiguousarray(q[inner])
        out = derive(region, probabilities, "probabilities", uncertainty="uncertainty" in image.out.layout.layers)
        image.out.mark_done(block, region, image.out.write_block(out))
        return UnitReport.since(outer.area, start)

    def flush(self) -> None:
        return None


def refined_layout(layout: MosaicLayout) -> MosaicLayout:
    """The refined mosaic's layout: the input's, with probabilities for scores. Its uncertainty layer, if it
    has one, is the entropy of the CRF's marginals; a TTA spread has no meaning for them and is left out."""
    return dataclasses.replace(layout, scores_kind="probabilities",
                               layers=tuple(n for n in layout.layers if n != "spread"))


def with_halo(region: Rect, halo: int, height: int, width: int) -> Rect:
    """`region` grown by `halo` px on every side, clipped to the image."""
    return Rect(max(region.y0 - halo, 0), max(region.x0 - halo, 0), min(region.y1 + halo, height),
                min(region.x1 + halo, width))


def bytes_per_pixel(classes: int) -> int:
    """Peak memory of pydensecrf2 per pixel refined, measured on generated scenes (docs/models.md)."""
    return CRF_BYTES_BASE + CRF_BYTES_PER_CLASS * classes


def block_regions(height: int, width: int, block: int) -> dict[tuple[int, int], Rect]:
    """The output blocks, row by row: `block` px squares from the origin, clipped at the image's edges."""
    return {
        (r, c): Rect(r * block, c * block, min((r + 1) * block, height), min((c + 1) * block, width))
        for r in range(math.ceil(height / block)) for c in range(math.ceil(width / block))
    }


def blocks_with_data(mosaic: Mosaic, blocks: dict[tuple[int, int], Rect], block: int) -> set[tuple[int, int]]:
    """Blocks with at least one pixel of data, found on a coarse level of the mask.

    A pyramid pixel has data when any level-0 pixel under it has (the 2x2 means ignore nodata). At a
    level whose pixels tile the blocks exactly (2^level divides `block`), a block is a few pixels
    there, and that level answers exactly without reading level 0.
    """
    aligned = (block & -block).bit_length() - 1  # the largest power of two dividing `block`
    level = min(aligned, mosaic.layout.num_levels - 1)
    coarse = mosaic.read("mask", level) != mosaic.layout.mask_nodata
    f = 2**level
    return {b for b, r in blocks.items()
            if coarse[r.y0 // f : -(-r.y1 // f), r.x0 // f : -(-r.x1 // f)].any()}


def colour_scale(source: RasterSource) -> ColourScale:
    """8-bit sources as they are; others stretched by percentiles of windows spread over the image."""
    if source.dtype == np.uint8:
        return ColourScale()
    samples = []
    edge = min(SAMPLE_EDGE, source.height, source.width)
    for y in np.linspace(0, source.height - edge, SAMPLE_WINDOWS).astype(int):
        for x in np.linspace(0, source.width - edge, SAMPLE_WINDOWS).astype(int):
            values = source.read(int(y), int(x), edge, edge).astype(np.float64)
            samples.append(values[:, source.valid(int(y), int(x), edge, edge)])
    return ColourScale.from_sample(np.concatenate(samples, axis=1))


def open_input(config: RefineConfig) -> tuple[Mosaic, RasterSource, int]:
    """The complete input mosaic, its source at the mosaic's level, and the block edge; raises on bad input.

    Paths come back absolute: Ray workers run in folders of their own.
    """
    require()  # an optional package: missing, it is bad input, found before anything is written
    mosaic = Mosaic.open(config.mosaic)
    if not mosaic.complete:
        raise MosaicError(f"{config.mosaic} is not complete: rerun its segment job to finish it, then refine it")
    here, there = place(mosaic.location), place(Location.parse(config.output))
    if here == there or there.startswith(here + "/") or here.startswith(there + "/"):
        raise ConfigError(f"output {config.output} is, or is inside, or contains the mosaic being refined: "
                          "write the refined mosaic beside it")
    described = mosaic.lineage.get("source", {})
    path = config.source or recorded_source(mosaic)
    if is_local_file(path):
        path = str(Path(path).resolve())
    source = open_source(path, int(described.get("level", 0)))
    layout = mosaic.layout
    if (source.height, source.width) != (layout.height, layout.width):
        raise ConfigError(
            f"source {path} at level {source.level} is {source.width} x {source.height} px but the mosaic is "
            f"{layout.width} x {layout.height}: pass --source with the image the mosaic was segmented from"
        )
    block = config.block or layout.shard
    if block <= 0 or block % layout.shard:
        raise ConfigError(f"block {block} must be a multiple of the mosaic's shard {layout.shard} "
                          f"(one writer per shard): use block={layout.shard} or a multiple of it")
    return mosaic, source, block


def place(location: Location) -> str:
    """Where a mosaic is, one way for each: a local path with its links resolved, else its URL."""
    return str(Path(location.path).resolve()) if location.is_local else location.url


def recorded_source(mosaic: Mosaic) -> str:
    """The source image a mosaic names: its job's absolute path, or the lineage's path as typed.

    Raises:
        ConfigError: neither is there any more (the image moved): the fix is --source.
    """
    named = [p for p in (mosaic.meta.get("job", {}).get("source"), mosaic.lineage.get("source", {}).get("path")) if p]
    for path in named:
        if not is_local_file(path) or Path(path).exists():
            return str(path)
    if not named:
        raise ConfigError(f"{mosaic.path} does not record its source image: pass --source")
    raise ConfigError(f"{mosaic.path} was segmented from {named[0]}, which is not there any more: "
                      "pass --source with the image's new path")


def job_fingerprint(mosaic: Mosaic, source: RasterSource, block: int, crf: CRFSettings,
                    colour: ColourScale) -> dict[str, Any]:
    """The settings that fix a refined mosaic's content: a rerun with the same ones resumes it (paths absolute)."""
    return {
        "refines": place(mosaic.location), "input_job": mosaic.meta.get("job", {}),
        "input_finished": mosaic.lineage.get("finished"), "source": str(source.path), "level": source.level,
        "block": block, "crf": crf.as_dict(), "colour": colour.as_dict(),
    }


def worker_count(config: RefineConfig, block: int, halo: int, classes: int, todo: int) -> int:
    """One per core, as memory allows for a block's CRF (with its halo) in each."""
    if config.workers:
        return config.workers
    per_worker = bytes_per_pixel(classes) * (block + 2 * halo) ** 2
    room = max(1, int(psutil.virtual_memory().available // per_worker))
    return max(1, min(os.cpu_count() or 1, room, max(todo, 1)))


class RefineJob(JobBase):
    """The refine job as the engine runs it (see `pipeline.engine`): each image is a complete mosaic."""

    name = "refine"
    summary_type = RefineSummary

    def __init__(self, config: RefineConfig) -> None:
        super().__init__(config, per_image=("mosaic", "output"))
        self.config: RefineConfig = config

    def check(self) -> None:
        require()

    def prepare(self, item: CollectionItem, output: str) -> ImageJob:
        config = dataclasses.replace(self.config, mosaic=item.source, output=output)
        mosaic, source, block = open_input(config)
        colour = colour_scale(source)
        job = job_fingerprint(mosaic, source, block, config.crf, colour)
        layout = mosaic.layout
        blocks = block_regions(layout.height, layout.width, block)
        busy = blocks_with_data(mosaic, blocks, block)
        lineage = {
            **{k: v for k, v in mosaic.lineage.items() if k in ("model", "tiling")},
            "source": {**mosaic.lineage.get("source", {}), "path": str(source.path)},
            "refined": {"mosaic": job["refines"], "crf": config.crf.as_dict(), "colour": colour.as_dict(),
                        "block": block, "input_lineage": mosaic.lineage},
            "config": dataclasses.asdict(config), "started": lineage_info.now(),
            "versions": {**lineage_info.versions(), **_crf_version()},
        }
        spec = RefineSpec(job["refines"], place(Location.parse(output)), source, colour, config.crf, layout.scores_kind,
                          {b: blocks[b] for b in busy})
        return ImageJob(item, output, job, refined_layout(layout), lineage,
                        UnitGraph(tuple(sorted(busy))), spec, flat_params(config, job),
                        extra={"blocks": blocks, "busy": busy, "block": block, "input": item.source})

    def ray_resources(self) -> tuple[int, int | None]:
        """One CPU per core; blocks pass through the object store only as their reports (Ray's default store)."""
        return max(os.cpu_count() or 1, self.config.workers or 1), None

    def worker_setup(self) -> RefineSetup:
        return RefineSetup()

    def worker_layout(self, first: ImageJob | None) -> WorkerLayout:
        block = first.extra["block"] if first is not None else (self.config.block or 2048)
        classes = len(first.layout.classes) if first is not None else 10
        todo = len(first.graph.blocks) if first is not None else os.cpu_count() or 1
        workers = worker_count(self.config, block, self.config.crf.reach, classes, todo)
        return WorkerLayout(workers, hint="refine with fewer --workers, a smaller --block or a smaller halo")

    def summarise(self, job: ImageJob, figures: ImageFigures) -> RefineSummary:
        layout, blocks = job.layout, job.extra["blocks"]
        return RefineSummary(
            output=job.output, input=job.extra["input"], height=layout.height, width=layout.width,
            blocks_total=len(blocks), blocks_written=figures.blocks_written, blocks_resumed=figures.blocks_resumed,
            blocks_empty=len(blocks) - len(job.extra["busy"]),
            halo_overhead=halo_overhead(blocks, list(figures.written), self.config.crf.reach, layout.height,
                                        layout.width),
            workers=figures.workers, wall_seconds=figures.wall_seconds, phases=figures.phases,
            peak_memory_mib=figures.peak_memory_mib, worker_peak_rss_mib=figures.worker_peak_rss_mib,
            run_id=figures.run_id,
        )


def refine_mosaic(config: RefineConfig, on_progress: Callable[[int, int], None] | None = None) -> RefineSummary:
    """Refine `config.mosaic` with a dense CRF into the new mosaic `config.output`.

    Args:
        config: the job settings.
        on_progress: called with (blocks done, blocks to do) after each block.

    Example:
        >>> refine_mosaic(RefineConfig("scene.zarr", "scene.crf.zarr"))  # doctest: +SKIP

    Returns:
        The job summary (also written into the refined mosaic's lineage).

    Raises:
        TesseraError: on bad input, before anything is written.
    """
    require()  # an optional package: missing, it is bad input, found before anything is written
    item = CollectionItem(config.mosaic, Path(Location.parse(config.output).name).stem)
    summary: RefineSummary = run_image(RefineJob(config), item, config.output, on_progress)
    return summary


def refine_collection(config: RefineConfig, root: str, out_root: str,
                      on_progress: Callable[[int, int], None] | None = None) -> CollectionSummary:
    """Refine every mosaic in the folder `root` into `out_root`/<name>.zarr, on one pool of workers; an
    unfinished one is a failed image (its segment job must finish first) and the others go on.

    Raises:
        ConfigError: `root` holds no mosaic, or `out_root` is inside it.
    """
    require()
    if config.source is not None:
        raise ConfigError(f"--source names one image, but {root} is a folder of mosaics, each refined against the "
                          "image in its own lineage: refine a mosaic alone when its image has moved")
    here, there = Path(root).resolve(), Path(out_root).resolve()
    if here == there or here in there.parents:
        raise ConfigError(f"output {out_root} is, or is inside, {root}: write the refined mosaics beside it")
    found = sorted(p for p in here.iterdir() if p.is_dir() and is_mosaic(p))
    if not found:
        raise ConfigError(f"{root} holds no mosaic: segment into it first (tessera segment ... --out {root})")
    tasks = [(CollectionItem(str(p), p.stem), str(there / p.name)) for p in found]
    return run_collection(RefineJob(config), tasks, root=str(there), on_progress=on_progress)


def refine_inputs(config: RefineConfig) -> RefineSummary | CollectionSummary:
    """What the front doors run: one mosaic into `config.output`, or every complete mosaic of the folder
    `config.mosaic` into the folder `config.output`."""
    mosaic = Location.parse(config.mosaic)
    if mosaic.is_local and mosaic.local_path().is_dir() and not is_mosaic(mosaic):
        return refine_collection(config, config.mosaic, config.output)
    return refine_mosaic(config)


def halo_overhead(blocks: dict[tuple[int, int], Rect], todo: list[tuple[int, int]], halo: int, height: int,
                  width: int) -> float:
    """Pixels refined over pixels written, minus one, for the blocks in `todo`."""
    written = sum(blocks[b].area for b in todo)
    refined = sum(with_halo(blocks[b], halo, height, width).area for b in todo)
    return refined / written - 1 if written else 0.0


def _crf_version() -> dict[str, str]:
    import importlib.metadata

    try:
        return {"pydensecrf2": importlib.metadata.version("pydensecrf2")}
    except importlib.metadata.PackageNotFoundError:
        return {}
