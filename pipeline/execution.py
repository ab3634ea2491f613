"""The segment job: a model's blended scores over each image of a collection, as Zarr mosaics.

This module says what segmenting one image is, for the job engine (`pipeline.engine`) that runs it
over a collection on one warm pool of workers:

- prepare (driver): open the source at the model's resolution, the tile grid, skip background, and
  the block plan (`tiling.BlockPlan`); the mosaic's layout, lineage and fingerprint;
- units (workers, each holding the model once, `SegmentRunner`): seams, tiles that straddle blocks,
  computed once, whose weighted sums go to each block they touch; and blocks, the tiles inside one
  block plus the seams that feed it, normalised and written by exactly this unit (one writer per
  block).

The engine submits a block once every seam it needs has finished, so no worker ever waits on
another, and starts seams in the order their first block needs them, which keeps the seam results
alive at any time to about one row of blocks. The same code runs on an embedded Ray or on a
cluster; only `address` differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import psutil

from pipeline import lineage as lineage_info
from pipeline.blending import Accumulator
from pipeline.collection import CollectionItem, materialise, output_path
from pipeline.engine import (
    IN_FLIGHT,
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
from pipeline.errors import BandMismatchError, ConfigError
from pipeline.files import cache_folder
from pipeline.inference import InferenceOptions, pick_device
from pipeline.models.bundle import BundleSpec, ModelBundle, read_bundle_bytes
from pipeline.mosaic import Mosaic, MosaicLayout
from pipeline.settings import SegmentConfig
from pipeline.sources import RasterSource, open_source
from pipeline.sources.base import is_local_file
from pipeline.storage import Location
from pipeline.tiling import BlockId, BlockPlan, TileGrid
from pipeline.tracking import check_reachable, flat_params

log = logging.getLogger(__name__)

OBJECT_STORE_MIN = 128 * 2**20


@dataclass(frozen=True)
class SegmentSummary:
    """What a finished job reports; also stored in the mosaic's lineage."""

    output: str
    height: int
    width: int
    level: int
    tiles_total: int
    tiles_computed: int
    tiles_skipped: int
    tiles_recomputed: int
    blocks_total: int
    blocks_written: int
    blocks_resumed: int  # found written and verified from an earlier run of the same job
    workers: int
    wall_seconds: float
    phases: dict[str, float]  # seconds: prepare (open, plan, create), startup (Ray, workers), blocks, pyramid
    peak_memory_mib: float  # PSS summed over all processes of the job on this machine, sampled
    worker_peak_rss_mib: float  # the largest single worker
    run_id: str | None = None  # the MLflow run that tracked the job
    kept: bool = False  # finished before by the same job and kept as it was (this run computed nothing)
    input_check: str = ""  # what was checked of the image's values against the model's training data

    @property
    def pyramid_seconds(self) -> float:
        return self.phases.get("pyramid", 0.0)

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6

    @property
    def mpix_per_second(self) -> float:
        return self.megapixels / self.wall_seconds if self.wall_seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(megapixels=self.megapixels, mpix_per_second=self.mpix_per_second)
        return d

    def describe(self) -> str:
        def pct(n: int) -> str:
            return f"{100 * n / max(self.tiles_total, 1):.1f}%"

        return "\n".join([
            f"mosaic      {self.output}"
            + (" (complete already: kept as it is; --overwrite computes it again)" if self.kept else ""),
            f"image       {self.width} x {self.height} px at level {self.level} ({self.megapixels:.1f} MPix)",
            f"tiles       {self.tiles_total} in grid: {self.tiles_computed} computed ({pct(self.tiles_computed)}), "
            f"{self.tiles_skipped} skipped ({pct(self.tiles_skipped)}), "
            f"{self.tiles_recomputed} recomputed ({pct(self.tiles_recomputed)})",
            f"blocks      {self.blocks_written} written of {self.blocks_total}"
            + (f" ({self.blocks_resumed} verified from an earlier run)" if self.blocks_resumed else "")
            + f", {self.workers} worker(s)",
            *([f"input       {self.input_check}"] if self.input_check else []),
            *cost_lines(self.mpix_per_second, self.wall_seconds, self.phases, self.peak_memory_mib,
                        self.worker_peak_rss_mib, self.run_id),
        ])


