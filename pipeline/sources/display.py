"""Raw source values as 8-bit RGB for people to look at (previews, figures)."""

from __future__ import annotations

import numpy as np


def display_rgb(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) raw values as (H, W, 3) uint8: the first three bands (or the first, grey), each
    stretched between its 2nd and 98th percentile over the `valid` pixels (default: all)."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    out = np.zeros((*bands.shape[1:], 3), np.uint8)
    for i, band in enumerate(bands.astype(np.float64)):
        sample = band if valid is None else band[valid]
        if sample.size == 0:
            continue
        low, high = np.percentile(sample, [2, 98])
        out[..., i] = np.clip((band - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)
    return out
