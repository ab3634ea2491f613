"""Conditional requests, one way per object store: what makes the output lock safe with no lock server.

Each store has its own words for the same three operations: create only where nothing is, replace or
delete only the version read.

- S3 (AWS since 2024, MinIO, Ceph RGW, moto): ``If-None-Match: *`` and ``If-Match: <ETag>`` on PUT and
  DELETE, refused with HTTP 412 (409 while a concurrent conditional write is under way).
- Azure Blob (and Azurite): the same headers through the SDK's ``overwrite=False`` and
  ``etag`` with ``MatchConditions.IfNotModified``, refused as ResourceExistsError / ResourceModifiedError.

Google Cloud Storage has them too (``ifGenerationMatch``), but no emulator that enforces them can be
installed here to test them, so ``gs://`` is not offered a lock yet.
"""

from __future__ import annotations

import builtins
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

__all__ = ["Conditions", "conditions_for"]


class Conditions(ABC):
    """The conditional operations on one file system; ``key`` is the object's name inside ``bucket``."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @abstractmethod
    def head_bucket(self, bucket: str) -> None:
        """Raise the store's error for a bucket that is missing, refused or out of reach, quickly."""

    @abstractmethod
    def create(self, bucket: str, key: str, data: bytes) -> str | None:
        """The new object's tag, or None when something was there. A missing bucket raises."""

    @abstractmethod
    def replace_if(self, bucket: str, key: str, data: bytes, tag: str) -> str | None:
        """The new tag, or None when the object changed or is gone."""

    @abstractmethod
    def delete_if(self, bucket: str, key: str, tag: str) -> bool:
        """Whether the object was deleted (False: it changed or is gone)."""


class S3Conditions(Conditions):
    def head_bucket(self, bucket: str) -> None:
        self.fs.call_s3("head_bucket", Bucket=bucket)

    def create(self, bucket: str, key: str, data: bytes) -> str | None:
        with self._refused(gone_is_refusal=False) as refused:  # no bucket: an error
            answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return None if refused else str(answer["ETag"])

    def replace_if(self, bucket: str, key: str, data: bytes, tag: str) -> str | None:
        with self._refused() as refused:
            answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
        return None if refused else str(answer["ETag"])

    def delete_if(self, bucket: str, key: str, tag: str) -> bool:
        with self._refused() as refused:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
        return not refused

    @staticmethod
    @contextlib.contextmanager
    def _refused(gone_is_refusal: bool = True) -> Iterator[builtins.list[bool]]:
        """Catch a failed condition (s3fs raises a 412 on If-None-Match as FileExistsError, others as an
        OSError caused by botocore's error, PreconditionFailed, or ConditionalRequestConflict (409) for a
        concurrent conditional write; with `gone_is_refusal`, If-Match on an object that is gone); the
        yielded list is then true."""
        refused: builtins.list[bool] = []
        try:
            yield refused
        except FileExistsError:
            refused.append(True)
        except FileNotFoundError:
            if not gone_is_refusal:
                raise
            refused.append(True)
        except OSError as e:
            response = getattr(e.__cause__, "response", None)  # botocore's error, which s3fs raises from
            code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
            if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            refused.append(True)


class AzureConditions(Conditions):
    """Through adlfs's asynchronous client (``fs.service_client``), on adlfs's own event loop."""

    def head_bucket(self, bucket: str) -> None:
        # One attempt: the SDK's default retries a refused connection for minutes.
        self._run(self.fs.service_client.get_container_client(bucket),
                  lambda container: container.get_container_properties(retry_total=0, connection_timeout=5))

    def create(self, bucket: str, key: str, data: bytes) -> str | None:
        from azure.core.exceptions import ResourceExistsError

        try:
            answer = self._run(self._blob(bucket, key), lambda blob: blob.upload_blob(data, overwrite=False))
        except ResourceExistsError:
            return None
        return str(answer["etag"])

    def replace_if(self, bucket: str, key: str, data: bytes, tag: str) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            answer = self._run(self._blob(bucket, key), lambda blob: blob.upload_blob(
                data, overwrite=True, etag=tag, match_condition=MatchConditions.IfNotModified))
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return str(answer["etag"])

    def delete_if(self, bucket: str, key: str, tag: str) -> bool:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            self._run(self._blob(bucket, key),
                      lambda blob: blob.delete_blob(etag=tag, match_condition=MatchConditions.IfNotModified))
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    def _blob(self, container: str, name: str) -> Any:
        return self.fs.service_client.get_blob_client(container, name)

    def _run(self, client: Any, call: Any) -> Any:
        """`await call(client)` inside the client's context, on adlfs's event loop."""
        from fsspec.asyn import sync

        async def run() -> Any:
            async with client:
                return await call(client)

        return sync(self.fs.loop, run)


_BY_SCHEME: dict[str, type[Conditions]] = {"s3": S3Conditions, "s3a": S3Conditions, "az": AzureConditions,
                                           "abfs": AzureConditions, "abfss": AzureConditions}


def conditions_for(scheme: str, fs: Any) -> Conditions | None:
    """The conditional operations of `scheme`'s store, or None where tessera has none for it."""
    kind = _BY_SCHEME.get(scheme)
    return kind(fs) if kind is not None else None
