"""A served ROOT with damaged mosaics beside good ones: the listing still answers, errors name the
problem without the server's paths or the libraries' internals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.synthetic import write_label_mosaic
from tests.servers.ports import http_answers, start_server


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-with-damage")
    labels = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 3
    for name in ("good.zarr", "nested/also-good.zarr", "no-layout.zarr", "bad-layout.zarr"):
        write_label_mosaic(labels, root / name, crs="EPSG:32632", transform=(1.0, 0.0, 500000.0, 0.0, -1.0, 5200000.0),
                           chunk=64, shard=64)
    # Tessera's metadata with a piece missing, and with a piece of the wrong shape: a mosaic written by
    # another version, or edited by hand.
    for name, damage in (("no-layout.zarr", lambda meta: meta.pop("layout")),
                         ("bad-layout.zarr", lambda meta: meta.update(layout={"classes": 7}))):
        document = json.loads((root / name / "zarr.json").read_text())
        damage(document["attributes"]["tessera"])
        (root / name / "zarr.json").write_text(json.dumps(document))
    # A chunk cut short (a copy that stopped half-way): its checksum fails when read.
    write_label_mosaic(labels, root / "cut-chunk.zarr", crs=None, transform=None, chunk=64, shard=64)
    with open(root / "cut-chunk.zarr" / "labels" / "mask" / "0" / "c" / "0" / "0", "r+b") as chunk:
        chunk.truncate(100)
    (root / "not-json.zarr").mkdir()
    (root / "not-json.zarr" / "zarr.json").write_text("{ cut short")
    # Metadata no JSON parser can take (nested past Python's recursion limit), and a named pipe, whose
    # reader blocks until something writes: neither may fail the listing or hold a server thread.
    (root / "deep.zarr").mkdir()
    (root / "deep.zarr" / "zarr.json").write_text("[" * 200_000 + "]" * 200_000)
    (root / "pipe.zarr").mkdir()
    os.mkfifo(root / "pipe.zarr" / "zarr.json")
    return root


@pytest.fixture(scope="module")
def url(root: Path) -> Iterator[str]:
    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    address = f"http://127.0.0.1:{port}"
    yield address
    server.terminate()
    server.wait(timeout=20)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_damaged_mosaics_are_listed_with_their_problem_beside_the_good_ones(url: str, root: Path) -> None:
    status, listed = get(f"{url}/api/mosaics")
    assert status == 200
    by_id = {m["id"]: m for m in listed}
    assert set(by_id) == {"good.zarr", "nested/also-good.zarr", "no-layout.zarr", "bad-layout.zarr", "cut-chunk.zarr",
                          "pipe.zarr"}  # the pipe is listed with its reason; deep.zarr's document is no mosaic's
    assert "not a regular file" in by_id["pipe.zarr"]["error"]
    for good in ("good.zarr", "nested/also-good.zarr"):
        assert "error" not in by_id[good] and by_id[good]["height"] == 64
    assert "metadata is damaged (missing 'layout')" in by_id["no-layout.zarr"]["error"]
    assert "metadata is damaged" in by_id["bad-layout.zarr"]["error"]
    assert str(root) not in json.dumps(listed)


def test_errors_carry_no_server_path_nor_library_internals(url: str, root: Path) -> None:
    answers = [get(f"{url}{path}") for path in (
        "/api/mosaics/no-layout.zarr",
        "/api/mosaics/bad-layout.zarr/region.npy?window=0,0,8,8",
        "/api/mosaics/good.zarr/region.npy?bbox=0,0,1,1&crs=EPSG:999999",  # no such CRS: PROJ's words
        "/api/mosaics/good.zarr/stats?bbox=1e30,1e30,2e30,2e30&crs=EPSG:4326",  # not reprojectable
        "/api/mosaics/not-json.zarr",
        "/api/mosaics/cut-chunk.zarr/region.npy?window=0,0,8,8",
        "/api/mosaics/deep.zarr",
        *["/api/mosaics/pipe.zarr"] * 3,
    )]
    assert [status for status, _ in answers] == [404, 404, 422, 422, 404, 422, 404, 403, 403, 403]
    assert "a chunk is damaged" in answers[5][1]["detail"]
    assert "not a regular file" in answers[-1][1]["detail"]
    assert get(f"{url}/api/mosaics/good.zarr")[0] == 200  # the pipe held no thread
    for _, body in answers:
        text = json.dumps(body)
        assert str(root) not in text and "/tmp" not in text
        assert "proj_create" not in text and "PROJ" not in text and "Traceback" not in text
    assert "unknown CRS 'EPSG:999999'" in answers[2][1]["detail"]


def test_a_mosaic_mended_in_place_is_listed_as_good_at_the_next_listing(url: str, root: Path) -> None:
    # A mosaic mended in place is listed as good at the next listing (its metadata file changed).
    before = {m["id"]: m for m in get(f"{url}/api/mosaics")[1]}
    assert "error" in before["no-layout.zarr"]
    good = json.loads((root / "good.zarr" / "zarr.json").read_text())
    document = json.loads((root / "no-layout.zarr" / "zarr.json").read_text())
    document["attributes"]["tessera"]["layout"] = good["attributes"]["tessera"]["layout"]
    (root / "no-layout.zarr" / "zarr.json").write_text(json.dumps(document))
    after = {m["id"]: m for m in get(f"{url}/api/mosaics")[1]}
    assert "error" not in after["no-layout.zarr"] and after["no-layout.zarr"]["width"] == 64
