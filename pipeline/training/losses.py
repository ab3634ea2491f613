"""Training losses: a weighted sum of named terms, deep-supervision aware.

Terms (weights are given per term, e.g. ``{"cross_entropy": 1, "dice": 1}``):

- ``cross_entropy``: per-pixel cross-entropy, with optional class weights;
- ``dice``: multiclass soft Dice, every class present in the batch weighted equally, which keeps
  thin, rare classes from being drowned by large ones (smp's ``DiceLoss``);
- ``focal``: softmax focal loss, ``-(1 - p_t)^gamma log p_t`` with gamma 2 (Lin et al. 2017), with
  optional class weights (smp's ``FocalLoss`` is the per-class sigmoid form, which does not match
  models trained with a softmax);
- ``boundary_cross_entropy``: cross-entropy weighted per pixel as in the U-Net paper (Ronneberger
  et al. 2015, eq. 2): the class weight plus ``w0 exp(-(d1 + d2)^2 / 2 sigma^2)``, where d1 and d2
  are the distances to the nearest and second-nearest object, so the narrow gaps between touching
  objects weigh most;
- ``iou``: soft Jaccard loss (smp's ``JaccardLoss``);
- ``ms_ssim``: 1 - multi-scale structural similarity between the softmax probabilities and the
  one-hot truth (torchmetrics), with as many scales as the window allows.

Presets: ``ce_dice`` (the default), ``unet3plus_hybrid`` (focal + MS-SSIM + IoU, the U-Net 3+
paper's hybrid loss) and ``unet_boundary`` (boundary-weighted cross-entropy).

U-Net 3+ returns several masks and a "contains foreground" logit in training mode; each mask gets
the same loss, they are averaged, and binary cross-entropy on the image-level logit is added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from segmentation_models_pytorch.losses import DiceLoss, JaccardLoss
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from pipeline.errors import ConfigError
from pipeline.models.unet3plus import DeepSupervisionOutput
from pipeline.training.metrics import IGNORE_INDEX

__all__ = ["LOSS_PRESETS", "LOSS_TERMS", "SegmentationLoss", "boundary_weights"]

LOSS_TERMS = ("cross_entropy", "dice", "focal", "boundary_cross_entropy", "iou", "ms_ssim")
LOSS_PRESETS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "ce_dice": {"cross_entropy": 1.0, "dice": 1.0},
    "unet3plus_hybrid": {"focal": 1.0, "ms_ssim": 1.0, "iou": 1.0},
    "unet_boundary": {"boundary_cross_entropy": 1.0},
})
_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales
_MS_SSIM_KERNEL = 5


class SegmentationLoss(nn.Module):
    """The weighted sum of loss `terms` per mask, plus BCE on U-Net 3+ image labels.

    Args:
        terms: A preset name from ``LOSS_PRESETS`` or a mapping of term name to weight.
        class_weights: One weight per class for the cross-entropy, focal and boundary terms; None
            weighs classes equally.
        ignore_index: Target value of unlabelled pixels; they add nothing to any term.
        label_weight: Weight of the image-level BCE term (U-Net 3+ classification guidance).
        boundary_w0: The U-Net paper's w0, the extra weight of pixels between close objects.
        boundary_sigma: The U-Net paper's sigma, in pixels.

    Raises:
        ConfigError: Unknown preset or term, or a negative weight.

    Example:
        >>> loss = SegmentationLoss("unet3plus_hybrid")
        >>> logits = torch.zeros(2, 3, 64, 64, requires_grad=True)
        >>> loss(logits, torch.zeros(2, 64, 64, dtype=torch.long)).backward()
    """

    def __init__(
        self,
        terms: str | Mapping[str, float] = "ce_dice",
        class_weights: Sequence[float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        label_weight: float = 1.0,
        boundary_w0: float = 10.0,
        boundary_sigma: float = 5.0,
    ) -> None:
        super().__init__()
        if isinstance(terms, str):
            if terms not in LOSS_PRESETS:
                raise ConfigError(f"Unknown loss preset {terms!r}; expected one of {sorted(LOSS_PRESETS)} "
                                  f"or a mapping of terms {list(LOSS_TERMS)} to weights.")
            terms = LOSS_PRESETS[terms]
        unknown = sorted(set(terms) - set(LOSS_TERMS))
        try:
            weights = {str(name): float(w) for name, w in terms.items()}
        except (TypeError, ValueError):
            weights = {}
        self.terms = {name: w for name, w in weights.items() if w > 0}
        if unknown or not self.terms or any(not 0 <= w < float("inf") for w in weights.values()):
            raise ConfigError(f"Loss terms {dict(terms)} are invalid; give non-negative numbers, at least one above 0, "
                              f"to some of {list(LOSS_TERMS)}{f' (unknown: {unknown})' if unknown else ''}.")
        self.ignore_index = ignore_index
        self.label_weight = label_weight
        self.boundary_w0 = boundary_w0
        self.boundary_sigma = boundary_sigma
        self.class_weights = None if class_weights is None else torch.tensor([float(w) for w in class_weights])
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)
        self.iou = JaccardLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)

    def forward(self, output: torch.Tensor | DeepSupervisionOutput, target: torch.Tensor) -> torch.Tensor:
        """Loss of a model output against (N, H, W) integer class ids.

        Args:
            output: (N, K, H, W) logits, or a ``DeepSupervisionOutput`` whose masks are such
                logits (resized bilinearly to the target if they are not at its size).
            target: (N, H, W) class ids, ``ignore_index`` for unlabelled pixels.

        Returns:
            The scalar loss.
        """
        target = target.long()
        pixel_weights = self._boundary_weights(target) if "boundary_cross_entropy" in self.terms else None
        if not isinstance(output, DeepSupervisionOutput):
            return self._mask_loss(output, target, pixel_weights)
        loss = torch.stack([self._mask_loss(mask, target, pixel_weights) for mask in output.masks]).mean()
        if output.labels is not None:
            loss = loss + self.label_weight * self._label_loss(output.labels, target)
        return loss

    def _mask_loss(
        self, logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The weighted terms for one (N, K, h, w) mask."""
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        labelled = target != self.ignore_index
        if not labelled.any():
            # Cross-entropy over zero pixels is NaN; an unlabelled batch teaches nothing.
            return logits.sum() * 0.0
        total = logits.new_zeros(())
        for name, weight in self.terms.items():
            if name == "cross_entropy":
                value = F.cross_entropy(logits, target, weight=self._weights(logits), ignore_index=self.ignore_index)
            elif name == "boundary_cross_entropy":
                assert pixel_weights is not None
                per_pixel = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
                value = (per_pixel * pixel_weights)[labelled].sum() / pixel_weights[labelled].sum()
            elif name == "dice":
                value = self.dice(logits, target)
            elif name == "focal":
                value = self._focal(logits, target, labelled)
            elif name == "iou":
                value = self.iou(logits, target)
            else:
                value = self._ms_ssim_loss(logits, target, labelled)
            total = total + weight * value
        return total

    def _focal(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor, gamma: float = 2.0
               ) -> torch.Tensor:
        """Mean over labelled pixels of (1 - p_t)^gamma times the (class-weighted) cross-entropy."""
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        p_t = torch.exp(-ce)
        weights = self._weights(logits)
        scale = labelled.to(logits.dtype) if weights is None else weights[target.clamp(0, len(weights) - 1)] * labelled
        return ((1 - p_t) ** gamma * ce * scale).sum() / scale.sum()

    def _weights(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)

    def _boundary_weights(self, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights of the boundary term: the class weight plus the U-Net separation term."""
        maps = [boundary_weights(t.cpu().numpy(), self.boundary_w0, self.boundary_sigma, self.ignore_index)
                for t in target]
        weights = torch.from_numpy(np.stack(maps)).to(target.device)
        if self.class_weights is not None:
            per_class = torch.cat([self.class_weights.to(weights), weights.new_ones(1)])
            weights = weights + per_class[torch.where(target == self.ignore_index, -1, target)] - 1
        return weights

    def _ms_ssim_loss(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """1 - MS-SSIM of softmax probabilities against the one-hot truth, unlabelled pixels zeroed in both."""
        k = logits.shape[1]
        mask = labelled.unsqueeze(1).to(logits.dtype)
        probabilities = logits.softmax(1) * mask
        truth = F.one_hot(target.clamp(0, k - 1), k).permute(0, 3, 1, 2).to(logits.dtype) * mask
        side = min(logits.shape[-2:])
        scales = max(1, min(len(_MS_SSIM_BETAS), int(math.log2(max(side - 1, 1) / (_MS_SSIM_KERNEL - 1))) + 1))
        betas = _MS_SSIM_BETAS[:scales]
        betas = tuple(b / sum(betas) for b in betas)
        score = multiscale_structural_similarity_index_measure(
            probabilities, truth, data_range=1.0, kernel_size=_MS_SSIM_KERNEL, betas=betas, normalize="relu",
        )
        return 1 - score  # type: ignore[operator]

    def _label_loss(self, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE of (N, 1) "contains foreground" logits against whether the target has class != 0."""
        foreground = ((target != 0) & (target != self.ignore_index)).flatten(1).any(dim=1)
        return F.binary_cross_entropy_with_logits(labels.flatten(), foreground.to(labels.dtype))


def boundary_weights(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, ignore_index: int = IGNORE_INDEX
                     ) -> np.ndarray:
    """The U-Net paper's separation weight 1 + w0 exp(-(d1 + d2)^2 / 2 sigma^2) of an (H, W) label map.

    Objects are the connected regions of each non-background class (class 0 is background), so two
    touching objects of different classes are two objects; d1 and d2 are each pixel's distances to
    the nearest and the second-nearest object. With fewer than two objects the term is 0 and every
    weight is 1. Each object's distance map is computed within 3 sigma of it only (the term is
    below w0 exp(-18) further away), which keeps the cost per window small.

    Returns:
        (H, W) float32 weights.
    """
    objects = np.zeros(labels.shape, np.int64)
    count = 0
    for c in np.unique(labels):
        if c in (0, ignore_index):
            continue
        regions, n = ndimage.label(labels == c)
        objects[regions > 0] = regions[regions > 0] + count
        count += n
    weights = np.ones(labels.shape, np.float32)
    if count < 2:
        return weights
    nearest = np.full(labels.shape, np.inf, np.float32)
    second = np.full(labels.shape, np.inf, np.float32)
    reach = math.ceil(3 * sigma)
    h, w = labels.shape
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        ys = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h))
        xs = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w))
        d = ndimage.distance_transform_edt(objects[ys, xs] != index).astype(np.float32)
        second[ys, xs] = np.minimum(second[ys, xs], np.maximum(nearest[ys, xs], d))
        nearest[ys, xs] = np.minimum(nearest[ys, xs], d)
    weights += w0 * np.exp(-((nearest + second) ** 2) / (2 * sigma**2))
    return weights
