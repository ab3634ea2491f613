"""Segment job: `python -m jobs.segment source=... model=... output=...` (Hydra, conf/segment.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, ListConfig

from pipeline.errors import user_errors
from pipeline.execution import SegmentConfig, segment_inputs
from pipeline.tracking import Tracking


def to_config(cfg: DictConfig) -> SegmentConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read)."""
    t, s, c = cfg.tiling, cfg.storage, cfg.cluster
    return SegmentConfig(
        source=",".join(sources(cfg)), model=str(cfg.model), output=str(cfg.output),
        tile=t.tile, overlap=t.overlap, window=t.window, scores=t.scores, tta=t.tta, uncertainty=t.uncertainty,
        batch_size=t.batch_size, level=t.level, block=t.block, skip_background=t.skip_background,
        chunk=s.chunk, shard=s.shard, scores_dtype=s.scores_dtype,
        workers=c.workers, threads=c.threads, device=c.device, ray_address=c.address,
        actors_per_gpu=c.actors_per_gpu, pipelined=c.pipelined, compile=c.compile, runtime=cfg.runtime,
        overwrite=cfg.overwrite, accept_input=cfg.accept_input, progress=cfg.progress, verbose=cfg.verbose,
        tracking=Tracking(enabled=cfg.tracking.enabled, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment),
    )


def sources(cfg: DictConfig) -> list[str]:
    """`source=` as given: one path, or a list of them."""
    return [str(s) for s in cfg.source] if isinstance(cfg.source, ListConfig) else [str(cfg.source)]


@hydra.main(config_path="../conf", config_name="segment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        summary = segment_inputs(to_config(cfg), sources(cfg), pattern=cfg.glob, assets=[str(a) for a in cfg.asset])
    print(summary.describe())
    if getattr(summary, "failed", None):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
