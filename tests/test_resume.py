"""Resume, the exclusive output lock, and surviving a job or a worker killed mid-job (real Ray, real kills;
the killed job writes to a real S3 server on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.errors import OutputExistsError, OutputLockedError
from pipeline.execution import SegmentConfig, segment
from pipeline.locking import lock_location
from pipeline.mosaic import BLOCKS, Mosaic
from pipeline.storage import Location, storage_for
from tests.conftest import make_bundle, smooth_image, write_geotiff

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("resume")
    source = write_geotiff(d / "scene.tif", smooth_image(1024, 1024, seed=4))
    bundle = make_bundle(d / "slow.bundle", tile=128, overlap=32, arch_args={"depth": 6, "width": 16})
    return source, bundle


def config(source: Path, bundle: Path, out: Path | str, **kw: object) -> SegmentConfig:
    settings: dict[str, object] = {"scores_dtype": "float32", "chunk": 128, "shard": 256, "block": 256,
                                   "workers": 2, "progress": False, **kw}
    return SegmentConfig(source=str(source), model=str(bundle), output=str(out), **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def undisturbed(job_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Mosaic:
    out = tmp_path_factory.mktemp("clean") / "m.zarr"
    segment(config(*job_inputs, out))
    return Mosaic.open(out)


def assert_same_mosaic(a: Mosaic, b: Mosaic) -> None:
    assert b.complete
    for level in range(a.layout.num_levels):
        np.testing.assert_array_equal(a.read("mask", level), b.read("mask", level))
        np.testing.assert_allclose(a.read("scores", level), b.read("scores", level), atol=1e-5, equal_nan=True)


@pytest.mark.slow
def test_a_job_on_s3_refuses_a_second_and_resumes_after_a_kill(
    job_inputs: tuple[Path, Path], undisturbed: Mosaic, s3_bucket: str, tmp_path: Path
) -> None:
    """On object storage (a real S3 server on 127.0.0.1): the output lock, the markers and resume."""
    source, bundle = job_inputs
    url = f"{s3_bucket}/m.zarr"
    out = Location.parse(url)
    storage = storage_for(out)
    cmd = [sys.executable, "-m", "jobs.segment", f"source={source}", f"model={bundle}", f"output={url}",
           "progress=false", "storage.chunk=128", "storage.shard=256", "storage.scores_dtype=float32",
           "tiling.block=256", "cluster.workers=1"]  # one worker: still writing when the second job is refused
    first = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def markers() -> int:  # the blocks' markers, not the group's own zarr.json
        return len([name for name in storage.list(out.join(BLOCKS)) if name != "zarr.json"])

    deadline = time.monotonic() + 240
    while markers() < 2:
        assert first.poll() is None and time.monotonic() < deadline, "the job ended before it could be stopped"
        time.sleep(0.1)
    with pytest.raises(OutputLockedError, match=f"pid {first.pid}"):  # a second job on the same output
        segment(config(source, bundle, url))
    seen = markers()
    while markers() == seen:  # the first job goes on writing, its lock untouched
        assert first.poll() is None and time.monotonic() < deadline, "the first job stopped"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its embedded Ray, at once
    first.wait()

    interrupted = Mosaic.open(url)
    assert not interrupted.complete and "ome" not in dict(interrupted.group.attrs)
    lock = lock_location(url)
    assert storage.exists(lock), "the dead driver's lock is left behind..."
    summary = segment(config(source, bundle, url))  # ...and broken, since its owner is gone
    assert summary.blocks_resumed >= 3
    assert summary.blocks_written + summary.blocks_resumed == 16
    assert_same_mosaic(undisturbed, Mosaic.open(url))
    assert not storage.exists(lock)


@pytest.mark.usefixtures("ray_session")
def test_resume_verifies_blocks_and_refuses_other_settings(
    job_inputs: tuple[Path, Path], undisturbed: Mosaic, tmp_path: Path
) -> None:
    source, bundle = job_inputs
    out = tmp_path / "m.zarr"

    def stop_after_four(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt  # the driver stopped by a user

    with pytest.raises(KeyboardInterrupt):
        segment(config(source, bundle, out), on_progress=stop_after_four)
    partial = Mosaic.open(out, mode="r+")
    assert not partial.complete and len(partial.done_blocks()) >= 4
    with pytest.raises(OutputExistsError, match="tile"):
        segment(config(source, bundle, out, tile=256, overlap=32))
    # A finished block whose data no longer matches its checksum is not trusted.
    tampered = sorted(partial.done_blocks())[0]
    r, c = tampered
    corner = (slice(r * 256, r * 256 + 8), slice(c * 256, c * 256 + 8))
    partial.array("mask")[corner] = partial.array("mask")[corner] ^ 1  # another class on each of its pixels
    assert tampered not in partial.done_blocks()
    summary = segment(config(source, bundle, out))
    assert summary.blocks_resumed >= 3 and summary.tiles_recomputed > 0
    assert_same_mosaic(undisturbed, Mosaic.open(out))


@pytest.mark.usefixtures("ray_session")
def test_worker_killed_mid_job_is_retried_to_the_same_mosaic(
    job_inputs: tuple[Path, Path], undisturbed: Mosaic, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_a_worker(done: int, total: int) -> None:
        if done == 3 and not killed:
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "BlockWorker" in " ".join(p.cmdline())]
            assert workers, "the block workers are found by their process title"
            workers[0].send_signal(signal.SIGKILL)
            killed.append(workers[0].pid)

    out = tmp_path / "m.zarr"
    summary = segment(config(*job_inputs, out), on_progress=kill_a_worker)
    assert killed and not psutil.pid_exists(killed[0])
    assert summary.blocks_written == undisturbed.lineage["summary"]["blocks_written"]
    assert_same_mosaic(undisturbed, Mosaic.open(out))


@pytest.mark.usefixtures("ray_session")
def test_block_lost_with_a_pipelined_worker_is_computed_again(
    job_inputs: tuple[Path, Path], undisturbed: Mosaic, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipelined worker reports a block before its writer has stored it; if the process dies then,
    the block has no marker. Here a worker is killed and a reported block's write is undone (marker
    removed, data zeroed): the job finds the block by its missing marker and computes it again."""
    out = tmp_path / "m.zarr"
    undone: list[str] = []

    def kill_a_worker_and_lose_a_write(done: int, total: int) -> None:
        if done != 3 or undone:
            return
        worker = next(p for p in psutil.Process().children(recursive=True) if "BlockWorker" in " ".join(p.cmdline()))
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        mosaic = Mosaic.open(out, mode="r+")
        markers = mosaic.group[BLOCKS]
        name, marker = next((n, m) for n, m in sorted(markers.groups()) if "checksum" in m.attrs)
        y0, x0, y1, x1 = marker.attrs["region"]
        mosaic.group["0/scores"][:, y0:y1, x0:x1] = 0
        mosaic.group["labels/mask/0"][y0:y1, x0:x1] = 0
        del markers[name]
        undone.append(name)

    with caplog.at_level(logging.WARNING, logger="pipeline.execution"):
        summary = segment(config(*job_inputs, out, pipelined=True), on_progress=kill_a_worker_and_lose_a_write)
    assert undone
    # The undone block, and possibly one that really was in the killed worker's writer.
    assert re.search(r"[12] block\(s\) lost with a worker process are computed again", caplog.text)
    assert summary.tiles_computed > undisturbed.lineage["summary"]["tiles_computed"]
    assert Mosaic.open(out).done_blocks() >= {tuple(map(int, undone[0].split("_")))}
    assert_same_mosaic(undisturbed, Mosaic.open(out))


