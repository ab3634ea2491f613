"""One output block: read tiles, infer, blend, derive mask and confidence.

Pure functions of their inputs: no Ray, no Zarr. `execution` calls them inside workers; tests call
them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from pipeline.blending import Accumulator, tile_window
from pipeline.sources import RasterSource
from pipeline.tiling import Rect, TileGrid, TileId

if TYPE_CHECKING:
    from pipeline.inference import Predictor

NODATA_CLASS = 255


@dataclass(frozen=True)
class BlockOutput:
    """What is written for one block: NaN scores/confidence and class 255 where there is no data."""

    region: Rect
    scores: np.ndarray  # (C, h, w) float32
    mask: np.ndarray  # (h, w) uint8
    confidence: np.ndarray  # (h, w) float32


T = TypeVar("T")
R = TypeVar("R")


def _batches(tiles: Sequence[TileId], size: int) -> Iterator[Sequence[TileId]]:
    for i in range(0, len(tiles), size):
        yield tiles[i : i + size]


def prefetched(load: Callable[[T], R], items: Iterable[T], executor: Executor | None) -> Iterator[R]:
    """`load(item)` for each item in order; with an executor, the next item loads while this one is used."""
    if executor is None:
        yield from map(load, items)
        return
    pending: Future[R] | None = None
    for item in items:
        ahead = executor.submit(load, item)
        if pending is not None:
            yield pending.result()
        pending = ahead
    if pending is not None:
        yield pending.result()


def blend_tiles(
    tiles: Sequence[TileId],
    regions: Sequence[Rect],
    grid: TileGrid,
    source: RasterSource,
    predictor: Predictor,
    window: str,
    reader: Executor | None = None,
) -> list[Accumulator]:
    """Compute `tiles` once and accumulate their weighted scores into one accumulator per region.

    With a `reader` executor, the next batch is read and decoded while the model runs on this one.
    """
    accs = [Accumulator.zeros(r, predictor.num_classes) for r in regions]

    def load(batch: Sequence[TileId]) -> tuple[Sequence[TileId], list[Rect], np.ndarray]:
        rects = [grid.rect(t) for t in batch]
        raw = np.stack([predictor.select_bands(source.read(r.y0, r.x0, r.height, r.width)) for r in rects])
        return batch, rects, raw

    for batch, rects, raw in prefetched(load, _batches(tiles, predictor.options.batch_size), reader):
        scores = predictor(raw)
        for tile, rect, values in zip(batch, rects, scores, strict=True):
            weights = tile_window(window, grid.tile, grid.edges(tile))
            for acc in accs:
                acc.add(values, weights, rect)
    return accs


def summarise(scores: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Class mask (uint8 argmax) and confidence (float32 top-class probability) of blended scores.

    Nodata pixels (NaN scores) get NODATA_CLASS and NaN. One running max over the classes gives both:
    contiguous per-class passes are several times faster than argmax along the class axis.

    Args:
        scores: (C, h, w) blended logits or probabilities.
        kind: "logits" (confidence is the softmax's top probability) or "probabilities".
    """
    best = scores[0].astype(np.float32, copy=True)
    mask = np.zeros(best.shape, np.uint8)
    for c in range(1, len(scores)):
        better = scores[c] > best
        mask[better] = c
        np.maximum(best, scores[c], out=best)
    nodata = np.isnan(best)
    mask[nodata] = NODATA_CLASS
    if kind == "logits":
        # softmax top = exp(top - top) / sum exp(s - top) = 1 / sum exp(s - top); NaN stays NaN.
        total = np.zeros_like(best)
        for c in range(len(scores)):
            total += np.exp(scores[c] - best)
        return mask, (1.0 / total).astype(np.float32)
    return mask, best


def finish_block(acc: Accumulator, valid: np.ndarray, scores_kind: str) -> BlockOutput:
    """Normalise a block's sums, in place (`acc` is spent); NaN where the source has no data or no tile contributed.

    Args:
        acc: every contribution to the block, merged.
        valid: (h, w) bool, where the source has data.
        scores_kind: "logits" or "probabilities", what was blended.
    """
    scores = acc.normalised(in_place=True)
    scores[:, ~valid] = np.nan
    mask, top = summarise(scores, scores_kind)
    return BlockOutput(acc.region, scores, mask, top)
