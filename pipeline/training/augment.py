"""Training augmentation with kornia: the square's symmetries, colour jitter, elastic deformation.

One `Augmenter` turns a batch of raw windows and their labels into model input:

1. flips and 90-degree rotations (the 8 symmetries of the square: aerial and microscope images have
   no "up");
2. elastic deformation, as in the U-Net paper (a smooth random displacement field), with
   probability `elastic`; labels follow by nearest-neighbour sampling, so no class is invented;
3. colour jitter (brightness and contrast per sample) on the normalised values, so its strength is
   in band standard deviations whatever the sensor's range (a 16-bit image whose values fill a
   tenth of its range would otherwise have its contrast wiped out by a brightness shift of 0.1).

Geometric steps move image and labels together (kornia's `AugmentationSequential` with an input and
a mask key). Unlabelled pixels (255) stay unlabelled; pixels pulled in from outside the window by
the deformation are reflected, not padded with a class.
"""

from __future__ import annotations

import warnings
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

from pipeline.models import Normalization

__all__ = ["Augmenter"]


class Augmenter(nn.Module):
    """Random augmentation of (N, C, S, S) raw windows and (N, S, S) labels into normalised input.

    Args:
        normalization: The bundle's normalisation (scale, then per-band mean and std).
        jitter: Brightness shift (in band standard deviations) and contrast factor (1 +- jitter)
            strength, 0 for none.
        elastic: Probability of an elastic deformation per window, 0 for none.
        elastic_alpha: Strength of the displacement, as a share of the window side.
        elastic_sigma: Smoothness of the displacement field, in pixels.
    """

    def __init__(
        self, normalization: Normalization, jitter: float = 0.0, elastic: float = 0.0,
        elastic_alpha: float = 1.0, elastic_sigma: float = 12.0,
    ) -> None:
        super().__init__()
        self.normalization = normalization
        geometric: list[Any] = [
            K.RandomHorizontalFlip(p=0.5),
            K.RandomRotation90(times=(0, 3), p=1.0),
        ]
        if elastic > 0:
            kernel = int(4 * elastic_sigma) | 1
            geometric.append(K.RandomElasticTransform(
                kernel_size=(kernel, kernel), sigma=(elastic_sigma, elastic_sigma),
                alpha=(elastic_alpha, elastic_alpha), padding_mode="reflection", p=elastic,
            ))
        self.geometric = K.AugmentationSequential(*geometric, data_keys=["input", "mask"])
        self.colour = (
            K.AugmentationSequential(
                K.RandomBrightness(brightness=(1 - jitter, 1 + jitter), clip_output=False, p=1.0),
                K.RandomContrast(contrast=(1 - jitter, 1 + jitter), clip_output=False, p=1.0),
            ) if jitter > 0 else None
        )

    @torch.no_grad()
    def forward(self, raw: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, normalised (N, C, S, S) float32 input and (N, S, S) int64 labels."""
        with warnings.catch_warnings():
            # kornia resamples masks with align_corners=None, which makes torch warn on every batch.
            warnings.filterwarnings("ignore", message="Default grid_sample and affine_grid behavior")
            x, y = self.geometric(self.normalization.apply(raw.float()), labels.float().unsqueeze(1))
        if self.colour is not None:
            x = self.colour(x)
        return x, y.squeeze(1).round().long()