@pytest.mark.usefixtures("ray_session")
def test_a_worker_still_writing_when_an_image_ends_is_stopped_before_its_blocks_go_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer per block: a block whose write behind has not ended after FLUSH_TIMEOUT has no marker,
    so it is computed again; the slow writer must be gone by then, not land its write afterwards."""
    import ray

    from pipeline import engine

    monkeypatch.setattr(engine, "FLUSH_TIMEOUT", 0.5)

    class Writer:
        def flush(self, path: str, seconds: float) -> bool:  # a write behind that takes `seconds`, then lands
            time.sleep(seconds)
            Path(path).write_text("written")
            return True

        def ping(self) -> bool:
            return True

    slow, quick = (ray.remote(num_cpus=0)(Writer).remote() for _ in range(2))
    assert ray.get([slow.ping.remote(), quick.ping.remote()])
    late, on_time = tmp_path / "late", tmp_path / "on-time"
    killed: list[object] = []
    engine.stop_writers([(slow, slow.flush.remote(str(late), 3.0)), (quick, quick.flush.remote(str(on_time), 0.0))],
                        killed)
    assert killed == [slow]  # handed to the engine's loop, which gives the slot a new worker
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(slow.ping.remote(), timeout=30)
    assert ray.get(quick.ping.remote()) and on_time.exists()
    time.sleep(3.5)
    assert not late.exists(), "the stopped writer's write landed after its block was given to another"


@pytest.mark.usefixtures("ray_session")
def test_corrupt_region_fails_fast_with_the_cause_and_leaves_it_incomplete(tmp_path: Path) -> None:
    import tifffile

    from pipeline.errors import SourceReadError

    source = write_geotiff(tmp_path / "scene.tif", smooth_image(1024, 1024, seed=1))
    with tifffile.TiffFile(source) as tif:  # garble one tile in the middle; the corners still read
        page = tif.pages[0]
        index = len(page.dataoffsets) // 2 + 4
        offset, size = page.dataoffsets[index], page.databytecounts[index]
    with source.open("r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    bundle = make_bundle(tmp_path / "b.bundle", tile=128, overlap=32)
    out = tmp_path / "m.zarr"
    with pytest.raises(SourceReadError, match=r"scene\.tif"):
        segment(config(source, bundle, out))
    assert not Mosaic.open(out).complete
    assert not lock_location(out).local_path().exists()
    import mlflow

    from pipeline.tracking import find_runs

    (run_id,) = find_runs(out)  # the image's run ends FAILED
    assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status == "FAILED"
