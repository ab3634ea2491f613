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


def finish_block(acc: Accumulator, valid: np.ndarray, scores_kind: str) -> BlockOutput:
    """Normalise a block's sums; mask is the argmax, confidence the top class probability.

    Args:
        acc: every contribution to the block, merged.
        valid: (h, w) bool, where the source has data.
        scores_kind: "logits" or "probabilities", what was blended.
    """
    scores = acc.normalised()
    nodata = ~valid | (acc.weight <= 0)
    scores[:, nodata] = np.nan
    filled = np.nan_to_num(scores, nan=0.0)
    mask = filled.argmax(0).astype(np.uint8)
    mask[nodata] = NODATA_CLASS
    if scores_kind == "logits":
        shifted = np.exp(filled - filled.max(0, keepdims=True))
        confidence = (shifted.max(0) / shifted.sum(0)).astype(np.float32)
    else:
        confidence = filled.max(0)
    confidence[nodata] = np.nan
    return BlockOutput(acc.region, scores, mask, confidence)
