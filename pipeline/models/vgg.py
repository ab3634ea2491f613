"""A VGG-style encoder: five stages of 3x3 convolutions, each ending in a 2x2 max pool.

FCN-32s/16s/8s and DeconvNet are built on it, as in their papers (VGG-16: stages of 2, 2, 3, 3, 3
convolutions of 64, 128, 256, 512, 512 channels). Batch norm follows every convolution: tessera
trains from scratch, where VGG without it trains poorly. The widths default to a quarter of VGG-16's
so that a 512 px tile runs in about a second on a laptop CPU; pass `widths` for the original.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.errors import ConfigError

VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
DEFAULT_WIDTHS = (16, 32, 64, 128, 128)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    """A convolution (no bias: batch norm shifts), batch norm and ReLU; keeps the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


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


def check_widths(name: str, widths: Sequence[int], count: int) -> None:
    if len(widths) != count or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ConfigError(f"{name}={list(widths)!r} is invalid; expected {count} positive integers")
