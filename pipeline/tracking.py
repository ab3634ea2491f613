"""MLflow runs: one per segment job and one per training run.

A segment job's run holds its settings, summary figures, preview and config; its id is written into
the mosaic's lineage and the mosaic's path is a tag of the run, so each can be found from the other.
A training run's holds its settings, per-epoch figures, the resolved config, the best model's
validation confusion matrix and predictions beside the truth, and its holdout scores.

With no tracking URI set (argument or MLFLOW_TRACKING_URI), runs go to the sqlite file MLflow 3 uses
by default, `mlflow.db` in the working directory, with artefacts beside it. A server named by an
http(s) URI is checked first, so an unreachable one fails at once with what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.storage import Location

SQLITE = "sqlite:///"
DEFAULT_URI = f"{SQLITE}mlflow.db"
OUTPUT_TAG = "tessera.output"


@dataclass(frozen=True)
class Tracking:
    """Where jobs that write mosaics are tracked; `enabled=False` tracks nothing."""

    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "tessera-segment"

    def resolved_uri(self) -> str:
        """The store to use; a relative sqlite file (the default, ./mlflow.db) made absolute here, so that
        processes in other folders (Ray Train's workers) write to the same one."""
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        relative = uri.removeprefix(SQLITE)
        if uri.startswith(SQLITE) and not relative.startswith("/") and relative != ":memory:":
            return SQLITE + os.path.abspath(relative)
        return uri


@dataclass
class JobRun:
    """An open MLflow run of a job that writes a mosaic, segment or refine (or a stand-in that records nothing)."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    def lineage(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}

    def end(self, status: str) -> None:
        """End a run from `start_run`: FINISHED or FAILED (a stand-in ignores it)."""
        if self.run_id is None or self.tracking_uri is None:
            return

        mlflow_client(self.tracking_uri).set_terminated(self.run_id, status=status)

    def log_result(self, summary: Mapping[str, Any], config: Mapping[str, Any], preview_png: bytes | None) -> None:
        """Summary figures as metrics; config, lineage summary and preview as artefacts."""
        if self.run_id is None or self.tracking_uri is None:
            return
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics.update({f"seconds_{k}": float(v) for k, v in summary.get("phases", {}).items()})
        files = {"config.json": json.dumps(dict(config), indent=2, default=str).encode(),
                 "summary.json": json.dumps(dict(summary), indent=2, default=str).encode()}
        if preview_png is not None:
            files["preview.png"] = preview_png
        logger = RunLogger(self.run_id, self.tracking_uri)
        logger.log_metrics(metrics)
        logger.log_files(files)


def start_run(tracking: Tracking, params: Mapping[str, Any], output: str, parent: JobRun | None = None,
              name: str | None = None) -> JobRun:
    """Start a run of a job that writes a mosaic (`output`, tagged), nested under `parent` if given; end it
    with `JobRun.end`. Disabled tracking gives a stand-in that records nothing.

    Raises:
        ConfigError: If the tracking server cannot be reached.
    """
    if not tracking.enabled:
        return JobRun()
    import mlflow

    uri = tracking.resolved_uri()
    check_reachable(uri)
    client = mlflow_client(uri)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    tags = {OUTPUT_TAG: _output_tag(output)}
    if parent is not None and parent.run_id is not None:
        tags["mlflow.parentRunId"] = parent.run_id
    run_id = client.create_run(experiment_id, run_name=name or Location.parse(output).name, tags=tags).info.run_id
    try:
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return JobRun(run_id, uri, experiment_id)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if new (by another thread or process at the same moment too)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=_artifact_root(uri)))
    except MlflowException:
        return str(client.get_experiment_by_name(name).experiment_id)


@contextlib.contextmanager
def open_run(
    tracking: Tracking, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> Iterator[tuple[str, str, str]]:
    """Start a run in the tracking's experiment (created if new); it ends FINISHED, or FAILED on an error.

    Yields:
        The run id, the tracking URI and the experiment id.

    Raises:
        ConfigError: If the tracking server cannot be reached.
    """
    import mlflow

    uri = tracking.resolved_uri()
    check_reachable(uri)
    client = mlflow_client(uri)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    run_id = client.create_run(experiment_id, run_name=name, tags=dict(tags or {})).info.run_id
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
        yield run_id, uri, experiment_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


def mlflow_client(uri: str) -> Any:
    """An MLflow client for `uri`, with MLflow's own INFO messages (store creation, migrations) kept out of
    the terminal; MLFLOW_LOGGING_LEVEL or a logger level set by the user wins."""
    import logging

    import mlflow

    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        if "MLFLOW_LOGGING_LEVEL" not in os.environ and logger.level in (logging.NOTSET, logging.INFO):
            logger.setLevel(logging.WARNING)
    return mlflow.MlflowClient(uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """ConfigError naming the fix when the tracking server at an http(s) `uri` does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            if answer.status == 200:
                return
            reason = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise ConfigError(
        f"The MLflow tracking server at {uri} cannot be reached ({reason}). Start it (e.g. `mlflow server "
        f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`), fix the tracking URI, or leave "
        "it unset to track into ./mlflow.db."
    )


@dataclass(frozen=True)
class RunLogger:
    """Logs a training run's figures and pictures from wherever rank 0 runs (it is pickled there)."""

    run_id: str
    uri: str

    def log_epoch(self, epoch: int, figures: Mapping[str, float]) -> None:
        self.log_metrics({k: v for k, v in figures.items() if k != "epoch"}, step=epoch)

    def log_final(self, report: Any) -> None:
        """The best model's validation confusion matrix and predictions (a `FinalReport`)."""
        from pipeline.training.figures import confusion_png, prediction_grid_png

        names = [c.name for c in report.classes]
        self.log_files({
            "validation_confusion.png": confusion_png(report.confusion, names),
            "validation_confusion.json": json.dumps({"classes": names,
                                                     "counts": report.confusion.tolist()}).encode(),
            "validation_predictions.png": prediction_grid_png(report),
        })

    def log_files(self, files: Mapping[str, bytes]) -> None:

        client = mlflow_client(self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
                client.log_artifact(self.run_id, str(Path(tmp) / name))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics at `step`; NaN ones (a class absent from the truth and the prediction) are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]
        mlflow_client(self.uri).log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:

        client = mlflow_client(self.uri)
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)


def find_runs(output: str | Path, tracking: Tracking = Tracking()) -> list[str]:
    """Ids of the runs that wrote the mosaic at `output`, newest first."""

    client = mlflow_client(tracking.resolved_uri())
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{OUTPUT_TAG}` = '{_output_tag(output)}'",
                              order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs]


def flat_params(config: Any, job: Mapping[str, Any]) -> dict[str, Any]:
    """The job's settings and fingerprint as one flat dict of parameters."""
    params = {f"config.{k}": v for k, v in dataclasses.asdict(config).items()}
    params.update({f"job.{k}": v for k, v in job.items()})
    return params


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artefacts go beside the database file; servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlruns").as_uri()
    return None


def _output_tag(output: str | Path) -> str:
    """How a run names its mosaic: an absolute local path (symlinks resolved) or the storage URL."""
    location = Location.parse(output)
    return str(location.local_path().resolve()) if location.is_local else location.url
