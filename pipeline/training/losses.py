"""The training loss: cross-entropy plus multiclass Dice, deep-supervision aware.

Cross-entropy gives well-calibrated per-pixel gradients; Dice weights every class present in the
batch equally, which keeps thin, rare classes (roads, small buildings) from being drowned by large
ones. U-Net 3+ returns several masks and a "contains foreground" logit in training mode; each mask
gets the same loss, they are averaged, and binary cross-entropy on the image-level logit is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from pipeline.models import DeepSupervisionOutput
from pipeline.training.metrics import IGNORE_INDEX

__all__ = ["SegmentationLoss"]


class SegmentationLoss(nn.Module):
    """Cross-entropy + ``dice_weight`` x Dice per mask, plus BCE on U-Net 3+ image labels.

    Args:
        ignore_index: Target value of unlabelled pixels; they add nothing to any term.
        dice_weight: Weight of the Dice term relative to cross-entropy.
        label_weight: Weight of the image-level BCE term (U-Net 3+ classification guidance).

    Example:
        >>> loss = SegmentationLoss()
        >>> logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
        >>> loss(logits, torch.zeros(2, 8, 8, dtype=torch.long)).backward()
    """

    def __init__(
        self, ignore_index: int = IGNORE_INDEX, dice_weight: float = 1.0, label_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.label_weight = label_weight
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)

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
        if not isinstance(output, DeepSupervisionOutput):
            return self._mask_loss(output, target)
        loss = torch.stack([self._mask_loss(mask, target) for mask in output.masks]).mean()
        if output.labels is not None:
            loss = loss + self.label_weight * self._label_loss(output.labels, target)
        return loss

    def _mask_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy + weighted Dice of one (N, K, h, w) mask."""
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        labelled = target != self.ignore_index
        if not labelled.any():
            # Cross-entropy over zero pixels is NaN; an unlabelled batch teaches nothing.
            return logits.sum() * 0.0
        cross_entropy = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        return cross_entropy + self.dice_weight * self.dice(logits, target)

    def _label_loss(self, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE of (N, 1) "contains foreground" logits against whether the target has class != 0."""
        foreground = ((target != 0) & (target != self.ignore_index)).flatten(1).any(dim=1)
        return F.binary_cross_entropy_with_logits(labels.flatten(), foreground.to(labels.dtype))
