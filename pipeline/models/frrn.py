"""FRRN: full-resolution residual networks (Pohlen, Hermans, Mathias and Leibe, CVPR 2017).

Two streams run side by side. The *residual stream* stays at full resolution and only ever receives
additive updates, which carries precise localisation; the *pooling stream* goes down and up like an
encoder-decoder, for context. They meet in full-resolution residual units (FRRUs): the residual
stream is max-pooled to the pooling stream's scale and concatenated with it, two 3x3 convolutions
make the new pooling stream, and a 1x1 convolution of it, upsampled back to full resolution, is added
to the residual stream. The layout follows FRRN A (a 5x5 stem and three residual units, FRRUs at 1/2,
1/4, 1/8 and 1/16 going down and 1/8, 1/4, 1/2 coming up, three residual units at the end) with
narrower widths by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import ResidualBlock, check_widths, conv_bn_relu

# (scale, units) going down, then coming up: FRRN A.
DOWN = ((2, 3), (4, 4), (8, 2), (16, 2))
UP = ((8, 2), (4, 2), (2, 2))


class FRRU(nn.Module):
    """One full-resolution residual unit at `scale`: (pooling stream, residual stream) -> both updated."""

    def __init__(self, pool_channels: int, residual_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.convs = nn.Sequential(conv_bn_relu(pool_channels + residual_channels, out_channels),
                                   conv_bn_relu(out_channels, out_channels))
        self.to_residual = nn.Conv2d(out_channels, residual_channels, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.max_pool2d(y, self.scale, ceil_mode=True)
        z = self.convs(torch.cat([z, pooled], dim=1))
        y = y + F.interpolate(self.to_residual(z), size=y.shape[-2:], mode="nearest")
        return z, y


class FRRN(nn.Module):
    """FRRN (layout A).

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes.
        widths: Channels of the pooling stream at 1/2, 1/4, 1/8 and 1/16 (FRRN A: 96, 192, 384, 384).
        stem: Channels of the stem and the full-resolution units (FRRN A: 48).
        residual: Channels of the residual stream (FRRN A: 32).
    """

    def __init__(self, in_channels: int, classes: int, widths: Sequence[int] = (32, 64, 128, 128), stem: int = 24,
                 residual: int = 16) -> None:
        super().__init__()
        check_widths("widths", widths, len(DOWN))
        if stem < 1 or residual < 1:
            raise ConfigError(f"FRRN stem={stem} and residual={residual} must be positive")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 5, padding=2, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True), *(ResidualBlock(stem) for _ in range(3)))
        self.split = nn.Conv2d(stem, residual, 1)
        down: list[FRRU] = []
        channels = stem
        for (scale, units), width in zip(DOWN, widths, strict=True):
            for _ in range(units):
                down.append(FRRU(channels, residual, width, scale))
                channels = width
        self.down = nn.ModuleList(down)
        up: list[FRRU] = []
        for (scale, units), width in zip(UP, reversed(widths[:-1]), strict=True):
            for _ in range(units):
                up.append(FRRU(channels, residual, width, scale))
                channels = width
        self.up = nn.ModuleList(up)
        self.merge = nn.Sequential(conv_bn_relu(channels + residual, stem, 1), *(ResidualBlock(stem) for _ in range(3)))
        self.classifier = nn.Conv2d(stem, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, classes, H, W) logits, for any H and W."""
        z = self.stem(x)
        y = self.split(z)
        h, w = x.shape[-2:]
        scale = 1
        for unit in (*self.down, *self.up):
            if unit.scale > scale:
                z = F.max_pool2d(z, unit.scale // scale, ceil_mode=True)
            elif unit.scale < scale:  # to the size ceil-mode pooling gives at that scale
                z = F.interpolate(z, size=(-(-h // unit.scale), -(-w // unit.scale)), mode="bilinear")
            scale = unit.scale
            z, y = unit(z, y)
        z = F.interpolate(z, size=y.shape[-2:], mode="bilinear")
        return self.classifier(self.merge(torch.cat([z, y], dim=1)))
