"""The `RasterSource` contract: a raster read in windows at one chosen pyramid level.

Implementations supply four things: `_open` (a handle plus the file's description),
`_read_inbounds`, `_valid_inbounds` and `foreground`. Everything else (boundless reads
with reflect padding, level selection, pickling, lazy opening, error wrapping) is here,
once, so every source behaves the same at the image border and across processes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
from affine import Affine
from scipy import ndimage

from pipeline.errors import (
    ConfigError,
    SourceNotFoundError,
    SourceReadError,
    TesseraError,
)
from pipeline.storage.location import Location

UNITS = ("m", "um")

WindowReader = Callable[[int, int, int, int], np.ndarray]  # (y0, x0, h, w) -> array

# A level whose pixel size is within this factor of the target still counts as "not coarser"
# than the model's native resolution: pyramids are rarely exact powers of two.
RESOLUTION_TOLERANCE = 1.1


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample relative to level 0."""

    height: int
    width: int
    downsample: float


@dataclass(frozen=True)
class SourceInfo:
    """What a source knows about its file, independent of the working level."""

    levels: tuple[Level, ...]
    bands: int
    dtype: np.dtype[Any]
    crs: str | None = None
    transform0: Affine | None = None
    metres_per_unit: float | None = None
    mpp0: float | None = None
    nodata: float | None = None


def reflect_indices(start: int, size: int, n: int) -> np.ndarray:
    """Indices into an axis of length `n` for positions `start .. start + size - 1`, reflected.

    This is numpy's ``mode="reflect"`` (edge pixel not repeated) extended periodically, so
    it also holds when the pad is larger than the axis; a 1-pixel axis repeats its pixel.

    Args:
        start: First position, may be negative or past the axis.
        size: Number of positions.
        n: Axis length (>= 1).

    Returns:
        Integer array of `size` indices in ``[0, n)``.

    Example:
        >>> reflect_indices(-2, 6, 3).tolist()
        [2, 1, 0, 1, 2, 1]
    """
    positions = np.arange(start, start + size, dtype=np.int64)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded >= n, period - folded, folded)


def grow_mask(mask: np.ndarray) -> np.ndarray:
    """Dilate a bool mask by one pixel (8-connected).

    Foreground masks are coarse and sampled; growing them by one cell makes a tile that
    touches a little data at its edge still count as foreground (computing a tile too many
    is cheap, dropping data is not).

    Args:
        mask: Bool array (h, w).

    Returns:
        The dilated bool array, same shape.
    """
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool))


def is_local_file(path: str) -> bool:
    """False for object-storage and other URLs and for GDAL virtual paths (/vsis3/, /vsicurl/...), which
    cannot be checked with the local file system."""
    return not path.startswith("/vsi") and Location.parse(path).is_local


def _check_window(h: int, w: int) -> None:
    """Reject empty or negative window sizes."""
    if h <= 0 or w <= 0:
        raise ConfigError(f"window size must be positive, got h={h}, w={w}; pass h >= 1 and w >= 1")


