"""How training scores a model: over areas of labelled images, through the segment job's own path.

Validation after each epoch, the holdout at the end, and the nightly comparison of champion and
challenger all score a model the way the mosaics users get are made: the bundle's tile and overlap on
the same tile grid (`pipeline.tiling.TileGrid`), the production `Predictor`, the segment job's blend
window and scores (`pipeline.stitching.blend_tiles`, `finish_block`). A pixel's class is then the class
the segment job writes there for the same bundle and image (tests/training/test_scoring.py checks it
against a mosaic), and a tile near an area's edge sees the image beyond it, as in production.

An area is scored in blocks of at most 1024 x 1024 px, so memory does not grow with the image; a
tile that straddles two blocks is computed for each (about 1.4x the tiles of one pass at 512 px tiles).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.blending import DEFAULT_WINDOW
from pipeline.inference import InferenceOptions, Predictor
from pipeline.models import ModelBundle
from pipeline.stitching import blend_tiles, finish_block
from pipeline.tiling import Rect, TileGrid, TileId
from pipeline.training.data import LabelledImage
from pipeline.training.metrics import SegmentationMetrics

__all__ = ["SCORING_BLOCK", "predict_region", "score_areas", "scoring_predictor", "tile_grid"]

SCORING_BLOCK = 1024  # px: the side of the blocks an area is scored in


def tile_grid(bundle: ModelBundle, height: int, width: int) -> TileGrid:
    """The segment job's tile grid for this bundle over an image of `height` x `width` (its default tile
    and overlap, or the fixed input size of an imported program)."""
    spec = bundle.spec
    return TileGrid(height, width, spec.input_size or spec.tile_size, spec.overlap)


def scoring_predictor(bundle: ModelBundle, device: str = "cpu") -> Predictor:
    """The production Predictor for scoring, with the segment job's options (a model being trained is in
    channels_last already, so converting it changes nothing)."""
    return Predictor(bundle, InferenceOptions(device=device))


def predict_region(predictor: Predictor, image: LabelledImage, grid: TileGrid, region: Rect) -> np.ndarray:
    """(h, w) uint8 classes of `region`, as the segment job writes them (255 where the image has no data)."""
    tiles = _tiles_over(grid, region)
    (acc,) = blend_tiles(tiles, [region], grid, image.source, predictor, DEFAULT_WINDOW)
    valid = image.source.valid(region.y0, region.x0, region.height, region.width)
    return finish_block(acc, valid, predictor.options.scores).mask


def score_areas(
    bundle: ModelBundle, images: Sequence[LabelledImage], areas: Sequence[slice], device: str = "cpu"
) -> dict[str, Any]:
    """torchmetrics scores of the bundle's model over a band of rows of each image (see the module's notes).

    The model is put in eval mode (a training loop puts it back in train mode for its next epoch).
    """
    predictor = scoring_predictor(bundle, device)
    metrics = SegmentationMetrics(bundle.spec.num_classes)
    for image, rows in zip(images, areas, strict=True):
        grid = tile_grid(bundle, image.height, image.width)
        for region in _blocks(rows, image.width):
            truth = image.truth.read(region.y0, region.x0, region.height, region.width)
            metrics.update(predict_region(predictor, image, grid, region), truth)
    return metrics.compute()


def _blocks(rows: slice, width: int) -> Iterator[Rect]:
    for y in range(rows.start, rows.stop, SCORING_BLOCK):
        for x in range(0, width, SCORING_BLOCK):
            yield Rect(y, x, min(y + SCORING_BLOCK, rows.stop), min(x + SCORING_BLOCK, width))


def _tiles_over(grid: TileGrid, region: Rect) -> list[TileId]:
    """The grid's tiles that cover a pixel of `region`, in the grid's order."""
    rows = np.flatnonzero((grid.ys < region.y1) & (grid.ys + grid.tile > region.y0))
    cols = np.flatnonzero((grid.xs < region.x1) & (grid.xs + grid.tile > region.x0))
    return [(int(i), int(j)) for i in rows for j in cols]
