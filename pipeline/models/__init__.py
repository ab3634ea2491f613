"""Segmentation models: the architecture registry, U-Net 3+, a plain FCN, and model bundles."""

from typing import TYPE_CHECKING

from pipeline.models.bundle import BundleSpec, ClassInfo, ModelBundle, Normalization, file_sha256
from pipeline.models.fcn import FCN
from pipeline.models.registry import ARCHITECTURES, available_architectures, build_model

if TYPE_CHECKING:
    from pipeline.models.unet3plus import DeepSupervisionOutput, UNet3Plus

_LAZY = {"DeepSupervisionOutput", "UNet3Plus"}  # imported on first use: they pull in smp, timm and torchvision


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from pipeline.models import unet3plus

        return getattr(unet3plus, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "FCN",
    "BundleSpec",
    "ClassInfo",
    "DeepSupervisionOutput",
    "ModelBundle",
    "Normalization",
    "UNet3Plus",
    "available_architectures",
    "build_model",
    "file_sha256",
]
