"""UNet 3+ (Huang et al. 2020) on smp's encoder interface."""

from pipeline.models.unet3plus.model import DeepSupervisionOutput, UNet3Plus

__all__ = ["DeepSupervisionOutput", "UNet3Plus"]
