"""Jobs on a Ray cluster through the Ray Jobs API: submit, list, status, logs, stop.

A submitted job runs the same entry point a user runs by hand (`python -m jobs.segment key=value ...`),
so `ray job submit -- python -m jobs.segment ...` is equivalent. The address is the cluster's
dashboard (http://head:8265), from the argument or RAY_ADDRESS.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, TesseraError

ENTRY_POINTS = {"segment": "jobs.segment", "refine": "jobs.refine", "train": "jobs.train", "nightly": "jobs.nightly"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class JobInfo:
    """What `tessera jobs list` and `status` show of a job."""

    job_id: str
    status: str
    entrypoint: str
    message: str


def entrypoint(job: str, overrides: Sequence[str], python: str = "python") -> str:
    """The shell command a job runs: the job's module with its Hydra overrides.

    Raises:
        ConfigError: for an unknown job.
    """
    if job not in ENTRY_POINTS:
        raise ConfigError(f"unknown job {job!r}: choose one of {', '.join(ENTRY_POINTS)}")
    return shlex.join([python, "-m", ENTRY_POINTS[job], *overrides])


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS).

    Raises:
        ConfigError: no address given, or nothing answers there.
    """
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises plain ConnectionError/RuntimeError/AuthenticationError here
        hint = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) for this cluster"
                if "auth" in str(e).lower() else "check the address and that the head runs with its dashboard")
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0]}; {hint}") from None


def submit(
    address: str | None, job: str, overrides: Sequence[str], *, working_dir: str | None = None,
    env: Mapping[str, str] | None = None, python: str = "python",
) -> str:
    """Submit a job; returns its id.

    Args:
        address: the cluster's dashboard address, or None for RAY_ADDRESS.
        job: "segment", "train" or "nightly".
        overrides: Hydra overrides, e.g. ["source=/data/a.tif", "model=/models/m.bundle", "output=/mnt/a.zarr"].
        working_dir: a folder shipped to the cluster as the job's working directory (the runtime
            environment), for clusters that do not have tessera installed.
        env: environment variables for the job (e.g. MLFLOW_TRACKING_URI).
        python: the interpreter on the cluster that has tessera installed.
    """
    runtime_env: dict[str, Any] = {}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    if env:
        runtime_env["env_vars"] = dict(env)
    command = entrypoint(job, overrides, python)
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return str(jobs.submit_job(entrypoint=command, runtime_env=runtime_env or None))
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up; it says so.
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise TesseraError(f"the cluster refused the job: {str(e).splitlines()[0]}") from None
            time.sleep(1.0)


def info(address: str | None, job_id: str) -> JobInfo:
    details = _details(client(address), job_id)
    return JobInfo(job_id, str(details.status), details.entrypoint, details.message or "")


def list_jobs(address: str | None) -> list[JobInfo]:
    jobs = client(address).list_jobs()
    return [JobInfo(j.submission_id or j.job_id or "", str(j.status), j.entrypoint, j.message or "")
            for j in sorted(jobs, key=lambda j: j.start_time or 0)]


def logs(address: str | None, job_id: str) -> str:
    c = client(address)
    _details(c, job_id)
    return str(c.get_job_logs(job_id))


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    c = client(address)
    _details(c, job_id)
    return bool(c.stop_job(job_id))


def wait(address: str | None, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> JobInfo:
    """Block until the job ends (or `timeout` seconds pass) and return its final state."""
    deadline = time.monotonic() + timeout
    while True:
        state = info(address, job_id)
        if state.status in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def _details(c: Any, job_id: str) -> Any:
    try:
        return c.get_job_info(job_id)
    except RuntimeError as e:
        raise TesseraError(f"no job {job_id!r} on this cluster: `tessera jobs list` shows the ids") from e