def cost_lines(mpix_per_second: float, wall_seconds: float, phases: dict[str, float], peak_memory_mib: float,
               worker_peak_rss_mib: float, run_id: str | None) -> list[str]:
    """The speed, memory and tracking lines of a job summary (segment and refine)."""
    return [
        f"speed       {mpix_per_second:.2f} MPix/s, wall {wall_seconds:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")",
        f"memory      peak {peak_memory_mib:.0f} MiB all processes (PSS), {worker_peak_rss_mib:.0f} MiB largest worker",
        *([f"tracking    MLflow run {run_id}"] if run_id else []),
    ]


@dataclass(frozen=True)
class ImageSpec:
    """What a worker needs of one image, shipped once to each worker that computes a unit of it."""

    source: RasterSource  # pickles as (path, level); each worker opens its own handle
    plan: BlockPlan
    window: str
    scores: str
    mosaic: Location


@dataclass(frozen=True)
class SegmentSetup:
    """What every worker keeps warm for the whole collection: the model."""

    bundle_bytes: bytes
    inference: InferenceOptions
    threads: int
    pipelined: bool = False  # read ahead and write behind in helper threads (GPU workers: the CPU is free)

    def start(self) -> SegmentRunner:
        return SegmentRunner(self)


@dataclass
class ImageHandles:
    spec: ImageSpec
    mosaic: Mosaic


