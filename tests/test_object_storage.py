"""Mosaics written straight to object storage: a real S3 server (moto's) on 127.0.0.1, real Ray, and the
same jobs as on a disk. Credentials and the endpoint reach the driver and the workers through the
environment (tests/conftest.py), as on a cluster."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.collection import resolve_collection
from pipeline.errors import StorageError
from pipeline.execution import SegmentConfig, segment, segment_collection
from pipeline.locking import lock_location
from pipeline.manifest import Manifest
from pipeline.mosaic import Mosaic
from pipeline.storage import Location, storage_for
from pipeline.tiling import Rect
from tests.conftest import free_port, make_bundle, smooth_image, write_geotiff
from tests.servers.ports import http_answers, start_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("s3-inputs")
    source = write_geotiff(d / "scene.tif", smooth_image(600, 520, seed=11))
    return source, make_bundle(d / "m.bundle", tile=128, overlap=32)


def config(inputs: tuple[Path, Path], out: str | Path, **kw: object) -> SegmentConfig:
    settings: dict[str, object] = {"scores_dtype": "float32", "chunk": 128, "shard": 256, "block": 256,
                                   "workers": 2, "progress": False, **kw}
    return SegmentConfig(source=str(inputs[0]), model=str(inputs[1]), output=str(out), **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def local_mosaic(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """The job written to a local folder: what each object store's copy must equal."""
    out = tmp_path_factory.mktemp("local") / "a.zarr"
    segment(config(inputs, out))
    return out


def assert_same_mosaic(a: Mosaic, b: Mosaic) -> None:
    assert a.complete and b.complete
    assert a.layout == b.layout
    for level in range(a.layout.num_levels):
        for name in ("mask", "scores", "confidence"):
            np.testing.assert_array_equal(a.read(name, level), b.read(name, level))


@pytest.mark.usefixtures("ray_session")
def test_a_mosaic_written_to_s3_equals_the_one_written_locally(
    inputs: tuple[Path, Path], local_mosaic: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"{s3_bucket}/scenes/a.zarr"
    summary = segment(config(inputs, url))
    assert summary.blocks_written == 9  # 3 x 3 blocks of 256 px
    remote = Mosaic.open(url)
    assert remote.location.url == url
    assert_same_mosaic(Mosaic.open(local_mosaic), remote)
    assert dict(remote.group.attrs)["ome"]["multiscales"]
    lock = lock_location(url)
    assert not storage_for(lock).exists(lock)
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # nothing of it landed on the disk
    again = segment(config(inputs, url))  # the same job again: the complete mosaic is kept
    assert again.kept

    # The query commands and the service read it where it is.
    info = CliRunner().invoke(app, ["query", "info", url])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["complete"] is True
    stats = CliRunner().invoke(app, ["query", "stats", url])
    assert stats.exit_code == 0, stats.output
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", s3_bucket, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/api/mosaics") as answer:
            assert [m["id"] for m in json.load(answer)] == ["scenes/a.zarr"]
        window = "0,0,64,64"
        with urllib.request.urlopen(f"{base}/api/mosaics/scenes/a.zarr/region.npy?window={window}") as answer:
            served = np.load(io.BytesIO(answer.read()))
        np.testing.assert_array_equal(served, remote.read("mask", 0, Rect(0, 0, 64, 64)))
    finally:
        server.terminate()
        server.wait(timeout=20)

    # A collection: its mosaics and its manifest under a ROOT on the bucket.
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        write_geotiff(folder / f"b{k}.tif", smooth_image(300, 260, seed=20 + k))
    root = f"{s3_bucket}/run"
    summary = segment_collection(config(inputs, root), resolve_collection([str(folder)]), root)
    assert not summary.failed
    assert {(Path(r.input).name, r.output, r.status) for r in Manifest.read(root).rows} == {
        ("b0.tif", f"{root}/b0.zarr", "done"), ("b1.tif", f"{root}/b1.zarr", "done")}
    assert Mosaic.open(f"{root}/b1.zarr").complete


