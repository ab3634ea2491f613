"""What a mosaic records about how it was made: source, model, config, software versions, times."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib.metadata
import platform
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.execution import SegmentConfig
    from pipeline.models.bundle import ModelBundle
    from pipeline.sources import RasterSource
    from pipeline.tiling import TileGrid

PACKAGES = ("tessera", "torch", "segmentation-models-pytorch", "ray", "zarr", "numpy", "rasterio",
            "openslide-python", "openslide-bin", "tifffile", "dask")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output (a copy: callers may add to it)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    """Read once a process: scanning the installed packages' metadata takes milliseconds per package, per image."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def describe(
    config: SegmentConfig, source: RasterSource, bundle: ModelBundle, grid: TileGrid,
    registered: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage written when a mosaic is created; `registered` is the registry version the model came from."""
    return {
        "started": now(),
        "host": socket.gethostname(),
        "source": {
            "path": str(source.path), "level": source.level, "height": source.height,
            "width": source.width, "bands": source.bands, "dtype": str(source.dtype),
            "crs": source.crs, "mpp": source.mpp,
        },
        "model": {
            "path": str(config.model), "sha256": bundle.sha256, "spec": bundle.spec.to_dict(),
            "registered": registered,
        },
        "config": dataclasses.asdict(config),
        "tiling": {"tile": grid.tile, "overlap": grid.overlap, "grid": list(grid.shape)},
        "versions": versions(),
    }
