"""Where training starts: pretrained encoder weights, or the weights of an existing bundle.

- ``arch_args.encoder_weights=NAME`` (``imagenet``, or any weight name smp or timm knows for the
  encoder) downloads them through the Hugging Face hub, or finds them in its cache (``HF_HOME``). With
  no network and nothing cached it fails at once, in one line naming what to download and where to put
  it, instead of retrying the hub for half a minute.
- ``arch_args.encoder_weights=PATH`` loads a local encoder checkpoint: the encoder's state dict, or a
  whole model's whose encoder keys start with ``encoder.``.
- ``init=BUNDLE`` starts from a bundle's weights: every tensor whose name and shape match is copied; a
  first convolution made for another number of bands is adapted (its kernels summed over the old bands
  and spread over the new), and whatever else differs (the head, when the classes differ) keeps its
  fresh initialisation.

The bundle written after training never names the weights it started from: its state dict holds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import hub
from pipeline.errors import ConfigError, cause


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
    if os.path.sep in weights or os.path.exists(weights):
        state = _encoder_state(Path(weights))
        try:  # nn.Module's own: some smp encoders (mit_*, densenet, xception) override it without `strict`
            nn.Module.load_state_dict(encoder, state, strict=True)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"The encoder checkpoint {weights!r} does not fit {arch_args.get('encoder_name')!r} "
                              f"with {in_channels} bands ({cause(exc)}).") from None
        return
    from pipeline.models.registry import ARCHITECTURES

    named = {**ARCHITECTURES[architecture].defaults, **arch_args}  # the encoder the registry builds by default
    nn.Module.load_state_dict(encoder, _hub_encoder(named, weights, in_channels).state_dict(), strict=True)


def check_encoder_weights(architecture: str, arch_args: Mapping[str, Any]) -> None:
    """Fail now, in this process, if `encoder_weights` names hub weights that can be neither downloaded
    nor found in the cache (a training worker would find out only after Ray and its imports had started).

    Raises:
        ConfigError: as `load_encoder_weights` would.
    """
    weights = arch_args.get("encoder_weights")
    if not isinstance(weights, str) or os.path.sep in weights or os.path.exists(weights):
        return  # none, or a local file: read where it is used
    if not hub.reachable():
        from pipeline.models.registry import ARCHITECTURES

        if architecture in ARCHITECTURES:
            _hub_encoder({**ARCHITECTURES[architecture].defaults, **arch_args}, weights, 3)  # from the cache only


def init_from_bundle(model: nn.Module, path: str) -> list[str]:
    """Copy a bundle's weights into `model` where names and shapes match; the names left as initialised.

    Raises:
        BundleError: the bundle cannot be read.
        ConfigError: nothing at all matches (another architecture).
    """
    from pipeline.models import ModelBundle

    source = ModelBundle.load(path).model.state_dict()
    target = model.state_dict()
    copied, fresh = {}, []
    for name, tensor in target.items():
        old = source.get(name)
        if old is not None and old.shape == tensor.shape:
            copied[name] = old
        elif old is not None and _other_bands(old, tensor):
            copied[name] = old.sum(dim=1, keepdim=True).repeat(1, tensor.shape[1], 1, 1) / tensor.shape[1]
        else:
            fresh.append(name)
    if not any(tensor.is_floating_point() and tensor.ndim > 1 for tensor in copied.values()):
        raise ConfigError(f"init={path!r}: none of its weights fit this model; fine-tune from a bundle of the same "
                          "architecture and arch_args.")
    model.load_state_dict({**target, **copied})
    return fresh


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters (empty for architectures without one)."""
    encoder = getattr(model, "encoder", None)
    return list(encoder.parameters()) if isinstance(encoder, nn.Module) else []


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
        raise ConfigError(
            f"Pretrained weights {weights!r} for encoder {name!r} are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}. Where there is a network, run `python -c \"import "
            f"segmentation_models_pytorch as smp; smp.encoders.get_encoder('{name}', weights={asked})\"` and copy "
            "that cache here (or set HF_HOME to it), or give encoder_weights=PATH, a local encoder checkpoint."
        ) from None
