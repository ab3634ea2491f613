"""The job engine: every mosaic job (segment, refine) over a collection of images, on one warm pool.

A job kind (`JobKind`: segment in `execution`, refine in `refinement`) says what one image's work is:
how to open and check it (`prepare`, nothing written), its fingerprint, the layout and lineage of the
mosaic it writes, and its units: blocks, each written by exactly one unit, and seams, units whose
results feed several blocks. The engine owns everything else, once:

- Ray: one connection and one pool of warm worker actors (`BlockWorker`) for the whole collection,
  started while the driver opens and plans the first images;
- images streamed through the pool: a few planned ahead in driver threads, several in flight at once
  (the oldest first), so no worker idles at an image boundary and an image of one block does not
  leave cores idle; each image's finish (pyramid, metadata, `complete`, tracking) runs in a driver
  thread while other images compute;
- per image: the output lock, resume from verified done-markers, a finished mosaic skipped, lost
  writes recomputed, and any failure (missing, unreadable, bands that do not fit, a worker dying)
  recorded as that image's one-line error while the others go on;
- the collection's manifest, its MLflow run with one nested run per image, and the summary.

Memory stays bounded whatever the number of images: at most `max_images` images are in flight and
`PLAN_AHEAD` planned; workers keep the handles of the last `CONTEXTS` images only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import lineage as lineage_info
from pipeline import warm_pool
from pipeline.collection import CollectionItem
from pipeline.errors import OutputLockedError, TesseraError
from pipeline.locking import OutputLock, lock_location
from pipeline.manifest import Manifest, ManifestRow
from pipeline.memory import PeakMemory, limit_gdal_cache, release_memory
from pipeline.mosaic import Mosaic, MosaicLayout, output_state
from pipeline.storage import Location, storage_for
from pipeline.tiling import BlockId
from pipeline.tracking import JobRun, Tracking, check_reachable, start_run

log = logging.getLogger(__name__)

WORKER_RESTARTS = 3  # per worker, for processes that die; errors raised by tessera are never retried
STARTUP_TIMEOUT = 600.0  # seconds for workers to start; a cluster may need to scale up first
FLUSH_TIMEOUT = 60.0  # seconds for workers to finish writing blocks already computed when a job stops
IN_FLIGHT = 2  # units per worker: one running, one queued, so a worker never idles between units
PLAN_AHEAD = 2  # images opened and planned ahead of those in flight
FAST_CHECK = 0.5  # seconds a single image has to fail before Ray starts beside its planning
CONTEXTS = 8  # images whose handles (source, mosaic) a worker keeps open
MANIFEST_EVERY = 2.0  # seconds between rewrites of the manifest while a collection runs


# -- what a job kind provides ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnitGraph:
    """One image's units: its blocks to write, and seams (units whose results feed several blocks).

    A block is computed once every seam feeding it has finished; `seams[k]` names the blocks seam k
    feeds, in the order its results come back.
    """

    blocks: tuple[BlockId, ...]
    seams: tuple[tuple[BlockId, ...], ...] = ()

    def feeds(self) -> dict[BlockId, list[int]]:
        """For each block, the seams that feed it."""
        out: dict[BlockId, list[int]] = defaultdict(list)
        for k, blocks in enumerate(self.seams):
            for b in blocks:
                out[b].append(k)
        return out


@dataclass
class ImageJob:
    """What a job kind prepares for one image on the driver, before anything is written."""

    item: CollectionItem
    output: str
    fingerprint: dict[str, Any]  # the settings that fix the mosaic's content: a rerun with the same resumes
    layout: MosaicLayout
    lineage: dict[str, Any]  # written when the mosaic is created
    graph: UnitGraph
    spec: Any  # shipped once to each worker that computes a unit of this image
    params: dict[str, Any]  # the image's settings, tracked as run parameters
    extra: dict[str, Any] = field(default_factory=dict)  # the kind's own, for its summary


@dataclass(frozen=True)
class UnitReport:
    """What a worker returns for one unit."""

    work: int  # tiles computed (segment) or pixels refined (refine)
    seconds: float
    peak_rss_mib: float

    @staticmethod
    def since(work: int, start: float) -> UnitReport:
        return UnitReport(work, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass(frozen=True)
class ImageFigures:
    """What the engine measured of one image, for the kind's summary."""

    blocks_written: int
    blocks_resumed: int
    written: tuple[BlockId, ...]  # the blocks computed by this run
    work: int  # summed over the units run
    recomputed_seams: tuple[int, ...]  # seams run again because a block beside them was done before
    workers: int
    wall_seconds: float
    phases: dict[str, float]
    peak_memory_mib: float
    worker_peak_rss_mib: float
    run_id: str | None


class Summary(Protocol):
    def as_dict(self) -> dict[str, Any]: ...
    def describe(self) -> str: ...


class UnitRunner(Protocol):
    """A job kind's side of a worker: opens an image's handles and computes its units."""

    def open(self, spec: Any) -> Any: ...
    def seam(self, context: Any, index: int) -> tuple[list[Any], UnitReport]: ...
    def block(self, context: Any, block: BlockId, parts: Sequence[Any]) -> UnitReport: ...
    def flush(self) -> None: ...


class WorkerSetup(Protocol):
    """Shipped once to every worker; `start` loads what the worker keeps warm (the model)."""

    def start(self) -> UnitRunner: ...


@dataclass(frozen=True)
class WorkerLayout:
    """The pool: how many workers, what each holds of the cluster, and whether they write behind."""

    workers: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    writes_behind: bool = False  # a unit returns before its block is stored: flush before finishing
    hint: str = "use fewer --workers"  # the fix when a worker keeps dying


