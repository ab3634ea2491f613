"""Reading a served mosaic without leaving the served folder.

`tessera serve ROOT` must not read a byte from outside ROOT, even when someone who may write under
ROOT puts a symbolic link inside a mosaic (a chunk, a metadata document or a whole array folder that
points at, say, /etc or another user's files). Checking the folder when the mosaic is opened would
leave a race (a link made after the check is followed), so the check is the read itself:
`ContainedStore` opens every file one path component at a time from ROOT's own folder with
O_NOFOLLOW, so a link anywhere below ROOT on the way to a file is met as a link and refused
(`ContainmentError`), whatever it points to and whenever it was made. A link to a folder *naming*
the mosaic (ROOT/a.zarr -> ROOT/b.zarr) is resolved once, by the service, and allowed when it stays
inside ROOT; below that, inside a mosaic, no link is followed.

Not covered: hard links (they are the file itself, indistinguishable from a copy; Linux's
fs.protected_hardlinks stops linking files one cannot read), and ROOT's own ancestors, which are the
operator's.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from pipeline.errors import ContainmentError
from pipeline.mosaic import Mosaic, is_mosaic_document
from pipeline.storage import Location

_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang a read


MAX_METADATA = 16 << 20  # bytes of a mosaic's zarr.json the service reads


def is_contained_mosaic(root: Path, folder: Path) -> bool:
    """Whether `folder` (resolved, inside `root`) holds a tessera mosaic, its zarr.json read as the store reads
    chunks: following no link, never blocking (a FIFO), at most MAX_METADATA bytes; a document that is not
    JSON, or too deeply nested to parse, is no mosaic.

    Raises:
        ContainmentError: zarr.json, or a folder on the way to it, is a link or not a regular file.
    """
    try:
        fd = open_below(root, (*folder.relative_to(root).parts, "zarr.json"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    with io.FileIO(fd, closefd=True) as f:
        text = f.read(MAX_METADATA + 1)
    if len(text) > MAX_METADATA:
        return False
    try:
        return is_mosaic_document(json.loads(text))
    except (ValueError, RecursionError):
        return False


def open_contained(root: Path, folder: Path) -> Mosaic:
    """The mosaic in `folder` (resolved, inside `root`), every file of it read through `ContainedStore`.

    Raises:
        ContainmentError: a file it reads is a link, or not a regular file.
        MosaicError: `folder` holds no tessera mosaic.
    """
    store = ContainedStore(folder, root)
    return Mosaic(Location.parse(folder), zarr.open_group(store, mode="r", zarr_format=3))


class ContainedStore(LocalStore):
    """A read-only zarr LocalStore on `root` that follows no symbolic link below `within`."""

    def __init__(self, root: Path | str, within: Path, *, read_only: bool = True) -> None:
        super().__init__(root, read_only=True)
        self.within = within
        self._below = Path(root).relative_to(within).parts  # ValueError: not inside, a bug of the caller

    def with_read_only(self, read_only: bool = False) -> ContainedStore:
        return self  # read-only whatever is asked

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Any) -> list[Buffer | None]:
        reads = (asyncio.to_thread(self._read, key, prototype, byte_range) for key, byte_range in key_ranges)
        return list(await asyncio.gather(*reads))

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
        """The bytes of `key` (None when it does not exist, as zarr expects of a missing chunk)."""
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ContainmentError(f"the mosaic names a file {key!r} that is not a plain path inside it")
        try:
            fd = open_below(self.within, (*self._below, *parts))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with io.FileIO(fd, "rb") as f:
            if byte_range is None:
                return prototype.buffer.from_bytes(f.readall())
            size = f.seek(0, io.SEEK_END)
            if isinstance(byte_range, RangeByteRequest):
                f.seek(byte_range.start)
                return prototype.buffer.from_bytes(f.read(byte_range.end - byte_range.start) or b"")
            if isinstance(byte_range, OffsetByteRequest):
                f.seek(byte_range.offset)
            elif isinstance(byte_range, SuffixByteRequest):
                f.seek(max(0, size - byte_range.suffix))
            else:
                raise TypeError(f"unexpected byte range {byte_range!r}")
            return prototype.buffer.from_bytes(f.readall())


def open_below(within: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of the regular file `within`/parts, opened component by component, following no link.

    Raises:
        ContainmentError: a component is a symbolic link, or the file is not a regular file.
        FileNotFoundError, NotADirectoryError, IsADirectoryError: it is not there (or is a folder).
    """
    fd = os.open(within, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            inner = _open_at(fd, name, _FOLDER)
            os.close(fd)
            fd = inner
        file = _open_at(fd, parts[-1], _FILE)
    finally:
        os.close(fd)
    mode = os.fstat(file).st_mode
    if stat.S_ISREG(mode):
        return file
    os.close(file)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(parts[-1])
    raise ContainmentError(f"{'/'.join(parts[-2:])} in a served mosaic is not a regular file: it is not read")


def _open_at(folder: int, name: str, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=folder)
    except OSError as e:
        # O_NOFOLLOW meets a link as ELOOP (a file) or ENOTDIR (a folder wanted): tell a link from absence.
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and _is_link(folder, name):
            raise ContainmentError(
                f"{name!r} in a served mosaic is a symbolic link: the service reads no file through a link "
                "inside a mosaic; replace the link with the file itself") from None
        raise


def _is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False
