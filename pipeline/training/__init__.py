"""Training: the catalog of labelled pairs, windows and augmentation, losses, metrics and the loop."""

from pipeline.training.data import (
    AreaIndex,
    AreaSplit,
    LabelledImage,
    WindowBatches,
    WindowSampler,
    compute_normalization,
    open_labelled_image,
    sample_pixels,
    split_by_area,
)
from pipeline.training.loop import (
    DEFAULT_ARCH_ARGS,
    TrainConfig,
    TrainResult,
    balanced_weights,
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
    "AreaIndex",
    "AreaSplit",
    "LabelledImage",
    "SegmentationLoss",
    "TrainConfig",
    "TrainResult",
    "WindowBatches",
    "WindowSampler",
    "balanced_weights",
    "compute_normalization",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "open_labelled_image",
    "pixel_accuracy",
    "sample_pixels",
    "split_by_area",
    "train",
]
