"""One output block: read tiles, infer, blend, derive mask and confidence.

Pure functions of their inputs: no Ray, no Zarr. `execution` calls them inside workers; tests call
them directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.blending import Accumulator, tile_window
from pipeline.inference import Predictor
from pipeline.sources import RasterSource
from pipeline.tiling import Rect, TileGrid, TileId

NODATA_CLASS = 255


@dataclass(frozen=True)
class BlockOutput:
    """What is written for one block: NaN scores/confidence and class 255 where there is no data."""

    region: Rect
    scores: np.ndarray  # (C, h, w) float32
    mask: np.ndarray  # (h, w) uint8
    confidence: np.ndarray  # (h, w) float32


def _batches(tiles: Sequence[TileId], size: int) -> Iterator[Sequence[TileId]]:
    for i in range(0, len(tiles), size):
        yield tiles[i : i + size]


def blend_tiles(
    tiles: Sequence[TileId],
    regions: Sequence[Rect],
    grid: TileGrid,
    source: RasterSource,
    predictor: Predictor,
    window: str,
) -> list[Accumulator]:
    """Compute `tiles` once and accumulate their weighted scores into one accumulator per region."""
    accs = [Accumulator.zeros(r, predictor.num_classes) for r in regions]
    for batch in _batches(tiles, predictor.options.batch_size):
        rects = [grid.rect(t) for t in batch]
        raw = np.stack([predictor.select_bands(source.read(r.y0, r.x0, r.height, r.width)) for r in rects])
        scores = predictor(raw)
        for tile, rect, values in zip(batch, rects, scores, strict=True):
            weights = tile_window(window, grid.tile, grid.edges(tile))
            for acc in accs:
                acc.add(values, weights, rect)
    return accs


def class_mask(scores: np.ndarray) -> np.ndarray:
    """Argmax class per pixel (uint8), NODATA_CLASS where the scores are NaN."""
    mask = np.nan_to_num(scores, nan=-np.inf).argmax(0).astype(np.uint8)
    mask[np.isnan(scores[0])] = NODATA_CLASS
    return mask


def confidence(scores: np.ndarray, kind: str) -> np.ndarray:
    """Top-class probability per pixel (float32), NaN where the scores are NaN.

    Args:
        scores: (C, h, w) blended logits or probabilities.
        kind: "logits" (softmax is taken) or "probabilities" (used as they are).
    """
    filled = np.nan_to_num(scores, nan=0.0)
    if kind == "logits":
        e = np.exp(filled - filled.max(0, keepdims=True))
        top = e.max(0) / e.sum(0)
    else:
        top = filled.max(0)
    top = top.astype(np.float32)
    top[np.isnan(scores[0])] = np.nan
    return top


def finish_block(acc: Accumulator, valid: np.ndarray, scores_kind: str) -> BlockOutput:
    """Normalise a block's sums; NaN where the source has no data or no tile contributed.

    Args:
        acc: every contribution to the block, merged.
        valid: (h, w) bool, where the source has data.
        scores_kind: "logits" or "probabilities", what was blended.
    """
    scores = acc.normalised()
    scores[:, ~valid] = np.nan
    return BlockOutput(acc.region, scores, class_mask(scores), confidence(scores, scores_kind))
