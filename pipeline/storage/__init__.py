"""Where bytes live: one contract (:class:`Storage`), a local and an object-storage implementation.

Example:
    >>> location = Location.parse("/tmp/scene.zarr")
    >>> storage_for(location).exists(location.join("zarr.json"))  # doctest: +SKIP
    False
"""

from __future__ import annotations

import functools
import json
import os

from pipeline.storage._local import LocalStorage
from pipeline.storage.base import Storage, Version
from pipeline.storage.location import Location

__all__ = ["LocalStorage", "Location", "Storage", "Version", "stamp", "storage_for"]

_LOCAL = LocalStorage()


def storage_for(location: Location) -> Storage:
    """The storage that holds `location` (one instance per scheme and options, reused)."""
    if location.is_local:
        return _LOCAL
    return _object_storage(location.scheme, json.dumps(dict(location.options), sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _object_storage(scheme: str, options: str) -> Storage:
    from pipeline.storage._object import ObjectStorage

    return ObjectStorage(scheme, json.loads(options))


def stamp(location: Location) -> str | None:
    """A cheap version of a file, which changes when it does: its size and modification time on local
    disk (nothing is read), its ETag (or what its store has instead) on object storage; None if absent."""
    if location.is_local:
        try:
            info = os.stat(location.path)
        except FileNotFoundError:
            return None
        return f"{info.st_size}-{info.st_mtime_ns}"
    version = storage_for(location).version(location)
    return None if version is None else version.tag
