"""The storage contract on object storage, through fsspec (s3fs for ``s3://``, adlfs for ``az://``,
gcsfs for ``gs://``, any other fsspec file system for reading).

Credentials and the endpoint come from the environment as each store's own client reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, an instance role...;
``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_NAME`` with a key or an identity), or
from the location's storage options. A PUT is atomic on object stores, so whole-object writes need no
temporary object. The conditional operations are the store's conditional requests (``_conditional``).
Listings are never cached: a lock or a marker must be seen the moment another process writes it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, MissingDependencyError, StorageError, cause
from pipeline.storage._conditional import Conditions, conditions_for
from pipeline.storage.base import Storage, Version
from pipeline.storage.location import Location

# A store that does not answer fails in seconds, not minutes: botocore's default waits 60 s per
# connection attempt and retries.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
_S3 = ("s3", "s3a")
_AZURE = ("az", "abfs", "abfss")
_WEB = ("http", "https")  # fsspec's HTTP file system takes whole URLs, and has no buckets


class ObjectStorage(Storage):
    """One fsspec file system (one scheme and set of options)."""

    def __init__(self, scheme: str, options: dict[str, Any]) -> None:
        import fsspec

        self.scheme = scheme
        # The same options for this file system and for zarr's (an async one of its own).
        self.options: dict[str, Any] = {"use_listings_cache": False, **options}
        if scheme in _S3:
            self.options.setdefault("config_kwargs", _S3_CONFIG)
            # One GET per read: with more, s3fs asks for the size first (a HEAD, and a listing when the
            # key is missing, as every new shard is when zarr reads it before writing it).
            self.options.setdefault("max_concurrency", 1)
        try:
            self.fs = fsspec.filesystem(scheme, **self.options)
        except ImportError as e:
            raise MissingDependencyError(f"{scheme}:// needs an fsspec backend that is not installed ({cause(e)}); "
                                         "install it, e.g. `pip install s3fs` for s3://, gcsfs for gs://, adlfs for "
                                         "az://.") from None
        except ValueError as e:
            if "protocol" in str(e).lower():
                raise ConfigError(f"{scheme}:// is not a storage tessera knows ({cause(e)}): use a local path, "
                                  "s3://, gs://, az:// or another fsspec URL.") from None
            fix = _CREDENTIALS.get(scheme, "check its storage options")
            raise StorageError(f"No usable credentials or settings for {scheme}://: {fix} ({cause(e)}).") from None
        self.conditions: Conditions | None = conditions_for(scheme, self.fs)

    def check(self, location: Location) -> None:
        if self.scheme in _WEB:
            return  # read-only, and no bucket: a missing file is found where it is read
        with self._errors(location):
            try:
                if self.conditions is not None:
                    self.conditions.head_bucket(location.bucket)
                    return
                found = self.fs.exists(location.bucket)
            except FileNotFoundError:
                found = False
            if not found:
                raise self._no_bucket(location)

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
        conditions, bucket, key = self._split(location)
        with self._errors(location):
            return conditions.create(bucket, key, data)

    def version(self, location: Location) -> Version | None:
        with self._errors(location):
            try:
                info = self.fs.info(self._path(location))
            except FileNotFoundError:
                return None
        if info.get("type") == "directory":
            return None
        # ETag on S3, etag on Azure, generation on GCS; a web server's Last-Modified at worst.
        tag = next((str(info[k]) for k in ("ETag", "etag", "generation", "Last-Modified") if info.get(k)), None)
        return Version(tag or f"size-{info.get('size')}", _modified(info))

    def replace_if(self, location: Location, data: bytes, tag: str) -> str | None:
        conditions, bucket, key = self._split(location)
        with self._errors(location):
            return conditions.replace_if(bucket, key, data, tag)

    def delete_if(self, location: Location, tag: str) -> bool:
        conditions, bucket, key = self._split(location)
        with self._errors(location):
            return conditions.delete_if(bucket, key, tag)

    def delete(self, location: Location, recursive: bool = False) -> None:
        with self._errors(location), contextlib.suppress(FileNotFoundError):
            if recursive:
                self.fs.rm(self._path(location), recursive=True)
            elif self.fs.isfile(self._path(location)):
                self.fs.rm_file(self._path(location))

    def zarr_store(self, location: Location, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        if self.scheme in _AZURE:
            _close_azure_clients_first()
            fs = _azure_with_suffix_reads()(asynchronous=True, **self.options)
            return FsspecStore(fs=fs, path=location.path, read_only=read_only)
        return FsspecStore.from_url(location.url, storage_options=self.options, read_only=read_only)

    # -- helpers --------------------------------------------------------------------------------------

    def _path(self, location: Location) -> str:
        """The path as this file system names it: ``bucket/key``, or the whole URL on a web server."""
        return location.url if self.scheme in _WEB else location.path

    def _split(self, location: Location) -> tuple[Conditions, str, str]:
        if self.conditions is None:
            raise StorageError(f"{location.url}: tessera's output lock needs conditional writes, which it makes on "
                               "s3:// (and S3-compatible stores) and az:// only; write there or to a local folder.")
        bucket, _, key = location.path.partition("/")
        return self.conditions, bucket, key

    @contextlib.contextmanager
    def _errors(self, location: Location) -> Iterator[None]:
        """Turn the store's failures (unreachable, no credentials, no bucket, denied) into one-line StorageErrors."""
        credentials = _CREDENTIALS.get(self.scheme, "check the storage options' credentials")
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as e:  # s3fs and adlfs raise it for a missing bucket and a missing object alike
            if _no_such_bucket(e):
                raise self._no_bucket(location) from None
            raise
        except PermissionError as e:
            raise StorageError(f"Access to {location.url} was refused ({cause(e)}): {credentials}, with permissions "
                               "on the bucket.") from None
        except Exception as e:
            name = type(e).__name__
            if _no_such_bucket(e):  # Azure's own error, where adlfs does not translate it
                raise self._no_bucket(location) from None
            if getattr(e, "status_code", None) == 403 or name == "ClientAuthenticationError":  # Azure's refusals
                raise StorageError(f"Access to {location.url} was refused ({cause(e)}): {credentials}, with "
                                   "permissions on the container.") from None
            if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialUnavailableError"):
                raise StorageError(f"No usable credentials for {location.url} ({cause(e)}): {credentials}.") from None
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                        "ClientConnectorError", "ServerTimeoutError", "ServiceRequestError",
                        "ServiceResponseTimeoutError") or isinstance(e, ConnectionError | TimeoutError):
                raise StorageError(f"Cannot reach the object store for {location.url} at {self._endpoint(location)} "
                                   f"({cause(e)}): check the endpoint ({_ENDPOINT.get(self.scheme, 'endpoint_url')}) "
                                   "and the network.") from None
            if type(e).__module__.startswith("azure."):  # the service's other answers (busy, a bad name...)
                raise StorageError(f"The object store failed a request for {location.url} ({cause(e)}): check the "
                                   "name and the service's status, then rerun.") from None
            raise

    def _no_bucket(self, location: Location) -> StorageError:
        kind = "container" if self.scheme in _AZURE else "bucket"
        return StorageError(f"The {kind} {location.bucket!r} of {location.url} does not exist: create it, "
                            "or name one that does.")

    def _endpoint(self, location: Location) -> str:
        if self.scheme in _AZURE:
            return str(getattr(getattr(self.fs, "service_client", None), "url", "") or "its endpoint")
        return (location.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or "its endpoint")


