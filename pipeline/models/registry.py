"""The architecture registry: one name -> one model factory, built with one lookup.

Every architecture is built here without weights: trained weights come from a model bundle
(``pipeline.models.bundle``), pretrained encoders are loaded by training (``pipeline.training.pretrained``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.deconvnet import DeconvNet
from pipeline.models.fcn import FCN
from pipeline.models.frrn import FRRN
from pipeline.models.fusionnet import FusionNet
from pipeline.models.setr import SETR
from pipeline.models.skipfcn import SkipFCN

# Arguments that would change what a model returns: the pipeline blends raw per-class logits.
_OUTPUT_CHANGING_ARGS: Mapping[str, str] = MappingProxyType(
    {
        "activation": "tessera blends raw logits; apply softmax/sigmoid after blending instead",
        "aux_params": "an auxiliary head makes forward return a tuple; tessera expects one tensor",
    }
)


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: its factory and the defaults tessera builds it with."""

    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    uses_encoder: bool = True

    def accepted_args(self) -> list[str]:
        """Keyword arguments the factory takes besides ``in_channels`` and ``classes``."""
        parameters = inspect.signature(self.factory).parameters.values()
        return [
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("in_channels", "classes")
        ]


class _Imported:
    """A model class imported when first built or inspected. segmentation_models_pytorch pulls in timm
    and torchvision (seconds of imports in every process); a job on a from-scratch model never needs them."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self.__qualname__ = name  # what error messages name

    def resolve(self) -> Callable[..., nn.Module]:
        return getattr(importlib.import_module(self.module), self.name)  # type: ignore[no-any-return]

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.resolve()(**kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what `inspect.signature` reads: the class's own
        return inspect.signature(self.resolve())


def _smp(name: str, encoder_name: str = "resnet18") -> Architecture:
    """Register an smp architecture with a light default encoder."""
    factory = _Imported("segmentation_models_pytorch", name)
    return Architecture(factory, MappingProxyType({"encoder_name": encoder_name}))


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        "unet": _smp("Unet"),
        "unetplusplus": _smp("UnetPlusPlus"),
        "deeplabv3plus": _smp("DeepLabV3Plus"),
        "segformer": _smp("Segformer", encoder_name="mit_b0"),
        "fpn": _smp("FPN"),
        "pspnet": _smp("PSPNet"),
        "unet3plus": Architecture(_Imported("pipeline.models.unet3plus", "UNet3Plus"),
                                  MappingProxyType({"encoder_name": "resnet18"})),
        "fcn": Architecture(FCN, uses_encoder=False),
        "fcn32s": Architecture(SkipFCN, MappingProxyType({"variant": "32s"}), uses_encoder=False),
        "fcn16s": Architecture(SkipFCN, MappingProxyType({"variant": "16s"}), uses_encoder=False),
        "fcn8s": Architecture(SkipFCN, MappingProxyType({"variant": "8s"}), uses_encoder=False),
        "deconvnet": Architecture(DeconvNet, uses_encoder=False),
        "setr_naive": Architecture(SETR, MappingProxyType({"decoder": "naive"}), uses_encoder=False),
        "setr_pup": Architecture(SETR, MappingProxyType({"decoder": "pup"}), uses_encoder=False),
        "setr_mla": Architecture(SETR, MappingProxyType({"decoder": "mla"}), uses_encoder=False),
        "fusionnet": Architecture(FusionNet, uses_encoder=False),
        "frrn": Architecture(FRRN, uses_encoder=False),
    }
)


def available_architectures() -> list[str]:
    """Names accepted by ``build_model``, sorted.

    Returns:
        The registry's architecture names.
    """
    return sorted(ARCHITECTURES)


def build_model(architecture: str, *, in_channels: int, classes: int, **arch_args: Any) -> nn.Module:
    """Build a freshly initialised model of a registered architecture.

    Args:
        architecture: A name from ``available_architectures()``.
        in_channels: Number of input bands.
        classes: Number of output classes (one logit channel each).
        **arch_args: Keyword arguments of the architecture's constructor, e.g. ``encoder_name``
            (any smp encoder; default ``"resnet18"``, ``"mit_b0"`` for segformer) or FCN's
            ``depth``. ``encoder_weights`` may only be None: nothing downloads weights.

    Returns:
        The model, in training mode, producing (N, classes, H, W) logits in eval mode.

    Raises:
        ConfigError: If the architecture is unknown, an argument is unknown or has a bad value,
            or pretrained weights are requested.

    Example:
        >>> model = build_model("unet", in_channels=4, classes=3, encoder_name="resnet34")
    """
    entry = ARCHITECTURES.get(architecture)
    if entry is None:
        raise ConfigError(
            f"Unknown architecture {architecture!r}{_did_you_mean(architecture, ARCHITECTURES)}; "
            f"expected one of {available_architectures()}."
        )
    _check_count("in_channels", in_channels)
    _check_count("classes", classes)
    kwargs = {**entry.defaults, **_without_weights(architecture, arch_args)}
    accepted = entry.accepted_args()
    _check_arg_names(architecture, accepted, kwargs)
    if "encoder_weights" in accepted:
        # smp defaults to "imagenet", which would download weights.
        kwargs["encoder_weights"] = None
    if entry.uses_encoder:
        _check_encoder_name(architecture, kwargs["encoder_name"])
    try:
        return entry.factory(in_channels=in_channels, classes=classes, **kwargs)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ConfigError(
            f"Cannot build {architecture!r} with arguments {arch_args}: {str(exc).rstrip('.')}. "
            f"Check them against the constructor of {entry.factory.__qualname__}."
        ) from exc


def _check_count(name: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"build_model {name}={value!r} is invalid; expected an integer >= 1.")


def _without_weights(architecture: str, arch_args: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``encoder_weights=None`` and refuse any other weights or output-changing argument."""
    kwargs = dict(arch_args)
    weights = kwargs.pop("encoder_weights", None)
    if weights is not None:
        raise ConfigError(
            f"{architecture!r} got encoder_weights={weights!r}, but a model is built here without weights: a "
            "bundle holds its own, and pretrained encoders are loaded by training (tessera train "
            "arch_args.encoder_weights=NAME or PATH, see pipeline.training.pretrained)."
        )
    for name, reason in _OUTPUT_CHANGING_ARGS.items():
        if kwargs.get(name) is not None:
            raise ConfigError(f"{architecture!r} got {name}={kwargs[name]!r}, but {reason}; remove it.")
        kwargs.pop(name, None)
    return kwargs


