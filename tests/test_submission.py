"""`tessera submit` and `tessera jobs` against a real Ray head on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.mosaic import Mosaic
from tests.conftest import free_port, make_bundle, ray_head_running, smooth_image, write_geotiff


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head's Jobs API address; without token authentication, as the Jobs API client sends none."""
    with ray_head_running({"RAY_AUTH_MODE": "disabled"}) as head:
        yield head.dashboard


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