def _no_such_bucket(error: BaseException) -> bool:
    """Whether an error says the bucket (or container) is missing, not an object: by the store's error code,
    on the error or the one it was raised from, where the client keeps it; else by its message."""
    for raised in (error, error.__cause__):
        response = getattr(raised, "response", None)  # botocore's: a dict; Azure's: an HTTP response
        code = (response.get("Error", {}).get("Code") if isinstance(response, dict) else None) or getattr(
            raised, "error_code", None)
        if code is not None:
            return str(code) in ("NoSuchBucket", "ContainerNotFound")
    text = str(error).lower()
    return "specified bucket does not exist" in text or "specified container does not exist" in text


def _modified(info: dict[str, Any]) -> float:
    """When the store says the object was written (seconds since the epoch), or 0.0 when it does not say."""
    import datetime as dt
    from email.utils import parsedate_to_datetime

    when = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("Last-Modified")
    if isinstance(when, str):
        text = when
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError):
                return 0.0
    return when.timestamp() if isinstance(when, dt.datetime) else float(when or 0.0)


@functools.cache
def _azure_with_suffix_reads() -> type:
    """adlfs's file system, reading "the last N bytes" (zarr asks so for a shard's index) by the object's
    size: adlfs 2026.8 sends the negative offset as it is, which the service refuses."""
    from adlfs import AzureBlobFileSystem

    class SuffixReads(AzureBlobFileSystem):  # type: ignore[misc]
        async def _cat_file(self, path: str, start: int | None = None, end: int | None = None,
                            **kwargs: Any) -> Any:
            if start is not None and start < 0:
                start = max((await self._info(path))["size"] + start, 0)
            return await super()._cat_file(path, start=start, end=end, **kwargs)

    return SuffixReads


@functools.cache
def _close_azure_clients_first() -> None:
    """adlfs closes each client at exit by a weakref finalizer, on the event loop the client was made on;
    zarr's own loop has stopped by then (its exit handler ran first), and each prints a traceback. This
    exit handler, registered after zarr's, runs before it: the finalizers are run while the loops still do."""

    from adlfs import AzureBlobFileSystem

    def close() -> None:
        for finalizer in list(getattr(weakref.finalize, "_registry", {})):
            held = finalizer.peek()
            if held is not None and isinstance(held[0], AzureBlobFileSystem):
                with contextlib.suppress(Exception):
                    finalizer()

    atexit.register(close)


# What to set, per store, when its credentials are missing or refused, and where its endpoint is named.
_CREDENTIALS = {
    **dict.fromkeys(_S3, "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an "
                         "instance role gives them"),
    **dict.fromkeys(_AZURE, "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with "
                            "AZURE_STORAGE_ACCOUNT_KEY (or a managed identity)"),
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run where the metadata server gives them",
}
_ENDPOINT = {**dict.fromkeys(_S3, "endpoint_url, AWS_ENDPOINT_URL"),
             **dict.fromkeys(_AZURE, "BlobEndpoint in AZURE_STORAGE_CONNECTION_STRING")}
