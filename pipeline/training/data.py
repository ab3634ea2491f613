"""Training data: a labelled raster, its train/validation split, window sampling, augmentation.

This minimal trainer reads the whole image and label raster into memory, which bounds it to
rasters that fit in RAM (a 10 000 x 10 000 RGB uint8 image with its labels takes about 400 MB);
larger data needs windowed reads, which a distributed trainer will add behind the same pieces.

The split is by area: the bottom ``val_fraction`` of the rows is validation, the rest training.
Training windows are sampled inside the training rows only, so no training window ever sees a
validation pixel (neither its image nor its labels), and validation is inferred from the
validation rows alone, reflect-padded at their edges.

Example (it needs the two rasters, so it is not a doctest)::

    raster = read_labelled_raster("scene.tif", "labels.tif")
    split = split_by_area(raster.height, raster.width, val_fraction=0.2, window=256)
    normalization = compute_normalization(raster.image[:, split.train])
    batches = WindowBatches(raster, split, normalization, window=256, batch_size=8,
                            rng=np.random.default_rng(0))
    x, y = next(batches)  # (8, C, 256, 256) float32 normalised, (8, 256, 256) int64
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioIOError

from pipeline.errors import ConfigError, SourceNotFoundError, SourceReadError
from pipeline.models import Normalization
from pipeline.storage import Location, storage_for
from pipeline.storage.gdal import configure_for
from pipeline.training.augment import Augmenter
from pipeline.training.metrics import IGNORE_INDEX

__all__ = [
    "AreaSplit",
    "LabelledRaster",
    "WindowBatches",
    "WindowSampler",
    "compute_normalization",
    "read_labelled_raster",
    "split_by_area",
]

_STATISTICS_PIXELS = 1_000_000  # per band; enough for a mean/std to three digits


@dataclass(frozen=True, eq=False)
class LabelledRaster:
    """An image and its per-pixel labels, in memory, on the same grid.

    Attributes:
        image: (C, H, W) raw values of the selected bands, in the file's dtype.
        labels: (H, W) uint8 class ids; 255 marks unlabelled pixels.
        bands: The 1-based band indices of ``image`` in the source file.
        resolution: Pixel size in ``resolution_unit``, or None when the file does not define it.
        resolution_unit: "m" for georeferenced rasters, "um" for slides.
    """

    image: np.ndarray
    labels: np.ndarray
    bands: tuple[int, ...]
    resolution: float | None
    resolution_unit: str = "m"

    @property
    def height(self) -> int:
        """Rows."""
        return int(self.labels.shape[0])

    @property
    def width(self) -> int:
        """Columns."""
        return int(self.labels.shape[1])


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


def read_labelled_raster(
    image_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
) -> LabelledRaster:
    """Read an image and its label raster fully into memory and check they share a grid.

    Args:
        image_path: Any raster rasterio reads (GeoTIFF, COG...).
        labels_path: Single-band integer raster of class ids (255 = unlabelled), same shape (and,
            when both are georeferenced, same transform) as the image; only band 1 is read.
        bands: 1-based image bands to read, in order; None reads all.

    Returns:
        The raster, with the pixel size in metres when the image has a projected CRS.

    Raises:
        SourceNotFoundError: If a file does not exist.
        SourceReadError: If a file cannot be read as a raster.
        ConfigError: If the grids differ, a band is out of range, or labels are not integers in
            0..255.
    """
    with _open(image_path, "image") as src:
        count = src.count
        selected = tuple(range(1, count + 1)) if bands is None else tuple(bands)
        bad = [b for b in selected if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= count]
        if not selected or bad:
            raise ConfigError(
                f"bands={list(selected)} is invalid for {str(image_path)!r}, which has {count} "
                f"band(s); give 1-based indices from 1 to {count}, or leave bands unset for all."
            )
        image = src.read(list(selected))
        image_transform, image_crs = src.transform, src.crs
        resolution = _resolution_in_metres(src)
    with _open(labels_path, "labels") as src:
        if src.shape != image.shape[1:]:
            raise ConfigError(
                f"Labels {str(labels_path)!r} are {src.height} x {src.width} pixels but image "
                f"{str(image_path)!r} is {image.shape[1]} x {image.shape[2]}; the label raster must "
                "be on the image's grid (rasterise or resample it onto the image first)."
            )
        moved = src.crs != image_crs or not src.transform.almost_equals(image_transform)
        if src.crs and image_crs and moved:
            raise ConfigError(
                f"Labels {str(labels_path)!r} ({src.crs}, {tuple(src.transform)[:6]}) and image "
                f"{str(image_path)!r} ({image_crs}, {tuple(image_transform)[:6]}) have the same "
                "shape but different georeferencing; put both on the same grid."
            )
        labels = src.read(1)
    return LabelledRaster(
        image=image, labels=as_class_ids(labels, labels_path), bands=selected, resolution=resolution
    )


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


def compute_normalization(image: np.ndarray) -> Normalization:
    """Per-band normalisation statistics of (a training area of) an image.

    uint8 data are scaled by 1/255; any other dtype by 1 / (largest absolute value), so that
    scaled values lie in [-1, 1] whatever the sensor's range. Mean and std are then taken per band
    on a regular subsample of at most a million pixels. A constant band gets std 1.

    Args:
        image: (C, H, W) raw values.

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


