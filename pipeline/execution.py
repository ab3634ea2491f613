"""Ray orchestration of a segment job: validate, plan, skip background, run blocks, pyramid, summary.

The driver plans the job (`tiling.BlockPlan`), starts one `BlockWorker` actor per worker slot (each
loads the model once and opens the source and mosaic itself), and feeds them two kinds of work:

- seams: tiles that straddle blocks, computed once; their weighted sums go to each block they touch;
- blocks: the tiles inside one block, plus the seams that feed it; the block is normalised and written
  by exactly this task (one writer per block).

A block is submitted only once every seam it needs has finished, so no actor ever waits on another.
Seams are started in the order their first block needs them, which keeps the seam results alive at
any time to about one row of blocks. The same code runs on an embedded Ray or on a cluster; only
`ray_address` differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pipeline import lineage as lineage_info
from pipeline.blending import WINDOWS, Accumulator
from pipeline.errors import BandMismatchError, ConfigError, TesseraError
from pipeline.inference import InferenceOptions, pick_device
from pipeline.locking import OutputLock
from pipeline.memory import PeakMemory, limit_gdal_cache, release_memory
from pipeline.models.bundle import ModelBundle
from pipeline.mosaic import Mosaic, MosaicLayout, check_output, check_storage
from pipeline.sources import RasterSource, open_source
from pipeline.tiling import BlockId, BlockPlan, TileGrid
from pipeline.tracking import JobRun, Tracking, check_reachable, flat_params, job_run

log = logging.getLogger(__name__)

WORKER_RESTARTS = 3  # per worker, for processes that die; errors raised by tessera are never retried
STARTUP_TIMEOUT = 600.0  # seconds for workers to load the model; a cluster may need to scale up first
FLUSH_TIMEOUT = 60.0  # seconds for workers to finish writing blocks already computed when a job stops
OBJECT_STORE_MIN = 128 * 2**20
IN_FLIGHT = 2  # units per worker: one running, one queued, so a worker never idles between units


@dataclass(frozen=True)
class SegmentConfig:
    """Everything a segment job needs; built once by a front door (CLI or Hydra job).

    Args:
        source: path of the image (GeoTIFF/COG, slide, OME-TIFF).
        model: path of a model bundle, or a registry reference, models:/NAME@ALIAS or
            models:/NAME/VERSION, resolved through `tracking`'s registry (see `pipeline.registry`).
        output: path of the mosaic to write.
        tile, overlap: tile size and minimum overlap in pixels; None takes the bundle's defaults.
        window: blend weight window, one of gaussian, cosine, linear, constant.
        scores: what is blended and stored: "logits" or "probabilities".
        scores_dtype: stored dtype of the scores, float16 or float32.
        tta: average the 8 flips/rotations of each tile (D4 test-time augmentation).
        level: source pyramid level to segment; None picks the one matching the bundle's resolution.
        chunk, shard: Zarr chunk and shard edges; block: output block edge (a multiple of shard).
        workers: model actors; None means one per GPU, or one per CPU core as memory allows.
        threads: torch threads per worker on CPU; None divides the cores among the workers.
        ray_address: None starts an embedded Ray; "auto" or "ray://host:10001" joins a cluster.
        skip_background: do not compute tiles without foreground (nodata, or no tissue on slides).
        pipelined: read ahead and write behind in each worker's helper threads; None means on GPU only.
        actors_per_gpu: model actors sharing each GPU (more than 1 helps when one actor's CPU work
            leaves the GPU idle; each holds its own copy of the model in GPU memory).
        compile: torch.compile the model in each worker (slower start, faster steady state on GPU).
        overwrite: replace a complete mosaic at `output`, or start an unfinished one over.
        tracking: the MLflow run of the job (default: MLFLOW_TRACKING_URI or ./mlflow.db).
    """

    source: str
    model: str
    output: str
    tile: int | None = None
    overlap: int | None = None
    window: str = "gaussian"
    scores: str = "logits"
    scores_dtype: str = "float16"
    tta: bool = False
    batch_size: int = 8
    device: str = "auto"
    level: int | None = None
    chunk: int = 512
    shard: int = 2048
    block: int = 2048
    workers: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    skip_background: bool = True
    pipelined: bool | None = None
    actors_per_gpu: int = 1
    compile: bool = False
    overwrite: bool = False
    progress: bool = True
    tracking: Tracking = field(default_factory=Tracking)

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ConfigError(f"window={self.window!r}: choose one of {', '.join(WINDOWS)}")
        check_storage(self.chunk, self.shard)
        if self.block <= 0 or self.block % self.shard:
            raise ConfigError(
                f"block {self.block} must be a multiple of shard {self.shard} (one writer per shard): "
                f"use block={self.shard} or a multiple of it"
            )
        for name in ("workers", "threads", "tile", "level", "actors_per_gpu"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "level" else 1):
                raise ConfigError(f"{name}={value} is out of range: use a positive number or leave it unset")
        self.inference  # noqa: B018  (validates scores, batch size and device before anything is written)

    @property
    def inference(self) -> InferenceOptions:
        return InferenceOptions(device=self.device, batch_size=self.batch_size, tta=self.tta, scores=self.scores,
                                compile=self.compile)


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
            f"mosaic      {self.output}",
            f"image       {self.width} x {self.height} px at level {self.level} ({self.megapixels:.1f} MPix)",
            f"tiles       {self.tiles_total} in grid: {self.tiles_computed} computed ({pct(self.tiles_computed)}), "
            f"{self.tiles_skipped} skipped ({pct(self.tiles_skipped)}), "
            f"{self.tiles_recomputed} recomputed ({pct(self.tiles_recomputed)})",
            f"blocks      {self.blocks_written} written of {self.blocks_total}"
            + (f" ({self.blocks_resumed} verified from an earlier run)" if self.blocks_resumed else "")
            + f", {self.workers} worker(s)",
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
class JobSpec:
    """What every worker needs, shipped once through the object store."""

    source: RasterSource  # pickles as (path, level); each worker opens its own handle
    bundle_bytes: bytes
    plan: BlockPlan
    window: str
    inference: InferenceOptions
    mosaic: str
    threads: int
    pipelined: bool = False  # read ahead and write behind in helper threads (GPU workers: the CPU is free)
    actors_per_gpu: int = 1


@dataclass(frozen=True)
class UnitReport:
    tiles: int
    seconds: float
    peak_rss_mib: float


class BlockWorker:
    """Holds the model, the source handle and the mosaic; computes seams and blocks.

    When pipelined (GPU workers), two helper threads keep the model busy: a reader decodes the next
    batch of tiles while the model runs on this one, and a writer finishes and stores a block while the
    next unit starts. At most one block waits for the writer; its error, if any, is raised by the next
    unit or by `flush`. A block whose write is lost with its process has no done-marker, and the driver
    computes it again. CPU workers do all of it in line: every core already runs a worker, and the
    helper threads were measured to slow the job down there (docs/benchmarks.md).
    """

    def __init__(self, job: JobSpec) -> None:
        import torch

        from pipeline.inference import Predictor

        limit_gdal_cache()
        torch.set_num_threads(job.threads)
        self.job = job
        with tempfile.NamedTemporaryFile(suffix=".bundle") as f:
            f.write(job.bundle_bytes)
            f.flush()
            bundle = ModelBundle.load(f.name)
        self.predictor = Predictor(bundle, job.inference)
        self.mosaic = Mosaic.open(job.mosaic, mode="r+")
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="tessera-read") if job.pipelined else None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tessera-write") if job.pipelined else None
        self.pending: Future[None] | None = None

    def ready(self) -> bool:
        """Answers once the model is loaded, so start-up is timed apart from compute."""
        return True

    def compute_seam(self, index: int) -> tuple[Any, ...]:
        """The seam's weighted sums, one accumulator per block it touches, then a report."""
        from pipeline.stitching import blend_tiles

        release_memory()
        start = time.perf_counter()
        plan, group = self.job.plan, self.job.plan.seams[index]
        regions = [plan.footprint(group.tiles, b) for b in group.blocks]
        accs = blend_tiles(group.tiles, regions, plan.grid, self.job.source, self.predictor, self.job.window,
                           self.reader)
        return (*accs, self._report(len(group.tiles), start))

    def compute_block(self, block: BlockId, *imports: Accumulator) -> UnitReport:
        """Compute the block's own tiles and add the seams' sums; the writer normalises and stores it."""
        from pipeline.stitching import blend_tiles

        release_memory()
        start = time.perf_counter()
        plan = self.job.plan
        tiles = plan.interior.get(block, ())
        (acc,) = blend_tiles(tiles, [plan.rect(block)], plan.grid, self.job.source, self.predictor,
                             self.job.window, self.reader)
        for part in imports:
            acc.merge(part)
        region = acc.region  # read here: the source handle is not shared between threads at once
        valid = self.job.source.valid(region.y0, region.x0, region.height, region.width)
        self.flush()  # one block at a time in the writer, so memory stays at two blocks
        if self.writer is None:
            self._store(block, acc, valid)
        else:
            self.pending = self.writer.submit(self._store, block, acc, valid)
        return self._report(len(tiles), start)

    def flush(self) -> bool:
        """Wait for the block in the writer; raises its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()
        return True

    def _store(self, block: BlockId, acc: Accumulator, valid: Any) -> None:
        from pipeline.stitching import finish_block

        out = finish_block(acc, valid, self.job.inference.scores)
        self.mosaic.mark_done(block, out.region, self.mosaic.write_block(out))

    @staticmethod
    def _report(tiles: int, start: float) -> UnitReport:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return UnitReport(tiles, time.perf_counter() - start, peak)


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
        if config.ray_address is None and workers > gpus * config.actors_per_gpu:
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
    source = open_source(config.source)
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
    tile = config.tile or spec.tile_size
    overlap = spec.overlap if config.overlap is None else config.overlap
    grid = TileGrid(source.height, source.width, tile, overlap)
    if config.block < tile:
        raise ConfigError(f"block {config.block} is smaller than the tile {tile}: raise block or shard")
    return source, bundle, grid


def segment(config: SegmentConfig, on_progress: Callable[[int, int], None] | None = None) -> SegmentSummary:
    """Segment `config.source` with `config.model` into the mosaic `config.output`.

    Args:
        config: the job settings.
        on_progress: called with (blocks done, blocks to do) after each block.

    Returns:
        The job summary (also written into the mosaic's lineage).

    Raises:
        TesseraError: on bad input, before anything is written.
    """
    start = time.perf_counter()
    config, registered = resolve_model(config)
    source, bundle, grid = prepare(config)
    job = job_fingerprint(config, source, bundle, grid)
    check_output(config.output, config.overwrite, job)  # refuse early, before taking the lock
    device_type = pick_device(config.device).type
    workers, threads = worker_layout(config, device_type)
    with OutputLock(config.output):
        resume = check_output(config.output, config.overwrite, job)  # authoritative, under the lock
        params = flat_params(config, job) | {f"model.{k}": v for k, v in (registered or {}).items()}
        with job_run(config.tracking, params, config.output) as run:
            summary = _execute(config, source, bundle, grid, job, resume, device_type, workers, threads,
                               start, on_progress, run, registered)
            run.log_result(summary.as_dict(), dataclasses.asdict(config), Mosaic.open(config.output).preview_png())
            return summary


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
        "source": str(Path(source.path).resolve()) if "://" not in source.path else source.path,
        "level": source.level, "height": source.height, "width": source.width, "model_sha256": bundle.sha256,
        "tile": grid.tile, "overlap": grid.overlap, "window": config.window, "scores": config.scores,
        "scores_dtype": config.scores_dtype, "tta": config.tta, "chunk": config.chunk, "shard": config.shard,
        "block": config.block, "skip_background": config.skip_background,
    }


def _execute(
    config: SegmentConfig, source: RasterSource, bundle: ModelBundle, grid: TileGrid, job: dict[str, Any],
    resume: bool, device_type: str, workers: int, threads: int, start: float,
    on_progress: Callable[[int, int], None] | None, run: JobRun, registered: dict[str, Any] | None = None,
) -> SegmentSummary:
    """Plan, create or reopen the mosaic, run the blocks not yet done, pyramid, finish."""
    import ray

    fg, factor = source.foreground() if config.skip_background else (None, 1.0)
    active = grid.active(fg, factor)
    plan = BlockPlan(grid, config.block, active)
    busy = plan.busy_blocks()
    if resume:
        done = Mosaic.open(config.output).done_blocks() & set(busy)
    else:
        layout = MosaicLayout(
            height=source.height, width=source.width, classes=bundle.spec.classes,
            scores_kind=config.scores, scores_dtype=config.scores_dtype, chunk=config.chunk,
            shard=config.shard, crs=source.crs,
            transform=tuple(source.transform)[:6] if source.transform is not None else None,
            mpp=source.mpp,
        )
        lineage = {**lineage_info.describe(config, source, bundle, grid, registered), "mlflow": run.lineage()}
        Mosaic.create(config.output, layout, lineage, job)
        done = set()
    todo = [b for b in busy if b not in done]
    # Seam tiles shared by a block done in an earlier run and one still to do are computed again.
    recomputed = sum(len(g.tiles) for g in plan.seams
                     if any(b in done for b in g.blocks) and any(b not in done for b in g.blocks))
    workers = max(1, min(workers, len(todo) + len(plan.seams))) if todo else 1

    phases = {"prepare": time.perf_counter() - start}
    started_ray = False
    try:
        with PeakMemory() as memory:
            tick = time.perf_counter()
            started_ray = connect_ray(config.ray_address, workers,
                                   object_store_bytes(plan, bundle.spec.num_classes, workers))
            phases["startup"] = time.perf_counter() - tick
            spec = JobSpec(
                source=source, bundle_bytes=Path(config.model).read_bytes(), plan=plan,
                window=config.window, inference=config.inference, mosaic=config.output, threads=threads,
                pipelined=config.pipelined if config.pipelined is not None else device_type == "cuda",
                actors_per_gpu=config.actors_per_gpu,
            )
            reports = _run(plan, todo, spec, workers, device_type, config.progress, on_progress, phases)
            reports += _rerun_lost(plan, todo, spec, workers, device_type, phases)
            mosaic = Mosaic.open(config.output, mode="r+")
            tick = time.perf_counter()
            mosaic.build_pyramid()
            phases["pyramid"] = time.perf_counter() - tick
    finally:
        if started_ray:
            ray.shutdown()
    summary = SegmentSummary(
        output=config.output, height=source.height, width=source.width, level=source.level,
        tiles_total=len(grid), tiles_computed=sum(r.tiles for r in reports), tiles_skipped=len(grid) - len(active),
        tiles_recomputed=recomputed, blocks_total=len(list(plan)), blocks_written=len(todo),
        blocks_resumed=len(done), workers=workers, wall_seconds=time.perf_counter() - start, phases=phases,
        peak_memory_mib=memory.peak_mib, worker_peak_rss_mib=max((r.peak_rss_mib for r in reports), default=0.0),
        run_id=run.run_id,
    )
    mosaic.finish({"summary": summary.as_dict(), "finished": lineage_info.now(), "mlflow": run.lineage()})
    return summary


def _rerun_lost(
    plan: BlockPlan, todo: list[BlockId], job: JobSpec, workers: int, device_type: str, phases: dict[str, float],
) -> list[UnitReport]:
    """Compute again the blocks of `todo` that have no done-marker; raises TesseraError after WORKER_RESTARTS tries.

    A worker process that dies with a block in its writer thread has already reported the block, but
    the block was never stored: it is found here by its missing marker.
    """
    mosaic = Mosaic.open(job.mosaic)
    reports: list[UnitReport] = []
    for attempt in range(WORKER_RESTARTS + 1):
        lost = sorted(set(todo) - mosaic.marked_blocks())
        if not lost:
            return reports
        if attempt == WORKER_RESTARTS:
            break
        log.warning("%d block(s) lost with a worker process are computed again", len(lost))
        reports += _run(plan, lost, job, workers, device_type, False, None, phases)
    raise TesseraError(f"{len(lost)} block(s) were still lost with their worker processes after {WORKER_RESTARTS} "
                       f"reruns: check the workers' logs; rerunning the job resumes it")


def _first_line(error: Exception) -> str:
    """The innermost message of a Ray error, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line and not line.startswith(("File", "ray."))]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:500]


