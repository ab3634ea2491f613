"""The model lifecycle in MLflow: tracked training runs, registered versions, and the nightly promotion.

`train_tracked` runs one training (in this process or on Ray Train) inside an MLflow run: its
settings, per-epoch figures, resolved config, confusion matrix, validation predictions and holdout
scores, then registers the best bundle as a new version of the model.

`nightly` is the job a scheduler starts each night. For its date it

1. does nothing if a nightly run of that date already finished (unless forced);
2. finds the catalog's pairs that arrived since the last finished nightly run; with none new and a
   champion in place, it records "no new data" and stops;
3. trains a challenger on the whole catalog, registers it and sets the `challenger` alias;
4. scores the champion and the challenger on the same holdout bands;
5. moves `champion` to the challenger only when it beats the champion by ``margin`` (the first
   run, with no champion, promotes its model), and records both scores and the decision.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.tracking import RunLogger, Tracking, check_reachable, mlflow_client, open_run
from pipeline.training.catalog import load_catalog
from pipeline.training.distributed import Distributed, check_paths, fit
from pipeline.training.loop import TrainConfig, TrainResult, score_holdout, train

__all__ = ["NightlyConfig", "NightlyOutcome", "Trained", "nightly", "train_tracked"]

NIGHTLY_TAG = "tessera.nightly.date"
DECISION_TAG = "tessera.nightly.decision"


@dataclass(frozen=True)
class Trained:
    """A tracked training run: its result, its MLflow run, and the registered version (if any)."""

    result: TrainResult
    run_id: str | None = None
    model: Any = None  # registry.ModelRef


def train_tracked(
    config: TrainConfig,
    tracking: Tracking,
    register: str | None = None,
    distributed: Distributed | None = None,
    progress: bool = False,
) -> Trained:
    """Train (on Ray Train when `distributed` is given), tracked in MLflow; register the best bundle.

    Args:
        config: What to train.
        tracking: Where to track; disabled trains without a run (and registers nothing).
        register: Registered model name for the best bundle; None registers nothing.
        distributed: Ray Train settings; None trains in this process.
        progress: Show a progress bar (in-process training only).

    Raises:
        ConfigError: Bad settings or data, or an unreachable tracking server (before training).
    """
    if not tracking.enabled:
        return Trained(_train(config, distributed, None, progress))
    check_paths(config)  # a missing input fails before the run is opened: no store is created for it
    name = Path(config.output).stem
    with open_run(tracking, name, _params(config, distributed)) as (run_id, uri, _):
        logger = RunLogger(run_id, uri)
        result = _train_in_run(config, distributed, logger, progress)
        model = _register(result, register, logger)
    return Trained(result, run_id, model)


@dataclass(frozen=True)
class NightlyConfig:
    """One night's training and promotion.

    Attributes:
        train: The training settings; ``catalog`` names the data and ``holdout_fraction`` (> 0)
            the fixed holdout; ``output`` is a folder: each night's bundle is ``<task>-<date>.bundle``.
        model: Registered model name; None takes the catalog's task.
        margin: The challenger is promoted when its holdout score exceeds the champion's by more
            than this (0.01: one point of IoU).
        metric: Holdout score compared: ``miou``, or ``iou:<class name>`` for one class.
        date: The night (YYYY-MM-DD); None is today (UTC).
        force: Run even if this date already has a finished nightly run, or no new data.
        tracking: Where the runs and the registry are (its experiment is not used).
        experiment: The MLflow experiment of the nightly runs; None takes the catalog's task.
        distributed: Ray Train settings; None trains in the nightly process.
    """

    train: TrainConfig
    model: str | None = None
    margin: float = 0.01
    metric: str = "miou"
    date: str | None = None
    force: bool = False
    tracking: Tracking = field(default_factory=Tracking)
    experiment: str | None = None
    distributed: Distributed | None = None

    def __post_init__(self) -> None:
        if self.train.catalog is None:
            raise ConfigError("The nightly job trains on a catalog: set train.catalog (a conf/data name or YAML file).")
        if not self.train.holdout_fraction:
            raise ConfigError("The nightly job compares models on a holdout: set train.holdout_fraction, e.g. 0.2.")
        if not (isinstance(self.margin, int | float) and math.isfinite(self.margin)):
            raise ConfigError(f"margin={self.margin!r} is invalid; expected a number, e.g. 0.01.")
        if self.metric != "miou" and not self.metric.startswith("iou:"):
            raise ConfigError(f"metric={self.metric!r} is invalid; use miou or iou:<class name>.")
        if self.date is not None:
            try:
                dt.date.fromisoformat(self.date)
            except ValueError:
                raise ConfigError(f"date={self.date!r} is not a date; use YYYY-MM-DD.") from None


@dataclass(frozen=True)
class NightlyOutcome:
    """What a night did.

    Attributes:
        date: The night.
        decision: ``promoted``, ``kept``, ``no-new-data`` or ``already-done``.
        run_id: The nightly MLflow run (for ``already-done``: the earlier one).
        new_pairs: Pairs that arrived since the last finished nightly run.
        champion: The champion's version and holdout score before the decision, if there was one.
        challenger: The challenger's version and holdout score, if one was trained.
    """

    date: str
    decision: str
    run_id: str
    new_pairs: int = 0
    champion: dict[str, Any] | None = None
    challenger: dict[str, Any] | None = None

    def describe(self) -> str:
        def side(v: dict[str, Any] | None) -> str:
            if v is None:
                return "none"
            return f"v{v['version']}" + ("" if v["score"] is None else f" {v['score']:.4f}")

        return (f"nightly {self.date}: {self.decision} (new pairs {self.new_pairs}; champion {side(self.champion)}; "
                f"challenger {side(self.challenger)}; run {self.run_id})")


def nightly(config: NightlyConfig, progress: bool = False) -> NightlyOutcome:
    """Run one night: train a challenger on new data, compare with the champion, promote or keep.

    Raises:
        ConfigError: Bad settings or catalog, or an unreachable tracking server.
    """

    from pipeline import registry

    catalog = load_catalog(str(config.train.catalog))
    tracking = dataclasses.replace(config.tracking, experiment=config.experiment or catalog.task)
    name = config.model or catalog.task
    _metric({"miou": 0.0, "iou": [0.0] * len(catalog.classes)}, config.metric, catalog.classes)  # a typo fails now
    date = config.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    uri = tracking.resolved_uri()
    check_reachable(uri)
    client = mlflow_client(uri)
    finished = _finished_nightlies(client, tracking.experiment)
    earlier = [r for r in finished if r.data.tags.get(NIGHTLY_TAG) == date]
    if earlier and not config.force:
        return NightlyOutcome(date, "already-done", earlier[0].info.run_id)
    before = [r for r in finished if r.data.tags[NIGHTLY_TAG] < date]
    new = catalog.since(_data_seen_until(before[0])) if before else catalog.pairs
    champion = registry.alias_version(name, registry.CHAMPION, uri)

    train_config = dataclasses.replace(config.train, output=str(Path(config.train.output) / f"{name}-{date}.bundle"))
    params = {**_params(train_config, config.distributed), "nightly.margin": config.margin,
              "nightly.metric": config.metric, "nightly.model": name}
    with open_run(tracking, f"nightly-{date}", params, {NIGHTLY_TAG: date}) as (run_id, _, _):
        logger = RunLogger(run_id, uri)
        logger.log_metrics({"new_pairs": len(new)})
        if not new and champion is not None and not config.force:
            logger.set_tags({DECISION_TAG: "no-new-data"})
            return NightlyOutcome(date, "no-new-data", run_id, 0, _side(champion, None))
        champion_score = None
        if champion is not None:  # scored first: a champion that no longer fits the data fails before training
            path, _ = registry.resolve_model(f"models:/{name}/{champion.version}", uri)
            champion_score = _metric(score_holdout(path, train_config), config.metric, catalog.classes)
        result = _train_in_run(train_config, config.distributed, logger, progress)
        # The run scored its best model on these same holdout bands already.
        assert result.holdout is not None, "holdout_fraction > 0 is checked in NightlyConfig"
        challenger_score = _metric(result.holdout, config.metric, catalog.classes)
        challenger = registry.set_alias(_register(result, name, logger), registry.CHALLENGER, uri)
        promote = champion_score is None or challenger_score > champion_score + config.margin
        decision = "promoted" if promote else "kept"
        if promote:
            registry.set_alias(challenger, registry.CHAMPION, uri)
        logger.log_metrics({"challenger_score": challenger_score}
                           | ({"champion_score": champion_score} if champion_score is not None else {}))
        outcome = NightlyOutcome(date, decision, run_id, len(new), _side(champion, champion_score),
                                 _side(challenger, challenger_score))
        logger.set_tags({DECISION_TAG: decision, "tessera.nightly.challenger": challenger.version,
                         "tessera.nightly.champion_before": champion.version if champion else "none"})
        logger.log_files({"decision.json": json.dumps(dataclasses.asdict(outcome), indent=2).encode()})
    return outcome


def _train(config: TrainConfig, distributed: Distributed | None, logger: RunLogger | None,
           progress: bool) -> TrainResult:
    if distributed is None:
        return train(config, progress=progress, logger=logger)
    return fit(config, distributed, logger=logger)


def _train_in_run(config: TrainConfig, distributed: Distributed | None, logger: RunLogger,
                  progress: bool) -> TrainResult:
    """Train, logging the resolved config first and the summary figures after."""
    logger.log_files({"config.json": json.dumps(dataclasses.asdict(config), indent=2, default=str).encode()})
    result = _train(config, distributed, logger, progress)
    figures: dict[str, float] = {"best_val_miou": result.val_miou, "epochs_done": result.epochs,
                                 "train_seconds": result.seconds}
    if result.holdout is not None:
        figures["holdout_miou"] = result.holdout["miou"]
        figures.update({f"holdout_iou_{i}": v for i, v in enumerate(result.holdout["iou"])})
    logger.log_metrics(figures)
    logger.set_tags({"tessera.sha256": result.sha256})
    return result


def _register(result: TrainResult, name: str | None, logger: RunLogger) -> Any:
    from pipeline import registry

    if name is None:
        return None
    ref = registry.register_bundle(result.bundle_path, name, logger.run_id, logger.uri)
    logger.set_tags({"tessera.model_version": ref.version, "tessera.model_name": name})
    return ref


def _params(config: TrainConfig, distributed: Distributed | None) -> dict[str, Any]:
    params = {f"train.{k}": v for k, v in dataclasses.asdict(config).items()}
    if distributed is not None:
        params.update({f"distributed.{k}": v for k, v in dataclasses.asdict(distributed).items()})
    return params


def _finished_nightlies(client: Any, experiment: str) -> list[Any]:
    """This experiment's nightly runs that finished with a decision, latest date first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{NIGHTLY_TAG}` != '' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1000,
    )
    done = [r for r in runs if DECISION_TAG in r.data.tags]
    return sorted(done, key=lambda r: (r.data.tags[NIGHTLY_TAG], r.info.start_time), reverse=True)


def _data_seen_until(run: Any) -> dt.datetime:
    """Until when a finished nightly run saw the catalog: its start, or the end of its date when it
    was run for a date already past (a catch-up, or a replay); pairs that arrived later are new."""
    started = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc)
    date = dt.date.fromisoformat(run.data.tags[NIGHTLY_TAG])
    end_of_date = dt.datetime.combine(date + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    return min(started, end_of_date - dt.timedelta(microseconds=1))


def _metric(scores: dict[str, Any], metric: str, classes: Any) -> float:
    if metric == "miou":
        return float(scores["miou"])
    wanted = metric.removeprefix("iou:")
    names = [c.name for c in classes]
    if wanted not in names:
        raise ConfigError(f"metric={metric!r} names no class; the classes are {names}.")
    return float(scores["iou"][names.index(wanted)])


def _side(ref: Any, score: float | None) -> dict[str, Any] | None:
    return None if ref is None else {"version": ref.version, "score": score}
