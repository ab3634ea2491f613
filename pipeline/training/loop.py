"""The single-process training loop: fit a model on a labelled raster, keep the best bundle.

:func:`train` reads the raster (see :mod:`pipeline.training.data` for the in-memory limit), splits
it by area, derives the normalisation from the training band, builds a fresh model from the
registry, and runs AdamW with a one-cycle learning-rate schedule on random augmented windows.
Every ``val_every`` steps, and after the last, the whole validation band is inferred tile by tile
and its mean IoU computed; whenever it beats the best so far, the bundle is saved to
``config.output``, so the file always holds the best model seen.

Window size versus bundle tile size: the model learns on ``tile_size`` windows (small windows
make more, cheaper, more varied steps), while the bundle records ``inference_tile_size`` and
``overlap`` as the defaults for tiled inference. The models are fully convolutional, so they run
on larger tiles than they were trained on. 512 px tiles with 64 px overlap recompute the same
share of pixels as 256/32 (about 23%), but their margin is twice as wide, so more of each tile's
border, where the model sees the least context, is blended away; and fewer, larger tiles keep an
accelerator busier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.models import BundleSpec, ClassInfo, ModelBundle, Normalization
from pipeline.synthetic import CLASSES as SYNTHETIC_CLASSES
from pipeline.training.catalog import LabelledPair, read_pair
from pipeline.training.data import (
    LabelledRaster,
    WindowBatches,
    compute_normalization,
    read_labelled_raster,
    split_by_area,
)
from pipeline.training.losses import SegmentationLoss
from pipeline.training.metrics import IGNORE_INDEX, SegmentationMetrics

__all__ = ["DEFAULT_ARCH_ARGS", "TrainConfig", "TrainResult", "balanced_weights", "predict_area", "train"]

DEFAULT_ARCH_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "encoder_name": "tu-mobilenetv3_small_100",
        "encoder_depth": 3,
        "decoder_channels": (32, 16, 8),
    }
)
"""``arch_args`` of the default U-Net: a MobileNetV3-small encoder cut after stride 8 and a slim
decoder, small enough to learn the synthetic scene in a couple of CPU minutes."""

_TILE_MULTIPLE = 32


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; validated on construction.

    Attributes:
        image: Image raster path.
        labels: Label raster path (class ids, 255 unlabelled), on the image's grid.
        output: Where the best model bundle is written (replaced if it exists).
        polygons: GeoJSON of class polygons in any CRS, in place of ``labels`` (rasterised onto
            the image's grid; every polygon is class 1 unless ``classes`` and the catalog say more).
        architecture: A registry name, e.g. ``"unet"`` or ``"unet3plus"``.
        arch_args: Keyword arguments of the architecture (not in_channels/classes); None takes
            ``DEFAULT_ARCH_ARGS`` for ``"unet"`` and the registry's defaults for the others.
        classes: One ClassInfo per class id; None takes the synthetic scene's five classes when
            the labels fit them, else generic names and colours.
        bands: 1-based image bands to train on; None takes all.
        tile_size: Side of the square training windows, a multiple of 32.
        inference_tile_size: Default tile side for inference stored in the bundle (and the tile
            used for validation), a multiple of 32.
        overlap: Default inference overlap stored in the bundle, 0..inference_tile_size / 2.
        batch_size: Windows per step.
        steps: Optimiser steps.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        val_fraction: Share of the raster's rows, below the training band, used for validation only.
        holdout_fraction: Share of the rows at the bottom never trained on nor used to pick the
            best model; the best model is scored there at the end (0: no holdout).
        val_every: Validate every this many steps (and after the last step).
        jitter: Brightness and contrast jitter strength (0.1: +-10%).
        elastic: Probability of an elastic deformation per training window.
        balance: Share of class-balanced training windows (centred on a pixel of a class drawn
            uniformly among those present).
        loss: A preset of `pipeline.training.losses.LOSS_PRESETS` or a mapping of terms to weights.
        class_weights: Per-class loss weights, "balanced" (inverse frequency in the training band,
            scaled to mean 1), or None for equal weights.
        seed: Seeds window sampling, augmentation and model initialisation.
        threads: torch CPU threads during training; None leaves torch's setting alone.
    """

    image: str
    labels: str | None
    output: str
    polygons: str | None = None
    architecture: str = "unet"
    arch_args: Mapping[str, Any] | None = None
    classes: tuple[ClassInfo, ...] | None = None
    bands: tuple[int, ...] | None = None
    tile_size: int = 128
    inference_tile_size: int = 512
    overlap: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 5e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    holdout_fraction: float = 0.0
    val_every: int = 50
    jitter: float = 0.1
    elastic: float = 0.25
    balance: float = 0.5
    loss: str | Mapping[str, float] = "ce_dice"
    class_weights: str | tuple[float, ...] | None = None
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.polygons is None):
            raise ConfigError("Give exactly one of labels (a label raster) and polygons (GeoJSON) for the image.")
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            raise ConfigError(f"class_weights={self.class_weights!r} is invalid; use 'balanced', a list, or null.")
        SegmentationLoss(self.loss)  # unknown presets and terms fail here, before any data is read
        for name in ("tile_size", "inference_tile_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % _TILE_MULTIPLE:
                raise ConfigError(
                    f"{name}={value!r} is invalid; expected a positive multiple of "
                    f"{_TILE_MULTIPLE} (encoders downsample by up to 32), e.g. 256."
                )
        if not _is_int(self.overlap) or not 0 <= 2 * self.overlap <= self.inference_tile_size:
            raise ConfigError(
                f"overlap={self.overlap!r} is invalid; expected an integer from 0 to "
                f"inference_tile_size / 2 = {self.inference_tile_size // 2}."
            )
        for name in ("batch_size", "steps", "val_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid; expected an integer >= 1.")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r} is invalid; expected an integer >= 1 or None.")
        for name in ("lr", "weight_decay", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ConfigError(f"{name}={value!r} is invalid; expected a finite number >= 0.")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} is invalid; expected a learning rate > 0, e.g. 5e-3.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"val_fraction={self.val_fraction!r} is invalid; expected a number strictly "
                "between 0 and 1, e.g. 0.2."
            )
        for name in ("elastic", "balance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"{name}={value!r} is invalid; expected a probability from 0 to 1.")
        if isinstance(self.holdout_fraction, bool) or not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction={self.holdout_fraction!r} is invalid; expected 0 (none) to below 1.")
        if self.val_fraction + self.holdout_fraction >= 1:
            raise ConfigError(
                f"val_fraction {self.val_fraction} and holdout_fraction {self.holdout_fraction} leave no training "
                "rows; keep their sum well below 1, e.g. 0.2 and 0.2."
            )
        if self.arch_args is None:
            default = DEFAULT_ARCH_ARGS if self.architecture == "unet" else {}
            object.__setattr__(self, "arch_args", dict(default))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        bundle_path: The bundle file (the best model by validation mIoU).
        sha256: Hex SHA-256 of that file.
        history: One entry per validation: step, loss (mean training loss since the previous
            entry), val_miou, lr and seconds since the start.
        val_miou: Best validation mean IoU.
        val_iou: Per-class validation IoU of the best model (NaN for classes absent from both the
            validation truth and the prediction).
        seconds: Wall time of the whole run.
        holdout: The best model's scores on the holdout band (miou, iou and dice per class,
            pixel_accuracy), or None without a holdout.
    """

    bundle_path: str
    sha256: str
    history: list[dict[str, float]]
    val_miou: float
    val_iou: tuple[float, ...]
    seconds: float
    holdout: dict[str, Any] | None = None


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a segmentation model on a labelled raster and save the best bundle.

    Args:
        config: What to train on, which model and how long.
        progress: Show a progress bar (on stderr) with the loss and validation mIoU.

    Returns:
        Where the bundle went, its hash, the validation history and the best scores.

    Raises:
        SourceNotFoundError: If the image or label raster does not exist.
        SourceReadError: If one cannot be read.
        ConfigError: If the rasters do not match, the config is inconsistent with the data, or the
            model cannot be built.

    Example:
        >>> result = train(TrainConfig(image="scene.tif", labels="labels.tif",
        ...                            output="model.bundle"))  # doctest: +SKIP
        >>> result.val_miou  # doctest: +SKIP
        0.83
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        # A private RNG state: seeding must not change the caller's torch random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _Run(config, progress, start).fit()
    finally:
        torch.set_num_threads(threads)


class _Run:
    """One training run's state: data, model, optimiser and the best score so far."""

    def __init__(self, config: TrainConfig, progress: bool, start: float) -> None:
        self.config = config
        self.progress = progress
        self.start = start
        rng = np.random.default_rng(config.seed)
        self.raster, classes = _read(config)
        self.split = split_by_area(
            self.raster.height, self.raster.width, config.val_fraction, config.tile_size, config.holdout_fraction
        )
        _check_labelled(self.raster, self.split.train, "training")
        _check_labelled(self.raster, self.split.val, "validation")
        if config.holdout_fraction:
            _check_labelled(self.raster, self.split.holdout, "holdout")
        normalization = compute_normalization(self.raster.image[:, self.split.train])
        spec = BundleSpec(
            architecture=config.architecture,
            arch_args=config.arch_args or {},
            classes=classes,
            bands=self.raster.bands,
            normalization=normalization,
            resolution=self.raster.resolution,
            resolution_unit="m" if self.raster.resolution is not None else None,
            tile_size=config.inference_tile_size,
            overlap=config.overlap,
        )
        self.bundle = ModelBundle.create(spec)
        self.batches = WindowBatches(
            self.raster, self.split, normalization, config.tile_size, config.batch_size, rng,
            jitter=config.jitter, elastic=config.elastic, balance=config.balance,
        )
        weights = config.class_weights
        if isinstance(weights, str):  # "balanced", checked in TrainConfig
            weights = balanced_weights(self.raster.labels[self.split.train], len(classes))
        elif weights is not None and (len(weights) != len(classes) or not all(0 <= w < math.inf for w in weights)):
            raise ConfigError(f"class_weights {list(weights)} are invalid; give one number >= 0 per class, "
                              f"{len(classes)} in all ({[c.name for c in classes]}), or 'balanced'.")
        self.loss = SegmentationLoss(config.loss, class_weights=weights)
        self.optimizer = torch.optim.AdamW(
            self.bundle.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.15
        )
        self.history: list[dict[str, float]] = []
        self.best_miou = -math.inf
        self.best_iou: tuple[float, ...] = ()
        self.sha256 = ""

    def fit(self) -> TrainResult:
        """Run every step, validating on schedule; return the result."""
        config = self.config
        model = self.bundle.model
        losses: list[float] = []
        bar = tqdm(range(1, config.steps + 1), desc="train", disable=not self.progress, unit="step")
        for step in bar:
            model.train()
            x, y = next(self.batches)
            loss = self.loss(model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            losses.append(float(loss.detach()))
            if step % config.val_every == 0 or step == config.steps:
                lr = self.optimizer.param_groups[0]["lr"]
                miou = self._validate(step, float(np.mean(losses)), lr)
                losses = []
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", val_miou=f"{miou:.3f}")
        bar.close()
        holdout = None
        if config.holdout_fraction:
            best = ModelBundle.load(config.output)
            holdout = self._score(best.model, self.split.holdout)
            holdout.pop("confusion")
        return TrainResult(
            bundle_path=str(config.output),
            sha256=self.sha256,
            history=self.history,
            val_miou=self.best_miou,
            val_iou=self.best_iou,
            seconds=time.perf_counter() - self.start,
            holdout=holdout,
        )

    def _score(self, model: nn.Module, rows: slice) -> dict[str, Any]:
        """torchmetrics scores of `model` on a band of rows, inferred tile by tile."""
        spec = self.bundle.spec
        metrics = SegmentationMetrics(spec.num_classes)
        metrics.update(predict_area(model, self.raster.image[:, rows], spec.normalization, spec.tile_size),
                       self.raster.labels[rows])
        return metrics.compute()

    def _validate(self, step: int, loss: float, lr: float) -> float:
        """Score the validation band, record it, save the bundle if it is the best so far."""
        scores = self._score(self.bundle.model, self.split.val)
        miou = scores["miou"]
        self.history.append(
            {
                "step": float(step),
                "loss": loss,
                "val_miou": miou,
                "lr": float(lr),
                "seconds": time.perf_counter() - self.start,
            }
        )
        if miou > self.best_miou:
            self.best_miou = miou
            self.best_iou = tuple(scores["iou"])
            self.sha256 = self.bundle.save(self.config.output)
        return miou


def balanced_weights(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class weights inversely proportional to each class's pixel count, with mean 1 over present classes.

    Classes absent from `labels` get weight 1 (they add nothing to the loss anyway).
    """
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes].astype(float)
    present = counts > 0
    inverse = np.where(present, counts.sum() / np.maximum(counts, 1), 0.0)
    inverse[present] /= inverse[present].mean()
    return tuple(float(w) if p else 1.0 for w, p in zip(inverse, present, strict=True))


def predict_area(
    model: nn.Module, image: np.ndarray, normalization: Normalization, tile: int = 512
) -> np.ndarray:
    """Class ids of an area, inferred on non-overlapping tiles.

    Tiles are reflect-padded where the area ends, so every prediction sees data from the area only;
    tiles are at most ``tile`` pixels a side (less for areas smaller than that, rounded up to 32).

    Args:
        model: The model; it is put in eval mode.
        image: (C, H, W) raw values.
        normalization: Turns raw values into model input.
        tile: Largest tile side, a multiple of 32.

    Returns:
        (H, W) uint8 argmax class ids.
    """
    _, height, width = image.shape
    tile_h = min(tile, -(-height // _TILE_MULTIPLE) * _TILE_MULTIPLE)
    tile_w = min(tile, -(-width // _TILE_MULTIPLE) * _TILE_MULTIPLE)
    prediction = np.empty((height, width), dtype=np.uint8)
    model.eval()
    with torch.inference_mode():
        for row in range(0, height, tile_h):
            for col in range(0, width, tile_w):
                window = image[:, row : row + tile_h, col : col + tile_w]
                h, w = window.shape[1:]
                window = np.pad(window, ((0, 0), (0, tile_h - h), (0, tile_w - w)), mode="reflect")
                x = normalization.apply(torch.from_numpy(np.ascontiguousarray(window))[None].float())
                logits = model(x)
                prediction[row : row + h, col : col + w] = logits[0, :, :h, :w].argmax(0).numpy()
    return prediction


def _read(config: TrainConfig) -> tuple[LabelledRaster, tuple[ClassInfo, ...]]:
    """The image and its labels (a raster, or polygons rasterised onto the image), and the classes."""
    if config.labels is not None:
        raster = read_labelled_raster(config.image, config.labels, config.bands)
        return raster, _resolve_classes(config.classes, raster.labels)
    classes = config.classes or (ClassInfo("background", (0, 0, 0)), ClassInfo("object", (230, 60, 60)))
    pair = LabelledPair(image=config.image, polygons=config.polygons)
    return read_pair(pair, classes, config.bands), classes


def _resolve_classes(classes: tuple[ClassInfo, ...] | None, labels: np.ndarray) -> tuple[ClassInfo, ...]:
    """The configured classes, checked against the labels, or defaults that fit them."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    present = present[present != IGNORE_INDEX]
    highest = int(present.max()) if present.size else 0
    if classes is not None:
        if highest >= len(classes):
            raise ConfigError(
                f"The labels hold class id {highest} but only {len(classes)} classes are "
                f"configured; give one class per id 0..{highest} (or mark unlabelled pixels "
                f"{IGNORE_INDEX})."
            )
        return classes
    if highest < len(SYNTHETIC_CLASSES):
        return SYNTHETIC_CLASSES
    return tuple(ClassInfo(f"class_{i}", _generic_colour(i)) for i in range(highest + 1))


def _generic_colour(index: int) -> tuple[int, int, int]:
    """A distinct display colour per class id: hues spaced by the golden angle."""
    hue = (index * 0.618033988749895) % 1.0
    sector, fraction = divmod(hue * 6, 1)
    up, down = round(255 * fraction), round(255 * (1 - fraction))
    sectors = [(255, up, 0), (down, 255, 0), (0, 255, up), (0, down, 255), (up, 0, 255), (255, 0, down)]
    return sectors[int(sector)]


def _check_labelled(raster: LabelledRaster, rows: slice, area: str) -> None:
    """ConfigError if an area holds no labelled pixel (nothing to learn from or score)."""
    if not (raster.labels[rows] != IGNORE_INDEX).any():
        raise ConfigError(
            f"The {area} area (rows {rows.start}..{rows.stop - 1}) holds no labelled pixel (all "
            f"{IGNORE_INDEX}); label it or change val_fraction."
        )


def _is_int(value: object) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)