def test_unusable_object_storage_fails_at_once_in_one_line(
    inputs: tuple[Path, Path], s3_bucket: str, azure_container: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing bucket, no or wrong credentials, an endpoint that does not answer: one line each from
    `tessera segment`, exit 2, nothing written. On S3 through the command; Azure's cases go through the same
    check in this process (below), as starting seven commands at once costs a minute on two cores."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    s3 = {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_DEFAULT_REGION": "us-east-1"}
    keys = {"AWS_ACCESS_KEY_ID": "tessera-test", "AWS_SECRET_ACCESS_KEY": "tessera-test"}
    azure = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    cases = {
        "does not exist: create it": ({**s3, **keys}, f"{s3_bucket}-missing/a.zarr"),
        "No usable credentials": ({**s3, "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
                                   "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}, f"{s3_bucket}/b.zarr"),
        "Cannot reach the object store for s3": (
            {**s3, **keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, f"{s3_bucket}/c.zarr"),
        "container 'tessera-missing' of az": ({"AZURE_STORAGE_CONNECTION_STRING": azure}, "az://tessera-missing/a.zarr"),
    }
    tessera = str(Path(sys.executable).parent / "tessera")
    runs: dict[str, tuple[float, Path, subprocess.Popen[str]]] = {}
    for expected, (env, out) in cases.items():
        folder = tmp_path / str(len(runs))
        folder.mkdir()
        runs[expected] = (time.monotonic(), folder, subprocess.Popen(
            [tessera, "segment", str(inputs[0]), "--model", str(inputs[1]), "--out", out],
            cwd=folder, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while len(ended) < len(runs) and time.monotonic() < deadline:
        ended.update({k: time.monotonic() for k, (_, _, run) in runs.items()
                      if k not in ended and run.poll() is not None})
        time.sleep(0.1)
    for expected, (started, folder, run) in runs.items():
        _, stderr = run.communicate(timeout=10)
        seconds = ended[expected] - started
        assert run.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
        assert seconds < 60, f"{expected}: {seconds:.0f} s (seven at once on two cores; alone, under 10 s)"
        assert list(folder.iterdir()) == []  # not even a tracking database
    for bucket in (s3_bucket, azure_container):
        assert storage_for(Location.parse(bucket)).list(Location.parse(bucket)) == []

    # Azure: no credentials, a wrong key, an endpoint that does not answer, each one line, quickly.
    dead = azure.replace(os.environ["TESSERA_TEST_AZURE_PORT"], str(free_port()))
    for expected, connection in {"set AZURE_STORAGE_CONNECTION_STRING": None,
                                 "was refused": azure.replace("AccountKey=E", "AccountKey=F"),
                                 "Cannot reach the object store for az": dead}.items():
        if connection is None:
            monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
        fresh = {"skip_instance_cache": True}  # a file system of its own, reading the environment as it is now
        location = Location.parse(f"{azure_container}/b.zarr",
                                  {**fresh, "connection_string": connection} if connection else fresh)
        started = time.monotonic()
        with pytest.raises(StorageError, match=expected) as raised:
            storage_for(location).check(location)
        assert "\n" not in str(raised.value) and time.monotonic() - started < 10


@pytest.mark.usefixtures("ray_session")
def test_a_mosaic_written_to_azure_blob_storage_equals_the_one_written_locally(
    inputs: tuple[Path, Path], local_mosaic: Path, azure_container: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same storage layer on another store (Azurite, Azure's own emulator): blocks, markers, the
    conditional lock and `complete` written there; the query commands read it."""
    monkeypatch.chdir(tmp_path)
    url = f"{azure_container}/scenes/a.zarr"
    assert segment(config(inputs, url)).blocks_written == 9
    assert_same_mosaic(Mosaic.open(local_mosaic), Mosaic.open(url))
    lock = lock_location(url)
    assert not storage_for(lock).exists(lock)
    info = CliRunner().invoke(app, ["query", "info", url])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["complete"] is True
