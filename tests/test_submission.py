"""`tessera submit` and `tessera jobs` against a real Ray head on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.mosaic import Mosaic
from tests.conftest import free_port, make_bundle, smooth_image, write_geotiff

REPO = Path(__file__).resolve().parents[1]


def start_head(temp: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`ray start --head` on ports of its own; the process and the dashboard's address once it answers.

    Raises:
        RuntimeError: the head exited before it answered (the log's tail says why) or took over 120 s.
    """
    port, dashboard, agent, agent_grpc, metrics, runtime_env, client = (free_port() for _ in range(7))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             # Every port of its own: the suite's embedded Rays already hold the default ones.
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--ray-client-server-port={client}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return head, address
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise RuntimeError("the Ray head did not start:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def stop_head(head: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with its dashboard, in its own process group and temp dir, so that stopping it
    touches nothing else (`ray stop` would stop every Ray on the machine). A start that fails (a port
    taken between choosing it and binding it, by the Ray of a test running beside this one) is tried
    once more on other ports."""
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths are length-limited
    log = Path(temp) / "head.log"
    try:
        head, address = start_head(temp, log)
    except RuntimeError as first:
        warnings.warn(f"Ray head start retried after: {first}", stacklevel=1)
        head, address = start_head(temp, log)
    yield address
    stop_head(head)


@pytest.mark.slow
def test_segment_job_submitted_to_a_real_head(ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    source = write_geotiff(tmp_path / "s.tif", smooth_image(400, 600, seed=8))
    bundle = make_bundle(tmp_path / "b.bundle", tile=128, overlap=32)
    out = tmp_path / "m.zarr"
    runner = CliRunner()
    done = runner.invoke(app, ["submit", "segment", "--address", ray_head, "--wait", f"source={source}",
                               f"model={bundle}", f"output={out}", "progress=false", "cluster.workers=1",
                               "tiling.block=512", "storage.shard=512"])
    assert done.exit_code == 0, done.output
    job_id = done.stdout.split()[0]
    assert f"{job_id} SUCCEEDED" in done.stdout
    assert Mosaic.open(out).complete

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["jobs", *args, "--address", ray_head])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert job_id in cli("list") and "jobs.segment" in cli("list")
    assert cli("status", job_id).startswith(f"{job_id} SUCCEEDED")
    assert "MPix/s" in cli("logs", job_id)
    assert cli("stop", job_id).strip() == "already ended"
    missing = runner.invoke(app, ["jobs", "status", "raysubmit_nope", "--address", ray_head])
    assert missing.exit_code == 2 and "no job" in missing.stderr


def test_submit_without_a_cluster_is_a_one_line_error() -> None:
    result = CliRunner().invoke(app, ["submit", "segment", "--address", f"http://127.0.0.1:{free_port()}",
                                      "source=a.tif"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray Jobs API" in lines[0]
    unknown = CliRunner().invoke(app, ["submit", "paint", "--address", "http://127.0.0.1:1"])
    assert unknown.exit_code == 2 and "unknown job" in unknown.stderr
