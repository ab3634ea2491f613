"""The errors tessera raises for bad input: each names the problem and the fix.

Every class also inherits the built-in exception it resembles, so callers may catch either.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class TesseraError(Exception):
    """Base class of every error tessera raises on purpose."""


class SourceNotFoundError(TesseraError, FileNotFoundError):
    """The source image does not exist."""


class SourceReadError(TesseraError, OSError):
    """The source exists but cannot be read (corrupt, truncated or unsupported)."""


class ConfigError(TesseraError, ValueError):
    """A setting is out of range or inconsistent with another."""


class BandMismatchError(ConfigError):
    """The source's bands do not match what the model expects."""


class BundleError(TesseraError, ValueError):
    """A model bundle is missing, corrupt or of an unknown format."""


class OutputExistsError(TesseraError, FileExistsError):
    """The output path exists and may not be replaced."""


class OutputFolderError(TesseraError, FileNotFoundError):
    """The folder an output file should be written in does not exist."""


class OutputLockedError(TesseraError, FileExistsError):
    """Another live job is writing the same output."""


class MosaicError(TesseraError, ValueError):
    """A path is not a tessera mosaic, or the mosaic is not in the expected state."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The model bundle file does not exist."""


class ContainmentError(TesseraError, PermissionError):
    """A file that a served mosaic or source leads to lies outside the served folders (through a link,
    or a format that names other files)."""


class StorageError(TesseraError, OSError):
    """Storage cannot be reached or used: an unreachable endpoint, missing credentials, a missing bucket."""


class MissingDependencyError(TesseraError, ImportError):
    """An optional package that a feature needs is not installed."""


def cause(exc: BaseException) -> str:
    """`Type: first line` of an exception another library raised, for a one-line message of ours."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """For front doors: a TesseraError becomes one line on stderr and exit status 2."""
    try:
        yield
    except TesseraError as e:
        parts = (line.strip() for line in str(e).splitlines())
        print("error: " + " ".join(p for p in parts if p), file=sys.stderr)
        raise SystemExit(2) from None


class RegionError(ConfigError):
    """A region, level, point or geometry asked of a mosaic does not fit it."""


class GivenUpError(TesseraError):
    """Work given up before its end, because whoever asked for it has gone (a client that disconnected)."""
