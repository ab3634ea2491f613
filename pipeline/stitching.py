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

NODATA_CLASS = 255  # the nodata class of a uint8 mask (models of up to MAX_UINT8_CLASSES classes)
MAX_UINT8_CLASSES = 254  # one more class and the mask is uint16, nodata 65535 (docs/FORMAT.md)


def mask_dtype(classes: int) -> np.dtype:
    """The mask's data type for a model of `classes` classes: uint8 up to 254 classes, else uint16."""
    return np.dtype(np.uint8 if classes <= MAX_UINT8_CLASSES else np.uint16)


def nodata_class(dtype: np.dtype | str) -> int:
    """The class id that means nodata in a mask of `dtype`: its largest value (255, or 65535 for uint16)."""
    return int(np.iinfo(np.dtype(dtype)).max)


@dataclass(frozen=True)
class BlockOutput:
    """What is written for one block: NaN scores/confidence and the nodata class where there is no data."""

    region: Rect
    scores: np.ndarray  # (C, h, w) float32
    mask: np.ndarray  # (h, w) uint8 or uint16
    confidence: np.ndarray  # (h, w) float32
    uncertainty: np.ndarray | None = None  # (h, w) float32 normalised entropy, when the mosaic has the layer
    spread: np.ndarray | None = None  # (h, w) float32 blended TTA spread, when the mosaic has the layer


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
    accs = [Accumulator.zeros(r, predictor.channels) for r in regions]

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
    """Class mask (argmax, of `mask_dtype(C)`) and confidence (float32 top-class probability) of blended scores.

    Nodata pixels (NaN scores) get the mask's nodata class and NaN. One running max over the classes
    gives both: contiguous per-class passes are several times faster than argmax along the class axis.

    Args:
        scores: (C, h, w) blended logits or probabilities.
        kind: "logits" (confidence is the softmax's top probability) or "probabilities".
    """
    mask, confidence, _ = _summary(scores, kind, uncertainty=False)
    return mask, confidence


def entropy(scores: np.ndarray, kind: str) -> np.ndarray:
    """Normalised entropy, in [0, 1], of the class distribution of blended scores: (h, w) float32, NaN = nodata.

    H / log(C) of softmax(scores) for logits, of the scores themselves for probabilities (0 log 0 = 0).
    For logits, with m the top logit, e_c = exp(s_c - m) and Z = sum e_c:
    H = log Z - sum_c e_c (s_c - m) / Z, one pass over the classes with no (C, h, w) temporary.

    Args:
        scores: (C, h, w) blended logits or probabilities.
        kind: "logits" or "probabilities".
    """
    if kind == "logits":
        total, weighted = _exp_sums(scores, scores.max(axis=0).astype(np.float32), weighted=True)
        return _normalised_entropy(np.log(total) - weighted / total, len(scores))
    return _normalised_entropy(_probability_entropy(scores), len(scores))


def _summary(scores: np.ndarray, kind: str, uncertainty: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mask, confidence and (when asked) normalised entropy, sharing one softmax pass for logits."""
    best = scores[0].astype(np.float32, copy=True)
    mask = np.zeros(best.shape, mask_dtype(len(scores)))
    for c in range(1, len(scores)):
        better = scores[c] > best
        mask[better] = c
        np.maximum(best, scores[c], out=best)
    nodata = np.isnan(best)
    mask[nodata] = nodata_class(mask.dtype)
    if kind != "logits":
        return mask, best, _normalised_entropy(_probability_entropy(scores), len(scores)) if uncertainty else None
    # softmax top = exp(top - top) / sum exp(s - top) = 1 / sum exp(s - top); NaN stays NaN. The entropy
    # needs the same sum (see `entropy`): one pass over the classes gives both.
    total, weighted = _exp_sums(scores, best, weighted=uncertainty)
    h = _normalised_entropy(np.log(total) - weighted / total, len(scores)) if weighted is not None else None
    return mask, (1.0 / total).astype(np.float32), h


def _exp_sums(scores: np.ndarray, top: np.ndarray, weighted: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Z = sum_c exp(s_c - top) and, when `weighted`, sum_c exp(s_c - top) (s_c - top)."""
    total = np.zeros_like(top)
    moment = np.zeros_like(top) if weighted else None
    for c in range(len(scores)):
        shifted = scores[c] - top
        e = np.exp(shifted)
        total += e
        if moment is not None:
            moment += e * shifted
    return total, moment


def _probability_entropy(scores: np.ndarray) -> np.ndarray:
    """-sum_c p_c log p_c of probabilities (0 log 0 = 0), NaN where they are NaN."""
    h = np.zeros(scores.shape[1:], np.float32)
    for c in range(len(scores)):
        p = scores[c].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            h -= np.where(p > 0, p * np.log(p), np.float32(0) * p)  # NaN stays NaN
    return h


def _normalised_entropy(h: np.ndarray, classes: int) -> np.ndarray:
    """H / log(C), clipped to [0, 1]; 0 for a single class (nothing to be unsure of), NaN kept."""
    if classes < 2:
        return np.where(np.isnan(h), np.float32(np.nan), np.float32(0))
    return np.clip(h / np.float32(np.log(classes)), 0, 1).astype(np.float32)


def derive(region: Rect, scores: np.ndarray, kind: str, *, uncertainty: bool = False,
           spread: np.ndarray | None = None) -> BlockOutput:
    """A block's output from its blended scores (NaN = nodata): mask, confidence and, when asked, uncertainty."""
    return BlockOutput(region, scores, *_summary(scores, kind, uncertainty), spread)


def finish_block(acc: Accumulator, valid: np.ndarray, scores_kind: str, *, uncertainty: bool = False,
                 spread: bool = False) -> BlockOutput:
    """Normalise a block's sums, in place (`acc` is spent); NaN where the source has no data or no tile contributed.

    Args:
        acc: every contribution to the block, merged.
        valid: (h, w) bool, where the source has data.
        scores_kind: "logits" or "probabilities", what was blended.
        uncertainty: derive the normalised entropy too.
        spread: the last channel of `acc` is the blended TTA spread (see `Predictor`), not a class.
    """
    blended = acc.normalised(in_place=True)
    blended[:, ~valid] = np.nan
    scores, tta_spread = (blended[:-1], blended[-1]) if spread else (blended, None)
    return derive(acc.region, scores, scores_kind, uncertainty=uncertainty, spread=tta_spread)
