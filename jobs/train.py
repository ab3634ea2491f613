"""Train job: `python -m jobs.train image=... labels=...|polygons=... output=model.bundle` (Hydra, conf/train.yaml).

Trains on Ray Train (``distributed.workers``, 0 for this process alone), tracked in MLflow, and registers
the best bundle when ``tracking.register`` names a model. Running the same command again resumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError, user_errors
from pipeline.lifecycle import Trained, train_tracked
from pipeline.models import ClassInfo
from pipeline.tracking import Tracking
from pipeline.training import TrainConfig
from pipeline.training.distributed import Distributed

SECTIONS = ("progress", "distributed", "tracking")


def to_config(cfg: DictConfig) -> TrainConfig:
    """The Hydra config as the library's frozen settings (the only place a DictConfig is read).

    Raises:
        ConfigError: If a required value is missing, a key is unknown or a value has the wrong shape.
    """
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a setting"
        raise ConfigError(
            f"{key} is not set ({type(exc).__name__}); give it on the command line, e.g. {key}=..."
        ) from exc
    if not isinstance(container, dict):
        raise ConfigError(f"The train config must be a mapping of settings, got {container!r}.")
    values: dict[str, Any] = {str(key): value for key, value in container.items()}
    for section in SECTIONS:
        values.pop(section, None)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"Unknown train settings {unknown}; expected some of {sorted(fields)}.")
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
    if isinstance(values.get("class_weights"), list):
        try:
            values["class_weights"] = tuple(float(w) for w in values["class_weights"])
        except (TypeError, ValueError):
            raise ConfigError(f"class_weights={values['class_weights']!r} must be numbers, one per class, "
                              "or 'balanced'.") from None
    return TrainConfig(**values)


def to_distributed(cfg: DictConfig) -> Distributed | None:
    """The `distributed` section; None (train in this process) for 0 workers."""
    d = cfg.distributed
    if d.workers == 0:
        return None
    return Distributed(workers=d.workers, use_gpu=d.use_gpu, threads=d.threads, storage=str(d.storage), name=d.name,
                       max_failures=d.max_failures, keep=d.keep, address=d.address)


def to_tracking(cfg: DictConfig) -> tuple[Tracking, str | None]:
    """The `tracking` section, and the name to register the best bundle under."""
    t = cfg.tracking
    return Tracking(enabled=t.enabled, uri=t.uri, experiment=t.experiment), t.register


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


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        tracking, register = to_tracking(cfg)
        trained = train_tracked(to_config(cfg), tracking, register, to_distributed(cfg), progress=bool(cfg.progress))
        print(describe(trained))


if __name__ == "__main__":
    main()