class SegmentRunner:
    """A worker's model, and the seam and block units of the segment job.

    When pipelined (GPU workers), two helper threads keep the model busy: a reader decodes the next
    batch of tiles while the model runs on this one, and a writer finishes and stores a block while the
    next unit starts. At most one block waits for the writer; its error, if any, is raised by the next
    unit or by `flush`. A block whose write is lost with its process has no done-marker, and the engine
    computes it again. CPU workers do all of it in line: every core already runs a worker, and the
    helper threads were measured to slow the job down there (docs/benchmarks.md).
    """

    def __init__(self, setup: SegmentSetup) -> None:
        import torch

        from pipeline.inference import Predictor

        torch.set_num_threads(setup.threads)
        # On the worker's device: an ONNX model's session picks its provider when it is made.
        bundle = ModelBundle.from_bytes(setup.bundle_bytes, "the job's model",
                                        map_location=str(pick_device(setup.inference.device)))
        self.predictor = Predictor(bundle, setup.inference)
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="tessera-read") if setup.pipelined else None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tessera-write") if setup.pipelined else None
        self.pending: Future[None] | None = None

    def open(self, spec: ImageSpec) -> ImageHandles:
        return ImageHandles(spec, Mosaic.open(spec.mosaic, mode="r+"))

    def seam(self, image: ImageHandles, index: int) -> tuple[list[Accumulator], UnitReport]:
        """The seam's weighted sums, one accumulator per block it touches."""
        from pipeline.stitching import blend_tiles

        start = time.perf_counter()
        plan, group = image.spec.plan, image.spec.plan.seams[index]
        regions = [plan.footprint(group.tiles, b) for b in group.blocks]
        accs = blend_tiles(group.tiles, regions, plan.grid, image.spec.source, self.predictor, image.spec.window,
                           self.reader)
        return accs, UnitReport.since(len(group.tiles), start)

    def block(self, image: ImageHandles, block: BlockId, parts: Sequence[Accumulator]) -> UnitReport:
        """Compute the block's own tiles and add the seams' sums; the writer normalises and stores it."""
        from pipeline.stitching import blend_tiles

        start = time.perf_counter()
        spec = image.spec
        tiles = spec.plan.interior.get(block, ())
        (acc,) = blend_tiles(tiles, [spec.plan.rect(block)], spec.plan.grid, spec.source, self.predictor,
                             spec.window, self.reader)
        for part in parts:
            acc.merge(part)
        region = acc.region  # read here: the source handle is not shared between threads at once
        valid = spec.source.valid(region.y0, region.x0, region.height, region.width)
        try:
            self.flush()  # one block at a time in the writer, so memory stays at two blocks
        except Exception as e:  # that block (maybe another image's) has no marker: the engine computes it again
            log.warning("a block written behind failed (%s); it is computed again", e)
        if self.writer is None:
            self._store(image, block, acc, valid)
        else:
            self.pending = self.writer.submit(self._store, image, block, acc, valid)
        return UnitReport.since(len(tiles), start)

    def flush(self) -> None:
        """Wait for the block in the writer; raises its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    @staticmethod
    def _store(image: ImageHandles, block: BlockId, acc: Accumulator, valid: Any) -> None:
        from pipeline.stitching import finish_block

        layout = image.mosaic.layout
        out = finish_block(acc, valid, image.spec.scores, uncertainty="uncertainty" in layout.layers,
                           spread="spread" in layout.layers)
        image.mosaic.mark_done(block, out.region, image.mosaic.write_block(out))


WORKER_MEMORY = 2 * 2**30  # measured peak of one CPU worker with the demo model (docs/benchmarks.md)


def worker_layout(config: SegmentConfig, device: str) -> tuple[int, int]:
    """(workers, torch threads per worker): one per GPU; on CPU one per core, as memory allows.

    On CPU, single-threaded workers beat one multi-threaded worker (2 x 1 thread was 22% faster
    end to end than 1 x 2 threads on 2 cores): while one worker runs the model, another reads,
    blends and writes. Each worker holds its own copy of torch and the model, hence the memory cap.

    Raises:
        ConfigError: more GPU workers than this machine has GPUs, on an embedded Ray.
    """
    cpus = os.cpu_count() or 1
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        slots = max(gpus, 1) * config.actors_per_gpu
        workers = config.workers or slots
        if config.address is None and workers > gpus * config.actors_per_gpu:
            raise ConfigError(f"{workers} GPU workers asked for, but this machine has {gpus} GPU(s) with "
                              f"{config.actors_per_gpu} actor(s) each: use --workers {slots}, raise "
                              f"actors_per_gpu, or use a Ray cluster")
        return workers, config.threads or max(1, min(4, cpus // workers))
    workers = config.workers or max(1, min(cpus, psutil.virtual_memory().available // WORKER_MEMORY))
    return workers, config.threads or max(1, cpus // workers)


def prepare(config: SegmentConfig) -> tuple[RasterSource, ModelBundle, TileGrid]:
    """Open and check everything before anything is written; raises TesseraError on bad input."""
    pick_device(config.device)  # a GPU asked for and not visible fails here, not in a worker
    bundle = ModelBundle.load(config.model)
    source, grid, _ = open_image(config, bundle)
    return source, bundle, grid


def open_image(config: SegmentConfig, bundle: ModelBundle,
               source: RasterSource | None = None) -> tuple[RasterSource, TileGrid, str]:
    """The source (`source`, opened already at level 0, or `config.source`) at the level that matches the
    model, its tile grid, and what was checked of its values (`check_input`); raises TesseraError on bad
    input."""
    source = source or open_source(config.source)
    spec = bundle.spec
    level = config.level
    if level is None:
        level = 0
        if spec.resolution is not None and spec.resolution_unit is not None:
            try:
                level = source.best_level(spec.resolution, spec.resolution_unit)
            except ConfigError as e:
                log.warning("level 0 used: %s", e)
    if level != 0:
        source = source.at_level(level)
    if max(spec.bands) > source.bands:
        raise BandMismatchError(
            f"model expects bands {list(spec.bands)} but {config.source} has {source.bands} band(s): "
            f"use a source with at least {max(spec.bands)} bands or a model trained on {source.bands}"
        )
    input_check = "not checked (accept_input)" if config.accept_input else check_input(source, spec, config.source)
    tile = config.tile or spec.tile_size
    if spec.input_size is not None and tile != spec.input_size:
        raise ConfigError(f"the model takes {spec.input_size} x {spec.input_size} px inputs only (its graph fixes the "
                          f"size): leave the tile unset or give {spec.input_size}, not {tile}")
    overlap = spec.overlap if config.overlap is None else config.overlap
    grid = TileGrid(source.height, source.width, tile, overlap)
    if config.block < tile:
        raise ConfigError(f"block {config.block} is smaller than the tile {tile}: raise block or shard")
    return source, grid, input_check


INPUT_SAMPLES = 4  # windows per side read to compare a source's values with the model's training range
INPUT_OUTSIDE = 0.5  # the share of sampled values outside the (widened) range that refuses a source


def check_input(source: RasterSource, spec: BundleSpec, name: str) -> str:
    """Refuse a source the model was not made for: another data type (uint16 into a uint8 model), or
    values mostly outside the range the model saw in training (widened by half its span each side).
    Bundles that do not record these (made before tessera recorded them) are not checked.

    Returns:
        What was checked, in a few words, for the job's summary.

    Raises:
        ConfigError: in one line, naming the difference and the fixes.
    """
    override = "or pass --accept-input (accept_input=true) if the values are right for the model"
    if spec.input_dtype is not None and source.dtype.name != spec.input_dtype:
        raise ConfigError(
            f"{name} holds {source.dtype.name} values but the model was made for {spec.input_dtype} images, and its "
            f"normalisation (scale {spec.normalization.scale:.6g}) would give it values it never saw: convert the "
            f"image to {spec.input_dtype} (rescaling its range), use a model trained on {source.dtype.name} data, "
            f"{override}"
        )
    dtype = f"{source.dtype.name} as in training" if spec.input_dtype is not None else "data type not recorded"
    if spec.input_range is None:
        return f"{dtype}; value range not checked (the model does not record its training range)"
    low, high = spec.input_range
    margin = (high - low) / 2
    size = min(64, source.height, source.width)
    values = []
    for i in range(INPUT_SAMPLES):
        for j in range(INPUT_SAMPLES):
            y0 = (source.height - size) * (2 * i + 1) // (2 * INPUT_SAMPLES)
            x0 = (source.width - size) * (2 * j + 1) // (2 * INPUT_SAMPLES)
            pixels = source.read(y0, x0, size, size)[np.asarray(spec.bands) - 1]
            values.append(pixels[:, source.valid(y0, x0, size, size)].ravel())
    sample = np.concatenate(values).astype(np.float64)
    if sample.size == 0:
        return f"{dtype}; value range not checked (no valid pixel in the sampled windows)"
    outside = float(np.mean((sample < low - margin) | (sample > high + margin)))
    if outside > INPUT_OUTSIDE:
        raise ConfigError(
            f"{100 * outside:.0f}% of the values sampled from {name} lie far outside the range the model was trained "
            f"on ({low:.6g} to {high:.6g}; sampled {sample.min():.6g} to {sample.max():.6g}): re-normalise the image "
            f"to that range, use a model trained on data like it, {override}"
        )
    return f"{dtype}; {100 * (1 - outside):.0f}% of sampled values near the training range ({low:.6g} to {high:.6g})"


def resolve_model(config: SegmentConfig) -> tuple[SegmentConfig, dict[str, Any] | None]:
    """The config with a registry reference replaced by the local bundle file, and the version used.

    Raises:
        ConfigError: If the reference does not resolve (or the registry cannot be reached).
    """
    from pipeline import registry

    if not registry.is_model_uri(config.model):
        return config, None
    uri = config.tracking.resolved_uri()
    check_reachable(uri)
    path, ref = registry.resolve_model(config.model, uri)
    return dataclasses.replace(config, model=str(path)), {"requested": config.model, **ref.as_dict()}


def job_fingerprint(config: SegmentConfig, source: RasterSource, bundle: ModelBundle, grid: TileGrid) -> dict[str, Any]:
    """The settings that fix a mosaic's content: a rerun with the same ones resumes it."""
    return {
        "source": str(Path(source.path).resolve()) if is_local_file(source.path) else source.path,
        "level": source.level, "height": source.height, "width": source.width, "model_sha256": bundle.sha256,
        "tile": grid.tile, "overlap": grid.overlap, "window": config.window, "scores": config.scores,
        "scores_dtype": config.scores_dtype, "tta": config.tta, "chunk": config.edges[0], "shard": config.edges[1],
        "block": config.block, "skip_background": config.skip_background,
        **({"uncertainty": True} if config.uncertainty else {}),  # absent when off: older mosaics still resume
        **({"runtime": config.runtime} if config.runtime not in (None, bundle.spec.runtime) else {}),
    }