def object_store_bytes(plan: BlockPlan, channels: int, workers: int) -> int:
    """Room in an embedded Ray's object store for the seam sums that the units in flight use.

    Seam sums wait in the object store until the blocks on both sides are written: about one row of
    blocks, so their total grows with the image's width. Sized for the units in flight (and twice that
    for those being made), the store spills the waiting ones to disk and memory stays flat.
    """
    feeds = plan.seams_of()

    def imports(b: BlockId) -> int:
        return sum((channels + 1) * 4 * plan.footprint(plan.seams[k].tiles, b).area for k in feeds.get(b, []))

    largest = max((imports(b) for b in plan.busy_blocks()), default=0)
    return max(OBJECT_STORE_MIN, 2 * IN_FLIGHT * workers * largest)


def connect_ray(address: str | None, workers: int, object_store: int | None = None) -> bool:
    """Join a Ray cluster, or start an embedded one; True when this call started Ray.

    No address means a new embedded Ray, even if a `ray start` head runs on this machine, except
    inside a job submitted through the Ray Jobs API, where RAY_ADDRESS names the job's cluster.
    `object_store` bytes bound an embedded Ray's object store (a cluster's is set by `ray start`).
    """
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **common)
    else:
        # One process each to spill and restore the waiting seam sums: each is a Python process of
        # about 80 MB, and Ray's default of up to 4 of each made peak memory grow with the image.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 object_store_memory=object_store, _system_config={"max_io_workers": 1}, **common)
    return True

