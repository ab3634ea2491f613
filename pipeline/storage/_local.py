"""The storage contract on a local or mounted shared file system (POSIX: NFS and Lustre included).

Whole-object writes go through a temporary file and a rename. Creating only where nothing is links a
finished temporary file into place (``link`` fails if the name exists, also over NFS, unlike a
check-then-write). The conditional create, replace and delete hold an exclusive ``flock`` of the
object's folder, so they run one at a time, across processes; the replace and delete look at the
object and leave another version alone, else rename it aside, checking by its inode that the file moved
is the one they looked at. Where folders cannot be locked (NFS), that protocol alone decides: a writer
replacing the object between the look and the move has it put back, and for that moment a racing
``create`` may win (the owner of the version put back then learns at its next conditional write, as a
lock's heartbeat does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError
from pipeline.files import write_atomically, write_beside
from pipeline.storage.base import Storage, Version
from pipeline.storage.location import Location


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@contextlib.contextmanager
def _exclusive(folder: Path, wait: float = 10.0) -> Iterator[None]:
    """One conditional write at a time in `folder`, across threads and processes: an exclusive ``flock`` of
    the folder itself, so no file is added. Where the folder cannot be locked (a file system without such
    locks, NFS among them, or a folder that cannot be opened), or the lock is not had within `wait`
    seconds (a lock server that does not answer), the rename protocol alone decides, and its one moment
    of absence remains."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    locked, deadline = False, time.monotonic() + wait
    try:
        while not locked:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            except OSError:
                break
        yield
    finally:
        if locked:
            fcntl.flock(descriptor, fcntl.LOCK_UN)  # before close: a forked child shares the descriptor
        os.close(descriptor)


class LocalStorage(Storage):
    """Local paths (``Location.scheme == "file"``)."""

    def check(self, location: Location) -> None:
        path = location.local_path()
        existing = next(p for p in (path, *path.parents) if p.exists())
        folder = existing if existing.is_dir() else existing.parent
        if existing != path and not existing.is_dir():
            raise StorageError(f"Cannot write {path}: {existing} is a file, not a folder; choose another path.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StorageError(f"Cannot write {path}: no permission to write in {folder}; choose a folder you can "
                               "write to.")

    def exists(self, location: Location) -> bool:
        return location.local_path().exists()

    def list(self, location: Location) -> list[str]:
        try:
            return sorted(os.listdir(location.local_path()))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, location: Location) -> bytes:
        path = location.local_path()
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder, not an object")
        return path.read_bytes()

    def download(self, location: Location, target: Path) -> None:
        path = location.local_path()
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder, not an object")
        shutil.copyfile(path, target)

    def write_bytes(self, location: Location, data: bytes) -> None:
        write_atomically(location.local_path(), data)

    def create(self, location: Location, data: bytes) -> str | None:
        path = location.local_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = write_beside(path, data)
        try:
            with _exclusive(path.parent):
                os.link(temporary, path)
        except FileExistsError:
            return None
        finally:
            temporary.unlink()
        return _tag(data)

    def version(self, location: Location) -> Version | None:
        path = location.local_path()
        try:
            data, modified = path.read_bytes(), path.stat().st_mtime
        except (FileNotFoundError, IsADirectoryError):
            return None
        return Version(_tag(data), modified)

    def replace_if(self, location: Location, data: bytes, tag: str) -> str | None:
        path = location.local_path()
        if not path.parent.is_dir():
            return None
        temporary = write_beside(path, data)
        try:
            with _exclusive(path.parent):
                aside = self._take(path, tag)
                if aside is None:
                    return None
                try:
                    os.link(temporary, path)
                except FileExistsError:  # created by someone else while ours was aside: theirs stands
                    return None
                finally:
                    aside.unlink()
        finally:
            temporary.unlink()
        return _tag(data)

    def delete_if(self, location: Location, tag: str) -> bool:
        path = location.local_path()
        if not path.parent.is_dir():
            return False
        with _exclusive(path.parent):
            aside = self._take(path, tag)
        if aside is None:
            return False
        aside.unlink()
        return True

    def delete(self, location: Location, recursive: bool = False) -> None:
        path = location.local_path()
        if path.is_dir() and not path.is_symlink():
            if recursive:
                shutil.rmtree(path)
            else:
                with contextlib.suppress(OSError):  # a folder with something in it stays
                    path.rmdir()
        else:
            path.unlink(missing_ok=True)

    def zarr_store(self, location: Location, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(location.path, read_only=read_only)

    @staticmethod
    def _take(path: Path, tag: str) -> Path | None:
        """Move the object aside if it is still version `tag`: the aside path, or None.

        The object is looked at before it is moved, and another version is left where it is, so that
        callers who come late (their version was replaced already) never take the object away even for
        a moment. Objects are never changed in place (every write links a new file), so the file looked
        at is the one moved when its inode is the same; if a writer replaced it between the look and the
        move, that version is put back (the one moment a racing ``create`` may slip in)."""
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.aside")
        try:
            with path.open("rb") as file:  # held open, so its inode cannot be reused before the move
                if _tag(file.read()) != tag:
                    return None
                inode = os.fstat(file.fileno()).st_ino
                os.replace(path, aside)
        except (FileNotFoundError, IsADirectoryError):
            return None
        if aside.stat().st_ino == inode:
            return aside
        with contextlib.suppress(FileExistsError):  # a third writer created one meanwhile: theirs stands
            os.link(aside, path)
        aside.unlink()
        return None
