"""A plain fully convolutional network with no downsampling.

It is the smallest model the pipeline can run. Its receptive field is known exactly, which is what
the seam and exactness tests need: a tile overlap of at least ``receptive_field // 2`` pixels makes
tiled inference match whole-image inference.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn

from pipeline.errors import ConfigError

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
PADDING_MODES: tuple[PaddingMode, ...] = ("zeros", "reflect", "replicate", "circular")


class FCN(nn.Module):
    """``depth`` 3x3 conv + BatchNorm + ReLU layers of ``width`` channels, then a 1x1 head.

    Every layer keeps the spatial size (stride 1, padding 1), so the output has the input's height
    and width for any input size.

    Args:
        in_channels: Number of input bands.
        classes: Number of output channels (one logit per class).
        depth: Number of 3x3 layers; 0 gives a per-pixel linear classifier.
        width: Channels of every hidden layer.
        padding_mode: How the 3x3 convolutions pad the border, one of ``PADDING_MODES``.

    Raises:
        ConfigError: If a size is not a positive integer (``depth`` may be 0) or
            ``padding_mode`` is unknown.

    Example:
        >>> model = FCN(in_channels=3, classes=2, depth=2).eval()
        >>> model(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 2, 8, 8])
        >>> model.receptive_field
        5
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        depth: int = 4,
        width: int = 16,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, minimum=1)
        _check_int("classes", classes, minimum=1)
        _check_int("depth", depth, minimum=0)
        _check_int("width", width, minimum=1)
        if padding_mode not in PADDING_MODES:
            raise ConfigError(
                f"FCN padding_mode={padding_mode!r} is not supported; expected one of {list(PADDING_MODES)}."
            )
        mode = cast(PaddingMode, padding_mode)
        self.depth = depth
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                # No bias: BatchNorm's shift makes it redundant.
                nn.Conv2d(channels, width, 3, padding=1, padding_mode=mode, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, classes, kernel_size=1)

    @property
    def receptive_field(self) -> int:
        """Side length in pixels of the input square that one output pixel depends on."""
        return 1 + 2 * self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, in_channels, H, W) inputs to (N, classes, H, W) logits."""
        return self.head(self.features(x))


def _check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise ConfigError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"FCN {name}={value!r} is invalid; expected an integer >= {minimum}.")
