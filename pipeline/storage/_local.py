"""The storage contract on a local or mounted shared file system (POSIX: NFS and Lustre included).

Whole-object writes go through a temporary file and a rename. Creating only where nothing is links a
finished temporary file into place (``link`` fails if the name exists, also over NFS, unlike a
check-then-write). The conditional replace and delete first rename the object aside, which only one
caller can do; whoever moved it compares it with the tag it read and puts it back if it changed. The
object is absent for that moment, so a ``create`` racing it may win; the conditional call then fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError
from pipeline.files import write_atomically, write_beside
from pipeline.storage.base import Storage, Version
from pipeline.storage.location import Location


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


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
        aside = self._take(path, tag)
        if aside is None:
            return None
        temporary = write_beside(path, data)
        try:
            os.link(temporary, path)
        except FileExistsError:  # created by someone else while ours was aside: theirs stands
            return None
        finally:
            temporary.unlink()
            aside.unlink()
        return _tag(data)

    def delete_if(self, location: Location, tag: str) -> bool:
        aside = self._take(location.local_path(), tag)
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
        """Rename the object aside if it is still version `tag`: the aside path, or None (it is put back)."""
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.aside")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None
        if _tag(aside.read_bytes()) == tag:
            return aside
        with contextlib.suppress(FileExistsError):  # a third writer created one meanwhile: theirs stands
            os.link(aside, path)
        aside.unlink()
        return None
