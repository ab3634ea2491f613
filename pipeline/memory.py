"""Memory of a job: its peak over all processes, and handing freed heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from typing import Any

import psutil

COST_RATIO = 10  # PeakMemory waits this many times as long as a sample took
# Workers read each source window about once, so a small GDAL block cache loses nothing; GDAL's default
# (5% of RAM in each process) let every worker grow with the image (docs/benchmarks.md, peak memory).
WORKER_GDAL_CACHE_MB = 32  # a segment block's tiles touch about 12 GeoTIFF blocks of 512² at a time


class PeakMemory:
    """Peak of the summed PSS of a process and all its descendants (embedded Ray's too), sampled in a thread.

    PSS (proportional set size) shares each shared page among the processes that map it, so the sum
    does not count torch's libraries or Ray's object store once per worker, as summed RSS does.

    Reading a process's PSS makes the kernel walk its page tables (about 30 ms for a worker of
    1 GB), so the sampler waits at least `COST_RATIO` times as long as its last sample took: it never
    takes more than about a tenth of one core from the job it measures.

    Args:
        pid: the root process; None means this one.
        interval: seconds between samples, at the least.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has ended
            return
        total = 0
        for p in processes:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                continue
        self.peak_mib = max(self.peak_mib, total / 2**20)

    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self.sample()
            wait = max(self.interval, COST_RATIO * (time.perf_counter() - start))


def limit_gdal_cache() -> None:
    """Cap GDAL's block cache in this worker process (unless the user set GDAL_CACHEMAX); call before its first read."""
    os.environ.setdefault("GDAL_CACHEMAX", str(WORKER_GDAL_CACHE_MB))


def release_memory() -> None:
    """Hand the heap that the last unit of work freed back to the OS.

    glibc keeps freed memory of mid-sized arrays in its heap, fragmented: without this a worker grew
    by about 25 MB per block and memory rose with the image size. malloc_trim costs about a millisecond.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()
