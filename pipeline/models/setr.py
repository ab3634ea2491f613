"""SETR: segmentation with a plain transformer encoder (Zheng et al., CVPR 2021).

The image is cut into `patch` x `patch` patches, each embedded linearly (a strided convolution), a
learnt positional embedding is added, and `depth` transformer blocks (pre-norm self-attention and
MLP) process the sequence. The embedding is learnt for a grid of `img_size / patch` patches and
interpolated (bicubic) to the grid of any other input size. Three decoders turn tokens back into
per-pixel logits:

- **naive**: the last block's tokens as a 1/patch feature map, two 1x1 convolutions, bilinear x`patch`;
- **pup** (progressive upsampling): four rounds of 3x3 convolution and bilinear x2 (for patch 16);
- **mla** (multi-level aggregation): tokens of the blocks at 1/4, 2/4, 3/4 and 4/4 of the depth,
  each reduced, aggregated top-down, refined and upsampled x4, then concatenated, classified and
  upsampled x4.

Inputs whose sides are not multiples of `patch` are padded (reflected) and the output cropped back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import conv_bn_relu, pad_to_multiple

DECODERS = ("naive", "pup", "mla")


class SETR(nn.Module):
    """SETR with a naive, PUP or MLA decoder.

    Args:
        in_channels: Number of input bands.
        classes: Number of output classes.
        decoder: "naive", "pup" or "mla".
        img_size: Input size the positional embedding is learnt for (other sizes interpolate it).
        patch: Patch edge in pixels (a power of two; 16 in the paper).
        dim: Token width (1024 for the paper's ViT-Large).
        depth: Transformer blocks (24 for ViT-Large; a multiple of 4 for MLA).
        heads: Attention heads (dim must divide by them).
        decoder_channels: Channels of the decoder's convolutions.
    """

    def __init__(self, in_channels: int, classes: int, decoder: str = "pup", img_size: int = 512, patch: int = 16,
                 dim: int = 128, depth: int = 8, heads: int = 4, decoder_channels: int = 64) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ConfigError(f"SETR decoder={decoder!r} is unknown; expected one of {list(DECODERS)}")
        if patch < 2 or patch & (patch - 1):
            raise ConfigError(f"SETR patch={patch!r} is invalid; expected a power of two such as 16")
        if img_size < patch or img_size % patch:
            raise ConfigError(f"SETR img_size={img_size!r} is invalid; expected a multiple of patch={patch}")
        if dim % heads:
            raise ConfigError(f"SETR dim={dim} does not divide into heads={heads}")
        if decoder == "mla" and depth % 4:
            raise ConfigError(f"SETR-MLA takes blocks at quarters of the depth: depth={depth} must divide by 4")
        self.decoder_kind = decoder
        self.patch = patch
        self.grid = img_size // patch
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, dim, self.grid, self.grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        c = decoder_channels
        self.head: nn.Module
        if decoder == "naive":
            self.head = nn.Sequential(conv_bn_relu(dim, c, 1), nn.Conv2d(c, classes, 1))
        elif decoder == "pup":
            rounds = int(math.log2(patch))
            self.head = nn.Sequential(
                *(nn.Sequential(conv_bn_relu(dim if i == 0 else c, c), nn.Upsample(scale_factor=2, mode="bilinear"))
                  for i in range(rounds)),
                nn.Conv2d(c, classes, 1),
            )
        else:
            self.taps = [depth // 4 * k - 1 for k in (1, 2, 3, 4)]
            self.reduce = nn.ModuleList(conv_bn_relu(dim, c, 1) for _ in self.taps)
            self.aggregate = nn.ModuleList(conv_bn_relu(c, c) for _ in self.taps)
            self.refine = nn.ModuleList(nn.Sequential(conv_bn_relu(c, c // 2), conv_bn_relu(c // 2, c // 2))
                                        for _ in self.taps)
            self.head = nn.Conv2d(4 * (c // 2), classes, 1)

    def positional(self, rows: int, cols: int) -> torch.Tensor:
        """The positional embedding for a grid of rows x cols patches, (1, rows * cols, dim)."""
        grid: torch.Tensor = self.position
        if (rows, cols) != (self.grid, self.grid):
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, classes, H, W) logits, for any H and W."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.patch)
        tokens = self.embed(x)
        rows, cols = tokens.shape[-2:]
        sequence = tokens.flatten(2).transpose(1, 2) + self.positional(rows, cols)
        taps = []
        for block in self.blocks:
            sequence = block(sequence)
            taps.append(sequence)
        taps[-1] = self.norm(taps[-1])

        def as_map(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(t.shape[0], -1, rows, cols)

        if self.decoder_kind == "naive":
            out = F.interpolate(self.head(as_map(taps[-1])), scale_factor=self.patch, mode="bilinear")
        elif self.decoder_kind == "pup":
            out = self.head(as_map(taps[-1]))
        else:
            streams, above = [], None
            for k in reversed(range(4)):  # top-down: the deepest block first
                feature = self.reduce[k](as_map(taps[self.taps[k]]))
                above = feature if above is None else feature + above
                streams.append(self.refine[k](self.aggregate[k](above)))
            up = self.patch // 4
            fused = torch.cat([F.interpolate(s, scale_factor=up, mode="bilinear") for s in streams], dim=1)
            out = F.interpolate(self.head(fused), scale_factor=4, mode="bilinear")
        return out[..., :h, :w]
