"""An exclusive lock on a job's output: one job writes a mosaic at a time.

The lock is a file beside the output (`scene.zarr.lock`) holding its owner (host, pid, start time)
and a heartbeat the owner refreshes. A second job finding a live lock is refused. A lock whose owner
is dead (same host and the process is gone, or no heartbeat for `stale_after` seconds) is broken:
it is renamed away atomically first, so two jobs breaking the same stale lock cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import OutputLockedError

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 120.0


def lock_path(output: str | Path) -> Path:
    return Path(str(output).rstrip("/") + ".lock")


class OutputLock:
    """Hold with `with OutputLock(output):`; raises OutputLockedError if another live job holds it."""

    def __init__(self, output: str | Path, stale_after: float = STALE_AFTER_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.path = lock_path(output)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(2):
            if self._try_create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            holder = self._read()
            if holder is not None and not self._is_stale(holder):
                raise OutputLockedError(
                    f"{self.path.with_suffix('')} is being written by another job (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {time.ctime(holder.get('started', 0))}): wait for it to "
                    f"finish, or stop it; a dead job's lock is broken after {self.stale_after:.0f} s"
                )
            self._break(holder or {})
        raise OutputLockedError(f"could not take the lock {self.path}: another job took it at the same moment")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.owner["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a crashed owner: stale unless its heartbeat file is fresh

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") == self.owner["host"] and isinstance(pid, int) and not psutil.pid_exists(pid):
            return True  # its process is gone (a reused pid only delays this to the heartbeat test)
        beat = holder.get("heartbeat")
        if not isinstance(beat, int | float):
            beat = self.path.stat().st_mtime if self.path.exists() else 0.0
        return time.time() - beat > self.stale_after

    def _break(self, stale: dict[str, Any]) -> None:
        """Move the stale lock aside atomically; whoever moves it first may then create a new one.

        If what was moved is not the lock judged stale (another job broke it and took a fresh one in
        between), it is put back, unless a third lock appeared meanwhile.
        """
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != stale.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = self._read()
            if holder is None or holder.get("token") != self.owner["token"]:
                return  # someone broke our lock as stale; stop touching it
            tmp = self.path.with_name(f"{self.path.name}.{self.owner['token'][:8]}.tmp")
            tmp.write_bytes(self._record())
            os.replace(tmp, self.path)
