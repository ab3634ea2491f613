"""Refine job: `python -m jobs.refine mosaic=... output=...` (Hydra, conf/refine.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.crf import CRFSettings
from pipeline.errors import user_errors
from pipeline.refinement import RefineConfig, refine_inputs
from pipeline.tracking import Tracking


def to_config(cfg: DictConfig) -> RefineConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read)."""
    crf = {str(k): v for k, v in OmegaConf.to_container(cfg.crf).items()}  # type: ignore[union-attr]
    return RefineConfig(
        mosaic=str(cfg.mosaic), output=str(cfg.output), source=None if cfg.source is None else str(cfg.source),
        crf=CRFSettings(**crf), block=cfg.block, workers=cfg.cluster.workers, ray_address=cfg.cluster.address,
        overwrite=cfg.overwrite, progress=cfg.progress, verbose=cfg.verbose,
        tracking=Tracking(enabled=cfg.tracking.enabled, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment),
    )


@hydra.main(config_path="../conf", config_name="refine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        summary = refine_inputs(to_config(cfg))
    print(summary.describe())
    if getattr(summary, "failed", None):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
