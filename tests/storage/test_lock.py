"""The output lock on each storage (a local folder and a real S3 server): one live owner at a time,
a dead owner's lock taken over by exactly one job, and an owner that lost its lock told so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import OutputLockedError
from pipeline.locking import OutputLock, lock_location
from pipeline.storage import Location, storage_for


@pytest.fixture(params=["local", "s3", "az"])
def out(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """A mosaic's location on each storage."""
    if request.param == "local":
        return Location.parse(tmp_path / "m.zarr")
    bucket = request.getfixturevalue("s3_bucket" if request.param == "s3" else "azure_container")
    return Location.parse(bucket).join("m.zarr")


def holder(out: Location) -> dict[str, object]:
    lock = lock_location(out)
    return dict(json.loads(storage_for(lock).read_bytes(lock)))


def plant(out: Location, **record: object) -> None:
    """A lock left by another job."""
    lock = lock_location(out)
    storage_for(lock).write_bytes(lock, json.dumps({"token": "x", "started": 0, **record}).encode())


def test_second_job_on_the_same_output_is_refused(out: Location) -> None:
    with OutputLock(out):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
        assert holder(out)["pid"] == os.getpid()
    assert not storage_for(out).exists(lock_location(out))


def test_a_lock_left_to_go_stale_keeps_other_jobs_out_until_it_is(out: Location) -> None:
    """A job that could not confirm its writers stopped leaves its lock (one writer per block): another job
    is refused while the lock's last heartbeat is fresh, and takes it over once it is stale."""
    # stale_after 4 s: the refusal must come while the heartbeat is fresh, and on a loaded machine an
    # object store's round trips took over a second (1 s made this test fail once in `make test`).
    first = OutputLock(out, stale_after=4.0, heartbeat=0.2)
    first.acquire()
    first.release(leave_stale=True)
    assert holder(out)["token"] == first.owner["token"]
    with pytest.raises(OutputLockedError):
        OutputLock(out, stale_after=4.0).acquire()
    time.sleep(4.2)
    with OutputLock(out, stale_after=4.0) as second:
        assert holder(out)["token"] == second.owner["token"]


def test_lock_of_a_dead_owner_is_broken(out: Location) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(out, host=os.uname().nodename, pid=dead.pid, heartbeat=time.time())
    with OutputLock(out) as lock:
        assert holder(out)["token"] == lock.owner["token"]


def test_lock_without_heartbeat_is_broken_after_stale_after(out: Location) -> None:
    plant(out, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(OutputLockedError):
        OutputLock(out, stale_after=60).acquire()
    with OutputLock(out, stale_after=2):
        assert holder(out)["host"] != "elsewhere"


def test_jobs_racing_for_a_dead_lock_have_one_winner(out: Location) -> None:
    plant(out, host="elsewhere", pid=1, heartbeat=0)
    locks = [OutputLock(out, stale_after=60) for _ in range(5)]
    barrier, won = threading.Barrier(len(locks)), []

    def take(lock: OutputLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except OutputLockedError:
            pass

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert holder(out)["token"] == won[0].owner["token"]
    won[0].release()


def test_an_owner_whose_lock_was_taken_over_learns_it(out: Location) -> None:
    stalled = OutputLock(out, heartbeat=0.2)
    stalled.acquire()
    lock = lock_location(out)
    storage_for(lock).write_bytes(lock, json.dumps({"host": "elsewhere", "pid": 1, "token": "new"}).encode())
    deadline = time.monotonic() + 10
    while not stalled.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stalled.lost
    stalled.release()  # leaves the new owner's lock alone
    assert holder(out)["token"] == "new"