def _check_arg_names(architecture: str, accepted: list[str], kwargs: Mapping[str, Any]) -> None:
    """Raise ConfigError naming any argument the architecture's constructor does not take."""
    for name in kwargs:
        if name not in accepted:
            # smp models swallow unknown keywords (**kwargs) and most encoders ignore them, so a
            # typo would silently build the default model; refuse it instead.
            raise ConfigError(
                f"{architecture!r} has no argument {name!r}{_did_you_mean(name, accepted)}; "
                f"expected some of {sorted(set(accepted) - {'encoder_weights'})}."
            )


def _check_encoder_name(architecture: str, encoder_name: object) -> None:
    """Raise ConfigError unless ``encoder_name`` names an smp encoder or a ``tu-`` timm model."""
    if not isinstance(encoder_name, str):
        raise ConfigError(
            f"{architecture!r} encoder_name={encoder_name!r} is invalid; expected a string such "
            "as 'resnet18'."
        )
    import segmentation_models_pytorch as smp
    import timm

    if encoder_name.startswith("tu-"):
        if timm.is_model(encoder_name[3:]):
            return
        known = [f"tu-{name}" for name in timm.list_models()]
        hint = _did_you_mean(encoder_name, known)
    else:
        known = smp.encoders.get_encoder_names()
        if encoder_name in known:
            return
        hint = _did_you_mean(encoder_name, known)
    raise ConfigError(
        f"{architecture!r} encoder_name={encoder_name!r} is not a known encoder{hint}; expected "
        "one of segmentation_models_pytorch.encoders.get_encoder_names() (e.g. 'resnet18', "
        "'efficientnet-b0', 'mit_b0') or 'tu-<timm model name>'."
    )


def _did_you_mean(name: str, known: Mapping[str, Any] | list[str]) -> str:
    """A ' (did you mean ...?)' hint with the closest known names, or ''."""
    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
