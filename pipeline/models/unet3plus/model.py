"""UNet 3+ on smp's encoder interface: wires encoder -> full-scale decoder -> heads."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import initialization
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.unet3plus.decoder import UNet3PlusDecoder


class DeepSupervisionOutput(NamedTuple):
    """What UNet 3+ returns in training mode.

    Attributes:
        masks: Logits (N, classes, H, W) at input size, one per decoder level, finest first.
        labels: Classification-guided module logits (N, 1), "the image contains foreground",
            or None when that module is off.
    """

    masks: list[torch.Tensor]
    labels: torch.Tensor | None


class UNet3Plus(nn.Module):
    """UNet 3+ (Huang et al. 2020): full-scale skips, deep supervision and classification guidance.

    The encoder is any smp encoder built with ``weights=None``. Its features at input resolution
    (smp's feature 0 is the input image itself) and features with zero channels (the placeholder
    some transformer encoders emit) are not decoder levels; the rest are, finest first, and the
    deepest of them (the bottom encoder feature) is the last decoder level. With ``resnet18`` and
    ``encoder_depth=5`` that is 5 levels at strides 2..32; with ``mit_b*`` it is 4 levels at
    strides 4..32. Every output is bilinearly upsampled to the input size.

    Outputs:

    - Training mode, ``deep_supervision=True``: ``DeepSupervisionOutput`` with ``decoder_levels``
      masks (a conv3x3 head per level, finest first) and the CGM ``labels`` (or None if
      ``classification_guided=False``).
    - Training mode, ``deep_supervision=False``: a plain (N, classes, H, W) tensor when
      ``classification_guided=False``; otherwise ``DeepSupervisionOutput`` with a single mask, so
      that the CGM logits still reach the loss.
    - Eval mode: one (N, classes, H, W) tensor, the finest output. With the classification-guided
      module on, it is gated softly: ``log(sigmoid(cls_logit))`` is added to the foreground
      channels ``1..classes-1``. This is the differentiable counterpart of the paper's hard gating
      (which zeroes the mask when the classifier says "no foreground"): after a softmax it scales
      every foreground probability by ``sigmoid(cls_logit)`` before renormalising, which tends to
      the hard gate as the classifier grows confident. Tiles are blended as logits, so their
      values must vary smoothly with the input; a hard per-tile switch would turn whole tiles on
      or off and leave seams where neighbouring tiles disagree. With ``classes == 1`` there is no
      foreground channel to gate and the output is the finest mask as is.

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes; class 0 is background.
        encoder_name: Any smp encoder name (``"resnet18"``, ``"mit_b0"``, ``"tu-..."``).
        encoder_depth: Number of encoder stages, 1..5 (at least two decoder levels must result).
        cat_channels: Channels each skip branch is reduced to; a fused level has
            ``cat_channels * decoder_levels`` channels.
        deep_supervision: Add a head to every decoder level (used in training only).
        classification_guided: Add the classification-guided module on the bottom feature.

    Raises:
        ConfigError: If a size is out of range or the encoder yields fewer than two levels.

    Example:
        >>> model = UNet3Plus(in_channels=3, classes=2, cat_channels=8)
        >>> out = model(torch.zeros(1, 3, 64, 64))
        >>> len(out.masks) == model.decoder_levels, out.labels.shape
        (True, torch.Size([1, 1]))
        >>> model.eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        encoder_name: str = "resnet18",
        encoder_depth: int = 5,
        cat_channels: int = 64,
        deep_supervision: bool = True,
        classification_guided: bool = True,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("classes", classes, 1),
            ("encoder_depth", encoder_depth, 1),
            ("cat_channels", cat_channels, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"UNet3Plus {name}={value!r} is invalid; expected an integer >= {minimum}.")
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth, weights=None)
        all_channels = list(self.encoder.out_channels)
        self._levels = tuple(
            index for index, channels in enumerate(all_channels) if index > 0 and channels > 0
        )
        if len(self._levels) < 2:
            raise ConfigError(
                f"UNet3Plus with encoder {encoder_name!r} and encoder_depth={encoder_depth} has "
                f"{len(self._levels)} decoder level(s); full-scale skips need at least 2. "
                "Increase encoder_depth (5 is the default)."
            )
        self.decoder = UNet3PlusDecoder(
            [all_channels[index] for index in self._levels], cat_channels=cat_channels
        )
        self.deep_supervision = deep_supervision
        head_channels = self.decoder.out_channels if deep_supervision else [self.decoder.out_channels[0]]
        self.segmentation_heads = nn.ModuleList(
            nn.Conv2d(channels, classes, kernel_size=3, padding=1) for channels in head_channels
        )
        self.classification_head: nn.Module | None = None
        if classification_guided:
            self.classification_head = nn.Sequential(
                nn.Dropout(p=0.5),
                nn.Conv2d(self.decoder.out_channels[-1], 1, kernel_size=1),
                nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
            )
        initialization.initialize_decoder(self.decoder)
        initialization.initialize_head(self.segmentation_heads)
        if self.classification_head is not None:
            initialization.initialize_head(self.classification_head)

    @property
    def decoder_levels(self) -> int:
        """Number of decoder levels, bottom encoder feature included: the deep-supervision outputs."""
        return len(self._levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor | DeepSupervisionOutput:
        """Segment a batch (N, in_channels, H, W); see the class docstring for what is returned."""
        features = self.encoder(x)
        decoded = self.decoder([features[index] for index in self._levels])
        size = x.shape[-2:]
        labels = self.classification_head(decoded[-1]) if self.classification_head is not None else None
        if not self.training:
            mask = _upsample_to(self.segmentation_heads[0](decoded[0]), size)
            return mask if labels is None else _gate_foreground(mask, labels)
        masks = [
            _upsample_to(head(feature), size)
            for head, feature in zip(self.segmentation_heads, decoded, strict=False)
        ]
        if labels is None and not self.deep_supervision:
            return masks[0]
        return DeepSupervisionOutput(masks=masks, labels=labels)


def _upsample_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinearly upsample ``x`` to ``size`` unless it is already that size."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _gate_foreground(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Add log(sigmoid(label)) to the foreground channels 1.. of ``mask``."""
    gate = F.logsigmoid(labels)[:, :, None, None]
    return torch.cat([mask[:, :1], mask[:, 1:] + gate], dim=1)
