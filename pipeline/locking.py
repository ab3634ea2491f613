"""An exclusive lock on a job's output: one job writes a mosaic at a time, on a disk or object storage.

The lock is a small JSON object beside the output (`scene.zarr.lock`) holding its owner (host, pid,
start time) and a heartbeat the owner refreshes. Every change to it is a conditional write of the
storage contract (`pipeline.storage`): it is created only where none is, and refreshed, broken or
released only if it is still the version its writer read. So a second job finding a live lock is
refused; a lock whose owner is dead (same host and the process is gone, or no heartbeat for
`stale_after` seconds) is taken over by exactly one of the jobs that find it; and an owner whose lock
was taken over while it was stalled learns so at its next heartbeat (`OutputLock.lost`) instead of
writing on beside the new owner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import OutputLockedError
from pipeline.storage import Location, Version, storage_for

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 120.0

log = logging.getLogger(__name__)


def lock_location(output: str | Path | Location) -> Location:
    """Where the lock of `output` lives: beside it, named `<output>.lock`."""
    return Location.parse(output).with_suffix(".lock")


class OutputLock:
    """Hold with `with OutputLock(output):`; raises OutputLockedError if another live job holds it."""

    def __init__(self, output: str | Path | Location, stale_after: float = STALE_AFTER_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.location = lock_location(output)
        self.storage = storage_for(self.location)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                                      "started": time.time()}
        self.lost = False  # taken over by another job while we held it
        self._tag: str | None = None  # the version of the lock we wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            tag = self.storage.create(self.location, self._record())
            if tag is None:
                holder, version = self._read()
                if version is None:
                    continue  # released between our two looks: try again
                if not self._is_stale(holder, version):
                    raise OutputLockedError(
                        f"{str(self.location).removesuffix('.lock')} is being written by another job (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, started {time.ctime(holder.get('started', 0))}):"
                        f" wait for it to finish, or stop it; a dead job's lock is broken after "
                        f"{self.stale_after:.0f} s"
                    )
                tag = self.storage.replace_if(self.location, self._record(), version.tag)  # take it over
            if tag is not None:
                self._tag = tag
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
        raise OutputLockedError(f"could not take the lock {self.location}: other jobs took it at the same moment")

    def release(self, leave_stale: bool = False) -> None:
        """Stop the heartbeat and delete the lock; with `leave_stale`, keep it, to be broken only once it has
        gone stale (when a writer of ours may still be running, so that no other job writes beside it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._tag is not None and not self.lost and not leave_stale:
            self.storage.delete_if(self.location, self._tag)
        self._tag = None

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _read(self) -> tuple[dict[str, Any], Version | None]:
        """The holder's record ({} when unreadable: half-written by a crashed owner) and its version."""
        version = self.storage.version(self.location)
        if version is None:
            return {}, None
        try:
            holder = json.loads(self.storage.read_bytes(self.location))
        except FileNotFoundError:
            return {}, None
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), version

    def _is_stale(self, holder: dict[str, Any], version: Version) -> bool:
        pid = holder.get("pid")
        if holder.get("host") == self.owner["host"] and isinstance(pid, int) and not psutil.pid_exists(pid):
            return True  # its process is gone (a reused pid only delays this to the heartbeat test)
        beat = holder.get("heartbeat")
        if not isinstance(beat, int | float):
            beat = version.modified
        return time.time() - beat > self.stale_after

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                tag = self.storage.replace_if(self.location, self._record(), str(self._tag))
            except Exception as e:  # the store did not answer this time: the next beat tries again
                log.warning("could not refresh the lock %s: %s", self.location, e)
                continue
            if tag is None:
                self.lost = True  # broken as stale by another job: stop touching it
                log.warning("the lock %s was taken over by another job", self.location)
                return
            self._tag = tag
