"""Every segment job is an MLflow run; the mosaic and the run each name the other."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.execution import SegmentConfig, segment
from pipeline.models.bundle import file_sha256
from pipeline.mosaic import Mosaic
from pipeline.tracking import Tracking, find_runs, start_run
from tests.conftest import make_bundle, smooth_image, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_session")


def test_job_is_tracked_and_each_finds_the_other(tmp_path: Path, mlflow_store: str) -> None:
    source = write_geotiff(tmp_path / "s.tif", smooth_image(300, 500, seed=2))
    bundle = make_bundle(tmp_path / "b.bundle", tile=128, overlap=32)
    out = tmp_path / "m.zarr"
    summary = segment(SegmentConfig(source=str(source), model=str(bundle), output=str(out), progress=False,
                                    chunk=128, shard=256, block=256, workers=1))
    mosaic = Mosaic.open(out)
    run_id = mosaic.lineage["mlflow"]["run_id"]
    assert run_id == summary.run_id
    assert find_runs(out)[0] == run_id
    client = mlflow.MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["job.model_sha256"] == file_sha256(bundle)
    assert run.data.metrics["tiles_computed"] == summary.tiles_computed
    assert run.data.metrics["mpix_per_second"] == pytest.approx(summary.mpix_per_second)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"preview.png", "config.json", "summary.json"} <= artifacts
    preview = Path(client.download_artifacts(run_id, "preview.png", str(tmp_path)))
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracking_can_be_switched_off(tmp_path: Path) -> None:
    run = start_run(Tracking(enabled=False), {}, str(tmp_path / "x.zarr"))
    assert run.run_id is None and run.lineage()["run_id"] is None
    run.end("FINISHED")  # a stand-in: nothing to end


def test_the_default_store_is_one_file_whatever_folder_a_process_runs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray Train's workers run in folders of their own: a relative sqlite path must not reach them as such
    # (the README's training command once failed in a worker with "Run with id=... not found").
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Tracking().resolved_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert Tracking(uri="sqlite:///runs/t.db").resolved_uri() == f"sqlite:///{tmp_path}/runs/t.db"
    for kept in ("sqlite:////data/m.db", "http://127.0.0.1:5000", "databricks"):
        assert Tracking(uri=kept).resolved_uri() == kept
