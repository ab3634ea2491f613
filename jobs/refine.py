"""Refine job: `python -m jobs.refine mosaic=... output=...` (Hydra, pipeline/conf/refine.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import CONF, Layout, Part, register
from pipeline.crf import CRFSettings
from pipeline.errors import user_errors
from pipeline.refinement import refine_inputs
from pipeline.settings import RefineConfig
from pipeline.tracking import Tracking

# `python -m jobs.refine` (pipeline/conf/refine.yaml).
REFINE = Layout(
    name="refine",
    parts=(
        Part(RefineConfig, None, ("mosaic", "output", "source", "block", "overwrite", "progress", "verbose")),
        Part(RefineConfig, "cluster", ("address", "workers")),
    ),
    nested={"crf": CRFSettings, "tracking": Tracking},
)
register([REFINE])


def to_config(cfg: DictConfig) -> RefineConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read)."""
    return RefineConfig(**REFINE.values(cfg, RefineConfig))


@hydra.main(config_path=str(CONF), config_name="refine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        summary = refine_inputs(to_config(cfg))
    print(summary.describe())
    if getattr(summary, "failed", None):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
