"""FCN-32s, FCN-16s and FCN-8s: the fully convolutional network of Long, Shelhamer and Darrell
(CVPR 2015), on a VGG-style encoder.

The classifier of the encoder becomes convolutions ("fc6" a 3x3 convolution, here, in place of the
paper's 7x7; "fc7" 1x1), a 1x1 convolution scores the classes at 1/32 of the input, and learnable
transposed convolutions, initialised to bilinear interpolation, upsample the scores:

- **32s**: the 1/32 scores straight to the input size (x32);
- **16s**: x2, plus the scores of pool 4 (1/16), then x16;
- **8s**: as 16s, then x2, plus the scores of pool 3 (1/8), then x8.

Inputs whose sides are not multiples of 32 are padded (reflected) to the next one and the output is
cropped back, so the logits always have the input's height and width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import conv_bn_relu, pad_to_multiple
from pipeline.models.vgg import DEFAULT_WIDTHS, vgg_stages

VARIANTS = ("32s", "16s", "8s")
STRIDE = 32


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A per-channel transposed convolution that upsamples by `factor`, initialised to bilinear
    interpolation (the paper's initialisation), and learnable."""
    kernel = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, kernel, stride=factor, padding=factor // 2, groups=channels,
                            bias=False)
    centre = (kernel - 1) / 2 if kernel % 2 else kernel / 2 - 0.5
    taps = 1 - torch.abs(torch.arange(kernel, dtype=torch.float32) - centre) / factor
    with torch.no_grad():
        up.weight.copy_((taps[:, None] * taps[None, :]).expand(channels, 1, kernel, kernel))
    return up


class SkipFCN(nn.Module):
    """FCN-32s/16s/8s.

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes.
        variant: "32s", "16s" or "8s": how many skip connections refine the coarse scores.
        widths: Channels of the five VGG stages (VGG-16: 64, 128, 256, 512, 512).
        head_channels: Channels of fc6 and fc7 (VGG-16: 4096).
        dropout: Dropout after fc6 and fc7 (the paper: 0.5).
    """

    def __init__(self, in_channels: int, classes: int, variant: str = "8s",
                 widths: Sequence[int] = DEFAULT_WIDTHS, head_channels: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"FCN variant={variant!r} is unknown; expected one of {list(VARIANTS)}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout={dropout!r} is invalid; expected 0 <= dropout < 1")
        self.variant = variant
        self.stages = vgg_stages(in_channels, widths)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(
            conv_bn_relu(widths[-1], head_channels, kernel=3), nn.Dropout2d(dropout),
            conv_bn_relu(head_channels, head_channels, kernel=1), nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, classes, 1),
        )
        self.score_pool4 = nn.Conv2d(widths[3], classes, 1) if variant in ("16s", "8s") else None
        self.score_pool3 = nn.Conv2d(widths[2], classes, 1) if variant == "8s" else None
        self.up2_pool5 = bilinear_upsampling(classes, 2) if self.score_pool4 is not None else None
        self.up2_pool4 = bilinear_upsampling(classes, 2) if self.score_pool3 is not None else None
        self.up_final = bilinear_upsampling(classes, {"32s": 32, "16s": 16, "8s": 8}[variant])
        for score in (self.score_pool4, self.score_pool3):
            if score is not None:  # skips start silent, as in the paper: the coarse net is refined
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, classes, H, W) logits, for any H and W."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, STRIDE)
        pools = []
        for stage in self.stages:
            x = self.pool(stage(x))
            pools.append(x)
        scores = self.head(pools[4])
        if self.score_pool4 is not None and self.up2_pool5 is not None:
            scores = self.up2_pool5(scores) + self.score_pool4(pools[3])
        if self.score_pool3 is not None and self.up2_pool4 is not None:
            scores = self.up2_pool4(scores) + self.score_pool3(pools[2])
        return self.up_final(scores)[..., :h, :w]
