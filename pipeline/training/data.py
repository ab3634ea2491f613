"""Training data read window by window: a labelled image, its split by area, a class index, batches.

Nothing here reads an image or its truth whole, so a training worker's memory depends on the window,
the batch and the loader settings, not on the image's size (docs/training.md): a 100 000 px slide
trains in the memory of a 2 000 px tile.

- `LabelledImage`: a `RasterSource` (GeoTIFF/COG, whole-slide image at a level, object storage) and
  its truth (`pipeline.training.truth`), read together by window.
- `split_by_area`: the bottom rows are holdout, above them validation, the rest training. Training
  windows lie inside the training rows only, so no training window sees a validation pixel.
- `AreaIndex`: the label values per cell (a quarter of a training window) of one area, built in one
  pass over the truth and cached on disk: exact label counts per area (the checks before training,
  balanced class weights) and class-balanced window sampling.
- `sample_pixels` / `compute_normalization`: statistics from at most a million pixels of the
  training area, read as a grid of small windows.
- `WindowSampler` and `WindowBatches`: random windows (a share class-balanced), read and augmented.

Example (it needs the two rasters, so it is not a doctest)::

    image = open_labelled_image("scene.tif", "labels.tif")
    split = split_by_area(image.height, image.width, val_fraction=0.2, window=256)
    normalization = compute_normalization(sample_pixels(image, split.train))
    batches = WindowBatches(image, split, normalization, window=256, batch_size=8,
                            rng=np.random.default_rng(0),
                            index=AreaIndex.build(image.truth, split.train, image.width))
    x, y = next(batches)  # (8, C, 256, 256) float32 normalised, (8, 256, 256) int64
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from rasterio.crs import CRS

from pipeline.errors import ConfigError
from pipeline.files import cache_folder
from pipeline.models import Normalization
from pipeline.sources import RasterSource, open_source
from pipeline.training.augment import Augmenter
from pipeline.training.metrics import IGNORE_INDEX
from pipeline.training.truth import RasterTruth, open_raster

__all__ = [
    "AreaIndex",
    "AreaSplit",
    "LabelledImage",
    "Truth",
    "WindowBatches",
    "WindowSampler",
    "compute_normalization",
    "index_cell",
    "open_labelled_image",
    "sample_pixels",
    "split_by_area",
]

_STATISTICS_PIXELS = 1_000_000  # per band; enough for a mean/std to three digits
_STATISTICS_WINDOWS = 16  # per side: the grid of windows a large area's statistics are read from
_INDEX_TILE = 1024  # px: the truth is read in tiles of this side to build the index
_INDEX_FORMAT = 1  # in the cache's file names: a new layout is not read from older files


class Truth(Protocol):
    """Class ids of a window of the image's grid (see `pipeline.training.truth`)."""

    key: str

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray: ...

    def reopened(self) -> Truth: ...


