"""Distributed training with Ray Train: the loop of `pipeline.training.loop` on N workers.

`fit` starts a `TorchTrainer` (DDP: gloo on CPU, nccl on GPU, bf16 autocast on GPU). Each worker
reads the labelled raster, takes ``batch_size / workers`` windows per step (so the global batch,
and with it the budget, does not depend on the number of workers) and draws them from its own
(seed, rank, epoch) stream. Rank 0 scores the validation band after each epoch and reports a
checkpoint: the training state and the best bundle so far.

Checkpoints live in ``storage/name``. A run started again with the same name and storage (the
default name is derived from the output and the settings) continues from its last checkpoint:
after a crash, a kill, or a lost node. Inside one run, Ray Train also restarts failed workers
from the last checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError, TesseraError
from pipeline.storage import Location, stamp, storage_for
from pipeline.training.loop import EpochLogger, TrainConfig, TrainResult, open_data, result_from_metrics, run_loop

__all__ = ["Distributed", "fit", "run_name"]

# Ray Train's own machinery, trimmed for an embedded Ray (set unless the user set them): no preemption
# watcher (an actor process of its own, polling for spot-instance notices a laptop never gets), no
# metrics callbacks, and the controller looks at its workers every 0.5 s rather than every 2 s, so a
# finished run returns sooner. Together about 5 s less per run on 2 cores (a 2-worker, 60-step run: 45 to
# 52 s with Ray's defaults, 39 to 45 s without). Set for the run only; on a cluster (an address or
# RAY_ADDRESS) Ray's defaults stay.
EMBEDDED_RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Distributed:
    """How a training run is spread over Ray Train workers and where its checkpoints go.

    Attributes:
        workers: Training processes (DDP ranks); each takes ``batch_size / workers`` windows a step.
        device: cuda: one GPU per worker (nccl, bf16 autocast); cpu: gloo on CPUs; auto: GPUs when the
            machine (embedded Ray) or the cluster has them, else CPUs.
        threads: torch threads (and reserved CPUs) per worker; None: on an embedded Ray, this machine's CPUs
            shared among the workers (2 workers on 8 CPUs: 4 each), on a cluster 1.
        storage: Folder (or URI Ray Train accepts, e.g. s3://...) for the run's checkpoints; on a
            cluster, one every node can reach.
        name: The run's name under ``storage``; None derives it from the output and the settings,
            so running the same command again resumes.
        max_failures: Restarts from the last checkpoint after a worker fails, within one run.
        keep: Checkpoints kept (the newest).
        address: the Ray cluster to join; None starts an embedded Ray (or joins the job's cluster).
    """

    workers: int = 1
    device: str = "auto"
    threads: int | None = None
    storage: str = "checkpoints"
    name: str | None = None
    max_failures: int = 0
    keep: int = 2
    address: str | None = None

    @property
    def use_gpu(self) -> bool:
        """One GPU per worker (after `fit` resolved auto)."""
        return self.device == "cuda"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: use one of {', '.join(DEVICES)}")
        for key in ("workers", "threads", "keep"):
            value = getattr(self, key)
            if key == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} is invalid; expected an integer >= 1.")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures!r} is invalid; expected an integer >= 0.")


def _absolute_inputs(config: TrainConfig) -> TrainConfig:
    """The config with its local input files as absolute paths (a catalog name is left as it is)."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Location.parse(path).is_local and Path(path).exists() else path

    return dataclasses.replace(config, image=absolute(config.image), labels=absolute(config.labels),
                               polygons=absolute(config.polygons), catalog=absolute(config.catalog))


def run_name(config: TrainConfig, settings: Distributed) -> str:
    """The default run name: the output's stem and a digest of everything that shapes the run.

    The same command resumes the same run; changing a setting (or the number of workers), or the
    data (a file's size or modification time, a pair added to the catalog), starts a new one
    instead of resuming a run that trained on something else.
    """
    if settings.name:
        return settings.name
    shape = {**dataclasses.asdict(config), "workers": settings.workers, "use_gpu": settings.device == "cuda",
             "inputs": _input_stamps(config)}
    shape.pop("threads")
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{Path(config.output).stem}-{digest}"


def fit(
    config: TrainConfig, settings: Distributed = Distributed(), logger: EpochLogger | None = None
) -> TrainResult:
    """Train with Ray Train on ``settings.workers`` workers, resuming the run if it exists.

    Args:
        config: What to train on, which model and how long (``threads`` is taken from ``settings``).
        settings: Workers, devices and where checkpoints go.
        logger: Receives rank 0's figures (it is pickled to the worker, e.g. an MLflow run logger).

    Returns:
        The result; the best bundle is copied to ``config.output``.

    Raises:
        ConfigError, SourceNotFoundError, SourceReadError: As `train` does, raised on a worker and
            re-raised here.
        RuntimeError: When training fails for another reason (the worker's error is chained).
    """
    from pipeline.training.pretrained import check_encoder_weights

    start = time.perf_counter()
    embedded = settings.address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        _check_inputs(config)  # on this machine, a missing file fails now rather than in a worker
        check_encoder_weights(config.architecture, config.arch_args or {})  # and weights it cannot get
        config = _absolute_inputs(config)  # workers run in folders of their own
        settings = dataclasses.replace(settings, device=_local_device(settings.device))
    output = Location.parse(config.output)
    storage_for(output).check(output)  # a missing bucket or no credentials: now, not after the training
    if settings.threads is None:  # a laptop's cores all go to training; a cluster's node size is not known here
        shared = max(1, (os.cpu_count() or 1) // settings.workers) if embedded else 1
        settings = dataclasses.replace(settings, threads=shared)
    config = dataclasses.replace(config, threads=settings.threads)
    name = run_name(config, settings)
    with _environment(EMBEDDED_RAY_TRAIN_ENV if embedded else {}):  # read by Ray Train, passed to its controller
        return _fit(config, settings, logger, output, name, start)


def _fit(config: TrainConfig, settings: Distributed, logger: EpochLogger | None, output: Location, name: str,
         start: float) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline import warm_pool
    from pipeline.cluster import connect_ray

    threads = settings.threads or 1  # resolved by fit
    storage = Location.parse(settings.storage).url  # Ray Train takes a local path or a URL
    started = connect_ray(settings.address, settings.workers * threads)
    if settings.device == "auto":  # a cluster: its GPUs, if it has any
        gpus = ray.cluster_resources().get("GPU", 0)
        settings = dataclasses.replace(settings, device="cuda" if gpus >= 1 else "cpu")
    trainer = TorchTrainer(
        _worker,  # type: ignore[arg-type]  # Ray Train v2 (the default) returns its value; the stubs are v1's
        train_loop_config={"config": config, "use_gpu": settings.use_gpu, "logger": logger},
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.use_gpu, resources_per_worker={"CPU": threads}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=settings.keep),
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )
    warm_pool.release()  # idle block workers of this process's earlier jobs give their CPUs back
    try:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            if Location.parse(storage).is_local:
                _remove_if_no_checkpoint(Path(storage), name)
            raise _user_error(exc) or RuntimeError(f"Training failed: {exc}") from exc
        assert result.checkpoint is not None, "a finished run reports a checkpoint every epoch"
        with result.checkpoint.as_directory() as folder:
            storage_for(output).write_bytes(output, (Path(folder) / "best.bundle").read_bytes())  # whole, at once
    finally:
        if started:
            ray.shutdown()
    return result_from_metrics(config.output, result.return_value, time.perf_counter() - start)  # type: ignore[attr-defined]


def _local_device(device: str) -> str:
    """auto as this machine has it; cuda asked for where there is none fails now, in one line."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cluster.device=cuda but this machine has no CUDA GPU: use cluster.device=cpu (or auto), "
                          "or join a cluster with GPUs (cluster.address=...)")
    return device


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (those the user set are kept), as they were after it."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _RayTrainSession:
    """The `Session` of one Ray Train worker."""

    def __init__(self, use_gpu: bool) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP when there are several workers

    keeps_checkpoints = True

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:  # a local copy only if it lives elsewhere, removed after
            yield Path(folder)

    def share(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        ray.train.report(
            {k: v for k, v in metrics.items() if k != "history"},
            checkpoint=None if checkpoint is None else ray.train.Checkpoint.from_directory(checkpoint),
        )


def _worker(settings: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: run the loop; rank 0's metrics come back as the return value."""
    session = _RayTrainSession(settings["use_gpu"])
    scratch = Path(tempfile.mkdtemp(prefix="tessera-train-"))
    try:
        return run_loop(settings["config"], session, scratch / "best.bundle", logger=settings["logger"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _input_stamps(config: TrainConfig) -> list[tuple[str, str]]:
    """(place, version) of every input file: the image, its truth, or a catalog and its pairs. A local file's
    version is its size and modification time, an object's its ETag (or what its store has instead)."""
    from pipeline.training.catalog import catalog_path, load_catalog

    paths = [config.image, config.labels, config.polygons]
    if config.catalog is not None:
        remote = not Location.parse(config.catalog).is_local
        paths.append(config.catalog if remote else str(catalog_path(config.catalog)))
        if remote or catalog_path(config.catalog).is_file():
            paths += [f for p in load_catalog(config.catalog).pairs for f in (p.image, p.truth)]
    places = [Location.parse(p) for p in paths if p is not None]
    return [(place.path if place.is_local else place.url, version) for place in places
            if (version := stamp(place)) is not None]


def check_paths(config: TrainConfig) -> None:
    """The error a worker would raise for a missing image, truth, catalog or init bundle, raised at once
    (before a tracking run or Ray starts, so that nothing is left behind)."""
    from pipeline.errors import SourceNotFoundError
    from pipeline.training.catalog import load_catalog

    paths = [("image", config.image), ("labels", config.labels), ("polygons", config.polygons),
             ("init bundle", config.init)]
    if config.catalog is not None:
        pairs = load_catalog(config.catalog).pairs
        paths += [(f"catalog's {role}", path) for p in pairs for role, path in (("image", p.image), ("truth", p.truth))]
    for role, path in paths:
        location = None if path is None else Location.parse(path)
        if location is not None and not storage_for(location).exists(location):
            raise SourceNotFoundError(f"The {role} {path!r} does not exist; check the path (relative paths are "
                                      f"relative to {os.getcwd()!r}).")


def _check_inputs(config: TrainConfig) -> None:
    """The error a worker would raise for a missing image, truth or catalog, or for labels that do not fit the
    classes, raised here at once."""
    check_paths(config)
    # The label checks (a 0/255 mask, values beyond the classes, an area with no labelled pixel) now, not
    # after the workers start; the class indexes built for them are cached for the workers on this machine.
    open_data(config)


def _user_error(exc: BaseException) -> TesseraError | None:
    """The tessera error a worker raised (bad data or settings), found in Ray Train's failure."""
    failures = getattr(exc, "worker_failures", None) or {}
    seen: list[BaseException] = [*failures.values(), exc]
    while seen:
        error = seen.pop()
        if isinstance(error, TesseraError):
            return error
        for inner in (getattr(error, "cause", None), error.__cause__, error.__context__):
            if isinstance(inner, BaseException):
                seen.append(inner)
    return None


def _remove_if_no_checkpoint(storage: Path, name: str) -> None:
    """A run that failed before its first checkpoint leaves nothing to resume: remove its folder (and
    the storage folder, if that leaves it empty), so a failed start does not look like a run."""
    folder = storage / name
    if folder.is_dir() and not any(folder.glob("checkpoint_*")):
        shutil.rmtree(folder, ignore_errors=True)
    if storage.is_dir() and not any(storage.iterdir()):
        storage.rmdir()
