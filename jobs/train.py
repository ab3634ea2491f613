"""Train job: `python -m jobs.train image=... labels=...|polygons=... output=...` (Hydra, pipeline/conf/train.yaml).

Trains on Ray Train (``cluster.workers``, 0 for this process alone), tracked in MLflow, and registers
the best bundle when ``tracking.register`` names a model. Running the same command again resumes.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.config import CLUSTER_KEYS, CONF, Extra, Layout, Part, check_moved, register
from pipeline.errors import ConfigError, user_errors
from pipeline.lifecycle import Trained, train_tracked
from pipeline.models import ClassInfo
from pipeline.tracking import Tracking
from pipeline.training import TrainConfig
from pipeline.training.distributed import Distributed

# Where each setting sits in pipeline/conf/train.yaml: TrainConfig's fields at the top level, the cluster
# (as for every job) and the checkpoints of Ray Train in sections.
TRAIN = Layout(
    name="train",
    parts=(
        Part(TrainConfig, None, None),
        Part(TrainConfig, "cluster", ("threads",)),
        Part(Distributed, "cluster", CLUSTER_KEYS),
        Part(Distributed, "distributed", ("storage", "name", "max_failures", "keep")),
        Part(Tracking, "tracking", None),
    ),
    extras=(Extra("progress", bool, True), Extra("register", str | None, None, section="tracking")),
    given={"image": None, "labels": None},
)
register([TRAIN])


def to_config(cfg: DictConfig, layout: Layout = TRAIN) -> TrainConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read).

    Raises:
        ConfigError: If a required value is missing or a value has the wrong shape.
    """
    return train_config(layout.values(cfg, TrainConfig))


def train_config(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from plain values (lists for tuples, mappings for classes), as YAML gives them."""
    values = dict(values)
    if values.get("classes") is not None:
        try:
            values["classes"] = tuple(ClassInfo(name=c["name"], color=c["color"]) for c in values["classes"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"classes={values['classes']!r} is malformed; expected a list of "
                "{name: ..., color: [r, g, b]}."
            ) from exc
    for key in ("image", "labels", "polygons", "catalog", "output"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    if isinstance(values.get("bands"), list):
        values["bands"] = tuple(values["bands"])
    if isinstance(values.get("class_weights"), list):
        try:
            values["class_weights"] = tuple(float(w) for w in values["class_weights"])
        except (TypeError, ValueError):
            raise ConfigError(f"class_weights={values['class_weights']!r} must be numbers, one per class, "
                              "or 'balanced'.") from None
    return TrainConfig(**values)


def to_distributed(cfg: DictConfig, layout: Layout = TRAIN) -> Distributed | None:
    """The `cluster` and `distributed` sections; None (train in this process) for 0 workers."""
    values = layout.values(cfg, Distributed)
    return None if values["workers"] == 0 else Distributed(**values)


def to_tracking(cfg: DictConfig) -> tuple[Tracking, str | None]:
    """The `tracking` section, and the name to register the best bundle under."""
    return Tracking(**TRAIN.values(cfg, Tracking)), cfg.tracking.register


def describe(trained: Trained) -> str:
    """What the job prints: the bundle, its scores, the run and the registered version."""
    result = trained.result
    ious = ", ".join(f"{v:.3f}" for v in result.val_iou)
    lines = [f"wrote {result.bundle_path} (sha256 {result.sha256[:12]}): validation mIoU {result.val_miou:.3f} "
             f"(per class {ious}) after {result.epochs} epoch{'s' * (result.epochs != 1)} in {result.seconds:.0f} s"
             + (" (stopped early)" if result.stopped_early else "")
             + (f", resumed from epoch {result.resumed_from}" if result.resumed_from is not None else "")]
    if result.holdout is not None:
        held = ", ".join(f"{v:.3f}" for v in result.holdout["iou"])
        lines.append(f"holdout mIoU {result.holdout['miou']:.3f} (per class {held}), scored once with the best model")
    if trained.run_id is not None:
        lines.append(f"mlflow run {trained.run_id}")
    if trained.model is not None:
        lines.append(f"registered {trained.model.uri}")
    return "\n".join(lines)


@hydra.main(config_path=str(CONF), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        tracking, register = to_tracking(cfg)
        trained = train_tracked(to_config(cfg), tracking, register, to_distributed(cfg), progress=bool(cfg.progress))
        print(describe(trained))


if __name__ == "__main__":
    with user_errors():
        check_moved(sys.argv[1:])
    main()
