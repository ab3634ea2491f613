"""Segmentation models: the architecture registry, U-Net 3+, a plain FCN, and model bundles."""

from pipeline.models.bundle import BundleSpec, ClassInfo, ModelBundle, Normalization, file_sha256
from pipeline.models.fcn import FCN
from pipeline.models.registry import ARCHITECTURES, available_architectures, build_model
from pipeline.models.unet3plus import DeepSupervisionOutput, UNet3Plus

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
