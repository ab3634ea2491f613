"""Segment job: `python -m jobs.segment source=... model=... output=...` (Hydra, pipeline/conf/segment.yaml)."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from pipeline.config import CONF, Extra, Layout, Part, register, settings_json
from pipeline.errors import user_errors
from pipeline.execution import segment_inputs
from pipeline.settings import SegmentConfig
from pipeline.tracking import Tracking

# `python -m jobs.segment` (pipeline/conf/segment.yaml): where each setting sits in the Hydra config.
SEGMENT = Layout(
    name="segment",
    parts=(
        Part(SegmentConfig, None, ("source", "model", "output", "runtime", "overwrite", "accept_input", "progress",
                                   "verbose")),
        Part(SegmentConfig, "tiling", ("tile", "overlap", "window", "scores", "tta", "uncertainty", "batch_size",
                                       "level", "block", "skip_background")),
        Part(SegmentConfig, "storage", ("chunk", "shard", "scores_dtype")),
        Part(SegmentConfig, "cluster", ("address", "workers", "threads", "device", "actors_per_gpu", "pipelined",
                                        "compile")),
    ),
    nested={"tracking": Tracking},
    types={"source": Any},  # one path, or a list of them
    extras=(
        Extra("glob", str | None, None),  # files taken from a folder
        Extra("asset", Any, []),  # STAC assets to read
        Extra("show_config", bool, False),  # print the settings as JSON and stop
    ),
)
register([SEGMENT])


def to_config(cfg: DictConfig) -> SegmentConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read)."""
    return SegmentConfig(**{**SEGMENT.values(cfg, SegmentConfig), "source": ",".join(sources(cfg))})


def sources(cfg: DictConfig) -> list[str]:
    """`source=` as given: one path, or a list of them."""
    return [str(s) for s in cfg.source] if isinstance(cfg.source, ListConfig) else [str(cfg.source)]


@hydra.main(config_path=str(CONF), config_name="segment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        config = to_config(cfg)
        if cfg.show_config:
            print(settings_json(config))
            return
        summary = segment_inputs(config, sources(cfg), pattern=cfg.glob, assets=[str(a) for a in cfg.asset])
    print(summary.describe())
    if getattr(summary, "failed", None):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
