"""A real Ray cluster of three nodes on this machine (a head and two worker nodes, each its own raylet and
object store), with the image, the model and the mosaic on the S3 server, so that nothing relies on a
shared folder.
One worker node is killed in the middle of a job: the job completes, and its mosaic equals an undisturbed
run's."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.execution import SegmentConfig, segment
from pipeline.models import ModelBundle
from pipeline.mosaic import BLOCKS, Mosaic
from pipeline.storage import Location, storage_for
from tests.conftest import free_port, make_bundle, smooth_image, write_geotiff
from tests.servers.ports import check_own_server
from tests.test_collection_job import RAY_NOISE

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--block", "256", "--workers", "2", "--quiet", "--no-track"]


@pytest.fixture
def cluster() -> Iterator[object]:
    """A head that runs no work (0 CPUs) and two worker nodes of 2 CPUs each: room for both block workers
    on either node, as a cluster has room for the workers of a node it loses."""
    from ray.cluster_utils import Cluster

    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port,
                                                            "include_dashboard": False})
    try:
        check_own_server(os.getpid(), port)  # its GCS, started by this process, not another test's Ray
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def block_workers(node: object) -> list[psutil.Process]:
    """The block workers running on a node: processes under its raylet, named after the actor."""
    raylet = node.all_processes["raylet"][0].process  # type: ignore[attr-defined]
    found = []
    for process in psutil.Process(raylet.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a process starting or ending meanwhile
            if "BlockWorker" in " ".join(process.cmdline()):
                found.append(process)
    return found


@pytest.mark.slow(seconds=65)
def test_a_worker_node_killed_mid_job_the_job_completes_to_the_undisturbed_mosaic(
    cluster: object, s3_bucket: str, tmp_path: Path, ray_session: None
) -> None:
    local = write_geotiff(tmp_path / "scene.tif", smooth_image(1024, 1024, seed=3))
    bundle = make_bundle(tmp_path / "slow.bundle", tile=128, overlap=32, arch_args={"depth": 6, "width": 16})
    source = Location.parse(f"{s3_bucket}/in/scene.tif")
    storage_for(source).write_bytes(source, local.read_bytes())
    model = f"{s3_bucket}/models/slow.bundle"
    ModelBundle.load(bundle).save(model)
    out = Location.parse(f"{s3_bucket}/m.zarr")
    undisturbed = tmp_path / "undisturbed.zarr"  # from the local file, on this process's embedded Ray
    segment(SegmentConfig(source=str(local), model=str(bundle), output=str(undisturbed), block=256, shard=256,
                          chunk=256, workers=2, progress=False))

    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "segment", source.url, "--model", model, "--out", out.url,
         "--ray-address", cluster.address, *SETTINGS],  # type: ignore[attr-defined]
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    storage = storage_for(out)
    try:
        deadline = time.monotonic() + 120
        while len([n for n in storage.list(out.join(BLOCKS)) if n != "zarr.json"]) < 2:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before a node could be killed"
            time.sleep(0.2)
        victim = next(n for n in cluster.worker_nodes if block_workers(n))  # type: ignore[attr-defined]
        killed = block_workers(victim)
        cluster.remove_node(victim, allow_graceful=False)  # type: ignore[attr-defined]  # raylet, store, workers
        _, alive = psutil.wait_procs(killed, timeout=30)  # a worker ends when it loses its raylet
        for process in alive:
            with contextlib.suppress(psutil.Error):
                assert process.status() == psutil.STATUS_ZOMBIE, "a worker outlived its node"
        stdout, stderr = job.communicate(timeout=240)
    finally:
        job.kill()
        job.wait()

    assert job.returncode == 0, stdout + stderr
    noise = [line for line in stdout.splitlines() if RAY_NOISE.search(line)]
    assert not noise, f"Ray's own messages reached the terminal: {noise}"
    ours, reference = Mosaic.open(out.url), Mosaic.open(undisturbed)
    assert ours.complete and ours.layout == reference.layout
    for level in range(reference.layout.num_levels):
        for name in ("mask", "scores", "confidence"):
            np.testing.assert_array_equal(ours.read(name, level), reference.read(name, level))
