"""Raw source values as 8-bit RGB for people to look at (previews, figures, map tiles)."""

from __future__ import annotations

import numpy as np


def stretch_limits(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(3, 2) float64: the 2nd and 98th percentile of each displayed band (the first three, or the first
    three times for a grey image) over the `valid` pixels (default: all); (0, 0) for a band with none."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    limits = np.zeros((3, 2))
    for i, band in enumerate(bands):
        sample = band if valid is None else band[valid]
        if sample.size:
            limits[i] = np.percentile(sample.astype(np.float64), [2, 98])
    return limits


def apply_stretch(image: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(C, H, W) raw values as (H, W, 3) uint8, each displayed band stretched linearly from its
    `limits` (low, high) to 0..255 and clipped. The same limits give the same bytes for a pixel
    wherever it is read, so every tile of one source matches its neighbours."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    out = np.zeros((*bands.shape[1:], 3), np.uint8)
    for i, band in enumerate(bands.astype(np.float64)):
        low, high = limits[i]
        out[..., i] = np.clip((band - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)
    return out


def display_rgb(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) raw values as (H, W, 3) uint8: the first three bands (or the first, grey), each
    stretched between its 2nd and 98th percentile over the `valid` pixels (default: all)."""
    return apply_stretch(image, stretch_limits(image, valid))
