"""FusionNet: a deep residual encoder-decoder with additive skips (Quan, Hildebrand and Jain, 2016).

Each level is a convolution, a residual block (three convolutions plus the identity) and another
convolution; the encoder max-pools between levels, the decoder upsamples with a 2x2 transposed
convolution and *adds* the encoder's feature map of the same level (U-Net concatenates), which keeps
the decoder's width constant and lets the skips act as long residual connections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import ResidualBlock, check_widths, conv_bn_relu

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)


def level(in_channels: int, channels: int) -> nn.Sequential:
    """FusionNet's unit: convolution, residual block, convolution."""
    return nn.Sequential(conv_bn_relu(in_channels, channels), ResidualBlock(channels), conv_bn_relu(channels, channels))


class FusionNet(nn.Module):
    """FusionNet.

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes.
        widths: Channels of each level, finest first; the last is the bridge (the paper: 64..1024).
    """

    def __init__(self, in_channels: int, classes: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        check_widths("widths", widths, max(len(widths), 2))  # at least one level and the bridge
        self.down = nn.ModuleList(level(in_channels if i == 0 else widths[i - 1], w) for i, w in enumerate(widths[:-1]))
        self.bridge = level(widths[-2], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(len(widths) - 1)))
        self.decode = nn.ModuleList(level(widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.classifier = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, classes, H, W) logits, for any H and W."""
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.bridge(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips), strict=True):
            x = up(x)[..., : skip.shape[-2], : skip.shape[-1]]  # ceil-mode pooling: crop the odd row back
            x = decode(x + skip)
        return self.classifier(x)