class JobKind(Protocol):
    """A job description: what the engine needs to know of segment, refine, or a future job."""

    name: str
    params: dict[str, Any]  # the settings every image shares, tracked on the collection's run
    tracking: Tracking
    address: str | None
    overwrite: bool
    progress: bool
    verbose: bool

    @property
    def summary_type(self) -> type:
        """What one image's job reports: a dataclass with a `kept` field."""
        ...

    def check(self) -> None:
        """What every image shares, checked once before a collection starts; raises TesseraError."""
        ...
    def prepare(self, item: CollectionItem, output: str) -> ImageJob: ...
    def ray_resources(self) -> tuple[int, int | None]:
        """CPUs and object-store bytes for an embedded Ray, known before any image is planned."""
        ...
    def worker_setup(self) -> WorkerSetup: ...
    def worker_layout(self, first: ImageJob | None) -> WorkerLayout: ...
    def summarise(self, job: ImageJob, figures: ImageFigures) -> Summary: ...


class JobBase:
    """What every job kind takes from its config alike; `per_image` names the fields each image sets."""

    def __init__(self, config: Any, per_image: tuple[str, ...]) -> None:
        self.config = config
        self.tracking: Tracking = config.tracking
        self.address: str | None = config.address
        self.overwrite: bool = config.overwrite
        self.progress: bool = config.progress
        self.verbose: bool = config.verbose
        self.params = {f"config.{k}": v for k, v in dataclasses.asdict(config).items()
                       if k not in (*per_image, "tracking")}


# -- the worker -----------------------------------------------------------------------------------


class BlockWorker:
    """A warm worker: keeps what the job kind loads once (the model) and the handles of recent images.

    `setup` is a one-element list holding the ref of the job's WorkerSetup, so that Ray passes the ref
    itself: a worker kept warm for the next job (`pipeline.warm_pool`) is handed that job's setup, and
    every unit names its job's, so that a worker restarted by Ray (with the arguments it was created
    with, perhaps another job's) loads the right one before it computes anything.
    """

    def __init__(self, setup: list[Any]) -> None:
        limit_gdal_cache()
        self.setup_key = ""
        self.runner: Any = None
        self.contexts: OrderedDict[int, Any] = OrderedDict()  # `setup` is loaded by the first call: see above

    def ready(self, setup: list[Any]) -> bool:
        """Answers once the job's model is loaded, so start-up is timed apart from compute."""
        self._use(setup)
        return True

    def seam(self, setup: list[Any], image: int, spec: list[Any], index: int) -> tuple[Any, ...]:
        """A seam's results, one per block it feeds, then its report."""
        self._use(setup)
        release_memory()
        parts, report = self.runner.seam(self._context(image, spec), index)
        return (*parts, report)

    def block(self, setup: list[Any], image: int, spec: list[Any], block: BlockId, *parts: Any) -> UnitReport:
        self._use(setup)
        release_memory()
        return self.runner.block(self._context(image, spec), block, parts)

    def _use(self, setup: list[Any]) -> None:
        """Load the job's setup unless it is the one loaded; the last job's image handles go with it."""
        import ray

        if setup[0].hex() == self.setup_key:
            return
        if self.runner is not None:
            with contextlib.suppress(Exception):  # the last job ended: nothing of it is pending
                self.runner.flush()
        self.runner, self.contexts = None, OrderedDict()
        self.runner = ray.get(setup[0]).start()
        self.setup_key = setup[0].hex()

    def alive(self) -> bool:
        """Answers while the worker runs (and with an error once it is gone)."""
        return True

    def flush(self) -> bool:
        """Wait for the block being written behind; raises its error."""
        self.runner.flush()
        return True

    def _context(self, image: int, spec: list[Any]) -> Any:
        """The image's handles, opened once per worker; `spec` is a one-element list holding its ref,
        so Ray fetches it only here, the first time."""
        import ray

        if image not in self.contexts:
            self.contexts[image] = self.runner.open(ray.get(spec[0]))
            while len(self.contexts) > CONTEXTS:
                self.contexts.popitem(last=False)
        self.contexts.move_to_end(image)
        return self.contexts[image]


# -- results --------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """One image's outcome: done, failed or skipped."""

    item: CollectionItem
    output: str
    status: str = "pending"
    error: str = ""
    summary: Summary | None = None
    seconds: float = 0.0
    work: int = 0
    run_id: str | None = None
    exception: BaseException | None = field(default=None, repr=False)

    def row(self) -> ManifestRow:
        return ManifestRow(input=self.item.source, output=self.output, status=self.status, tiles_computed=self.work,
                           seconds=round(self.seconds, 3), error=self.error, run_id=self.run_id or "")


@dataclass(frozen=True)
class CollectionSummary:
    """What a collection job reports."""

    kind: str
    root: str | None
    images: tuple[ImageResult, ...]
    workers: int
    wall_seconds: float
    phases: dict[str, float]  # startup (Ray, workers), and the wall time to the end
    peak_memory_mib: float
    run_id: str | None
    manifest: str | None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.images)

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.images if r.status == "failed"]

    def describe(self) -> str:
        lines = [f"{self.kind}     {len(self.images)} image(s) under {self.root}" if self.root else self.kind]
        megapixels = sum(float(r.summary.as_dict().get("megapixels", 0.0)) for r in self.images if r.summary
                         and r.status == "done")
        lines.append(f"result      {self.count('done')} done, {self.count('failed')} failed, "
                     f"{self.count('skipped')} skipped (finished before)")
        for r in self.failed:
            lines.append(f"failed      {r.item.source}: {r.error}")
        lines.append(f"speed       {megapixels / self.wall_seconds if self.wall_seconds else 0:.2f} MPix/s, wall "
                     f"{self.wall_seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
                     + f"), {self.workers} worker(s)")
        lines.append(f"memory      peak {self.peak_memory_mib:.0f} MiB all processes (PSS)")
        if self.manifest:
            lines.append(f"manifest    {self.manifest}")
        if self.run_id:
            lines.append(f"tracking    MLflow run {self.run_id}")
        return "\n".join(lines)


