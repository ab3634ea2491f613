"""The model lifecycle against a real `mlflow server` on 127.0.0.1 (sqlite backend, local artefacts).

Three nights on a catalog that grows by one synthetic scene a night: the first promotes its model
(no champion yet), the second trains a deliberately weak challenger and keeps the champion, the third
trains a stronger one and promotes it. A second run on the same date does nothing. Then a segment job
with models:/NAME@champion records the version it used, in the mosaic and in its run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.execution import SegmentConfig, segment
from pipeline.lifecycle import NightlyConfig, nightly, train_tracked
from pipeline.mosaic import Mosaic
from pipeline.registry import CHALLENGER, CHAMPION, alias_version, resolve_model
from pipeline.synthetic import CLASSES, generate_scene, write_scene
from pipeline.tracking import Tracking
from pipeline.training import TrainConfig
from tests.conftest import free_port
from tests.servers.ports import http_answers, start_server

MODEL = "synthetic"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a sqlite store and local artefacts, in its own process group."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    log = open(folder / "server.log", "wb")  # noqa: SIM115  (closed below)
    process, port = start_server(lambda port: subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
    ), http_answers("/health"), seconds=120, log=lambda _: (folder / "server.log").read_text())
    uri = f"http://127.0.0.1:{port}"
    yield uri
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:  # its graceful stop can take longer than that on a busy machine
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    log.close()


def night_config(catalog: Path, out: Path, uri: str, date: str, **train: object) -> NightlyConfig:
    settings: dict[str, object] = {
        "architecture": "fcn", "arch_args": {"depth": 3, "width": 16}, "tile_size": 64, "inference_tile_size": 128,
        "overlap": 16, "batch_size": 8, "steps": 30, "steps_per_epoch": 10, "lr": 0.02, "threads": 1,
        "val_fraction": 0.25, "holdout_fraction": 0.25, "balance": 0.0, "elastic": 0.0,
    }
    settings.update(train)
    config = TrainConfig(image=None, labels=None, output=str(out), catalog=str(catalog), **settings)  # type: ignore[arg-type]
    return NightlyConfig(train=config, model=MODEL, margin=0.02, date=date, tracking=Tracking(uri=uri),
                         experiment="synthetic-nightly")


def add_scene(folder: Path, catalog: Path, seed: int, added: str) -> None:
    """A new labelled scene arrives: written to disk, and listed in the catalog with its date."""
    image, labels = folder / f"scene{seed}.tif", folder / f"labels{seed}.tif"
    write_scene(generate_scene(256, 256, seed=seed), image, labels)
    data: dict[str, Any] = yaml.safe_load(catalog.read_text()) if catalog.exists() else {
        "task": "synthetic", "classes": [{"name": c.name, "color": list(c.color)} for c in CLASSES], "pairs": []}
    data["pairs"].append({"image": str(image), "labels": str(labels), "added": added})
    catalog.write_text(yaml.safe_dump(data))


@pytest.mark.slow
def test_nightly_promotes_keeps_and_is_idempotent_then_segment_uses_the_champion(
    server: str, tmp_path: Path, ray_session: None
) -> None:
    catalog, out = tmp_path / "catalog.yaml", tmp_path / "models"
    client = mlflow.MlflowClient(server)

    # Night 1: no champion yet, so its model is promoted whatever its score.
    add_scene(tmp_path, catalog, seed=21, added="2026-10-30")
    first = nightly(night_config(catalog, out, server, "2026-11-01"))
    assert (first.decision, first.new_pairs, first.champion) == ("promoted", 1, None)
    assert first.challenger is not None
    champion = alias_version(MODEL, CHAMPION, server)
    assert champion is not None and champion.version == first.challenger["version"] == "1"
    run = client.get_run(first.run_id)
    assert run.data.tags["tessera.nightly.decision"] == "promoted"
    assert run.data.metrics["challenger_score"] == pytest.approx(first.challenger["score"])
    history = client.get_metric_history(first.run_id, "val_miou")
    assert [m.step for m in history] == [1, 2, 3]  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"config.json", "validation_confusion.png", "validation_predictions.png", "decision.json"} <= artifacts

    # The same night again does nothing: no new run, no new version.
    again = nightly(night_config(catalog, out, server, "2026-11-01"))
    assert (again.decision, again.run_id) == ("already-done", first.run_id)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

    # Night 2: a scene arrived; the challenger gets a single step, scores below the champion, is kept.
    add_scene(tmp_path, catalog, seed=22, added="2026-11-01")  # during the day before the night
    second = nightly(night_config(catalog, out, server, "2026-11-02", steps=1, steps_per_epoch=1))
    assert (second.decision, second.new_pairs) == ("kept", 1)
    assert second.challenger is not None and second.champion is not None
    assert second.challenger["score"] <= second.champion["score"] + 0.02
    assert alias_version(MODEL, CHAMPION, server).version == "1"  # type: ignore[union-attr]
    assert alias_version(MODEL, CHALLENGER, server).version == "2"  # type: ignore[union-attr]
    run = client.get_run(second.run_id)
    assert run.data.metrics["champion_score"] == pytest.approx(second.champion["score"])
    assert run.data.metrics["challenger_score"] == pytest.approx(second.challenger["score"])
    assert run.data.tags["tessera.nightly.decision"] == "kept"

    # Night 3: another scene, a longer run; it beats the champion by more than the margin.
    add_scene(tmp_path, catalog, seed=23, added="2026-11-02")
    third = nightly(night_config(catalog, out, server, "2026-11-03", steps=100, steps_per_epoch=50))
    assert (third.decision, third.new_pairs) == ("promoted", 1)
    assert third.challenger is not None and third.champion is not None
    assert third.champion["version"] == "1"
    assert third.challenger["score"] > third.champion["score"] + 0.02
    assert alias_version(MODEL, CHAMPION, server).version == "3"  # type: ignore[union-attr]

    # Night 4: nothing arrived; the champion stays and nothing is trained.
    fourth = nightly(night_config(catalog, out, server, "2026-11-04"))
    assert (fourth.decision, fourth.new_pairs, fourth.challenger) == ("no-new-data", 0, None)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 3
    for night in (first, again, second, third, fourth):
        print(night.describe())  # what each night logged, for the record (pytest -s shows it)

    # Segment with the champion through the registry: the mosaic and its run record version 3.
    scene = tmp_path / "to_segment.tif"
    write_scene(generate_scene(300, 300, seed=5), scene, tmp_path / "unused.tif")
    summary = segment(SegmentConfig(
        source=str(scene), model=f"models:/{MODEL}@{CHAMPION}", output=str(tmp_path / "m.zarr"), block=512,
        shard=512, chunk=256, workers=1, threads=1, progress=False,
        tracking=Tracking(uri=server, experiment="synthetic-segment"),
    ))
    registered = Mosaic.open(tmp_path / "m.zarr").lineage["model"]["registered"]
    assert (registered["name"], registered["version"], registered["alias"]) == (MODEL, "3", CHAMPION)
    assert registered["run_id"] == third.run_id
    assert summary.run_id is not None
    params = client.get_run(summary.run_id).data.params
    assert (params["model.version"], params["model.requested"]) == ("3", f"models:/{MODEL}@{CHAMPION}")


def test_training_run_registers_a_version_with_its_bundle(server: str, tmp_path: Path) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    image, labels = tmp_path / "scene.tif", tmp_path / "labels.tif"
    write_scene(generate_scene(192, 192, seed=3), image, labels)
    config = TrainConfig(image=str(image), labels=str(labels), output=str(tmp_path / "m.bundle"), architecture="fcn",
                         arch_args={"depth": 2, "width": 8}, tile_size=64, inference_tile_size=128, overlap=16,
                         batch_size=4, steps=4, steps_per_epoch=2, threads=1)
    trained = train_tracked(config, Tracking(uri=server, experiment="one-off"), register="one-off")
    assert trained.model is not None and trained.model.sha256 == trained.result.sha256
    path, ref = resolve_model(f"models:/one-off/{trained.model.version}", server, cache=tmp_path / "cache")
    assert path.read_bytes() == Path(config.output).read_bytes() and ref.run_id == trained.run_id
    assert trained.run_id is not None
    run = mlflow.MlflowClient(server).get_run(trained.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "4"
    assert run.data.metrics["best_val_miou"] == pytest.approx(trained.result.val_miou)
    # Registering through the server did not point later jobs at it.
    assert os.environ.get("MLFLOW_TRACKING_URI") == before and mlflow.get_tracking_uri() != server


def test_unknown_registry_reference_is_a_config_error(server: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in the registry"):
        resolve_model("models:/no-such-model@champion", server, cache=tmp_path)
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        resolve_model("models:/bad/uri/form", server, cache=tmp_path)


def test_unreachable_tracking_server_fails_fast_naming_the_fix(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    image, labels = tmp_path / "scene.tif", tmp_path / "labels.tif"
    write_scene(generate_scene(128, 128, seed=3), image, labels)
    config = TrainConfig(image=str(image), labels=str(labels), output=str(tmp_path / "m.bundle"), architecture="fcn")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot be reached.*mlflow server"):
        train_tracked(config, Tracking(uri=uri))
    assert time.monotonic() - started < 30
    assert not Path(config.output).exists()  # nothing trained, nothing written
    with pytest.raises(ConfigError, match="cannot be reached"):
        segment(dataclasses.replace(SegmentConfig(source=str(image), model="models:/x@champion",
                                                  output=str(tmp_path / "m.zarr")), tracking=Tracking(uri=uri)))
    assert not (tmp_path / "m.zarr").exists()
