"""Pictures of a trained model for its MLflow run: the confusion matrix and predictions beside the truth."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.models import ClassInfo
from pipeline.sources.display import display_rgb
from pipeline.training.metrics import IGNORE_INDEX

__all__ = ["FinalReport", "confusion_png", "display_rgb", "prediction_grid_png"]

_UNLABELLED = (0, 0, 0)


@dataclass(frozen=True)
class FinalReport:
    """What rank 0 knows about the best model at the end of a run.

    Attributes:
        classes: The classes, in id order.
        confusion: (K, K) validation confusion counts of the best model (rows: truth).
        samples: Validation windows: (RGB uint8 image, truth ids, predicted ids), each (H, W[, 3]).
    """

    classes: tuple[ClassInfo, ...]
    confusion: np.ndarray
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]


def confusion_png(confusion: np.ndarray, names: Sequence[str]) -> bytes:
    """The confusion matrix normalised per true class (recall on the diagonal), with the counts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = np.asarray(confusion, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.8 * len(names)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(share, vmin=0, vmax=1, cmap="Blues")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("truth")
    for (i, j), value in np.ndenumerate(share):
        axes.text(j, i, f"{value:.2f}\n{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                  color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axes, label="share of the true class")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def prediction_grid_png(report: FinalReport, gap: int = 4) -> bytes:
    """One row per sample: the image, the truth and the prediction in the class colours."""
    from PIL import Image

    palette = np.zeros((256, 3), np.uint8)
    palette[: len(report.classes)] = [c.color for c in report.classes]
    palette[IGNORE_INDEX] = _UNLABELLED
    rows = []
    for rgb, truth, predicted in report.samples:
        spacer = np.full((truth.shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([rgb, spacer, palette[truth], spacer, palette[predicted]], axis=1))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(padded, axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()
