"""The collection manifest: CSV and Parquet readable without tessera, atomic rewrites, updates from threads."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.collection import Manifest as ReExported
from pipeline.errors import ConfigError, MosaicError
from pipeline.manifest import STATUSES, Manifest, ManifestRow
from pipeline.storage import Location


def rows(n: int, root: Path) -> list[ManifestRow]:
    return [ManifestRow(f"/data/scene-{k}.tif", str(root / f"scene-{k}.zarr")) for k in range(n)]


def test_the_collection_module_re_exports_the_manifest() -> None:
    assert ReExported is Manifest


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "out"
    manifest = Manifest(root, rows(3, root))
    manifest.update(ManifestRow("/data/scene-1.tif", str(root / "scene-1.zarr"), "done", tiles_computed=64,
                                seconds=3.25, run_id="abc123"))
    manifest.update(ManifestRow("/data/scene-2.tif", str(root / "scene-2.zarr"), "failed",
                                error="cannot open:\n  truncated file\n"))
    assert manifest.write() == manifest.path == Location.parse(root / "manifest.csv")
    again = Manifest.read(root)
    assert again.rows == manifest.rows
    assert again.rows[1] == ManifestRow("/data/scene-1.tif", str(root / "scene-1.zarr"), "done", 64, 3.25, "", "abc123")
    assert again.rows[2].error == "cannot open: truncated file"


def test_the_csv_reads_with_the_csv_module(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, rows(2, tmp_path))
    manifest.update(ManifestRow("/data/a,b.tif", str(tmp_path / "scene-0.zarr"), "failed", error='said "no"\nthen'))
    with open(manifest.write().path, newline="") as f:
        records = list(csv.reader(f))
    assert records[0] == ["input", "output", "status", "tiles_computed", "seconds", "error", "run_id"]
    assert records[1] == ["/data/a,b.tif", str(tmp_path / "scene-0.zarr"), "failed", "0", "0.0", 'said "no" then', ""]
    assert len(records) == 3


def test_the_parquet_holds_the_same_table(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, rows(2, tmp_path))
    manifest.update(ManifestRow("/data/scene-0.tif", str(tmp_path / "scene-0.zarr"), "done", 10, 1.5))
    manifest.write()
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.column_names == ["input", "output", "status", "tiles_computed", "seconds", "error", "run_id"]
    assert str(table.schema.field("tiles_computed").type) == "int64"
    assert table.to_pylist()[0] == {"input": "/data/scene-0.tif", "output": str(tmp_path / "scene-0.zarr"),
                                    "status": "done", "tiles_computed": 10, "seconds": 1.5, "error": "", "run_id": ""}


def test_update_replaces_the_row_with_the_same_output_else_adds(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, rows(2, tmp_path))
    manifest.update(ManifestRow("/elsewhere/scene-0.tif", str(tmp_path / "scene-0.zarr"), "skipped"))
    manifest.update(ManifestRow("/data/new.tif", str(tmp_path / "new.zarr"), "done"))
    assert [(r.input, r.status) for r in manifest.rows] == [
        ("/elsewhere/scene-0.tif", "skipped"), ("/data/scene-1.tif", "pending"), ("/data/new.tif", "done")]


def test_counts_give_every_status(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, rows(4, tmp_path))
    manifest.update(ManifestRow("/data/scene-0.tif", str(tmp_path / "scene-0.zarr"), "done"))
    manifest.update(ManifestRow("/data/scene-3.tif", str(tmp_path / "scene-3.zarr"), "done"))
    manifest.update(ManifestRow("/data/scene-2.tif", str(tmp_path / "scene-2.zarr"), "failed", error="x"))
    assert manifest.counts() == {"pending": 1, "done": 2, "failed": 1, "skipped": 0}
    assert tuple(manifest.counts()) == STATUSES


def test_updates_and_writes_from_threads_lose_nothing(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, rows(40, tmp_path))

    def finish(k: int) -> None:
        manifest.update(ManifestRow(f"/data/scene-{k}.tif", str(tmp_path / f"scene-{k}.zarr"), "done", k))
        manifest.write()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(finish, range(40)))
    assert Manifest.read(tmp_path).counts()["done"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "manifest.parquet"]  # no temporaries


def test_an_unknown_status_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'finished' .* pending, done, failed, skipped"):
        ManifestRow("/data/a.tif", "out/a.zarr", "finished")


def test_reading_without_a_manifest_says_what_the_folder_is_not(tmp_path: Path) -> None:
    with pytest.raises(MosaicError, match=r"no manifest.csv, so it is not the output root of a collection job"):
        Manifest.read(tmp_path)


def test_reading_a_foreign_or_damaged_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("path,name\na.tif,a\n")
    with pytest.raises(MosaicError, match="columns path, name, not a tessera manifest"):
        Manifest.read(tmp_path)
    Manifest(tmp_path, rows(2, tmp_path)).write()
    text = (tmp_path / "manifest.csv").read_text().replace(",pending,0,", ",pending,many,", 1)
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(MosaicError, match=r"manifest.csv, line 2: .*'many'"):
        Manifest.read(tmp_path)


def test_a_manifest_on_object_storage_round_trips(s3_bucket: str) -> None:
    root = f"{s3_bucket}/run"
    manifest = Manifest(root, [ManifestRow("/data/a.tif", f"{root}/a.zarr", "done", 4, 1.5)])
    assert manifest.write().url == f"{root}/manifest.csv"
    assert Manifest.read(root).rows == manifest.rows
    with pytest.raises(MosaicError, match=r"has no manifest\.csv"):
        Manifest.read(f"{s3_bucket}/elsewhere")