class WindowSampler:
    """Random top-left corners of square windows that lie wholly inside the training band.

    With `labels`, a share `balance` of the windows is class-balanced: a class is drawn uniformly
    among those present in the training band, then a pixel of that class, and the window is placed
    at random around that pixel. Rare classes (a few per cent of buildings) are then seen as often
    as common ones; the rest of the windows are uniform, so the background's variety is kept.

    Args:
        split: The area split.
        window: Window side in pixels.
        rng: Source of randomness.
        labels: (H, W) class ids of the whole raster, or None for uniform windows only.
        balance: Share of class-balanced windows, 0..1.
    """

    _STRIDE = 4  # class pixels are indexed on a 4 px grid: 1/16 of the memory, windows are far larger

    def __init__(
        self, split: AreaSplit, window: int, rng: np.random.Generator, labels: np.ndarray | None = None,
        balance: float = 0.0,
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
        self.balance = balance if labels is not None else 0.0
        self.class_pixels: list[np.ndarray] = []
        if labels is not None:
            grid = labels[: split.val_start : self._STRIDE, :: self._STRIDE]
            for c in np.unique(grid):
                if c != IGNORE_INDEX:
                    self.class_pixels.append(np.argwhere(grid == c) * self._STRIDE)

    def sample(self, count: int) -> np.ndarray:
        """(count, 2) int64 (row, col) corners; every window ends at or above ``val_start``."""
        last_row, last_col = self.split.val_start - self.window, self.split.width - self.window
        rows = self.rng.integers(0, last_row, count, endpoint=True)
        cols = self.rng.integers(0, last_col, count, endpoint=True)
        if self.class_pixels:
            balanced = np.flatnonzero(self.rng.random(count) < self.balance)
            for i in balanced:
                pixels = self.class_pixels[self.rng.integers(len(self.class_pixels))]
                y, x = pixels[self.rng.integers(len(pixels))]
                rows[i] = np.clip(y - self.rng.integers(self.window), 0, last_row)
                cols[i] = np.clip(x - self.rng.integers(self.window), 0, last_col)
        return np.stack([rows, cols], axis=1)


class WindowBatches(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """An endless stream of augmented, normalised training batches.

    Each batch holds ``batch_size`` windows of the training band, placed by a `WindowSampler`
    (class-balanced for a share ``balance`` of them), then augmented by an `Augmenter`: a random
    symmetry of the square, elastic deformation with probability ``elastic``, colour jitter, and the
    normalisation.

    Args:
        raster: The labelled raster.
        split: Its area split; only rows above ``split.val_start`` are read.
        normalization: Turns raw values into model input.
        window: Window side in pixels.
        batch_size: Windows per batch.
        rng: Source of randomness (positions and, through derived seeds, the augmentation).
        jitter: Brightness and contrast jitter strength, 0 for none.
        elastic: Probability of an elastic deformation per window.
        balance: Share of class-balanced windows.

    Yields:
        (N, C, window, window) float32 inputs and (N, window, window) int64 labels.
    """

    def __init__(
        self,
        raster: LabelledRaster,
        split: AreaSplit,
        normalization: Normalization,
        window: int,
        batch_size: int,
        rng: np.random.Generator,
        jitter: float = 0.0,
        elastic: float = 0.0,
        balance: float = 0.0,
    ) -> None:
        self.raster = raster
        self.window = window
        self.batch_size = batch_size
        self.rng = rng
        self.sampler = WindowSampler(split, window, rng, labels=raster.labels if balance else None, balance=balance)
        self.augment = Augmenter(normalization, jitter=jitter, elastic=elastic)

    def reseed(self, rng: np.random.Generator) -> None:
        """Draw positions and augmentations from `rng` from now on."""
        self.rng = self.sampler.rng = rng

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.window
        corners = self.sampler.sample(self.batch_size)
        raw = np.stack([self.raster.image[:, r : r + size, c : c + size] for r, c in corners])
        labels = np.stack([self.raster.labels[r : r + size, c : c + size] for r, c in corners])
        with torch.random.fork_rng(devices=[]):  # kornia draws from torch's generator: seed it from ours
            torch.manual_seed(int(self.rng.integers(2**62)))
            return self.augment(torch.from_numpy(raw.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))


def _open(path: str | os.PathLike[str], role: str) -> rasterio.DatasetReader:
    """Open a raster, local or on object storage (read through GDAL's /vsis3/), mapping rasterio's errors
    onto tessera's."""
    location = Location.parse(path)
    if not storage_for(location).exists(location):
        raise SourceNotFoundError(
            f"The {role} raster {str(path)!r} does not exist; check the path (relative paths are "
            f"relative to {os.getcwd()!r})."
        )
    configure_for(location.url)
    try:
        return rasterio.open(location.url)
    except RasterioIOError as exc:
        raise SourceReadError(
            f"The {role} raster {str(path)!r} cannot be read ({exc}); expected a GeoTIFF or "
            "another format GDAL reads."
        ) from exc


def _resolution_in_metres(src: rasterio.DatasetReader) -> float | None:
    """The pixel size in metres, or None without a projected CRS (pixels in degrees or unknown)."""
    if src.crs is None or not src.crs.is_projected:
        return None
    _, metres_per_unit = src.crs.linear_units_factor
    # Non-square pixels: the side of the square of equal area.
    return float(math.sqrt(abs(src.transform.determinant)) * metres_per_unit)


def as_label_map(value: Mapping[Any, Any]) -> dict[int, int]:
    """`label_map` as label value -> class id, both in 0..255 (keys may come as strings from the command line).

    Raises:
        ConfigError: a key or value that is not an integer in 0..255.
    """
    try:
        mapping = {int(k): int(v) for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"label_map={value!r} is invalid; expected label values to class ids, e.g. "
                          f"label_map={{{IGNORE_INDEX}: 1}}.") from None
    bad = {k: v for k, v in mapping.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
    if bad:
        raise ConfigError(f"label_map entries {bad} are out of range; values and class ids are 0..255 "
                          f"({IGNORE_INDEX}: unlabelled).")
    return mapping


def map_labels(labels: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """uint8 `labels` with `label_map` applied (values not in it are kept)."""
    if not label_map:
        return labels
    table = np.arange(256, dtype=np.uint8)
    for value, class_id in label_map.items():
        table[value] = class_id
    return table[labels]


def label_values(path: str, label_map: Mapping[int, int] | None = None) -> np.ndarray:
    """The label values a label raster holds, `label_map` applied, read block by block (in bounded memory).

    Raises:
        ConfigError: values that are not class ids (as :func:`as_class_ids`).
    """
    counts = np.zeros(256, np.int64)
    with _open(path, "labels") as src:
        for _, window in src.block_windows(1):
            counts += np.bincount(as_class_ids(src.read(1, window=window), path).ravel(), minlength=256)
    return np.unique(map_labels(np.flatnonzero(counts).astype(np.uint8), label_map))


def as_class_ids(labels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Labels as uint8, or ConfigError if they are not integers in 0..255."""
    if labels.dtype == np.uint8:
        return labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"Labels {str(path)!r} have dtype {labels.dtype}; expected integer class ids (uint8, "
            f"with {IGNORE_INDEX} for unlabelled pixels)."
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > 255:
        raise ConfigError(
            f"Labels {str(path)!r} hold values {low}..{high}; expected class ids 0..254 and "
            f"{IGNORE_INDEX} for unlabelled pixels."
        )
    return labels.astype(np.uint8)
