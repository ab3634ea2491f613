"""Where a mosaic, a manifest or a lock lives: a local path or an object-storage URL, parsed once.

Every place that takes an output, a collection ROOT or a mosaic to read turns the user's string into
a :class:`Location` at the front door and passes that on; nothing else looks for ``://``.

Example:
    >>> Location.parse("s3://bucket/scenes/a.zarr/").url
    's3://bucket/scenes/a.zarr'
    >>> Location.parse("s3://bucket/scenes/a.zarr").with_suffix(".lock").name
    'a.zarr.lock'
    >>> Location.parse("/data/a.zarr").is_local
    True
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["Location"]

LOCAL = "file"
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


@dataclass(frozen=True)
class Location:
    """A parsed place: ``scheme`` is ``"file"`` for the local file system (``path`` absolute), else the
    fsspec protocol (``s3``, ``gs``, ``az``, ``memory``...) with ``path`` as ``bucket/key``.

    ``options`` are fsspec storage options (``endpoint_url``, ``anon``...). They travel with the location
    to every worker, so they should not hold secrets: credentials come from the environment, as boto and
    GDAL read them.
    """

    scheme: str
    path: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location, options: Mapping[str, Any] | None = None) -> Location:
        """A location from a path, a ``file://`` URL or an fsspec URL (``s3://bucket/key``).

        Relative local paths become absolute here, so that workers with another working folder agree.

        Raises:
            ConfigError: an empty path, or a URL with no bucket.
        """
        if isinstance(value, Location):
            return value if options is None else cls(value.scheme, value.path, dict(options))
        text = os.fspath(value)
        if not text:
            raise ConfigError("An empty path was given where a file, folder or URL is expected.")
        scheme, sep, rest = text.partition("://")
        if not sep or scheme == LOCAL:
            local = rest if sep else text
            if options:
                raise ConfigError(f"Storage options ({', '.join(options)}) were given for the local path {local}; "
                                  "they apply to object storage URLs only (s3://...).")
            return cls(LOCAL, os.path.normpath(os.path.abspath(os.path.expanduser(local))))
        path = rest.strip("/")  # an object's key is taken as written, never normalised...
        if not path:
            raise ConfigError(f"{text!r} names no bucket: expected {scheme}://BUCKET/PATH.")
        odd = any(part in ("", ".", "..") for part in path.split("/"))
        if odd and scheme.lower() in OBJECT_STORES:  # ...so keys that stores read otherwise are refused
            raise ConfigError(f"{text!r} has an empty, '.' or '..' part, which object stores read differently: "
                              "write the key plainly, e.g. s3://bucket/a/b.zarr.")
        return cls(scheme.lower(), path, dict(options or {}))

    @property
    def is_local(self) -> bool:
        return self.scheme == LOCAL

    @property
    def is_object_storage(self) -> bool:
        """A bucket of S3, Google Cloud Storage or Azure Blob (not a web server, not a local file)."""
        return self.scheme in OBJECT_STORES

    @property
    def url(self) -> str:
        """The location as users write it: a local path, or ``scheme://bucket/key``."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.scheme, posixpath.dirname(self.path) or self.path, self.options)

    @property
    def bucket(self) -> str:
        """The first part of an object-storage path (the bucket or container)."""
        return self.path.split("/", 1)[0]

    def join(self, *parts: str) -> Location:
        """A location below this one; ``parts`` are relative and use ``/``."""
        return Location(self.scheme, posixpath.join(self.path, *parts), self.options)

    def with_suffix(self, suffix: str) -> Location:
        """A sibling named like this one plus ``suffix`` (``a.zarr`` -> ``a.zarr.lock``)."""
        return Location(self.scheme, self.path + suffix, self.options)

    def local_path(self) -> Path:
        """The local path; raises ConfigError for object storage (for what only works on local files)."""
        if not self.is_local:
            raise ConfigError(f"{self.url} is on object storage; this needs a local path.")
        return Path(self.path)
