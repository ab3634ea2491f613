"""A VGG-style encoder: five stages of 3x3 convolutions, each ending in a 2x2 max pool.

FCN-32s/16s/8s and DeconvNet are built on it, as in their papers (VGG-16: stages of 2, 2, 3, 3, 3
convolutions of 64, 128, 256, 512, 512 channels). Batch norm follows every convolution: tessera
trains from scratch, where VGG without it trains poorly. The widths default to a quarter of VGG-16's
so that a 512 px tile runs in about a second on a laptop CPU; pass `widths` for the original.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.models.layers import check_widths, conv_bn_relu

VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
DEFAULT_WIDTHS = (16, 32, 64, 128, 128)


def vgg_stages(in_channels: int, widths: Sequence[int], depths: Sequence[int] = VGG16_DEPTHS) -> nn.ModuleList:
    """The convolutions of each stage (without its pool): stage k maps to `widths[k]` channels."""
    check_widths("widths", widths, len(depths))
    stages = nn.ModuleList()
    channels = in_channels
    for width, depth in zip(widths, depths, strict=True):
        layers = [conv_bn_relu(channels if i == 0 else width, width) for i in range(depth)]
        stages.append(nn.Sequential(*layers))
        channels = width
    return stages
