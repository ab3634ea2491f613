"""The storage conformance suite: the local file system and object storage (a real S3 server on
127.0.0.1) pass the same tests, so everything written against `Storage` works on both."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import StorageError
from pipeline.storage import LocalStorage, Location, Storage, storage_for


@pytest.fixture(params=["local", "s3", "az"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An empty folder (prefix) on each storage."""
    if request.param == "local":
        return Location.parse(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket" if request.param == "s3" else "azure_container")
    return Location.parse(bucket).join("root")


@pytest.fixture
def storage(root: Location) -> Storage:
    return storage_for(root)


def test_storage_matches_the_location(tmp_path: Path) -> None:
    assert isinstance(storage_for(Location.parse(tmp_path)), LocalStorage)
    assert type(storage_for(Location.parse("s3://b/x"))).__name__ == "ObjectStorage"


def test_objects_are_written_whole_and_read_back(storage: Storage, root: Location) -> None:
    a = root.join("a", "b.json")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)
    assert storage.read_json(a) is None
    storage.write_json(a, {"x": [1, 2]})
    assert storage.read_json(a) == {"x": [1, 2]}
    storage.write_bytes(a, b"second")
    assert storage.read_bytes(a) == b"second"
    assert storage.exists(a) and storage.exists(root.join("a")) and not storage.exists(root.join("c"))


def test_an_object_downloads_to_a_local_file(storage: Storage, root: Location, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.write_bytes(root.join("big.bin"), data)
    storage.download(root.join("big.bin"), tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        storage.download(root.join("missing.bin"), tmp_path / "none.bin")


def test_create_succeeds_only_where_nothing_is(storage: Storage, root: Location) -> None:
    lock = root.join("m.zarr.lock")
    tag = storage.create(lock, b"first")
    assert tag is not None
    version = storage.version(lock)
    assert version is not None and version.tag == tag
    assert abs(version.modified - time.time()) < 60
    assert storage.create(lock, b"second") is None
    assert storage.read_bytes(lock) == b"first"


def test_replace_and_delete_only_the_version_read(storage: Storage, root: Location) -> None:
    lock = root.join("lock")
    assert storage.replace_if(lock, b"x", "no-such-tag") is None and not storage.exists(lock)
    first = storage.create(lock, b"one")
    assert first is not None
    second = storage.replace_if(lock, b"two", first)
    assert second is not None and second != first and storage.read_bytes(lock) == b"two"
    assert storage.replace_if(lock, b"three", first) is None  # stale tag
    assert storage.delete_if(lock, first) is False
    assert storage.read_bytes(lock) == b"two"
    assert storage.delete_if(lock, second) is True
    assert not storage.exists(lock) and storage.version(lock) is None
    assert storage.delete_if(lock, second) is False


def race(calls: int, call: Callable[[], object]) -> list[object]:
    """Run `call` from `calls` threads released at once; their results."""
    barrier, results = threading.Barrier(calls), []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        result = call()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_of_racing_conditional_writes_one_wins(storage: Storage, root: Location) -> None:
    lock = root.join("lock")
    created = race(6, lambda: storage.create(lock, b"mine"))
    assert sum(r is not None for r in created) == 1
    (tag,) = [r for r in created if r is not None]
    replaced = race(6, lambda: storage.replace_if(lock, b"taken", str(tag)))
    assert sum(r is not None for r in replaced) == 1
    assert storage.read_bytes(lock) == b"taken"


def test_listing_names_what_is_directly_below(storage: Storage, root: Location) -> None:
    assert storage.list(root) == []
    for name in ("b", "a/one", "a/two", "c/d/e"):
        storage.write_bytes(root.join(name), b"1")
    assert storage.list(root) == ["a", "b", "c"]
    assert storage.list(root.join("a")) == ["one", "two"]


def test_delete_removes_an_object_or_a_whole_folder(storage: Storage, root: Location) -> None:
    for name in ("m/zarr.json", "m/0/c/0", "keep"):
        storage.write_bytes(root.join(name), b"1")
    storage.delete(root.join("nothing"))
    storage.delete(root.join("keep"))
    assert storage.list(root) == ["m"]
    storage.delete(root.join("m"), recursive=True)
    assert storage.list(root) == [] or not storage.exists(root.join("m"))
    assert not storage.exists(root.join("m", "zarr.json"))


def test_a_zarr_store_on_it_round_trips(storage: Storage, root: Location) -> None:
    location = root.join("a.zarr")
    group = zarr.open_group(storage.zarr_store(location, read_only=False), mode="w", zarr_format=3)
    group.create_array("x", data=np.arange(12, dtype="uint8").reshape(3, 4), chunks=(2, 2))
    again = zarr.open_group(storage.zarr_store(location, read_only=True), mode="r")
    np.testing.assert_array_equal(again["x"][:], np.arange(12).reshape(3, 4))
    assert "zarr.json" in storage.list(location)


def test_check_passes_where_writing_works(storage: Storage, root: Location) -> None:
    storage.check(root.join("new", "a.zarr"))


def test_check_names_what_is_wrong(tmp_path: Path, s3_bucket: str) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage_for(Location.parse(tmp_path)).check(Location.parse(tmp_path / "file" / "a.zarr"))
    missing = Location.parse(s3_bucket + "-missing/a.zarr")
    with pytest.raises(StorageError, match="does not exist: create it"):
        storage_for(missing).check(missing)
    with pytest.raises(StorageError, match="does not exist: create it"):  # an error, not "someone else has it"
        storage_for(missing).create(missing.join("x.lock"), b"{}")


def test_locations_parse_once() -> None:
    s3 = Location.parse("s3://bucket/a/b.zarr/")
    assert (s3.scheme, s3.path, s3.bucket, s3.name, s3.url) == ("s3", "bucket/a/b.zarr", "bucket", "b.zarr",
                                                               "s3://bucket/a/b.zarr")
    assert s3.with_suffix(".lock").url == "s3://bucket/a/b.zarr.lock"
    assert s3.parent.join("c.zarr").url == "s3://bucket/a/c.zarr"
    # Object keys are not normalised (stores read `a//b` and `..` differently): such keys are refused.
    for odd in ("s3://bucket/a//b", "s3://bucket/a/../b", "az://c/./a.zarr"):
        with pytest.raises(ValueError, match=r"empty, '\.' or '\.\.' part"):
            Location.parse(odd)
    local = Location.parse("file:///data/x/../a.zarr")
    assert local.is_local and local.path == "/data/a.zarr"
    assert Location.parse("rel.zarr").path == str(Path("rel.zarr").absolute())
    with pytest.raises(ValueError, match="names no bucket"):
        Location.parse("s3://")
