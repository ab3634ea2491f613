"""Train job: `python -m jobs.train image=... labels=...|polygons=... output=model.bundle` (Hydra, conf/train.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError, user_errors
from pipeline.models import ClassInfo
from pipeline.training import TrainConfig, train


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
    values.pop("progress", None)
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
    for key in ("image", "labels", "polygons", "output"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    if isinstance(values.get("class_weights"), list):
        try:
            values["class_weights"] = tuple(float(w) for w in values["class_weights"])
        except (TypeError, ValueError):
            raise ConfigError(f"class_weights={values['class_weights']!r} must be numbers, one per class, "
                              "or 'balanced'.") from None
    return TrainConfig(**values)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = train(to_config(cfg), progress=bool(cfg.progress))
        ious = ", ".join(f"{v:.3f}" for v in result.val_iou)
        print(
            f"wrote {result.bundle_path} (sha256 {result.sha256[:12]}): validation mIoU "
            f"{result.val_miou:.3f} (per class {ious}) in {result.seconds:.0f} s"
        )
        if result.holdout is not None:
            held = ", ".join(f"{v:.3f}" for v in result.holdout["iou"])
            print(f"holdout mIoU {result.holdout['miou']:.3f} (per class {held}), scored once with the best model")


if __name__ == "__main__":
    main()
