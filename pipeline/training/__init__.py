"""Training: labelled-raster windows, the loss, metrics and the single-process loop."""

from pipeline.training.data import (
    AreaSplit,
    LabelledRaster,
    WindowBatches,
    WindowSampler,
    augment_d4,
    compute_normalization,
    jitter_colour,
    read_labelled_raster,
    split_by_area,
)
from pipeline.training.loop import (
    DEFAULT_ARCH_ARGS,
    TrainConfig,
    TrainResult,
    evaluate,
    predict_area,
    train,
)
from pipeline.training.losses import SegmentationLoss
from pipeline.training.metrics import (
    IGNORE_INDEX,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)

__all__ = [
    "DEFAULT_ARCH_ARGS",
    "IGNORE_INDEX",
    "AreaSplit",
    "LabelledRaster",
    "SegmentationLoss",
    "TrainConfig",
    "TrainResult",
    "WindowBatches",
    "WindowSampler",
    "augment_d4",
    "compute_normalization",
    "confusion_matrix",
    "evaluate",
    "iou_per_class",
    "jitter_colour",
    "mean_iou",
    "pixel_accuracy",
    "predict_area",
    "read_labelled_raster",
    "split_by_area",
    "train",
]
