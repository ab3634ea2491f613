"""Collections on the job engine: one warm pool, per-image failures, manifest, resume, STAC, refine, front doors."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.collection import CollectionItem
from pipeline.errors import MosaicError
from pipeline.execution import SegmentConfig, segment, segment_collection
from pipeline.locking import lock_location
from pipeline.manifest import Manifest
from pipeline.mosaic import BLOCKS, Mosaic
from tests.conftest import make_bundle, smooth_image, write_geotiff

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"scores_dtype": "float32", "chunk": 128, "shard": 256, "block": 256, "workers": 2, "progress": False}
RAY_NOISE = re.compile(r"core_worker|raylet|gcs_|Started a local Ray|token|\(pid=|object store|ray\.|"
                       r"WARNING|INFO", re.IGNORECASE)


def config(bundle: Path, output: Path, source: str = "", **kw: object) -> SegmentConfig:
    return SegmentConfig(source=source, model=str(bundle), output=str(output), **{**SETTINGS, **kw})  # type: ignore[arg-type]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`tessera ...` in a fresh process, as a user runs it (its own embedded Ray)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def tree_digest(path: Path) -> str:
    """A hash of every file under `path` (names and bytes): unchanged means untouched."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def assert_same_level0(a: Mosaic, b: Mosaic) -> None:
    np.testing.assert_array_equal(a.read("mask"), b.read("mask"))
    np.testing.assert_allclose(a.read("scores"), b.read("scores"), atol=1e-5, equal_nan=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("collection")
    paths = {f"scene{k}": write_geotiff(d / f"scene{k}.tif", smooth_image(320 + 64 * k, 384, seed=20 + k))
             for k in range(5)}
    corrupt = d / "corrupt.tif"
    corrupt.write_bytes(paths["scene0"].read_bytes()[: paths["scene0"].stat().st_size // 2])
    return {**paths, "corrupt": corrupt, "missing": d / "missing.tif", "dir": d,
            "bundle": make_bundle(d / "fcn.bundle", tile=128, overlap=32,
                                  arch_args={"depth": 4, "width": 8, "padding_mode": "reflect"})}


@pytest.mark.slow
def test_collection_with_bad_images_then_rerun_computes_only_those(
    images: dict[str, Path], tmp_path: Path, ray_session: None
) -> None:
    root = tmp_path / "root"
    names = [f"scene{k}" for k in range(5)]
    sources = [str(images[n]) for n in names] + [str(images["corrupt"]), str(images["missing"])]
    args = ["segment", *sources, "--model", str(images["bundle"]), "--out", str(root), "--block", "256",
            "--workers", "2", "--quiet"]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "5 done, 2 failed" in first.stdout
    assert str(images["corrupt"]) in first.stdout and str(images["missing"]) in first.stdout
    noise = [line for line in (first.stdout + first.stderr).splitlines() if RAY_NOISE.search(line)]
    assert not noise, f"Ray's own messages reached the terminal: {noise}"

    rows = {Path(r.input).name: r for r in Manifest.read(root).rows}
    assert len(rows) == 7
    for n in names:
        assert rows[f"{n}.tif"].status == "done" and rows[f"{n}.tif"].tiles_computed > 0
        assert rows[f"{n}.tif"].run_id and rows[f"{n}.tif"].output == str(root / f"{n}.zarr")
    assert rows["corrupt.tif"].status == "failed" and "truncated" in rows["corrupt.tif"].error
    assert rows["missing.tif"].status == "failed" and "does not exist" in rows["missing.tif"].error
    assert not (root / "corrupt.zarr").exists() and not (root / "missing.zarr").exists()
    with (root / "manifest.csv").open() as f:  # opens without tessera
        assert [r["status"] for r in csv.DictReader(f)].count("done") == 5

    # A mosaic of the collection equals a single-image job on the same image.
    for n in (names[-1],):
        single = tmp_path / f"{n}.single.zarr"
        segment(config(images["bundle"], single, str(images[n]), scores_dtype="float16", chunk=256))  # the CLI's
        ours = Mosaic.open(root / f"{n}.zarr")
        assert ours.complete
        assert_same_level0(Mosaic.open(single), ours)
        assert ours.lineage["mlflow"]["run_id"] == rows[f"{n}.tif"].run_id

    digests = {n: tree_digest(root / f"{n}.zarr") for n in names}
    images["corrupt"].write_bytes(images["scene1"].read_bytes())
    write_geotiff(images["missing"], smooth_image(300, 300, seed=31))
    second = CliRunner().invoke(app, args)  # the same command, in this process (its Ray already running)
    assert second.exit_code == 0, second.output
    assert "2 done, 0 failed, 5 skipped" in second.stdout
    rows = {Path(r.input).name: r for r in Manifest.read(root).rows}
    assert {n: r.status for n, r in rows.items()} == {
        **{f"{n}.tif": "skipped" for n in names}, "corrupt.tif": "done", "missing.tif": "done"}
    assert all(tree_digest(root / f"{n}.zarr") == digests[n] for n in names), "finished mosaics are untouched"
    assert Mosaic.open(root / "missing.zarr").complete and Mosaic.open(root / "corrupt.zarr").complete


def test_stac_item_collection_segments_every_item(
    images: dict[str, Path], tmp_path: Path, ray_session: None
) -> None:
    import pystac
    import rasterio
    from rasterio.shutil import copy as rio_copy

    items = []
    for k in range(3):
        cog = tmp_path / f"cog{k}.tif"
        rio_copy(str(images[f"scene{k}"]), str(cog), driver="COG")
        with rasterio.open(cog) as src:
            bbox = list(src.bounds)
        item = pystac.Item(f"item-{k}", geometry=None, bbox=bbox, datetime=dt.datetime(2026, 11, 29), properties={})
        item.add_asset("image", pystac.Asset(cog.name, media_type=pystac.MediaType.COG, roles=["data"]))
        items.append(item)
    stac = tmp_path / "items.json"
    pystac.ItemCollection(items).save_object(str(stac))
    root = tmp_path / "stac-root"
    from pipeline.collection import resolve_collection

    summary = segment_collection(config(images["bundle"], root), resolve_collection([str(stac)]), str(root))
    assert summary.count("done") == 3 and not summary.failed
    for k in range(3):
        mosaic = Mosaic.open(root / f"item-{k}.zarr")
        assert mosaic.complete and mosaic.lineage["source"]["path"].endswith(f"cog{k}.tif")

    # Bands as assets of their own, stacked per item: an item whose assets are not on one grid fails alone.
    stacked = []
    for k in range(2):
        with rasterio.open(images[f"scene{k}"]) as src:
            pixels, profile = src.read(), src.profile
        item = pystac.Item(f"bands-{k}", geometry=None, bbox=items[k].bbox, datetime=dt.datetime(2026, 11, 29),
                           properties={})
        for b, key in enumerate("rgb"):
            band = pixels[b:b + 1, : 300 if (k, key) == (1, "b") else None]  # item 1's blue is cut short
            path = tmp_path / f"bands{k}_{key}.tif"
            with rasterio.open(path, "w", **{**profile, "count": 1, "height": band.shape[1]}) as dst:
                dst.write(band)
            item.add_asset(key, pystac.Asset(path.name, media_type=pystac.MediaType.GEOTIFF, roles=["data"]))
        stacked.append(item)
    pystac.ItemCollection(stacked).save_object(str(tmp_path / "bands.json"))
    root = tmp_path / "bands-root"
    bands = resolve_collection([str(tmp_path / "bands.json")], assets=list("rgb"), stacking_dir=root / ".inputs")
    summary = segment_collection(config(images["bundle"], root), bands, str(root))
    assert [r.status for r in summary.images] == ["done", "failed"]
    assert "STAC item 'bands-1': 'b' has size" in summary.images[1].error
    assert_same_level0(Mosaic.open(root / "bands-0.zarr"), Mosaic.open(tmp_path / "stac-root" / "item-0.zarr"))


def test_one_run_for_the_collection_with_a_nested_run_per_image(
    images: dict[str, Path], tmp_path: Path, ray_session: None, mlflow_store: str
) -> None:
    import mlflow

    root = tmp_path / "tracked"
    items = [CollectionItem(str(images[f"scene{k}"]), f"s{k}") for k in range(2)]
    summary = segment_collection(config(images["bundle"], root), items, str(root))
    assert summary.run_id is not None
    client = mlflow.MlflowClient(mlflow_store)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["images_done"] == 2
    assert "manifest.csv" in [a.path for a in client.list_artifacts(summary.run_id)]
    for result in summary.images:
        child = client.get_run(result.run_id)
        assert child.data.tags["mlflow.parentRunId"] == summary.run_id
        assert child.data.metrics["tiles_computed"] == result.work > 0
        assert Mosaic.open(result.output).lineage["mlflow"]["run_id"] == result.run_id


@pytest.mark.slow
def test_driver_killed_mid_collection_resumes_to_the_undisturbed_result(
    images: dict[str, Path], tmp_path: Path, ray_session: None
) -> None:
    d = tmp_path / "big"
    d.mkdir()
    for k in range(3):
        write_geotiff(d / f"b{k}.tif", smooth_image(768, 768, seed=40 + k))
    bundle = make_bundle(tmp_path / "slow.bundle", tile=128, overlap=32, arch_args={"depth": 6, "width": 16})
    undisturbed = tmp_path / "undisturbed"
    segment_collection(config(bundle, undisturbed), [CollectionItem(str(d / f"b{k}.tif"), f"b{k}")
                                                     for k in range(3)], str(undisturbed))

    root = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.segment", f"source={d}", f"model={bundle}", f"output={root}",
           "progress=false", "storage.chunk=128", "storage.shard=256", "storage.scores_dtype=float32",
           "tiling.block=256", "cluster.workers=2"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240

    def complete() -> list[str]:
        done = []
        for p in root.glob("*.zarr"):
            try:
                if Mosaic.open(p).complete:
                    done.append(p.stem)
            except MosaicError:  # being created this very moment
                continue
        return done

    while not (complete() and any((root / f"b{k}.zarr" / BLOCKS).is_dir() and
                                  len(list((root / f"b{k}.zarr" / BLOCKS).iterdir())) >= 2
                                  for k in range(3) if f"b{k}" not in complete())):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its embedded Ray, at once
    job.wait()
    finished = complete()
    assert 1 <= len(finished) < 3
    digests = {n: tree_digest(root / f"{n}.zarr") for n in finished}
    unfinished = [n for n in (f"b{k}" for k in range(3)) if n not in finished and (root / f"{n}.zarr").exists()]
    assert unfinished and any(lock_location(root / f"{n}.zarr").local_path().exists() for n in unfinished)

    from pipeline.collection import resolve_collection

    summary = segment_collection(config(bundle, root), resolve_collection([str(d)]), str(root))
    assert not summary.failed
    assert {r.item.name for r in summary.images if r.status == "skipped"} == set(finished)
    assert all(tree_digest(root / f"{n}.zarr") == digests[n] for n in finished)
    resumed = [r for r in summary.images if r.item.name in unfinished]
    assert any(r.summary is not None and r.summary.as_dict()["blocks_resumed"] > 0 for r in resumed)
    for k in range(3):
        assert_same_level0(Mosaic.open(undisturbed / f"b{k}.zarr"), Mosaic.open(root / f"b{k}.zarr"))
        assert not lock_location(root / f"b{k}.zarr").local_path().exists()


def test_unreachable_cluster_fails_fast_in_one_line_and_creates_nothing(
    images: dict[str, Path], tmp_path: Path
) -> None:
    from tests.conftest import free_port

    root = tmp_path / "never"
    start = time.monotonic()
    result = cli("segment", str(images["scene0"]), str(images["scene1"]), "--model", str(images["bundle"]),
                 "--out", str(root), "--ray-address", f"127.0.0.1:{free_port()}", "--quiet", cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "127.0.0.1" in lines[0], result.stderr
    assert elapsed < 30
    assert not root.exists()
