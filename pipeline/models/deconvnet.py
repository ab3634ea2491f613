"""DeconvNet: the symmetric encoder-decoder of Noh, Hong and Han (ICCV 2015).

A VGG-style encoder whose pools record where each maximum came from (the "switches"), a
convolutional bottleneck in place of fc6/fc7, and a mirrored decoder: each stage first unpools with
the switches of its encoder twin (the value goes back exactly where the maximum was, zeros elsewhere)
and then densifies the sparse map with deconvolution (transposed 3x3 convolution) layers, batch norm
and ReLU. Unpooling to the recorded sizes makes any input size work without padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.layers import conv_bn_relu
from pipeline.models.vgg import DEFAULT_WIDTHS, VGG16_DEPTHS, vgg_stages


def deconv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 deconvolution (transposed convolution, stride 1), batch norm and ReLU; keeps the size."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeconvNet(nn.Module):
    """DeconvNet.

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes.
        widths: Channels of the five encoder stages, mirrored by the decoder (VGG-16: 64..512).
        bottleneck: Channels of the convolutional fc6/fc7 (the paper: 4096, at 1 x 1).
    """

    def __init__(self, in_channels: int, classes: int, widths: Sequence[int] = DEFAULT_WIDTHS,
                 bottleneck: int = 256) -> None:
        super().__init__()
        self.encoder = vgg_stages(in_channels, widths)
        self.pools = nn.ModuleList(nn.MaxPool2d(2, return_indices=True) for _ in widths)
        self.bottleneck = nn.Sequential(conv_bn_relu(widths[-1], bottleneck, 3),
                                        conv_bn_relu(bottleneck, widths[-1], 1))
        self.unpools = nn.ModuleList(nn.MaxUnpool2d(2) for _ in widths)
        decoder = []
        for k in reversed(range(len(widths))):  # the decoder runs stage 4 .. 0
            out = widths[k - 1] if k > 0 else widths[0]
            layers = [deconv_bn_relu(widths[k], widths[k]) for _ in range(VGG16_DEPTHS[k] - 1)]
            decoder.append(nn.Sequential(*layers, deconv_bn_relu(widths[k], out)))
        self.decoder = nn.ModuleList(decoder)
        self.classifier = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, classes, H, W) logits, for any H and W of at least 32."""
        switches = []
        for stage, pool in zip(self.encoder, self.pools, strict=True):
            x = stage(x)
            size = x.shape[-2:]
            x, indices = pool(x)
            switches.append((indices, size))
        x = self.bottleneck(x)
        for unpool, stage, (indices, size) in zip(self.unpools, self.decoder, reversed(switches), strict=True):
            x = stage(unpool(x, indices, output_size=size))
        return self.classifier(x)