# -- the engine -----------------------------------------------------------------------------------


@dataclass
class _Opened:
    """An image prepared, locked and created (or resumed): ready for its units."""

    key: int
    job: ImageJob
    lock: OutputLock
    run: JobRun
    todo: list[BlockId]
    done: set[BlockId]
    started: float
    phases: dict[str, float]


@dataclass
class _Active:
    """The scheduling state of an image in flight."""

    key: int
    opened: _Opened
    spec: list[Any]  # [ObjectRef of the job's spec], not resolved by Ray when passed to a worker
    feeds: dict[BlockId, list[int]]
    seams_todo: deque[int]
    waiting: dict[BlockId, int]
    consumers: dict[int, int]
    blocks_ready: deque[BlockId]
    blocks_left: set[BlockId]
    seam_parts: dict[int, dict[BlockId, Any]] = field(default_factory=dict)
    in_flight: int = 0
    blocks_done: int = 0
    work: int = 0
    reports: list[UnitReport] = field(default_factory=list)
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    attempt: int = 0
    recomputed: tuple[int, ...] = ()
    lost_worker: bool = False  # a unit failed with its worker or node, not with an error of its own
    lost_before: int | None = None  # blocks left to do when this attempt started, after a loss

    @property
    def runnable(self) -> bool:
        return self.error is None and bool(self.blocks_ready or self.seams_todo)

    @property
    def finished(self) -> bool:
        return self.in_flight == 0 and (self.error is not None or not (self.blocks_ready or self.seams_todo
                                                                       or self.blocks_left))


# A unit in flight: its image, "seam" or "block", the seam's index or the block, the worker's slot and handle.
_Unit = tuple["_Active", str, Any, int, Any]


class _StillWriting(TesseraError):
    """A worker writing behind could not be stopped."""


class _Stop(BaseException):
    """The driver is stopping: images not yet opened stay pending."""