@dataclass(frozen=True, eq=False)
class LabelledImage:
    """An image and its per-pixel truth on the same grid, read by window.

    Attributes:
        source: The image at its working level (reads all its bands).
        truth: The class ids (255 = unlabelled) on the same grid.
        bands: The 1-based bands of `source` the model reads, in order.
        resolution: Pixel size in ``resolution_unit``, or None when the file does not define it.
        resolution_unit: "m" for georeferenced rasters, "um" for slides.
        name: The truth's file, for messages.
    """

    source: RasterSource
    truth: Truth
    bands: tuple[int, ...]
    resolution: float | None
    resolution_unit: str = "m"
    name: str = ""

    @property
    def height(self) -> int:
        """Rows of the working grid."""
        return self.source.height

    @property
    def width(self) -> int:
        """Columns of the working grid."""
        return self.source.width

    @property
    def dtype(self) -> np.dtype[Any]:
        """The image's data type."""
        return self.source.dtype

    def values(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(C, h, w) raw values of `bands` in a window inside the image."""
        return self.source.read(y0, x0, h, w)[[b - 1 for b in self.bands]]

    def read(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """A window inside the image: its `values` and (h, w) uint8 class ids."""
        return self.values(y0, x0, h, w), self.truth.read(y0, x0, h, w)

    def reopened(self) -> LabelledImage:
        """The same image with file handles of its own (for a forked process: handles are not shared)."""
        return dataclasses.replace(self, source=self.source.at_level(self.source.level), truth=self.truth.reopened())


def select_bands(source: RasterSource, bands: Sequence[int] | None, name: str) -> tuple[int, ...]:
    """The 1-based bands to read (all when None), checked against the source's band count."""
    count = source.bands
    selected = tuple(range(1, count + 1)) if bands is None else tuple(bands)
    bad = [b for b in selected if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= count]
    if not selected or bad:
        raise ConfigError(
            f"bands={list(selected)} is invalid for {name!r}, which has {count} band(s); give 1-based indices "
            f"from 1 to {count}, or leave bands unset for all."
        )
    return selected


def open_labelled_image(
    image_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> LabelledImage:
    """Open an image and its label raster, checking that they share a grid; nothing is read but headers.

    Args:
        image_path: Any raster tessera reads (GeoTIFF, COG, slide at level 0...), local or a URL.
        labels_path: Single-band integer raster of class ids (255 = unlabelled), same shape (and,
            when both are georeferenced, same transform) as the image; only band 1 is read.
        bands: 1-based image bands to read, in order; None reads all.
        label_map: Label values to class ids.

    Raises:
        SourceNotFoundError: If a file does not exist.
        SourceReadError: If a file cannot be read as a raster.
        ConfigError: If the grids differ or a band is out of range (values are checked as they are read).
    """
    source = open_source(str(image_path))
    selected = select_bands(source, bands, str(image_path))
    with open_raster(labels_path, "labels") as src:
        if (src.height, src.width) != (source.height, source.width):
            raise ConfigError(
                f"Labels {str(labels_path)!r} are {src.height} x {src.width} pixels but image "
                f"{str(image_path)!r} is {source.height} x {source.width}; the label raster must "
                "be on the image's grid (rasterise or resample it onto the image first)."
            )
        image_transform = source.transform
        moved = image_transform is not None and source.crs is not None and src.crs is not None and (
            src.crs != CRS.from_user_input(source.crs) or not src.transform.almost_equals(image_transform))
        if moved:
            raise ConfigError(
                f"Labels {str(labels_path)!r} ({src.crs}, {tuple(src.transform)[:6]}) and image "
                f"{str(image_path)!r} ({source.crs}, {tuple(image_transform)[:6]}) have the same "  # type: ignore[arg-type]
                "shape but different georeferencing; put both on the same grid."
            )
    truth = RasterTruth(str(labels_path), (source.height, source.width), label_map)
    return LabelledImage(source, truth, selected, source.pixel_size("m"), "m", str(labels_path))


@dataclass(frozen=True)
class AreaSplit:
    """Rows ``[0, val_start)`` are training, ``[val_start, holdout_start)`` validation, the rest holdout.

    Attributes:
        height: Rows of the raster.
        width: Columns of the raster.
        val_start: First validation row.
        holdout_start: First holdout row (``height`` when there is no holdout band).
    """

    height: int
    width: int
    val_start: int
    holdout_start: int

    @property
    def train(self) -> slice:
        """Row slice of the training area."""
        return slice(0, self.val_start)

    @property
    def val(self) -> slice:
        """Row slice of the validation area."""
        return slice(self.val_start, self.holdout_start)

    @property
    def holdout(self) -> slice:
        """Row slice of the holdout area (empty without one): never trained on nor used to choose a model."""
        return slice(self.holdout_start, self.height)


def split_by_area(
    height: int, width: int, val_fraction: float, window: int, holdout_fraction: float = 0.0
) -> AreaSplit:
    """Split a raster into bands of rows: training at the top, then validation, then holdout.

    The bands depend only on the raster's size and the fractions, so the holdout of a raster stays
    the same from run to run (the nightly job compares models on it).

    Args:
        height: Rows of the raster.
        width: Columns of the raster.
        val_fraction: Share of the rows that is validation, strictly between 0 and 1.
        window: Side of the square training windows; the training band must fit one.
        holdout_fraction: Share of the rows at the bottom kept for the final comparison, 0 for none.

    Returns:
        The split; the validation band (and the holdout band, when asked for) has at least one row.

    Raises:
        ConfigError: If a fraction is out of range or the training band is too small.
    """
    for name, value, low_ok in (("val_fraction", val_fraction, False), ("holdout_fraction", holdout_fraction, True)):
        if not (value >= 0 if low_ok else value > 0) or not value < 1:
            raise ConfigError(
                f"{name}={value!r} is invalid; expected a share of the rows from {'0' if low_ok else 'above 0'} "
                "to below 1, e.g. 0.2 for a fifth of the raster's rows."
            )
    holdout_rows = max(1, round(height * holdout_fraction)) if holdout_fraction > 0 else 0
    val_rows = max(1, round(height * val_fraction))
    train_rows = height - val_rows - holdout_rows
    if train_rows < window or width < window:
        raise ConfigError(
            f"The training area is {max(train_rows, 0)} x {width} pixels (a {height} x {width} raster less "
            f"{val_rows} validation and {holdout_rows} holdout rows), smaller than one {window} x {window} "
            "training window; lower tile_size, val_fraction or holdout_fraction, or use a larger raster."
        )
    return AreaSplit(height=height, width=width, val_start=train_rows, holdout_start=train_rows + val_rows)


def sample_pixels(image: LabelledImage, rows: slice, most: int = _STATISTICS_PIXELS) -> np.ndarray:
    """At most about `most` pixels of a band of rows, as (C, 1, N) raw values.

    A small area is read whole and subsampled on a regular grid; a large one is read as a 16 x 16 grid
    of windows spread over it, so the read is bounded whatever the image's size.
    """
    height, width = rows.stop - rows.start, image.width
    if height * width <= 4 * most:
        values = image.values(rows.start, 0, height, width)
        step = max(1, math.isqrt(height * width // most))
        return values[:, ::step, ::step].reshape(values.shape[0], 1, -1)
    side = max(1, math.isqrt(most // _STATISTICS_WINDOWS**2))
    wh, ww = min(side, height), min(side, width)
    ys = np.linspace(rows.start, rows.stop - wh, _STATISTICS_WINDOWS).astype(int)
    xs = np.linspace(0, width - ww, _STATISTICS_WINDOWS).astype(int)
    windows = [image.values(int(y), int(x), wh, ww) for y in ys for x in xs]
    return np.stack(windows, axis=1).reshape(len(image.bands), 1, -1)


def compute_normalization(image: np.ndarray) -> Normalization:
    """Per-band normalisation statistics of (a sample of) an image.

    uint8 data are scaled by 1/255; any other dtype by 1 / (largest absolute value), so that
    scaled values lie in [-1, 1] whatever the sensor's range. Mean and std are then taken per band
    on a regular subsample of at most a million pixels. A constant band gets std 1.

    Args:
        image: (C, H, W) raw values (`sample_pixels` gives (C, 1, N)).

    Returns:
        The normalisation to store in the model bundle.

    Raises:
        ConfigError: If the image is empty or not finite.
    """
    if image.ndim != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ConfigError(f"Cannot compute normalisation of an image of shape {image.shape}.")
    step = max(1, math.isqrt(image.shape[1] * image.shape[2] // _STATISTICS_PIXELS))
    sample = image[:, ::step, ::step].reshape(image.shape[0], -1).astype(np.float64)
    if not np.isfinite(sample).all():
        raise ConfigError("The training image holds NaN or infinite values; mask or fill them first.")
    if image.dtype == np.uint8:
        scale = 1 / 255
    else:
        peak = float(np.abs(sample).max())
        scale = 1 / peak if peak > 0 else 1.0
    sample *= scale
    std = sample.std(axis=1)
    return Normalization(
        scale=scale,
        mean=tuple(float(m) for m in sample.mean(axis=1)),
        std=tuple(float(s) if s > 1e-6 else 1.0 for s in std),
    )


def index_cell(window: int) -> int:
    """The class index's cell for training windows of `window` px: a quarter of the window (so that a
    window placed around a point of a cell holds most of that cell), from 8 to 64 px."""
    return max(8, min(64, window // 4))


@dataclass(frozen=True)
class AreaIndex:
    """How many pixels of each label value lie in each cell of a band of rows: built in one pass.

    Attributes:
        rows: The band of rows of the image it covers.
        cell: Cell side in pixels; cells start at ``rows.start`` and column 0.
        values: (V,) uint8: the label values present (255, unlabelled, among them if there is any).
        counts: (cell rows, cell columns, V) uint16 pixel counts.
    """

    rows: slice
    cell: int
    values: np.ndarray
    counts: np.ndarray

    def totals(self) -> np.ndarray:
        """(256,) int64: pixels of each label value in the area."""
        out = np.zeros(256, np.int64)
        out[self.values] = self.counts.sum(axis=(0, 1), dtype=np.int64)
        return out

    @classmethod
    def build(cls, truth: Truth, rows: slice, width: int, cell: int = 64, cache: bool = True) -> AreaIndex:
        """The index of `rows` (all `width` columns) of a truth, from tessera's cache when the same truth was
        indexed before.

        The truth is read in 1024 px tiles, so building it takes the memory of one tile whatever the
        image's size; the index itself holds two bytes per label value per cell (`cell` from 1 to 128 px:
        `index_cell` picks it for a window size).

        Raises:
            ConfigError: a truth value that is not a class id (as `truth.as_class_ids`).
        """
        if not 1 <= cell <= 128:
            raise ValueError(f"cell={cell}: expected 1 to 128 px (its counts are 16-bit)")
        rows = slice(rows.start, max(rows.start, rows.stop))
        name = f"v{_INDEX_FORMAT}-{truth.key}-{rows.start}-{rows.stop}-{width}-{cell}.npz"
        path = cache_folder("class-index") / name
        cells = (-(-(rows.stop - rows.start) // cell), -(-width // cell))
        if cache and path.is_file():
            try:
                with np.load(path) as saved:
                    values, counts = saved["values"], saved["counts"]
                if counts.shape == (*cells, len(values)):
                    return cls(rows, cell, values, counts)
            except Exception:  # a damaged or foreign file: built again and replaced
                pass
        index = cls._scan(truth, rows, width, cell)
        if cache:
            partial = path.with_name(f".{uuid.uuid4().hex}.npz")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(partial, values=index.values, counts=index.counts)
                os.replace(partial, path)  # whole or not at all, when two workers build it at once
            except OSError:  # a read-only or full cache: the next run builds it again
                with contextlib.suppress(OSError):
                    partial.unlink()
        return index

    @classmethod
    def _scan(cls, truth: Truth, rows: slice, width: int, cell: int) -> AreaIndex:
        height = rows.stop - rows.start
        cells = (-(-height // cell), -(-width // cell))
        values: list[int] = []
        counts = np.zeros((*cells, 0), np.uint16)
        tile = max(cell, _INDEX_TILE // cell * cell)
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                h, w = min(tile, height - y), min(tile, width - x)
                labels = truth.read(rows.start + y, x, h, w)
                ch, cw = -(-h // cell), -(-w // cell)
                ids = (np.arange(h)[:, None] // cell * cw + np.arange(w)[None, :] // cell) * 256 + labels
                tally = np.bincount(ids.ravel(), minlength=ch * cw * 256).reshape(ch, cw, 256)
                for value in np.flatnonzero(tally.sum(axis=(0, 1))):
                    if value not in values:
                        values.append(int(value))
                        counts = np.concatenate([counts, np.zeros((*cells, 1), np.uint16)], axis=2)
                counts[y // cell : y // cell + ch, x // cell : x // cell + cw] += tally[..., values].astype(np.uint16)
        order = np.argsort(values)
        return cls(rows, cell, np.asarray(values, np.uint8)[order], counts[..., order])


class WindowSampler:
    """Random top-left corners of square windows that lie wholly inside the training band.

    With an `index` of the training band, a share `balance` of the windows is class-balanced: a class
    is drawn uniformly among those present, then a pixel of that class (a cell in proportion to its
    pixels of the class, then one of them, read from `truth`), and the window is placed at random
    around that pixel. Rare classes (a few per cent of buildings) are then seen as often as common
    ones; the rest of the windows are uniform, so the background's variety is kept.

    Args:
        split: The area split.
        window: Window side in pixels.
        rng: Source of randomness.
        index: The class index of the training band (``split.train``), or None for uniform windows only.
        balance: Share of class-balanced windows, 0..1.
        truth: The image's truth, to find the class's pixels in a cell; None takes any point of the cell.
    """

    def __init__(
        self, split: AreaSplit, window: int, rng: np.random.Generator, index: AreaIndex | None = None,
        balance: float = 0.0, truth: Truth | None = None,
    ) -> None:
        if split.val_start < window or split.width < window:
            raise ConfigError(
                f"A {window} px window does not fit the {split.val_start} x {split.width} training "
                "area; lower tile_size."
            )
        if not 0 <= balance <= 1:
            raise ConfigError(f"balance={balance!r} is invalid; expected a share from 0 to 1.")
        self.split = split
        self.window = window
        self.rng = rng
        self.balance = balance if index is not None else 0.0
        self.cell = index.cell if index is not None else 1
        self.origin = index.rows.start if index is not None else 0
        self.truth = truth
        self.index = index
        # Per class present: its value, its column in the index, and the running sum of its pixels over the
        # rows of cells. A cell is drawn in two steps (a row of cells by bisecting this sum, then a cell of
        # that row in proportion to its pixels of the class), so nothing the size of the index is added.
        self.classes: list[tuple[int, int, np.ndarray]] = []
        if index is not None:
            for k, value in enumerate(index.values):
                by_row = index.counts[..., k].sum(axis=1, dtype=np.int64)
                if value != IGNORE_INDEX and by_row.any():
                    self.classes.append((int(value), k, np.cumsum(by_row)))

    def sample(self, count: int) -> np.ndarray:
        """(count, 2) int64 (row, col) corners; every window ends at or above ``val_start``."""
        last_row, last_col = self.split.val_start - self.window, self.split.width - self.window
        rows = self.rng.integers(0, last_row, count, endpoint=True)
        cols = self.rng.integers(0, last_col, count, endpoint=True)
        if self.classes and self.index is not None:
            balanced = np.flatnonzero(self.rng.random(count) < self.balance)
            for i in balanced:
                value, k, running = self.classes[self.rng.integers(len(self.classes))]
                cy = int(np.searchsorted(running, self.rng.integers(running[-1]), side="right"))
                row = np.cumsum(self.index.counts[cy, :, k], dtype=np.int64)
                cx = int(np.searchsorted(row, self.rng.integers(row[-1]), side="right"))
                y, x = self._pixel_of(value, cy, cx)
                rows[i] = np.clip(y - self.rng.integers(self.window), 0, last_row)
                cols[i] = np.clip(x - self.rng.integers(self.window), 0, last_col)
        return np.stack([rows, cols], axis=1)

    def _pixel_of(self, value: int, cy: int, cx: int) -> tuple[int, int]:
        """A pixel of class `value` in cell (cy, cx) of the training band, drawn uniformly."""
        y0, x0 = self.origin + cy * self.cell, cx * self.cell
        h, w = min(self.cell, self.split.val_start - y0), min(self.cell, self.split.width - x0)
        found = np.flatnonzero(self.truth.read(y0, x0, h, w) == value) if self.truth is not None else np.empty(0)
        if not found.size:  # no truth given (or a scaled one that rounds a cell's edge otherwise): any point
            return y0 + int(self.rng.integers(h)), x0 + int(self.rng.integers(w))
        dy, dx = divmod(int(found[self.rng.integers(len(found))]), w)
        return y0 + dy, x0 + dx


class WindowBatches(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """An endless stream of augmented, normalised training batches.

    Each batch holds ``batch_size`` windows of the training band, placed by a `WindowSampler`
    (class-balanced for a share ``balance`` of them), read from the image, then augmented by an
    `Augmenter`: a random symmetry of the square, elastic deformation with probability ``elastic``,
    colour jitter, and the normalisation.

    Args:
        image: The labelled image.
        split: Its area split; only rows above ``split.val_start`` are read.
        normalization: Turns raw values into model input.
        window: Window side in pixels.
        batch_size: Windows per batch.
        rng: Source of randomness (positions and, through derived seeds, the augmentation).
        jitter: Brightness and contrast jitter strength, 0 for none.
        elastic: Probability of an elastic deformation per window.
        balance: Share of class-balanced windows.
        index: The class index of the training band, needed for `balance`.

    Yields:
        (N, C, window, window) float32 inputs and (N, window, window) int64 labels.
    """

    def __init__(
        self,
        image: LabelledImage,
        split: AreaSplit,
        normalization: Normalization,
        window: int,
        batch_size: int,
        rng: np.random.Generator,
        jitter: float = 0.0,
        elastic: float = 0.0,
        balance: float = 0.0,
        index: AreaIndex | None = None,
    ) -> None:
        self.image = image
        self.window = window
        self.batch_size = batch_size
        self.rng = rng
        self.sampler = WindowSampler(split, window, rng, index=index if balance else None, balance=balance,
                                     truth=image.truth)
        self.augment = Augmenter(normalization, jitter=jitter, elastic=elastic)

    def reseed(self, rng: np.random.Generator) -> None:
        """Draw positions and augmentations from `rng` from now on."""
        self.rng = self.sampler.rng = rng

    def reopened(self) -> WindowBatches:
        """A copy reading through file handles of its own (in a forked loader process); the class index,
        the sampler and the augmentation are shared, not copied."""
        batches = copy.copy(self)
        batches.image = self.image.reopened()
        batches.sampler = copy.copy(self.sampler)
        batches.sampler.truth = batches.image.truth
        return batches

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.window
        windows = [self.image.read(int(r), int(c), size, size) for r, c in self.sampler.sample(self.batch_size)]
        raw = np.stack([w[0] for w in windows])
        labels = np.stack([w[1] for w in windows])
        with torch.random.fork_rng(devices=[]):  # kornia draws from torch's generator: seed it from ours
            torch.manual_seed(int(self.rng.integers(2**62)))
            return self.augment(torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))
