"""The storage contract: what tessera asks of the place its mosaics, manifests and locks live.

Two implementations pass the same conformance suite (``tests/storage/test_conformance.py``): the
local file system and object storage through fsspec. Everything above this layer (the mosaic, the
output lock, the collection manifest) is written against :class:`Storage` only.

Objects are written whole or not at all: a reader sees the old bytes or the new, never a mix. Three
operations are conditional, for the output lock: :meth:`Storage.create` succeeds only where nothing
is, :meth:`Storage.replace_if` and :meth:`Storage.delete_if` only where the object is still the
version the caller read (its ``tag``). Two conditional calls on one object never both succeed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.storage.location import Location

__all__ = ["Storage", "Version"]


@dataclass(frozen=True)
class Version:
    """One version of an object: ``tag`` changes with every write (an ETag, a content hash);
    ``modified`` is the time the store recorded for it (seconds since the epoch, the store's clock)."""

    tag: str
    modified: float


class Storage(ABC):
    """Objects and folders (prefixes) at :class:`Location` values of one scheme."""

    @abstractmethod
    def check(self, location: Location) -> None:
        """Raise StorageError, naming the fix, unless objects can be written at ``location``
        (the store answers, the credentials are accepted, the bucket exists). Writes nothing."""

    @abstractmethod
    def exists(self, location: Location) -> bool:
        """Whether an object, or anything below a folder, is at ``location``."""

    @abstractmethod
    def list(self, location: Location) -> list[str]:
        """Names directly below ``location`` (objects and folders), sorted; empty when there is none."""

    @abstractmethod
    def read_bytes(self, location: Location) -> bytes:
        """The object's bytes. Raises FileNotFoundError when there is none."""

    @abstractmethod
    def download(self, location: Location, target: Path) -> None:
        """Copy the object to the local file ``target``, streamed (not whole in memory). Raises
        FileNotFoundError when there is none."""

    @abstractmethod
    def write_bytes(self, location: Location, data: bytes) -> None:
        """Write the object whole, replacing any (parent folders are made where they exist)."""

    @abstractmethod
    def create(self, location: Location, data: bytes) -> str | None:
        """Write the object only if there is none: its tag, or None when something was there."""

    @abstractmethod
    def version(self, location: Location) -> Version | None:
        """The object's current version, or None when there is none."""

    @abstractmethod
    def replace_if(self, location: Location, data: bytes, tag: str) -> str | None:
        """Replace the object only if its version is still ``tag``: the new tag, or None (changed or gone)."""

    @abstractmethod
    def delete_if(self, location: Location, tag: str) -> bool:
        """Delete the object only if its version is still ``tag``: whether it was deleted."""

    @abstractmethod
    def delete(self, location: Location, recursive: bool = False) -> None:
        """Delete the object (or, with ``recursive``, everything below a folder); nothing there is fine."""

    @abstractmethod
    def zarr_store(self, location: Location, read_only: bool) -> Any:
        """A zarr v3 store rooted at ``location``."""

    # -- small JSON documents, on top of the above --------------------------------------------------

    def read_json(self, location: Location) -> Any:
        """The parsed document, or None when there is none. Raises ValueError when it is not JSON."""
        try:
            data = self.read_bytes(location)
        except FileNotFoundError:
            return None
        return json.loads(data)

    def write_json(self, location: Location, document: Any) -> None:
        self.write_bytes(location, json.dumps(document, sort_keys=True).encode())