class RasterSource(ABC):
    """A raster read in windows, at one chosen pyramid level (the "working level").

    The file is opened lazily on first use (any metadata attribute or read), so constructing
    a source and shipping it to another process is cheap; pickling keeps only
    ``(class, (path, level))`` and the receiving process reopens the file itself. A source is
    meant to be used from one thread at a time; give each thread its own (``at_level`` or a
    pickle round trip makes one). Prefer `pipeline.sources.open_source`, which picks the
    implementation and checks the file is readable before returning.

    Attributes:
        path: The file path (or URL, for rasterio).
        level: The working level; all sizes, reads, ``transform`` and ``mpp`` refer to it.
    """

    reader: ClassVar[str] = "?"

    def __init__(self, path: str | Path, level: int = 0) -> None:
        """Describe a source without opening it.

        Args:
            path: The image file.
            level: Working pyramid level (0 = full resolution). Checked when the file opens.
        """
        self.path: str = str(path)
        self.level: int = int(level)
        self._handle: Any | None = None
        self._info: SourceInfo | None = None

    # --- implementation hooks -------------------------------------------------------------

    @abstractmethod
    def _open(self) -> tuple[Any, SourceInfo]:
        """Open the file at the working level; return (handle, description). Call `_require_level`."""

    @abstractmethod
    def _close_handle(self, handle: Any) -> None:
        """Release a handle returned by `_open`."""

    @abstractmethod
    def _read_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Read a window that lies inside the working level: (bands, h, w), native dtype."""

    @abstractmethod
    def _valid_inbounds(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Bool (h, w) validity of a window that lies inside the working level."""

    @abstractmethod
    def foreground(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """A low-resolution mask of where there is something to segment.

        Args:
            max_size: Longest side of the returned mask, in mask pixels.

        Returns:
            ``(mask, f)``: a bool array of shape ``(ceil(height / f), ceil(width / f))`` and the
            whole-number factor ``f >= 1`` (as a float) such that mask pixel ``(i, j)`` covers
            working-level pixels ``[i*f, (i+1)*f) x [j*f, (j+1)*f)``.

        Raises:
            ConfigError: `max_size` is smaller than 1.
            SourceReadError: The file cannot be read.
        """

    # --- metadata ---------------------------------------------------------------------------

    @property
    def _described(self) -> SourceInfo:
        """The file's description, opening the file if needed."""
        self._ensure_open()
        assert self._info is not None  # set together with the handle by _ensure_open
        return self._info

    @property
    def levels(self) -> tuple[Level, ...]:
        """All pyramid levels of the file; level 0 is full resolution."""
        return self._described.levels

    @property
    def height(self) -> int:
        """Height in pixels at the working level."""
        return self.levels[self.level].height

    @property
    def width(self) -> int:
        """Width in pixels at the working level."""
        return self.levels[self.level].width

    @property
    def bands(self) -> int:
        """Number of bands returned by `read`."""
        return self._described.bands

    @property
    def dtype(self) -> np.dtype[Any]:
        """The native data type returned by `read`."""
        return self._described.dtype

    @property
    def crs(self) -> str | None:
        """The coordinate reference system as WKT, or None when not georeferenced."""
        return self._described.crs

    @property
    def transform(self) -> Affine | None:
        """Pixel -> CRS affine at the working level (level 0's, scaled), or None."""
        info = self._described
        if info.transform0 is None:
            return None
        level0, here = info.levels[0], info.levels[self.level]
        return info.transform0 @ Affine.scale(level0.width / here.width, level0.height / here.height)

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at the working level, or None when the file does not say."""
        info = self._described
        if info.mpp0 is None:
            return None
        return info.mpp0 * info.levels[self.level].downsample

    @property
    def nodata(self) -> float | None:
        """The nodata value declared by the file, or None."""
        return self._described.nodata

    # --- reading ---------------------------------------------------------------------------

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Read a window of the working level; pixels outside the image are reflect-padded.

        The value at a position outside the image depends only on the position, never on the
        window, so overlapping windows agree wherever they overlap.

        Args:
            y0: Top row (may be negative or past the image).
            x0: Left column (may be negative or past the image).
            h: Window height, >= 1 (may exceed the image height).
            w: Window width, >= 1 (may exceed the image width).

        Returns:
            Array of shape ``(bands, h, w)`` in the source's native dtype.

        Raises:
            ConfigError: `h` or `w` is not positive.
            SourceNotFoundError: The file has disappeared since the source was made.
            SourceReadError: The file cannot be read (corrupt, truncated).

        Example:
            >>> tile = source.read(-32, -32, 512, 512)  # top-left tile with a 32 px reflected halo
        """
        y0, x0, h, w = int(y0), int(x0), int(h), int(w)
        _check_window(h, w)
        height, width = self.height, self.width
        if y0 >= 0 and y0 + h <= height and x0 >= 0 and x0 + w <= width:
            return self._checked_read(y0, x0, h, w)
        rows = reflect_indices(y0, h, height)
        cols = reflect_indices(x0, w, width)
        # Read only the bounding box of the rows/columns the reflection needs: per axis at most
        # the window's size (or the image's, if smaller), so memory stays bounded by the window.
        r0, c0 = int(rows.min()), int(cols.min())
        block = self._checked_read(r0, c0, int(rows.max()) + 1 - r0, int(cols.max()) + 1 - c0)
        return block.take(rows - r0, axis=1).take(cols - c0, axis=2)

    def valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Where the source has data in a window of the working level.

        Args:
            y0: Top row (may be negative or past the image).
            x0: Left column (may be negative or past the image).
            h: Window height, >= 1.
            w: Window width, >= 1.

        Returns:
            Bool array ``(h, w)``: False outside the image and where the file marks pixels as
            missing (nodata, alpha or mask, depending on the format).

        Raises:
            ConfigError: `h` or `w` is not positive.
            SourceReadError: The file cannot be read.
        """
        y0, x0, h, w = int(y0), int(x0), int(h), int(w)
        _check_window(h, w)
        out = np.zeros((h, w), dtype=bool)
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + h, self.height), min(x0 + w, self.width)
        if bottom > top and right > left:
            inside = self._guarded(self._valid_inbounds, top, left, bottom - top, right - left)
            out[top - y0 : bottom - y0, left - x0 : right - x0] = inside
        return out

    def _checked_read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """An in-bounds read with library errors turned into SourceReadError."""
        return self._guarded(self._read_inbounds, y0, x0, h, w)

    def _guarded(self, read: WindowReader, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Call an in-bounds reader, naming the file, window and fix if the library fails."""
        self._ensure_open()
        try:
            return np.asarray(read(y0, x0, h, w))
        except TesseraError:
            raise
        except Exception as exc:
            raise SourceReadError(
                f"{self.path}: {self.reader} failed to read window y0={y0}, x0={x0}, h={h}, "
                f"w={w} at level {self.level}: {exc}. The file is probably truncated or corrupt; "
                "re-download or re-export it."
            ) from exc

    def _foreground_grid(self, max_size: int) -> tuple[int, int, int]:
        """The whole-number factor and mask shape for `foreground(max_size)`."""
        if int(max_size) < 1:
            raise ConfigError(f"foreground max_size must be >= 1, got {max_size}")
        factor = max(1, math.ceil(max(self.height, self.width) / int(max_size)))
        return factor, math.ceil(self.height / factor), math.ceil(self.width / factor)

    # --- levels -----------------------------------------------------------------------------

    def best_level(self, resolution: float, unit: str) -> int:
        """The coarsest level that is not coarser than a target resolution.

        A level qualifies when its pixel size is at most ``resolution * 1.1``; if none does
        (the file is coarser than the target even at level 0), level 0 is returned and the
        caller should resample.

        Args:
            resolution: Target pixel size, e.g. a model's native resolution.
            unit: ``"m"`` (metres per pixel, georeferenced rasters in a projected CRS) or
                ``"um"`` (microns per pixel, slides and OME-TIFF).

        Returns:
            A level index into `levels`.

        Raises:
            ConfigError: Unknown unit, non-positive resolution, or the source has no pixel
                size in that unit.

        Example:
            >>> source.best_level(0.5, "um")  # a 0.25 um/px slide with 2x levels -> 1
        """
        if unit not in UNITS:
            raise ConfigError(f"unit must be one of {UNITS}, got {unit!r}")
        if not resolution > 0:
            raise ConfigError(f"resolution must be positive, got {resolution}")
        size0 = self._level0_pixel_size(unit)
        if size0 is None:
            raise ConfigError(self._missing_resolution_message(unit))
        fitting = [
            k
            for k, lvl in enumerate(self.levels)
            if size0 * lvl.downsample <= resolution * RESOLUTION_TOLERANCE
        ]
        if not fitting:
            return 0
        return max(fitting, key=lambda k: self.levels[k].downsample)

    def pixel_size(self, unit: str) -> float | None:
        """Pixel size at the working level in `unit` ("m" or "um"), or None when the file does not define it."""
        size0 = self._level0_pixel_size(unit)
        return None if size0 is None else size0 * self.levels[self.level].downsample

    def _level0_pixel_size(self, unit: str) -> float | None:
        """Level-0 pixel size in `unit`, or None if the file does not define it."""
        info = self._described
        if unit == "um":
            return info.mpp0
        if info.transform0 is None or info.metres_per_unit is None:
            return None
        return abs(info.transform0.a) * info.metres_per_unit

    def _missing_resolution_message(self, unit: str) -> str:
        """Explain why a source has no pixel size in `unit` and what to do."""
        if unit == "um":
            return (
                f"{self.path} has no microns-per-pixel metadata, so a model trained at um/px "
                "cannot pick its level; give the model's resolution in metres ('m') for "
                "georeferenced rasters, or choose the level explicitly"
            )
        return (
            f"{self.path} has no pixel size in metres (it is not georeferenced, or its CRS is "
            "geographic); reproject it to a projected CRS such as UTM, or choose the level "
            "explicitly"
        )

    def _require_level(self, levels: tuple[Level, ...], level: int | None = None) -> None:
        """Raise ConfigError unless `level` (default: the working level) is one of `levels`."""
        level = self.level if level is None else level
        if not 0 <= level < len(levels):
            raise ConfigError(_bad_level_message(self.path, level, levels))

    def at_level(self, level: int) -> RasterSource:
        """A new source reading the same file at another working level.

        Args:
            level: The new working level.

        Returns:
            An unopened source of the same class.

        Raises:
            ConfigError: The level does not exist.
        """
        self._require_level(self.levels, int(level))
        return type(self)(self.path, int(level))

    # --- lifecycle --------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        """Open the file if this source has no handle yet."""
        if self._handle is not None:
            return
        if is_local_file(self.path) and not Path(self.path).exists():
            raise SourceNotFoundError(
                f"{self.path} does not exist; check the path (relative paths are resolved from {Path.cwd()})"
            )
        try:
            handle, info = self._open()
        except TesseraError:
            raise
        except Exception as exc:
            raise SourceReadError(
                f"{self.path}: {self.reader} cannot open it: {exc}. Check that the file is "
                "complete and in a format this reader supports (use "
                "pipeline.sources.open_source to pick the reader automatically)."
            ) from exc
        self._handle, self._info = handle, info

    def _probe(self) -> None:
        """Open the file and read one small window, so a broken file fails now, not in a worker."""
        self._ensure_open()
        h, w = min(16, self.height), min(16, self.width)
        # The bottom-right corner is written last, so a truncated file fails there.
        self.read(self.height - h, self.width - w, h, w)
        self.read(0, 0, h, w)

    def close(self) -> None:
        """Release the file handle. The source stays usable: the next read reopens the file."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._close_handle(handle)

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[type[RasterSource], tuple[str, int]]:
        # Only the path and level travel; the receiving process reopens the file lazily.
        return (type(self), (self.path, self.level))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, level={self.level})"


def _bad_level_message(path: str, level: int, levels: tuple[Level, ...]) -> str:
    """A ConfigError message listing the levels that do exist."""
    listing = ", ".join(
        f"{k} ({lvl.width}x{lvl.height} px, downsample {lvl.downsample:g})" for k, lvl in enumerate(levels)
    )
    return (
        f"level {level} does not exist in {path}; available levels (width x height): {listing}. "
        f"Pass a level from 0 to {len(levels) - 1}."
    )
