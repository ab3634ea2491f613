"""Refine a finished mosaic with a dense CRF, block by block on Ray, into a new mosaic.

The refine job reads a complete mosaic (its level-0 blended scores) and the source image it was
made from, and writes a second, complete mosaic in the same format whose scores are the CRF's class
probabilities (`scores_kind = "probabilities"`), with mask, confidence and pyramid derived from them
as usual. The input is never written: its logits stay as they were, for comparison or another
refinement with other settings.

Each output block is one Ray task. It reads the input's scores and the source over the block plus a
halo (`CRFSettings.reach`), refines that window (`crf.refine`) and writes only its own block of the
output, with its levels and its done-marker: one writer per block, no read-modify-write, idempotent,
so retries and resume are safe exactly as for the segment job. The result equals a refinement of the
whole image up to the context the halo leaves out (measured in tests/test_refinement.py and
docs/models.md). Blocks with no data in the input are not computed, and stay nodata.

The halo is computed by both blocks beside it: with 2048 px blocks and the default 200 px halo, each
task refines 43% more pixels than it writes (`RefineSummary.halo_overhead`). Larger blocks waste less
but need more memory per worker (about 400 B per pixel refined, with 5 classes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline import lineage as lineage_info
from pipeline.crf import ColourScale, CRFSettings, require
from pipeline.errors import ConfigError, MosaicError, TesseraError
from pipeline.locking import OutputLock
from pipeline.memory import PeakMemory, limit_gdal_cache, release_memory
from pipeline.mosaic import Mosaic, check_output, is_uri
from pipeline.sources import RasterSource, open_source
from pipeline.stitching import NODATA_CLASS, BlockOutput, summarise
from pipeline.tiling import Rect
from pipeline.tracking import Tracking, flat_params, job_run

log = logging.getLogger(__name__)

RETRIES = 3  # per block, for worker processes that die; errors raised by tessera are never retried
CANCEL_TIMEOUT = 60.0  # seconds to wait for cancelled block tasks to end before the lock is released
# pydensecrf2's peak per pixel refined, on a 2448² generated scene: 210 B with 2 classes, 248 with 5, 350
# with 10 (about 175 + 17.5 per class); on pure noise, whose colours spread the lattice, 520 with 5.
# The estimate sits between the two so that a worker count from it leaves room for noisy images.
CRF_BYTES_BASE = 300
CRF_BYTES_PER_CLASS = 20
SAMPLE_WINDOWS = 8  # the colour scale of a non-8-bit source is taken from 8 x 8 windows spread over it
SAMPLE_EDGE = 64


@dataclass(frozen=True)
class RefineConfig:
    """Settings of a refine job.

    Args:
        mosaic: the complete mosaic to refine (local folder).
        output: the refined mosaic to write.
        source: the image the mosaic was segmented from; None takes the path in its lineage.
        crf: the CRF's parameters.
        block: output block edge in px, a multiple of the input's shard; None means one shard.
        workers: parallel block tasks; None means one per core, as memory allows.
        ray_address: None starts an embedded Ray; "auto" or "ray://host:10001" joins a cluster.
        overwrite: replace a complete mosaic at `output`, or start an unfinished one over.
        progress: show a progress bar of the blocks.
        tracking: the MLflow run of the job (default: MLFLOW_TRACKING_URI or ./mlflow.db, experiment
            tessera-refine).
    """

    mosaic: str
    output: str
    source: str | None = None
    crf: CRFSettings = field(default_factory=CRFSettings)
    block: int | None = None
    workers: int | None = None
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True
    tracking: Tracking = field(default_factory=lambda: Tracking(experiment="tessera-refine"))

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers={self.workers} is out of range: use a positive number or leave it unset")


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

    @property
    def mpix_per_second(self) -> float:
        return self.height * self.width / 1e6 / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mpix_per_second": self.mpix_per_second}

    def describe(self) -> str:
        from pipeline.execution import cost_lines

        return "\n".join([
            f"mosaic      {self.output} (dense CRF of {self.input})",
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
    """What every block task needs, shipped once through the object store."""

    mosaic: str
    output: str
    source: RasterSource  # pickles as (path, level); each task opens its own handle
    colour: ColourScale
    crf: CRFSettings
    kind: str


@dataclass(frozen=True)
class BlockReport:
    seconds: float
    peak_rss_mib: float


def refine_block(spec: RefineSpec, block: tuple[int, int], region: Rect) -> BlockReport:
    """Refine one block with its halo of context and write it, its levels and its marker (its only writer)."""
    from pipeline.crf import refine

    limit_gdal_cache()
    release_memory()
    start = time.perf_counter()
    coarse = Mosaic.open(spec.mosaic)
    out = Mosaic.open(spec.output, mode="r+")
    outer = with_halo(region, spec.crf.reach, coarse.layout.height, coarse.layout.width)
    scores = coarse.read("scores", 0, outer).astype(np.float32)
    colour = spec.colour.apply(spec.source.read(outer.y0, outer.x0, outer.height, outer.width))
    q = refine(scores, spec.kind, colour, (outer.y0, outer.x0), spec.crf)
    inner = (slice(None), slice(region.y0 - outer.y0, region.y1 - outer.y0),
             slice(region.x0 - outer.x0, region.x1 - outer.x0))
    probabilities = np.ascontiguousarray(q[inner])
    mask, top = summarise(probabilities, "probabilities")
    out.mark_done(block, region, out.write_block(BlockOutput(region, probabilities, mask, top)))
    return BlockReport(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


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
    coarse = mosaic.read("mask", level) != NODATA_CLASS
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
    if is_uri(config.mosaic):
        raise ConfigError(f"{config.mosaic}: refine reads a local mosaic; copy it to this machine first")
    mosaic = Mosaic.open(config.mosaic)
    if not mosaic.complete:
        raise MosaicError(f"{config.mosaic} is not complete: rerun its segment job to finish it, then refine it")
    here, there = Path(str(mosaic.path)).resolve(), Path(config.output.removeprefix("file://")).resolve()
    if here == there or here in there.parents or there in here.parents:
        raise ConfigError(f"output {config.output} is, or is inside, or contains the mosaic being refined: "
                          "write the refined mosaic beside it")
    described = mosaic.lineage.get("source", {})
    path = config.source or recorded_source(mosaic)
    if "://" not in path:
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


def recorded_source(mosaic: Mosaic) -> str:
    """The source image a mosaic names: its job's absolute path, or the lineage's path as typed.

    Raises:
        ConfigError: neither is there any more (the image moved): the fix is --source.
    """
    named = [p for p in (mosaic.meta.get("job", {}).get("source"), mosaic.lineage.get("source", {}).get("path")) if p]
    for path in named:
        if "://" in path or Path(path).exists():
            return str(path)
    if not named:
        raise ConfigError(f"{mosaic.path} does not record its source image: pass --source")
    raise ConfigError(f"{mosaic.path} was segmented from {named[0]}, which is not there any more: "
                      "pass --source with the image's new path")


def job_fingerprint(mosaic: Mosaic, source: RasterSource, block: int, crf: CRFSettings,
                    colour: ColourScale) -> dict[str, Any]:
    """The settings that fix a refined mosaic's content: a rerun with the same ones resumes it (paths absolute)."""
    return {
        "refines": str(Path(str(mosaic.path)).resolve()), "input_job": mosaic.meta.get("job", {}),
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
    start = time.perf_counter()
    mosaic, source, block = open_input(config)
    colour = colour_scale(source)
    job = job_fingerprint(mosaic, source, block, config.crf, colour)
    check_output(config.output, config.overwrite, job)  # refuse early, before taking the lock
    layout = mosaic.layout
    blocks = block_regions(layout.height, layout.width, block)
    busy = blocks_with_data(mosaic, blocks, block)
    output = str(Path(config.output.removeprefix("file://")).resolve())
    with OutputLock(config.output):
        resume = check_output(config.output, config.overwrite, job)  # authoritative, under the lock
        params = flat_params(config, job)
        with job_run(config.tracking, params, config.output) as run:
            if resume:
                done = Mosaic.open(config.output).done_blocks() & busy
            else:
                lineage = {
                    **{k: v for k, v in mosaic.lineage.items() if k in ("model", "tiling")},
                    "source": {**mosaic.lineage.get("source", {}), "path": str(source.path)},
                    "refined": {"mosaic": job["refines"], "crf": config.crf.as_dict(), "colour": colour.as_dict(),
                                "block": block, "input_lineage": mosaic.lineage},
                    "config": dataclasses.asdict(config), "started": lineage_info.now(),
                    "versions": {**lineage_info.versions(), **_crf_version()}, "mlflow": run.lineage(),
                }
                Mosaic.create(config.output, dataclasses.replace(layout, scores_kind="probabilities"), lineage, job)
                done = set()
            todo = sorted(busy - done)
            workers = worker_count(config, block, config.crf.reach, len(layout.classes), len(todo))
            spec = RefineSpec(job["refines"], output, source, colour, config.crf, layout.scores_kind)
            phases = {"prepare": time.perf_counter() - start}
            with PeakMemory() as memory:
                reports = _run(spec, {b: blocks[b] for b in todo}, workers, config, phases, on_progress)
                out = Mosaic.open(config.output, mode="r+")
                tick = time.perf_counter()
                out.build_pyramid()
                phases["pyramid"] = time.perf_counter() - tick
            summary = RefineSummary(
                output=config.output, input=config.mosaic, height=layout.height, width=layout.width,
                blocks_total=len(blocks), blocks_written=len(todo), blocks_resumed=len(done),
                blocks_empty=len(blocks) - len(busy), halo_overhead=halo_overhead(blocks, todo, config.crf.reach,
                                                                                  layout.height, layout.width),
                workers=workers, wall_seconds=time.perf_counter() - start,
                phases=phases, peak_memory_mib=memory.peak_mib,
                worker_peak_rss_mib=max((r.peak_rss_mib for r in reports), default=0.0), run_id=run.run_id,
            )
            out.finish({"summary": summary.as_dict(), "finished": lineage_info.now(), "mlflow": run.lineage()})
            run.log_result(summary.as_dict(), dataclasses.asdict(config), out.preview_png())
            return summary


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


def _run(
    spec: RefineSpec, todo: dict[tuple[int, int], Rect], workers: int, config: RefineConfig,
    phases: dict[str, float], on_progress: Callable[[int, int], None] | None,
) -> list[BlockReport]:
    """One Ray task per block, `workers` at a time; raises the first error a block raises."""
    import ray
    from tqdm import tqdm

    from pipeline.execution import connect_ray

    if not todo:
        return []
    tick = time.perf_counter()
    started = connect_ray(config.ray_address, workers)
    phases["startup"] = time.perf_counter() - tick
    tick = time.perf_counter()
    # A task whose process dies is run again (safe: a block's write is idempotent); our errors are not.
    task = ray.remote(refine_block).options(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)
    spec_ref = ray.put(spec)
    queue = list(todo.items())
    in_flight: list[Any] = []
    reports: list[BlockReport] = []
    bar = tqdm(total=len(todo), desc="refine", unit="block", disable=not config.progress, leave=False)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                b, region = queue.pop(0)
                in_flight.append(task.remote(spec_ref, b, region))
            [ref], in_flight = ray.wait(in_flight, num_returns=1)
            try:
                reports.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, TesseraError) else e) from None
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
                raise TesseraError(
                    f"a block's worker died {RETRIES + 1} times ({type(e).__name__}): refine with fewer --workers, "
                    "a smaller --block or a smaller halo; rerunning the job resumes it"
                ) from None
            bar.update(1)
            if on_progress is not None:
                on_progress(len(reports), len(todo))
    except BaseException:
        # Stop the blocks still running, and wait until they have, so none writes after the lock is gone
        # (a block stopped mid-write has no marker: a rerun computes it again).
        for ref in in_flight:
            with contextlib.suppress(Exception):  # already finished, or its worker gone
                ray.cancel(ref, force=True)
        ray.wait(in_flight, num_returns=len(in_flight), timeout=CANCEL_TIMEOUT)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    phases["blocks"] = time.perf_counter() - tick
    return reports