class SegmentJob(JobBase):
    """The segment job as the engine runs it: one model, many images (see `pipeline.engine`)."""

    name = "segment"
    summary_type = SegmentSummary

    def __init__(self, config: SegmentConfig) -> None:
        super().__init__(config, per_image=("source", "output", "level"))
        self.config: SegmentConfig = config
        self._lock = threading.Lock()
        self._model: tuple[SegmentConfig, ModelBundle, dict[str, Any] | None] | None = None
        self._run_bytes: bytes | None = None  # the bundle the workers run: the file, or it on `runtime`
        self._threads: int | None = None  # torch threads per worker, chosen with the layout

    def check(self) -> None:
        self.model()

    def model(self) -> tuple[SegmentConfig, ModelBundle, dict[str, Any] | None]:
        """The config with the model resolved to a local bundle, the bundle, and its registry version; loaded once."""
        with self._lock:
            if self._model is None:
                pick_device(self.config.device)  # a GPU asked for and not visible fails here, not in a worker
                config, registered = resolve_model(self.config)
                data = read_bundle_bytes(config.model)  # read once: the bundle checked is the one that runs
                bundle = ModelBundle.from_bytes(data, config.model)
                if config.runtime is None or config.runtime == bundle.spec.runtime:
                    self._run_bytes = data
                else:  # converted once here, before anything is written; every worker gets the result
                    from pipeline.models.interchange import on_runtime

                    self._run_bytes = on_runtime(bundle, config.runtime).to_bytes()
                self._model = config, bundle, registered
            return self._model

    def for_image(self, item: CollectionItem, output: str) -> SegmentConfig:
        level = item.level if item.level is not None else self.model()[0].level
        return dataclasses.replace(self.model()[0], source=item.source, output=output, level=level)

    def prepare(self, item: CollectionItem, output: str) -> ImageJob:
        full = open_source(materialise(item))  # a missing or unreadable image fails here, before the model is loaded
        config = self.for_image(item, output)
        _, bundle, registered = self.model()
        source, grid, input_check = open_image(config, bundle, full)
        fg, factor = source.foreground() if config.skip_background else (None, 1.0)
        active = grid.active(fg, factor)
        plan = BlockPlan(grid, config.block, active)
        job = job_fingerprint(config, source, bundle, grid)
        layout = MosaicLayout(
            height=source.height, width=source.width, classes=bundle.spec.classes, scores_kind=config.scores,
            scores_dtype=config.scores_dtype, chunk=config.edges[0], shard=config.edges[1], crs=source.crs,
            transform=tuple(source.transform)[:6] if source.transform is not None else None, mpp=source.mpp,
            layers=config.layers,
        )
        graph = UnitGraph(tuple(plan.busy_blocks()), tuple(g.blocks for g in plan.seams))
        spec = ImageSpec(source, plan, config.window, config.scores, Location.parse(output))
        params = flat_params(config, job) | {f"model.{k}": v for k, v in (registered or {}).items()}
        return ImageJob(item, output, job, layout, lineage_info.describe(config, source, bundle, grid, registered),
                        graph, spec, params, extra={"plan": plan, "skipped": len(grid) - len(active),
                                                    "source": source, "input_check": input_check})

    def ray_resources(self) -> tuple[int, int | None]:
        """CPUs, and room in an embedded Ray's object store for the seam sums the units in flight use.

        Seam sums wait in the object store until the blocks on both sides are written: about one row
        of blocks, so their total grows with the image's width. Sized for the units in flight (and
        twice that for those being made), the store spills the waiting ones to disk and memory stays
        flat. It is sized from the settings alone (Ray starts while the model and the first images
        load): a block imports at most four seam strips a tile wide; a tile of 512 px and 8 classes
        are assumed when the settings do not say.
        """
        cpus = max(os.cpu_count() or 1, self.config.workers or 1)
        workers = self.config.workers or cpus
        tile = self.config.tile or 512
        largest = (8 + 1) * 4 * 4 * self.config.block * tile  # four seam strips of a block, 8 classes + weights
        return cpus, max(OBJECT_STORE_MIN, 2 * IN_FLIGHT * workers * largest)

    def worker_setup(self) -> SegmentSetup:
        config, _, _ = self.model()
        assert self._run_bytes is not None, "set with the model"
        device = pick_device(config.device).type
        threads = self._threads or self._layout(None)[1]
        return SegmentSetup(self._run_bytes, config.inference, threads,
                            config.pipelined if config.pipelined is not None else device == "cuda")

    def worker_layout(self, first: ImageJob | None) -> WorkerLayout:
        config = self.model()[0]
        device = pick_device(config.device).type
        workers, self._threads = self._layout(first)
        return WorkerLayout(
            workers=workers, num_cpus=1, num_gpus=1 / config.actors_per_gpu if device == "cuda" else 0,
            writes_behind=config.pipelined if config.pipelined is not None else device == "cuda",
            hint="segment with fewer --workers or a smaller --batch-size",
        )

    def _layout(self, first: ImageJob | None) -> tuple[int, int]:
        """Workers and threads; a single image with fewer units than workers gets fewer workers with more threads."""
        config = self.model()[0]
        device = pick_device(config.device).type
        workers, threads = worker_layout(config, device)
        if first is not None and config.workers is None:
            units = len(first.graph.blocks) + len(first.graph.seams)
            fewer = max(1, min(workers, units))
            if fewer < workers and config.threads is None and device != "cuda":
                threads = max(1, threads * workers // fewer)
            workers = fewer
        return workers, threads

    def summarise(self, job: ImageJob, figures: ImageFigures) -> SegmentSummary:
        plan: BlockPlan = job.extra["plan"]
        source: RasterSource = job.extra["source"]
        return SegmentSummary(
            output=job.output, height=source.height, width=source.width, level=source.level,
            tiles_total=len(plan.grid), tiles_computed=figures.work, tiles_skipped=job.extra["skipped"],
            tiles_recomputed=sum(len(plan.seams[k].tiles) for k in figures.recomputed_seams),
            blocks_total=len(list(plan)), blocks_written=figures.blocks_written,
            blocks_resumed=figures.blocks_resumed, workers=figures.workers, wall_seconds=figures.wall_seconds,
            phases=figures.phases, peak_memory_mib=figures.peak_memory_mib,
            worker_peak_rss_mib=figures.worker_peak_rss_mib, run_id=figures.run_id,
            input_check=job.extra["input_check"],
        )


def segment(config: SegmentConfig, on_progress: Callable[[int, int], None] | None = None) -> SegmentSummary:
    """Segment `config.source` with `config.model` into the mosaic `config.output` (a collection of one).

    Args:
        config: the job settings.
        on_progress: called with (blocks done, blocks to do) after each block.

    Returns:
        The job summary (also written into the mosaic's lineage). A mosaic finished before by the same
        job is kept as it is, and its recorded summary returned.

    Raises:
        TesseraError: on bad input, before anything is written; or the error that stopped the job.
    """
    item = CollectionItem(config.source, PurePosixPath(Location.parse(config.output).name).stem, config.level)
    summary: SegmentSummary = run_image(SegmentJob(config), item, config.output, on_progress)
    return summary


def segment_collection(config: SegmentConfig, items: Sequence[CollectionItem], root: str,
                       max_images: int | None = None,
                       on_progress: Callable[[int, int], None] | None = None) -> CollectionSummary:
    """Segment every image of a collection into ROOT/<name>.zarr on one warm pool of model workers.

    Args:
        config: the settings every image shares (its `source` and `output` are replaced per image).
        items: the images (`collection.resolve_collection`).
        root: the folder of the mosaics and the manifest (manifest.csv, manifest.parquet).
        max_images: images in flight at once (default: twice the workers).
        on_progress: called with (blocks done, blocks known so far) after each block.

    Returns:
        One result per image (done, failed with its one-line error, or skipped as finished before).

    Raises:
        ConfigError: the cluster or the tracking server cannot be reached, before anything is written.
    """
    tasks = [(item, output_path(root, item)) for item in items]
    return run_collection(SegmentJob(config), tasks, root=root, max_images=max_images, on_progress=on_progress)


def segment_inputs(config: SegmentConfig, sources: Sequence[str], pattern: str | None = None,
                   assets: Sequence[str] = ()) -> SegmentSummary | CollectionSummary:
    """What the front doors run: one image into the mosaic `config.output` (a path ending in .zarr),
    or else a collection (paths, folders, list files, STAC) into the folder `config.output`.

    Raises:
        ConfigError: the inputs do not make a collection (none found, two map to one name).
    """
    from pipeline.collection import is_collection, resolve_collection
    from pipeline.mosaic import is_mosaic

    if not is_collection(sources, config.output):
        return segment(dataclasses.replace(config, source=sources[0]))
    if is_mosaic(config.output):
        raise ConfigError(f"--out {config.output} is a mosaic: give a new folder for the collection's mosaics, "
                          "or a path ending in .zarr for one image's mosaic")
    items = resolve_collection(sources, pattern=pattern, assets=assets,
                               stacking_dir=_stacking_dir(config.output))
    return segment_collection(config, items, config.output)


def _stacking_dir(root: str) -> Path:
    """Where the VRTs that stack a STAC item's assets go: ROOT/.inputs, or, for a ROOT on object storage
    (GDAL opens VRTs from local files), a folder of tessera's cache named after the ROOT."""
    location = Location.parse(root)
    if location.is_local:
        return location.local_path() / ".inputs"
    return cache_folder("inputs") / hashlib.sha256(location.url.encode()).hexdigest()[:16]
