"""Weight windows and the blend arithmetic.

A pixel's blended value is sum_t(w_t * v_t) / sum_t(w_t) over the tiles t that cover it, where v_t is
the tile's logits (or probabilities) and w_t its weight window. Sums are kept in float32 and
normalised once, after every contribution has arrived, so the result does not depend on the order in
which tiles or seams are added (up to float rounding).

Windows are separable products of 1-D profiles. A side of a tile that lies on the image edge gets a
flat profile, so the image border is never down-weighted: where a single tile covers a pixel the
result is that tile's value whatever the window, and cosine/linear windows never divide by zero.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError
from pipeline.tiling import Rect

WINDOWS = ("gaussian", "cosine", "linear", "constant")
DEFAULT_WINDOW = "gaussian"  # the segment job's, and so the one training scores models with
GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = 0.125 * tile, the value MONAI and nnU-Net use


def window_profile(kind: str, size: int) -> np.ndarray:
    """A 1-D weight profile of `size` samples, peak 1, strictly positive.

    Raises:
        ConfigError: for an unknown window kind.
    """
    centre = (size - 1) / 2
    i = np.arange(size, dtype=np.float64)
    if kind == "gaussian":
        sigma = GAUSSIAN_SIGMA_SCALE * size
        profile = np.exp(-0.5 * ((i - centre) / sigma) ** 2)
    elif kind == "cosine":
        # Hann window sampled at pixel centres: zero only half a pixel outside the tile.
        profile = 0.5 - 0.5 * np.cos(2 * np.pi * (i + 0.5) / size)
    elif kind == "linear":
        profile = np.minimum(i + 0.5, size - i - 0.5) / (size / 2)
    elif kind == "constant":
        profile = np.ones(size)
    else:
        raise ConfigError(f"unknown blend window {kind!r}: choose one of {', '.join(WINDOWS)}")
    return profile / profile.max()


@functools.lru_cache(maxsize=64)
def tile_window(kind: str, size: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """The (size, size) float32 weight window of a tile touching the image edges `edges`.

    Args:
        kind: one of `WINDOWS`.
        size: tile size.
        edges: whether the tile touches the top, bottom, left and right image edge; those sides are
            flattened to the peak value.
    """
    top, bottom, left, right = edges
    peak = size // 2
    wy = window_profile(kind, size)
    wx = wy.copy()
    if top:
        wy[:peak] = 1.0
    if bottom:
        wy[peak:] = 1.0
    if left:
        wx[:peak] = 1.0
    if right:
        wx[peak:] = 1.0
    window = np.outer(wy, wx).astype(np.float32)
    window.setflags(write=False)
    return window


@dataclass
class Accumulator:
    """Weighted sums of tile values over one region of the image."""

    region: Rect
    total: np.ndarray  # (C, h, w) float32: sum of weight * value
    weight: np.ndarray  # (h, w) float32: sum of weights

    @classmethod
    def zeros(cls, region: Rect, channels: int) -> Accumulator:
        return cls(
            region,
            np.zeros((channels, region.height, region.width), np.float32),
            np.zeros((region.height, region.width), np.float32),
        )

    def add(self, values: np.ndarray, window: np.ndarray, rect: Rect) -> None:
        """Add one tile's `values` (C, T, T) weighted by `window` (T, T); `rect` is where the tile lies."""
        part = rect.intersect(self.region)
        if part.empty:
            return
        src = part.relative_to(rect)
        dst = part.relative_to(self.region)
        w = window[src]
        self.total[(slice(None), *dst)] += values[(slice(None), *src)] * w
        self.weight[dst] += w

    def merge(self, other: Accumulator) -> None:
        """Add another accumulator whose region lies inside this one's."""
        part = other.region.intersect(self.region)
        if part != other.region:
            raise ValueError(f"region {other.region} is not inside {self.region}")
        dst = part.relative_to(self.region)
        self.total[(slice(None), *dst)] += other.total
        self.weight[dst] += other.weight

    def crop(self, region: Rect) -> Accumulator:
        """A copy of the part of this accumulator inside `region`."""
        part = region.intersect(self.region)
        s = part.relative_to(self.region)
        return Accumulator(part, self.total[(slice(None), *s)].copy(), self.weight[s].copy())

    def normalised(self, in_place: bool = False) -> np.ndarray:
        """The blended values (C, h, w) float32; NaN where no tile contributed.

        `in_place` divides the sums themselves (no second block-sized array): the accumulator is spent.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.divide(self.total, self.weight, out=self.total if in_place else None)
        out[:, self.weight <= 0] = np.nan
        return out
