"""Writing a file whole or not at all (the one helper every writer of a small file uses), and where
tessera keeps what it caches."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it, flushed to disk, then renamed: readers see
    the old file or the new one, never half of one, and a crash leaves no file under the final name.

    The temporary file has a unique name in the same folder (a rename is atomic only within one file
    system) and the permissions the umask allows (not tempfile's private 0600). Parent folders are made.

    Returns:
        `path`, as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = write_beside(path, data)
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_beside(path: Path, data: bytes) -> Path:
    """`data` written whole and flushed to disk in a new temporary file beside `path` (same folder, a
    unique name, the umask's permissions): its path, for the caller to rename or link into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def cache_folder(name: str) -> Path:
    """tessera's cache for one kind of file: ``$TESSERA_CACHE/name``, by default ~/.cache/tessera/name."""
    return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera") / name