class Engine:
    """Runs one job kind over a collection; use `run_collection`."""

    def __init__(self, kind: JobKind, tasks: Sequence[tuple[CollectionItem, str]], root: str | None,
                 max_images: int | None, on_progress: Callable[[int, int], None] | None) -> None:
        self.kind = kind
        self.tasks = list(tasks)
        self.root = root
        self.max_images = max_images
        self.on_progress = on_progress
        self.results = [ImageResult(item, output) for item, output in self.tasks]
        self.manifest = self._manifest(root) if root else None
        self.ray_ready = threading.Event()
        self.stopping = threading.Event()
        self.parent: JobRun | None = None
        self.parent_ready = threading.Event()
        self.workers = 0
        self.blocks_done = 0
        self.blocks_total = 0
        self.bar: Any = None
        self.layout = WorkerLayout(1)
        self.first_job: ImageJob | None = None
        self.first_prepared = threading.Event()
        self.startup_seconds = 0.0
        self.setup: list[Any] = []  # the ref of the workers' setup, in a list (see BlockWorker)
        self._finishing: dict[int, _Active] = {}  # images handed to the finisher, by key
        self.retired: set[int] = set()  # worker slots whose lost worker could not be replaced
        self.killed: list[Any] = []  # workers the finisher stopped, for the loop to replace
        self._manifest_written = 0.0

    def _manifest(self, root: str) -> Manifest:
        """This run's rows, then those of earlier runs into the same ROOT for images not in this run."""
        rows = [r.row() for r in self.results]
        ours = {r.output for r in rows}
        with contextlib.suppress(TesseraError):  # none yet, or unreadable: this run's rows only
            rows += [r for r in Manifest.read(root).rows if r.output not in ours]
        return Manifest(root, rows)

    # -- driver threads: open an image ahead, finish one behind ----------------------------------

    def _open(self, index: int) -> _Opened | ImageResult:
        """Prepare, check and create (or resume) image `index`; its result when there is nothing to run."""
        item, output = self.tasks[index]
        result = self.results[index]
        start = time.perf_counter()
        job: ImageJob | None = None
        runs = False
        try:
            try:
                job = self.kind.prepare(item, output)
                if output_state(output, self.kind.overwrite, job.fingerprint) == "complete":
                    return self._skipped(result, output)
                runs = True
            finally:
                if index == 0:  # a single image's pool is sized to its units; none is started if it will not run
                    self.first_job = job if runs else None
                    self.first_prepared.set()
            waited = time.perf_counter()
            while not self.ray_ready.wait(0.1):  # nothing is written before Ray is known to be there
                if self.stopping.is_set():
                    raise _Stop
            waited = time.perf_counter() - waited
            lock = OutputLock(output)
            lock.acquire()
        except Exception as e:  # this image fails (bad input, or a reader's own error); the others go on
            return self._failed(result, e)
        run: JobRun | None = None
        try:
            state = output_state(output, self.kind.overwrite, job.fingerprint)  # authoritative, under the lock
            if state == "complete":
                lock.release()
                return self._skipped(result, output)
            self.parent_ready.wait()
            run = start_run(self.kind.tracking, job.params, output, parent=self.parent)
            if state == "resume":
                done = Mosaic.open(output).done_blocks() & set(job.graph.blocks)
            else:
                lineage = {**job.lineage, "mlflow": run.lineage(),
                           **({"collection": {"root": self.root, "mlflow": self.parent.lineage()}}
                              if self.root and self.parent else {})}
                Mosaic.create(output, job.layout, lineage, job.fingerprint)
                done = set()
        except BaseException as e:
            lock.release()
            if run is not None:
                with contextlib.suppress(Exception):
                    run.end("FAILED")
            if isinstance(e, Exception):  # tracking or storage trouble with this image: the others go on
                return self._failed(result, e)
            raise
        todo = [b for b in job.graph.blocks if b not in done]
        return _Opened(index, job, lock, run, todo, done, start, {"prepare": time.perf_counter() - start - waited})

    def _skipped(self, result: ImageResult, output: str) -> ImageResult:
        lock = lock_location(output)
        if storage_for(lock).exists(lock):  # left by a job killed after it finished: broken if its owner is dead
            with contextlib.suppress(OutputLockedError):
                OutputLock(output).__enter__().release()
        mosaic = Mosaic.open(output)
        result.status = "skipped"
        result.run_id = (mosaic.lineage.get("mlflow") or {}).get("run_id")
        result.work = 0
        return result

    def _failed(self, result: ImageResult, error: BaseException) -> ImageResult:
        result.status = "failed"
        result.error = one_line(error)
        if len(self.tasks) == 1:  # raised again to the caller; a collection keeps only the line
            result.exception = error
        return result

    def _finish(self, active: _Active, flushed: list[tuple[Any, Any]],
                peak: PeakMemory) -> tuple[_Active, list[BlockId]]:
        """Pyramid, metadata, `complete`, tracking; or the blocks whose writes were lost with a worker."""
        try:
            return self._complete(active, flushed, peak)
        except Exception as e:  # this image fails; the others go on
            active.error = e
            self._abandon(active)
            return active, []

    def _complete(self, active: _Active, flushed: list[tuple[Any, Any]],
                  peak: PeakMemory) -> tuple[_Active, list[BlockId]]:
        opened = active.opened
        if flushed:  # the last blocks written behind; a write that failed or was lost has no marker (below)
            stop_writers(flushed, self.killed)
        mosaic = Mosaic.open(opened.job.output, mode="r+")
        lost = sorted(set(opened.todo) - mosaic.marked_blocks())
        if lost:
            return active, lost
        active.error = None  # a worker was lost after every block was stored: nothing is missing
        if len(self.tasks) == 1:  # a single image pays the pool's start-up itself
            opened.phases["startup"] = self.startup_seconds
        opened.phases["blocks"] = time.perf_counter() - active.started
        tick = time.perf_counter()
        mosaic.build_pyramid(num_workers=None if len(self.tasks) == 1 else 1)  # beside others' compute: one thread
        opened.phases["pyramid"] = time.perf_counter() - tick
        figures = ImageFigures(
            blocks_written=len(opened.todo), blocks_resumed=len(opened.done), written=tuple(opened.todo),
            work=active.work,
            recomputed_seams=active.recomputed, workers=self.workers,
            wall_seconds=time.perf_counter() - opened.started, phases=opened.phases, peak_memory_mib=peak.peak_mib,
            worker_peak_rss_mib=max((r.peak_rss_mib for r in active.reports), default=0.0),
            run_id=opened.run.run_id,
        )
        summary = self.kind.summarise(opened.job, figures)
        if opened.lock.lost:  # stalled past the heartbeat: another job took the output over and finishes it
            raise OutputLockedError(f"{opened.job.output} was taken over by another job while this one stalled "
                                    f"(no heartbeat for {opened.lock.stale_after:.0f} s); that job finishes it")
        mosaic.finish({"summary": summary.as_dict(), "finished": lineage_info.now(), "mlflow": opened.run.lineage()})
        opened.lock.release()
        try:  # the mosaic is complete: a tracking failure now is a warning, not the image's failure
            opened.run.log_result(summary.as_dict(), opened.job.params, mosaic.preview_png(256))
            opened.run.end("FINISHED")
        except Exception as e:
            log.warning("%s is complete, but its MLflow run %s could not be updated: %s", opened.job.output,
                        opened.run.run_id, one_line(e))
        result = self.results[active.key]
        result.status, result.summary, result.run_id = "done", summary, opened.run.run_id
        result.seconds = sum(v for k, v in opened.phases.items() if k != "startup")  # its own, not the pool's
        result.work = active.work
        return active, []

    def _abandon(self, active: _Active) -> None:
        """An image that failed or was stopped: its lock goes (or, while a worker may still write to it, is left to
        go stale), its run ends FAILED, its mosaic stays unfinished."""
        active.opened.lock.release(leave_stale=isinstance(active.error, _StillWriting))
        with contextlib.suppress(Exception):
            active.opened.run.end("FAILED")
        result = self.results[active.key]
        if active.error is not None:
            self._failed(result, active.error)
        result.seconds = time.perf_counter() - active.opened.started

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> CollectionSummary:
        import ray

        start = time.perf_counter()
        # Where the output goes: an unreachable store, missing credentials or bucket fail here, in one line.
        root = Location.parse(self.root) if self.root else None
        where = root or (Location.parse(self.tasks[0][1]) if self.tasks else None)
        if where is not None:
            storage_for(where).check(where)
        tracking = self.kind.tracking
        if tracking.enabled:
            check_reachable(tracking.resolved_uri())
        address = self.kind.address or os.environ.get("RAY_ADDRESS")
        if address:
            from pipeline.cluster import check_address

            check_address(address)  # an unreachable cluster fails here, before any output
        if len(self.tasks) > 1:
            self.kind.check()  # what every image shares (the model, the device) fails once, for the whole job
        if root is not None and root.is_local:
            root.local_path().mkdir(parents=True, exist_ok=True)
        phases: dict[str, float] = {}
        planner = ThreadPoolExecutor(PLAN_AHEAD, thread_name_prefix="tessera-plan")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="tessera-finish")
        background = ThreadPoolExecutor(1, thread_name_prefix="tessera-track")
        next_task = 0
        planning: dict[Future[Any], int] = {}
        # The collection's run is created beside Ray's start (MLflow's store takes a second to open).
        parent_future = background.submit(self._start_parent) if self.root else None
        if parent_future is None:
            self.parent_ready.set()
        single = len(self.tasks) == 1
        first: ImageJob | None = None
        started_ray = False
        ended_normally = False
        shape: tuple[Any, ...] | None = None  # the workers' resources, where they may be kept warm
        actor_cls: Any = None
        actors: list[Any] = []
        active: list[_Active] = []
        finishing: dict[Future[Any], int] = {}
        in_flight: dict[Any, _Unit] = {}
        load: dict[int, int] = defaultdict(int)
        ready: deque[_Opened] = deque()
        try:
            with PeakMemory() as peak:
                while next_task < len(self.tasks) and len(planning) < PLAN_AHEAD:
                    planning[planner.submit(self._open, next_task)] = next_task
                    next_task += 1
                from pipeline.cluster import connect_ray, native_ray_lines_in_log_only

                # Ray starts while the driver opens and plans the first images. A single image that fails
                # at once (missing, unreadable) or was finished before starts no Ray at all.
                if single and self.first_prepared.wait(FAST_CHECK) and self.first_job is None:
                    pool = False
                else:
                    pool = True
                    tick = time.perf_counter()
                    cpus, store = self.kind.ray_resources()
                    started_ray = connect_ray(self.kind.address, cpus, store, verbose=self.kind.verbose)
                    self.ray_ready.set()
                    log.debug("Ray ready after %.2f s", time.perf_counter() - start)
                if single:  # one image: the pool is sized to its units
                    self.first_prepared.wait()
                    log.debug("first image prepared after %.2f s", time.perf_counter() - start)
                    first = self.first_job
                    pool = first is not None
                if pool:
                    layout = self.layout = self.kind.worker_layout(first)
                    self.setup = [ray.put(self.kind.worker_setup())]  # passed as a ref, see BlockWorker
                    actor_cls = ray.remote(BlockWorker).options(
                        num_cpus=layout.num_cpus, num_gpus=layout.num_gpus, max_restarts=WORKER_RESTARTS,
                        max_task_retries=WORKER_RESTARTS,
                    )
                    self.workers = layout.workers
                    # On a Ray this job did not start, workers outlive it: the last job's idle ones are taken.
                    shape = None if started_ray else warm_pool.key(layout.num_cpus, layout.num_gpus)
                    actors = self._alive(warm_pool.take(shape, layout.workers)) if shape else []
                    # The setup stays in the object store for restarts (the driver holds its ref for the whole job);
                    # Ray's warning about that, printed once a process, goes to its log only.
                    with native_ray_lines_in_log_only(self.kind.verbose):
                        actors += [actor_cls.remote(self.setup) for _ in range(layout.workers - len(actors))]
                    self._await_workers(actors, layout)
                    log.debug("workers ready after %.2f s", time.perf_counter() - start)
                    phases["startup"] = self.startup_seconds = time.perf_counter() - tick
                self.ray_ready.set()  # (also when no pool is needed: nothing waits for it then)
                if parent_future is not None:
                    parent_future.result()
                from tqdm import tqdm

                # One image: a bar of its blocks (none when it failed to open); a collection: a bar of its images.
                self.bar = tqdm(total=0 if single else len(self.tasks), desc=self.kind.name,
                                unit="block" if single else "image",
                                disable=not self.kind.progress or (single and first is None), leave=False)
                max_images = self.max_images or max(2, 2 * self.layout.workers)
                while True:
                    # Keep images planned ahead and in flight.
                    while next_task < len(self.tasks) and len(planning) + len(ready) < PLAN_AHEAD:
                        planning[planner.submit(self._open, next_task)] = next_task
                        next_task += 1
                    while ready and len(active) + len(finishing) < max_images:  # finishing ones hold memory too
                        opened = ready.popleft()
                        active.append(self._activate(opened.key, opened, None, 0))
                    # Workers stopped by the finisher (still writing after FLUSH_TIMEOUT) get their successors.
                    while self.killed:
                        gone = self.killed.pop()
                        for a in [a for a in range(len(actors)) if actors[a] is gone and a not in self.retired]:
                            self._replace(actors, a, actor_cls)
                    # Hand units to workers, oldest image first.
                    for a in sorted(set(range(len(actors))) - self.retired, key=lambda i: load[i]):
                        while load[a] < IN_FLIGHT:
                            unit = self._next_unit(active, actors[a], a)
                            if unit is None:
                                break
                            ref, entry = unit
                            in_flight[ref] = entry
                            load[a] += 1
                    # Images with nothing left to run go to the finisher, failed ones are abandoned.
                    for image in [i for i in active if i.finished]:
                        active.remove(image)
                        if image.error is not None and not image.lost_worker:
                            self._abandon(image)
                            self._record(image.key)
                        else:
                            flushed = [(w, w.flush.remote()) for w in actors] if self.layout.writes_behind else []
                            finishing[finisher.submit(self._finish, image, flushed, peak)] = image.key
                            self._finishing[image.key] = image
                    if not (in_flight or planning or finishing or ready or active or next_task < len(self.tasks)):
                        break
                    # Wait for a unit, a planned image or a finished one.
                    if in_flight:
                        timeout = 0.05 if (planning or finishing) else None
                        done_refs, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
                        for ref in done_refs:
                            image, kind, key, a, actor = in_flight.pop(ref)
                            load[a] -= 1
                            self._unit_done(image, kind, key, ref, actors, a, actor, actor_cls)
                    elif planning or finishing:
                        wait_futures([*planning, *finishing], timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in [f for f in planning if f.done()]:
                        index = planning.pop(future)
                        outcome = future.result()
                        if isinstance(outcome, _Opened):
                            ready.append(outcome)
                        else:
                            self._record(index)
                    for future in [f for f in finishing if f.done()]:
                        key = finishing.pop(future)
                        self._finishing.pop(key, None)
                        image, lost = future.result()
                        if lost:
                            try:
                                self._requeue(image, lost, active)
                            except Exception as e:  # it cannot go on: it fails, its lock released
                                image.error = e
                                self._abandon(image)
                                self._record(key)
                        else:
                            self._record(key)
                    self._write_manifest()
            ended_normally = True
        except BaseException:
            self.stopping.set()
            self._stop(in_flight, actors, active, ready, planning, finishing, planner, finisher)
            raise
        finally:  # each step on its own: one failing does not skip the others
            if self.bar is not None:
                self.bar.close()
            if ended_normally and shape is not None and actors:
                warm_pool.give(shape, actors)  # for the next job of this process
            else:
                for actor in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
            planner.shutdown(wait=True)
            finisher.shutdown(wait=True)
            with contextlib.suppress(Exception):
                self._write_manifest(force=True)
            background.shutdown(wait=True)  # the collection's run exists, or has failed to start, after this
            with contextlib.suppress(Exception):
                self._end_parent()
            if started_ray:
                with contextlib.suppress(Exception):
                    ray.shutdown()
        return CollectionSummary(
            kind=self.kind.name, root=self.root, images=tuple(self.results), workers=self.workers,
            wall_seconds=time.perf_counter() - start, phases=phases, peak_memory_mib=peak.peak_mib,
            run_id=self.parent.run_id if self.parent else None,
            manifest=self.manifest.path.url if self.manifest else None,
        )

    # -- helpers of the loop ----------------------------------------------------------------------

    def _activate(self, key: int, opened: _Opened, blocks: list[BlockId] | None, attempt: int) -> _Active:
        import ray

        graph = opened.job.graph
        todo = opened.todo if blocks is None else blocks
        todo_set = set(todo)
        feeds = graph.feeds()
        # Seams in the order their first block needs them.
        seam_order = list(dict.fromkeys(k for b in todo for k in feeds.get(b, [])))
        waiting = {b: len(feeds.get(b, [])) for b in todo}
        ready = deque(b for b in todo if waiting[b] == 0)
        # Seams shared by a block done in an earlier run and one still to do are computed again.
        recomputed = tuple(k for k in seam_order if any(b not in todo_set for b in graph.seams[k]))
        image = _Active(
            key=key, opened=opened, spec=[ray.put(opened.job.spec)], feeds=feeds, seams_todo=deque(seam_order),
            waiting=waiting, consumers={k: sum(b in todo_set for b in graph.seams[k]) for k in seam_order},
            blocks_ready=ready, blocks_left=todo_set - set(ready), attempt=attempt, recomputed=recomputed,
        )
        self.blocks_total += len(todo)
        if self.bar is not None and len(self.tasks) == 1:
            self.bar.total = self.blocks_total
            self.bar.refresh()
        return image

    def _next_unit(self, active: list[_Active], actor: Any, a: int) -> tuple[Any, _Unit] | None:
        for image in active:
            if image.error is not None:
                continue
            if image.blocks_ready:
                b = image.blocks_ready.popleft()
                parts = [image.seam_parts[k][b] for k in image.feeds.get(b, [])]
                ref = actor.block.remote(self.setup, image.key, image.spec, b, *parts)
                image.in_flight += 1
                return ref, (image, "block", b, a, actor)
            if image.seams_todo:
                k = image.seams_todo.popleft()
                blocks = image.opened.job.graph.seams[k]
                *parts, report = actor.seam.options(num_returns=len(blocks) + 1).remote(self.setup, image.key,
                                                                                        image.spec, k)
                image.seam_parts[k] = dict(zip(blocks, parts, strict=True))
                image.in_flight += 1
                return report, (image, "seam", k, a, actor)
        return None

    def _unit_done(self, image: _Active, kind: str, key: Any, ref: Any, actors: list[Any], a: int, actor: Any,
                   actor_cls: Any) -> None:
        import ray

        image.in_flight -= 1
        try:
            report: UnitReport = ray.get(ref)
        except ray.exceptions.TaskCancelledError as e:
            image.error = image.error or e
            return
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            if image.error is None:
                image.error = cause
            return
        except ray.exceptions.OutOfMemoryError as e:  # the same unit would kill its next worker too: not retried
            if image.error is None:
                image.error = TesseraError(f"a worker died {WORKER_RESTARTS + 1} times ({type(e).__name__}): "
                                           f"{self.layout.hint}; rerunning the job resumes it")
            if actors[a] is actor:
                self._replace(actors, a, actor_cls)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.LocalRayletDiedError, ray.exceptions.ObjectLostError) as e:
            # The unit's worker was lost: its process died, or its node (the worker unavailable or dead, the
            # objects it made gone with it). Its image goes on from its markers in this job (`_requeue`): the
            # blocks not stored are computed again, with the seams that feed them. The worker is replaced.
            image.lost_worker = True
            if image.error is None:
                image.error = TesseraError(f"a worker or its node was lost ({type(e).__name__}: {one_line(e)}) "
                                           f"{WORKER_RESTARTS} times; rerunning the job resumes it")
            if actors[a] is actor and isinstance(e, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError):
                self._replace(actors, a, actor_cls)
            return
        except ray.exceptions.RayError as e:  # the object store full, a disk full, nowhere to run...: this image
            image.error = image.error or TesseraError(f"{one_line(e)}: rerun the job to resume this image")
            return
        if image.error is not None and not image.lost_worker:  # (after a lost worker, what is stored counts)
            return
        image.reports.append(report)
        image.work += report.work
        if kind == "seam":
            for b in image.opened.job.graph.seams[key]:
                if b in image.waiting:
                    image.waiting[b] -= 1
                    if image.waiting[b] == 0 and b in image.blocks_left:
                        image.blocks_left.discard(b)
                        image.blocks_ready.append(b)
        else:
            for k in image.feeds.get(key, []):
                if k in image.consumers:
                    image.consumers[k] -= 1
                    image.seam_parts[k].pop(key, None)  # drop our reference so the object store frees it
                    if image.consumers[k] == 0:
                        del image.seam_parts[k]
            image.blocks_done += 1
            self.blocks_done += 1
            if self.bar is not None and len(self.tasks) == 1:
                self.bar.update(1)
            if self.on_progress is not None:
                self.on_progress(self.blocks_done, self.blocks_total)

    def _replace(self, actors: list[Any], a: int, actor_cls: Any) -> None:
        """A new worker in slot `a` for one that was lost, used once it has started. One that cannot start
        within STARTUP_TIMEOUT (the cluster has no room for it) retires the slot: the job goes on with the
        others, and fails, naming the cause, when none is left."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(actors[a], no_restart=True)
        new = actor_cls.remote(self.setup)
        try:
            ray.get(new.ready.remote(self.setup), timeout=STARTUP_TIMEOUT)
            actors[a] = new
            return
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            with contextlib.suppress(Exception):
                ray.kill(new, no_restart=True)
        self.retired.add(a)
        if len(self.retired) == len(actors):
            raise TesseraError(f"every worker was lost and none could be started again within {STARTUP_TIMEOUT:.0f} s "
                               "(the cluster lacks the resources): rerunning the job resumes it")
        log.warning("a lost worker could not be replaced within %.0f s (the cluster lacks the resources): the job "
                    "goes on with %d worker(s)", STARTUP_TIMEOUT, len(actors) - len(self.retired))

    def _requeue(self, image: _Active, lost: list[BlockId], active: list[_Active]) -> None:
        """Blocks not stored because a worker (or its node) was lost, or reported but never stored (written
        behind by a worker that died): computed again, with the seams that feed them."""
        if image.attempt >= WORKER_RESTARTS:
            image.error = image.error or TesseraError(
                f"{len(lost)} block(s) were still lost with their worker processes after {WORKER_RESTARTS} "
                "reruns: check the workers' logs; rerunning the job resumes it")
            self._abandon(image)
            self._record(image.key)
            return
        log.warning("%d block(s) lost with a worker process are computed again", len(lost))
        if image.lost_worker:  # never counted as done: they stay in the total once
            self.blocks_total -= len(lost)
        # An attempt that stored blocks does not count against the budget (a long image on spot nodes).
        progress = image.lost_before is None or len(lost) < image.lost_before
        again = self._activate(image.key, image.opened, lost, image.attempt if progress else image.attempt + 1)
        again.lost_before = len(lost)
        again.work, again.reports, again.started = image.work, image.reports, image.started
        again.recomputed = image.recomputed + again.recomputed
        active.insert(0, again)

    def _record(self, key: int) -> None:
        """An image has ended (done, failed or skipped)."""
        if self.bar is not None and len(self.tasks) > 1:
            self.bar.update(1)
        if self.manifest is not None:
            self.manifest.update(self.results[key].row())

    def _write_manifest(self, force: bool = False) -> None:
        if self.manifest is None:
            return
        now = time.monotonic()
        if force or now - self._manifest_written >= MANIFEST_EVERY:
            self.manifest.write()
            self._manifest_written = now

    def _alive(self, warm: list[Any]) -> list[Any]:
        """The idle workers of an earlier job that take this job's setup; one that has died since is dropped."""
        import ray

        loading = {actor.ready.remote(self.setup): actor for actor in warm}  # all at once
        if loading:
            ray.wait(list(loading), num_returns=len(loading), timeout=STARTUP_TIMEOUT)
        alive = []
        for ref, actor in loading.items():
            try:
                ray.get(ref, timeout=0)
                alive.append(actor)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
        return alive

    def _await_workers(self, actors: list[Any], layout: WorkerLayout) -> None:
        import ray

        try:
            ray.get([a.ready.remote(self.setup) for a in actors], timeout=STARTUP_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise TesseraError(
                f"{layout.workers} worker(s) needing {'a GPU' if layout.num_gpus else 'a CPU'} each could not start "
                f"within {STARTUP_TIMEOUT:.0f} s: the cluster lacks the resources; use fewer --workers"
            ) from None
        except ray.exceptions.RayActorError as e:
            raise TesseraError(f"a worker failed to start: {one_line(e)}") from None

    def _stop(self, in_flight: dict[Any, Any], actors: list[Any], active: list[_Active], ready: deque[_Opened],
              planning: dict[Future[Any], int], finishing: dict[Future[Any], int], planner: ThreadPoolExecutor,
              finisher: ThreadPoolExecutor) -> None:
        """Stopped or failed: keep the blocks already computed (their writes finish), drop the rest, and let
        no worker write after the locks are released."""
        import ray

        for ref in in_flight:
            with contextlib.suppress(Exception):  # already finished, or its worker gone
                ray.cancel(ref)
        if actors:
            with contextlib.suppress(Exception):
                ray.wait([a.flush.remote() for a in actors], num_returns=len(actors), timeout=FLUSH_TIMEOUT)
            for actor in actors:  # before any lock goes: a block stopped mid-write has no marker, and is redone
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            with contextlib.suppress(Exception):  # and gone, not only told to go, before the locks are released
                ray.wait([a.alive.remote() for a in actors], num_returns=len(actors), timeout=FLUSH_TIMEOUT)
        for future in [*planning, *finishing]:
            future.cancel()
        planner.shutdown(wait=True)
        finisher.shutdown(wait=True)
        for future, index in planning.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                opened = future.result()
                if isinstance(opened, _Opened):
                    ready.append(opened)
                else:
                    self._record(index)
        for future, index in finishing.items():
            if future.cancelled():
                self._abandon(self._finishing[index])
            elif future.exception() is None:
                image, lost = future.result()
                if lost:
                    self._abandon(image)
                self._record(index)
        for image in active:
            self._abandon(image)
        for opened in ready:
            opened.lock.release()
            with contextlib.suppress(Exception):
                opened.run.end("FAILED")

    def _start_parent(self) -> None:
        try:
            tracking = self.kind.tracking
            params = {**self.kind.params, "collection.root": self.root, "collection.images": len(self.tasks)}
            self.parent = start_run(tracking, params, self.root or "", name=f"collection {self.root}")
        finally:
            self.parent_ready.set()

    def _end_parent(self) -> None:
        if self.parent is None or self.parent.run_id is None:
            return
        counts: dict[str, int] = defaultdict(int)
        for r in self.results:
            counts[r.status] += 1
        with contextlib.suppress(Exception):
            from pipeline.tracking import RunLogger

            assert self.parent.tracking_uri is not None
            logger = RunLogger(self.parent.run_id, self.parent.tracking_uri)
            done = [r for r in self.results if r.status == "done"]
            logger.log_metrics({**{f"images_{k}": float(v) for k, v in counts.items()},
                                "tiles_computed": float(sum(r.work for r in done)),
                                "image_seconds": float(sum(r.seconds for r in done))})
            if self.manifest is not None:
                self.manifest.write()
                csv_file = self.manifest.path
                logger.log_files({"manifest.csv": storage_for(csv_file).read_bytes(csv_file)})
        self.parent.end("FINISHED" if not counts.get("failed") and not counts.get("pending") else "FAILED")


def stop_writers(flushed: list[tuple[Any, Any]], killed: list[Any]) -> None:
    """Wait for the workers' writes behind (`flushed`: each worker and its `flush` call). A worker still
    writing after FLUSH_TIMEOUT is stopped, and its end awaited, before its blocks can be found missing
    and given to another: one writer per block. The stopped workers are added to `killed`."""
    import ray

    refs = [ref for _, ref in flushed]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=FLUSH_TIMEOUT)
    if not pending:
        return
    stuck = [actor for actor, ref in flushed if ref in pending]
    log.warning("%d worker(s) still writing after %.0f s are stopped; their blocks are computed again",
                len(stuck), FLUSH_TIMEOUT)
    for actor in stuck:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        killed.append(actor)  # for the loop, to give its slot a new worker
    _, pending = ray.wait(pending, num_returns=len(pending), timeout=FLUSH_TIMEOUT)  # answered once gone
    if pending:  # its lock is left to go stale: no other job writes beside a worker that may still run
        raise _StillWriting(f"{len(pending)} worker(s) still writing could not be stopped; rerun the job once "
                            "the cluster's workers have ended to resume it")


