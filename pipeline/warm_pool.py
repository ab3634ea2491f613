"""Block workers kept warm between the jobs of one process, on a Ray it did not start.

A process that runs several jobs on a Ray it joined (a notebook after `ray.init()`, a service, the test
suite) would otherwise start fresh worker processes for every job: each a Python interpreter importing
torch and tessera, several CPU-seconds apiece. The workers of a job that ended normally wait here, idle,
for the next job asking for the same resources per worker on the same Ray; that job hands them its own
setup (its model), which they load in place of the last one. Workers that fail or are stopped are never
kept.

Idle workers hold their CPUs and GPUs, so they are ended after IDLE_SECONDS, when a job asks for workers
of another shape, when `release()` is called (Ray Train does, before it asks for the cluster's CPUs), and
with the process. An embedded Ray, started and stopped by its own job, keeps nothing here.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

IDLE_SECONDS = 60.0

_lock = threading.Lock()
_idle: dict[tuple[Any, ...], list[Any]] = {}
_timer: threading.Timer | None = None


def key(num_cpus: float, num_gpus: float) -> tuple[Any, ...]:
    """What makes workers interchangeable: the Ray job they belong to (a new `ray.init` is another) and
    the resources each holds."""
    import ray

    return ray.get_runtime_context().get_job_id(), float(num_cpus), float(num_gpus)


def take(wanted: tuple[Any, ...], count: int) -> list[Any]:
    """Up to `count` idle workers of that shape; every other idle worker is ended."""
    global _timer
    with _lock:
        if _timer is not None:
            _timer.cancel()
            _timer = None
        kept = _idle.pop(wanted, [])
        others = [actor for actors in _idle.values() for actor in actors] + kept[count:]
        _idle.clear()
    _end(others)
    return kept[:count]


def give(shape: tuple[Any, ...], actors: list[Any]) -> None:
    """Keep a finished job's workers for the next job, for IDLE_SECONDS at most."""
    global _timer
    with _lock:
        earlier = [actor for group in _idle.values() for actor in group]
        _idle.clear()
        _idle[shape] = list(actors)
        if _timer is not None:
            _timer.cancel()
        _timer = threading.Timer(IDLE_SECONDS, release)
        _timer.daemon = True
        _timer.start()
    _end(earlier)


def release() -> None:
    """End every idle worker now, giving their resources back to the cluster."""
    take((), 0)


def _end(actors: list[Any]) -> None:
    if not actors:
        return
    import ray

    if not ray.is_initialized():  # Ray was stopped, and the workers with it (a call would start a new Ray)
        return
    for actor in actors:
        with contextlib.suppress(Exception):  # gone already
            ray.kill(actor, no_restart=True)
