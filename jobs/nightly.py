"""Nightly job: `python -m jobs.nightly [date=YYYY-MM-DD] [train.catalog=NAME] ...` (Hydra, pipeline/conf/nightly.yaml).

Trains a challenger on the catalog when labelled data arrived since the last finished night, compares
it with the registry's champion on the fixed holdout, promotes it by the configured margin, and
records the decision in MLflow. A date already done does nothing unless `force=true`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jobs.train import to_distributed, train_config
from pipeline.config import CLUSTER_KEYS, CONF, Extra, Layout, Part, check_moved, register
from pipeline.errors import ConfigError, user_errors
from pipeline.lifecycle import NightlyConfig, nightly
from pipeline.schedule import Schedule
from pipeline.tracking import Tracking
from pipeline.training import TrainConfig
from pipeline.training.distributed import Distributed

# Where each setting sits in pipeline/conf/nightly.yaml: the night's own settings at the top level, the
# training run's under `train` (TrainConfig), the schedule, the cluster (as for every job), Ray Train's
# checkpoints, and the tracking store whose registry holds the champion.
NIGHTLY = Layout(
    name="nightly",
    parts=(
        Part(NightlyConfig, None, ("model", "margin", "metric", "date", "force")),
        Part(NightlyConfig, "tracking", ("experiment",)),
        Part(Tracking, "tracking", ("enabled", "uri")),
        Part(Schedule, "schedule", None),
        Part(Distributed, "cluster", CLUSTER_KEYS),
        Part(Distributed, "distributed", ("storage", "name", "max_failures", "keep")),
    ),
    nested={"train": TrainConfig},
    skip=("train", "tracking", "distributed", "experiment"),
    extras=(Extra("progress", bool, False),),
    given={"experiment": None, "image": None, "labels": None},
)
register([NIGHTLY])


def to_config(cfg: DictConfig) -> NightlyConfig:
    """The Hydra config as the library's frozen settings."""
    if not cfg.tracking.enabled:
        raise ConfigError("The nightly job needs MLflow (its registry holds the champion): set tracking.enabled=true.")
    return NightlyConfig(
        **NIGHTLY.values(cfg, NightlyConfig), train=train_config(NIGHTLY.section(cfg, "train")),
        tracking=Tracking(uri=cfg.tracking.uri), distributed=to_distributed(cfg, NIGHTLY),
    )


@hydra.main(config_path=str(CONF), config_name="nightly", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        print(nightly(to_config(cfg), progress=bool(cfg.progress)).describe())


if __name__ == "__main__":
    with user_errors():
        check_moved(sys.argv[1:])
    main()
