"""The UNet 3+ decoder: full-scale skip connections (Huang et al. 2020, "UNet 3+")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Module:
    """A 3x3 convolution, BatchNorm and ReLU that keep the spatial size."""
    return Conv2dReLU(in_channels, out_channels, kernel_size=3, padding=1, use_norm="batchnorm")


def _pool_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Max-pool ``x`` down to ``size``."""
    height, width = x.shape[-2:]
    if height % size[0] == 0 and width % size[1] == 0:
        # The paper's non-overlapping windows (kernel = stride = scale ratio).
        kernel = (height // size[0], width // size[1])
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)
    # Input sizes that do not divide by the encoder stride give odd feature sizes; adaptive pooling
    # still lands exactly on the target grid.
    return F.adaptive_max_pool2d(x, size)


def _upsample_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinearly upsample ``x`` to ``size``."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FullScaleStage(nn.Module):
    """One decoder level: fuses every encoder and deeper decoder feature at this level's scale."""

    def __init__(
        self,
        level: int,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        cat_channels: int,
    ) -> None:
        super().__init__()
        self.level = level
        # Shallower encoder features are max-pooled down; this level's is used as is.
        self.encoder_branches = nn.ModuleList(
            _conv_bn_relu(channels, cat_channels) for channels in encoder_channels[: level + 1]
        )
        # Deeper decoder features (the deepest is the bottom encoder feature) are upsampled.
        self.decoder_branches = nn.ModuleList(
            _conv_bn_relu(channels, cat_channels) for channels in decoder_channels[level + 1 :]
        )
        fused = cat_channels * len(encoder_channels)
        self.fuse = _conv_bn_relu(fused, fused)

    def forward(
        self, encoder_features: Sequence[torch.Tensor], deeper: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Fuse encoder features 0..level and decoder features level+1.. into this level."""
        size = encoder_features[self.level].shape[-2:]
        parts = [
            branch(feature if index == self.level else _pool_to(feature, size))
            for index, (branch, feature) in enumerate(
                zip(self.encoder_branches, encoder_features, strict=True)
            )
        ]
        parts += [
            branch(_upsample_to(feature, size))
            for branch, feature in zip(self.decoder_branches, deeper, strict=True)
        ]
        return self.fuse(torch.cat(parts, dim=1))


class UNet3PlusDecoder(nn.Module):
    """Full-scale skip decoder over encoder features given finest first.

    Level ``i`` fuses encoder features ``0..i`` (shallower ones max-pooled to level ``i``) and
    decoder features ``i+1..`` (bilinearly upsampled), each through conv3x3-BN-ReLU to
    ``cat_channels``, and fuses the concatenation with one more conv3x3-BN-ReLU. The deepest level
    is the bottom encoder feature itself.
    """

    def __init__(self, encoder_channels: Sequence[int], cat_channels: int = 64) -> None:
        super().__init__()
        levels = len(encoder_channels)
        fused = cat_channels * levels
        self.out_channels: list[int] = [fused] * (levels - 1) + [encoder_channels[-1]]
        self.stages = nn.ModuleList(
            FullScaleStage(level, encoder_channels, self.out_channels, cat_channels)
            for level in range(levels - 1)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return one feature map per decoder level, finest first; the last is ``features[-1]``."""
        decoded: list[torch.Tensor] = [features[-1]]
        # Deepest first: each level needs every deeper decoder level.
        for level in reversed(range(len(self.stages))):
            decoded.insert(0, self.stages[level](features[: level + 1], decoded))
        return decoded
