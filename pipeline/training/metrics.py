"""Segmentation metrics: torchmetrics for training (`SegmentationMetrics`), a numpy confusion matrix for mosaics.

The trainer's validation and the demo both use these. The confusion matrix is the one sufficient
statistic: accumulate it over tiles, images or workers by adding, then derive IoU from the sum
(averaging per-tile IoUs would weight small tiles wrongly).

Example:
    >>> truth = np.array([[0, 1], [1, 255]])
    >>> pred = np.array([[0, 1], [0, 1]])
    >>> cm = confusion_matrix(pred, truth, num_classes=3)
    >>> iou_per_class(cm)
    array([0.5, 0.5, nan])
    >>> mean_iou(cm)
    0.5
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError

__all__ = ["IGNORE_INDEX", "SegmentationMetrics", "confusion_matrix", "iou_per_class", "mean_iou", "pixel_accuracy"]

IGNORE_INDEX = 255
"""Label value meaning "no truth here": such pixels count in no metric and no loss."""


def confusion_matrix(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Count pixels by (true class, predicted class).

    Pixels whose truth is ``ignore_index`` and pixels whose prediction is 255 (no prediction, e.g.
    outside the mosaic's footprint) are left out.

    Args:
        pred: Predicted class ids, any shape, integer dtype.
        truth: True class ids, same shape as ``pred``.
        num_classes: K, the number of classes; ids must lie in 0..K-1.
        ignore_index: Truth value of unlabelled pixels.

    Returns:
        (K, K) int64 matrix; entry [t, p] counts pixels of true class t predicted as p, so rows
        sum to the true class sizes and columns to the predicted ones.

    Raises:
        ConfigError: If the shapes differ, ``num_classes`` < 1, or an id outside 0..K-1 remains
            after the ignored pixels are removed.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ConfigError(
            f"Prediction shape {pred.shape} differs from truth shape {truth.shape}; compare "
            "arrays of the same area."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} is invalid; expected an integer >= 1.")
    valid = (truth != ignore_index) & (pred != IGNORE_INDEX)
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    for name, ids in (("truth", t), ("prediction", p)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ConfigError(
                f"The {name} holds class ids {ids.min()}..{ids.max()}, outside 0..{num_classes - 1}"
                f" for num_classes={num_classes}; mark unlabelled pixels with {ignore_index}."
            )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Intersection over union of every class.

    Args:
        cm: (K, K) confusion matrix from :func:`confusion_matrix` (truth on rows).

    Returns:
        (K,) float64: TP / (TP + FP + FN) per class, NaN for a class that is neither in the truth
        nor in the prediction (its IoU is undefined, not 0 or 1).
    """
    cm = np.asarray(cm, dtype=np.float64)
    intersection = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - intersection
    iou = np.full(len(intersection), np.nan)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes that occur in the truth or the prediction.

    Args:
        cm: (K, K) confusion matrix.

    Returns:
        The mean of :func:`iou_per_class` ignoring NaN, or NaN if no class occurs at all.
    """
    iou = iou_per_class(cm)
    defined = iou[~np.isnan(iou)]
    return float(defined.mean()) if defined.size else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of counted pixels predicted correctly, NaN if none was counted."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


class SegmentationMetrics:
    """Per-class IoU and Dice, pixel accuracy and mIoU, accumulated batch by batch.

    The state is a torchmetrics confusion matrix, which adds up over batches and, when training runs
    on several DDP workers, over workers (torchmetrics syncs it when computing); every figure is
    derived from that one matrix. Classes that occur in neither the truth nor the prediction have
    no IoU or Dice (NaN, not 0) and are left out of the mean.

    Example:
        >>> metrics = SegmentationMetrics(num_classes=3)
        >>> metrics.update(np.array([[0, 1], [0, 1]]), np.array([[0, 1], [1, 255]]))
        >>> metrics.compute()["miou"]
        0.5
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # One process scores a whole area: no syncing with the other ranks of a distributed run.
        self.confusion = MulticlassConfusionMatrix(
            num_classes, ignore_index=ignore_index, validate_args=False, sync_on_compute=False
        )

    def update(self, pred: Any, truth: Any) -> None:
        """Add predicted and true class ids of any shape; ids are checked as in `confusion_matrix`.

        Raises:
            ConfigError: An id outside 0..K-1 (other than the ignored ones).
        """
        import torch

        p, t = np.asarray(pred), np.asarray(truth)
        confusion_matrix(p, t, self.num_classes, self.ignore_index)  # the checks, with their messages
        t = np.where(p == IGNORE_INDEX, self.ignore_index, t)  # no prediction there (outside a mosaic)
        p = np.where(p == IGNORE_INDEX, 0, p)
        self.confusion.update(torch.as_tensor(p.astype(np.int64)), torch.as_tensor(t.astype(np.int64)))

    def compute(self) -> dict[str, Any]:
        """{"miou", "iou" (per class), "dice" (per class), "pixel_accuracy", "confusion" (K x K)}."""
        cm = self.confusion.compute().cpu().numpy().astype(np.int64)
        iou = iou_per_class(cm)
        return {
            "miou": mean_iou(cm),
            "iou": [float(v) for v in iou],
            "dice": [float(v) for v in 2 * iou / (1 + iou)],  # Dice = 2 IoU / (1 + IoU), class by class
            "pixel_accuracy": pixel_accuracy(cm),
            "confusion": cm,
        }

    def reset(self) -> None:
        self.confusion.reset()