def _run(
    plan: BlockPlan,
    busy: list[BlockId],
    job: JobSpec,
    workers: int,
    device_type: str,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
    phases: dict[str, float],
) -> list[UnitReport]:
    """Dataflow over the actors: seams first, each block once all its seams are done.

    Adds the workers' start-up time to `phases["startup"]` and the compute time as `phases["blocks"]`.
    """
    import ray
    from tqdm import tqdm

    if not busy:
        return []
    job_ref = ray.put(job)
    # A worker process that dies (killed, node lost) is restarted and its unfinished units retried;
    # that is safe because every unit is idempotent. Exceptions raised by our code are not retried.
    actor_cls = ray.remote(BlockWorker).options(
        num_cpus=1, num_gpus=1 / job.actors_per_gpu if device_type == "cuda" else 0, max_restarts=WORKER_RESTARTS,
        max_task_retries=WORKER_RESTARTS,
    )
    tick = time.perf_counter()
    actors: list[Any] = [actor_cls.remote(job_ref) for _ in range(workers)]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=STARTUP_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise TesseraError(
            f"{workers} worker(s) needing {'a GPU' if device_type == 'cuda' else 'a CPU'} each could not start "
            f"within {STARTUP_TIMEOUT:.0f} s: the cluster lacks the resources; use fewer --workers"
        ) from None
    except ray.exceptions.RayActorError as e:
        raise TesseraError(f"a worker failed to start: {_first_line(e)}") from None
    phases["startup"] = phases.get("startup", 0.0) + time.perf_counter() - tick
    tick = time.perf_counter()
    feeds = plan.seams_of()
    seam_order: list[int] = []
    ordered: set[int] = set()
    for b in busy:  # seams in the order their first block needs them
        for k in feeds.get(b, []):
            if k not in ordered:
                ordered.add(k)
                seam_order.append(k)
    seams_todo = deque(seam_order)
    waiting = {b: len(feeds.get(b, [])) for b in busy}
    consumers = {k: sum(b in waiting for b in plan.seams[k].blocks) for k in seam_order}
    seam_parts: dict[int, dict[BlockId, Any]] = {}
    blocks_ready = deque(b for b in busy if waiting[b] == 0)
    blocks_left = set(busy) - set(blocks_ready)
    in_flight: dict[Any, tuple[str, Any, int]] = {}
    load: dict[int, int] = defaultdict(int)
    reports: list[UnitReport] = []
    bar = tqdm(total=len(busy), desc="blocks", unit="block", disable=not progress, leave=False)
    done_blocks = 0

    def submit(a: int) -> bool:
        actor = actors[a]
        if blocks_ready:
            b = blocks_ready.popleft()
            refs = [seam_parts[k][b] for k in feeds.get(b, [])]
            in_flight[actor.compute_block.remote(b, *refs)] = ("block", b, a)
        elif seams_todo:
            k = seams_todo.popleft()
            group = plan.seams[k]
            *parts, report = actor.compute_seam.options(num_returns=len(group.blocks) + 1).remote(k)
            seam_parts[k] = dict(zip(group.blocks, parts, strict=True))
            in_flight[report] = ("seam", k, a)
        else:
            return False
        load[a] += 1
        return True

    try:
        while blocks_ready or seams_todo or in_flight:
            for a in sorted(range(workers), key=lambda i: load[i]):
                while load[a] < IN_FLIGHT and submit(a):
                    pass
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            kind, key, a = in_flight.pop(ref)
            load[a] -= 1
            try:
                report: UnitReport = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, TesseraError) else None
                raise cause or e from None
            reports.append(report)
            if kind == "seam":
                for b in plan.seams[key].blocks:
                    if b in waiting:
                        waiting[b] -= 1
                        if waiting[b] == 0 and b in blocks_left:
                            blocks_left.discard(b)
                            blocks_ready.append(b)
            else:
                for k in feeds.get(key, []):
                    consumers[k] -= 1
                    seam_parts[k].pop(key, None)  # drop our reference so the object store frees it
                    if consumers[k] == 0:
                        del seam_parts[k]
                done_blocks += 1
                bar.update(1)
                if on_progress is not None:
                    on_progress(done_blocks, len(busy))
        for ref in [a.flush.remote() for a in actors]:  # the last block of each worker is still writing
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, TesseraError) else e) from None
    except BaseException:
        # Stopped or failed: keep the blocks already computed (their writes finish), drop the rest.
        for ref in in_flight:
            with contextlib.suppress(Exception):  # already finished, or its worker gone
                ray.cancel(ref)
        ray.wait([a.flush.remote() for a in actors], num_returns=len(actors), timeout=FLUSH_TIMEOUT)
        raise
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    phases["blocks"] = phases.get("blocks", 0.0) + time.perf_counter() - tick
    return reports
