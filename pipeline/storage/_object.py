"""The storage contract on object storage, through fsspec (s3fs for ``s3://``).

Credentials and the endpoint come from the environment as boto reads them (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, an instance role...), or from the location's storage options.
A PUT is atomic on object stores, so whole-object writes need no temporary object. The conditional
operations are S3's conditional requests: ``If-None-Match: *`` creates only where nothing is,
``If-Match: <ETag>`` replaces or deletes only the version read (AWS S3 since 2024, MinIO, Ceph, moto).
Listings are never cached: a lock or a marker must be seen the moment another process writes it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import MissingDependencyError, StorageError, cause
from pipeline.storage.base import Storage, Version
from pipeline.storage.location import Location

# A store that does not answer fails in seconds, not minutes: botocore's default waits 60 s per
# connection attempt and retries.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
_CONDITIONAL = ("s3", "s3a")
_WEB = ("http", "https")  # fsspec's HTTP file system takes whole URLs, and has no buckets


class ObjectStorage(Storage):
    """One fsspec file system (one scheme and set of options)."""

    def __init__(self, scheme: str, options: dict[str, Any]) -> None:
        import fsspec

        self.scheme = scheme
        # The same options for this file system and for zarr's (an async one of its own).
        self.options: dict[str, Any] = {"use_listings_cache": False, **options}
        if scheme in _CONDITIONAL:
            self.options.setdefault("config_kwargs", _S3_CONFIG)
            # One GET per read: with more, s3fs asks for the size first (a HEAD, and a listing when the
            # key is missing, as every new shard is when zarr reads it before writing it).
            self.options.setdefault("max_concurrency", 1)
        try:
            self.fs = fsspec.filesystem(scheme, **self.options)
        except (ImportError, ValueError) as e:
            raise MissingDependencyError(f"{scheme}:// needs an fsspec backend that is not installed ({cause(e)}); "
                                         "install it, e.g. `pip install s3fs` for s3://, gcsfs for gs://, adlfs for "
                                         "az://.") from None

    def check(self, location: Location) -> None:
        if self.scheme in _WEB:
            return  # read-only, and no bucket: a missing file is found where it is read
        with self._errors(location):
            try:
                if self.scheme in _CONDITIONAL:
                    self.fs.call_s3("head_bucket", Bucket=location.bucket)
                    return
                found = self.fs.exists(location.bucket)
            except FileNotFoundError:
                found = False
            if not found:
                raise StorageError(f"The bucket {location.bucket!r} of {location.url} does not exist: create it, "
                                   "or name one that does.")

    def exists(self, location: Location) -> bool:
        with self._errors(location):
            return bool(self.fs.exists(self._path(location)))

    def list(self, location: Location) -> list[str]:
        with self._errors(location):
            try:
                entries = self.fs.ls(self._path(location), detail=False)
            except FileNotFoundError:
                return []
        here = self._path(location).rstrip("/")
        return sorted({e.rstrip("/").removeprefix(here + "/") for e in entries if e.rstrip("/") != here})

    def read_bytes(self, location: Location) -> bytes:
        with self._errors(location):
            return bytes(self.fs.cat_file(self._path(location)))

    def download(self, location: Location, target: Path) -> None:
        with self._errors(location):
            self.fs.get_file(self._path(location), str(target))

    def write_bytes(self, location: Location, data: bytes) -> None:
        with self._errors(location):
            self.fs.pipe_file(self._path(location), data)

    def create(self, location: Location, data: bytes) -> str | None:
        bucket, key = self._split(location)
        with self._errors(location), self._refused(gone_is_refusal=False) as refused:  # no bucket: an error
            answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return None if refused else str(answer["ETag"])

    def version(self, location: Location) -> Version | None:
        with self._errors(location):
            try:
                info = self.fs.info(self._path(location))
            except FileNotFoundError:
                return None
        if info.get("type") == "directory":
            return None
        if "ETag" in info and "LastModified" in info:  # S3
            return Version(str(info["ETag"]), info["LastModified"].timestamp())
        # Other stores and web servers: whatever identifies this version of the bytes.
        tag = next((str(info[k]) for k in ("ETag", "etag", "generation", "Last-Modified") if info.get(k)), None)
        return Version(tag or f"size-{info.get('size')}", 0.0)

    def replace_if(self, location: Location, data: bytes, tag: str) -> str | None:
        bucket, key = self._split(location)
        with self._errors(location), self._refused() as refused:
            answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        return None if refused else str(answer["ETag"])

    def delete_if(self, location: Location, tag: str) -> bool:
        bucket, key = self._split(location)
        with self._errors(location), self._refused() as refused:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
        return not refused

    def delete(self, location: Location, recursive: bool = False) -> None:
        with self._errors(location), contextlib.suppress(FileNotFoundError):
            if recursive:
                self.fs.rm(self._path(location), recursive=True)
            elif self.fs.isfile(self._path(location)):
                self.fs.rm_file(self._path(location))

    def zarr_store(self, location: Location, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(location.url, storage_options=self.options, read_only=read_only)

    # -- helpers --------------------------------------------------------------------------------------

    def _path(self, location: Location) -> str:
        """The path as this file system names it: ``bucket/key``, or the whole URL on a web server."""
        return location.url if self.scheme in _WEB else location.path

    def _split(self, location: Location) -> tuple[str, str]:
        if self.scheme not in _CONDITIONAL:
            raise StorageError(f"{location.url}: tessera's output lock needs conditional writes, which it makes on "
                               "s3:// (and S3-compatible stores) only; write to s3:// or a local folder.")
        bucket, _, key = location.path.partition("/")
        return bucket, key

    @staticmethod
    @contextlib.contextmanager
    def _refused(gone_is_refusal: bool = True) -> Iterator[builtins.list[bool]]:
        """Catch a failed condition (HTTP 412; 409 when a concurrent conditional write is under way; with
        `gone_is_refusal`, If-Match on an object that is gone); the yielded list is then true."""
        refused: builtins.list[bool] = []
        try:
            yield refused
        except FileExistsError:  # s3fs: If-None-Match failed
            refused.append(True)
        except FileNotFoundError:
            if not gone_is_refusal:
                raise
            refused.append(True)
        except OSError as e:
            if e.errno != errno.EINVAL or ("condition" not in str(e).lower() and "conflict" not in str(e).lower()):
                raise
            refused.append(True)

    @contextlib.contextmanager
    def _errors(self, location: Location) -> Iterator[None]:
        """Turn the store's failures (unreachable, no credentials, no bucket, denied) into one-line StorageErrors."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise StorageError(f"The bucket {location.bucket!r} of {location.url} does not exist: create it, "
                                   "or name one that does.") from None
            raise
        except PermissionError as e:
            raise StorageError(f"Access to {location.url} was refused ({cause(e)}): check the credentials "
                               "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions "
                               "on the bucket.") from None
        except Exception as e:
            name = type(e).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                raise StorageError(f"No credentials for {location.url}: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance role "
                                   "gives them.") from None
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                        "ClientConnectorError", "ServerTimeoutError") or isinstance(e, ConnectionError | TimeoutError):
                endpoint = (location.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                            or os.environ.get("AWS_ENDPOINT_URL") or "its endpoint")
                raise StorageError(f"Cannot reach the object store for {location.url} at {endpoint} ({cause(e)}): "
                                   "check the endpoint (endpoint_url, AWS_ENDPOINT_URL) and the network.") from None
            raise
