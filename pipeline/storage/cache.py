"""Local copies of objects, for readers that need a file (OpenSlide): downloaded once per machine, bounded.

A whole-slide image on ``s3://`` is copied whole into tessera's cache (``$TESSERA_CACHE/objects``,
by default ~/.cache/tessera/objects) the first time a process on this machine opens it; the driver and
every worker on the same node then share that copy. A copy is named by the object's location and
version (its ETag), so a slide replaced in the bucket is fetched again. Beyond `max_bytes` in all, the
copies used least recently are removed (never the one just asked for).

Example:
    >>> path = local_copy(Location.parse("s3://slides/CMU-1.svs"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from pipeline.files import cache_folder
from pipeline.storage import storage_for
from pipeline.storage.location import Location

__all__ = ["MAX_BYTES", "local_copy"]

MAX_BYTES = 50 * 2**30  # the cache's bound: a few hundred slides of 100-200 MB, or a handful of large ones


def local_copy(location: Location, max_bytes: int = MAX_BYTES) -> Path:
    """A local file with the bytes of the object at `location` (a local path is returned as it is).

    Raises:
        FileNotFoundError: there is no such object.
        StorageError: the store cannot be reached, or refuses (one line, naming the fix).
    """
    if location.is_local:
        return Path(location.path)
    storage = storage_for(location)
    version = storage.version(location)
    if version is None:
        raise FileNotFoundError(f"{location.url} does not exist")
    folder = cache_folder("objects")
    key = hashlib.sha256(f"{location.url}\n{version.tag}".encode()).hexdigest()[:24]
    target = folder / key / location.name  # the name kept: readers tell formats by their suffix
    if target.is_file():
        os.utime(target)  # used now: the last to be evicted
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        storage.download(location, partial)
        os.replace(partial, target)  # several processes may fetch it at once: the last rename wins, same bytes
    finally:
        partial.unlink(missing_ok=True)
    _evict(folder, max_bytes, keep=target)
    return target


def _evict(folder: Path, max_bytes: int, keep: Path) -> None:
    """Remove the least recently used copies until the cache holds at most `max_bytes` (`keep` stays)."""
    copies = []
    for entry in folder.iterdir():
        for file in entry.glob("*") if entry.is_dir() else ():
            if not file.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                    info = file.stat()
                    copies.append((info.st_mtime, info.st_size, file))
    total = sum(size for _, size, _ in copies)
    for _, size, file in sorted(copies, key=lambda c: c[0]):
        if total <= max_bytes:
            break
        if file == keep:
            continue
        shutil.rmtree(file.parent, ignore_errors=True)  # a process reading it keeps its open file (POSIX)
        total -= size
