"""Nightly job: `python -m jobs.nightly [date=YYYY-MM-DD] [train.catalog=NAME] ...` (Hydra, conf/nightly.yaml).

Trains a challenger on the catalog when labelled data arrived since the last finished night, compares
it with the registry's champion on the fixed holdout, promotes it by the configured margin, and
records the decision in MLflow. A date already done does nothing unless `force=true`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs.train import to_config as to_train_config
from jobs.train import to_distributed
from pipeline.errors import ConfigError, user_errors
from pipeline.lifecycle import NightlyConfig, nightly
from pipeline.tracking import Tracking


def to_config(cfg: DictConfig) -> NightlyConfig:
    """The Hydra config as the library's frozen settings."""
    if not cfg.tracking.enabled:
        raise ConfigError("The nightly job needs MLflow (its registry holds the champion): set tracking.enabled=true.")
    train = to_train_config(cfg.train)
    t = cfg.tracking
    return NightlyConfig(
        train=train, model=cfg.model, margin=float(cfg.margin), metric=str(cfg.metric),
        date=None if cfg.date is None else str(cfg.date), force=bool(cfg.force),
        tracking=Tracking(uri=t.uri), experiment=t.experiment, distributed=to_distributed(cfg),
    )


@hydra.main(config_path="../conf", config_name="nightly", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        print(nightly(to_config(cfg), progress=bool(cfg.progress)).describe())


if __name__ == "__main__":
    main()