def one_line(error: BaseException) -> str:
    """An error's message on one line; for Ray's errors, the innermost cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not isinstance(error, TesseraError):
        causes = [line for line in lines if "Error:" in line and not line.startswith(("File", "ray."))]
        if causes:
            return causes[-1][:500]
        if not lines:
            return type(error).__name__
        return f"{type(error).__name__}: {' '.join(lines)}"[:500]
    return " ".join(lines)[:1000]


def run_image(kind: JobKind, item: CollectionItem, output: str,
              on_progress: Callable[[int, int], None] | None = None) -> Any:
    """One image, as a collection of one: its summary (`kind.summary_type`), or, for a mosaic finished
    before by the same job, the summary recorded in it (`kept`). Raises the error that stopped it."""
    result = run_collection(kind, [(item, output)], on_progress=on_progress).images[0]
    if result.exception is not None:
        raise result.exception
    if result.status == "skipped":
        recorded = Mosaic.open(output).lineage["summary"]
        fields = {f.name for f in dataclasses.fields(kind.summary_type)} - {"kept"}
        return kind.summary_type(**{k: v for k, v in recorded.items() if k in fields}, kept=True)
    return result.summary


def run_collection(kind: JobKind, tasks: Sequence[tuple[CollectionItem, str]], root: str | None = None,
                   max_images: int | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> CollectionSummary:
    """Run `kind` over `tasks` (image, output mosaic) on one warm pool; failures stay per image.

    Args:
        kind: the job description (segment, refine).
        tasks: each image with the mosaic it writes.
        root: the collection's folder, where the manifest is written; None for a single image.
        max_images: images in flight at once (default: twice the workers, at least 2).
        on_progress: called with (blocks done, blocks known so far) after each block.

    Returns:
        The collection's summary: one result per image, in the order given.

    Raises:
        ConfigError: the cluster or the tracking server cannot be reached (before anything is written).
    """
    return Engine(kind, tasks, root, max_images, on_progress).run()
