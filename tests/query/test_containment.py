"""Nothing under ROOT reaches outside it: each attack from issue 18 against a real `tessera serve`.

A scratch ROOT holds mosaics whose source previews or chunks lead outside it: a VRT naming an image
outside, a raw-band VRT over a text file outside, a VRT naming a /vsicurl/ URL of an HTTP listener
started here, a TIFF whose .ovr beside it is a link out, and mosaics with a chunk (or a whole chunk
folder) that is a link to another mosaic's chunk outside. Each is refused with a 4xx; no body carries
the outside bytes or a server path; the listener receives no request. A plain mosaic and its source in
the same ROOT are served, so the refusals are the containment's and not a broken set-up.
"""

from __future__ import annotations

import http.server
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.synthetic import write_label_mosaic
from tests.servers.ports import http_answers, start_server

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # plain TIFFs

SECRET_TEXT = b"TESSERA-SECRET-" * 64  # 960 bytes: what a raw-band VRT would show as a grey ramp
SIZE = 64


@dataclass
class Contained:
    url: str
    temp: Path  # every test path lies below it: no body may name it
    secret_chunk: bytes  # the outside mosaic's mask chunk, the bytes a followed link would decode
    requests: list[str] = field(default_factory=list)  # what the HTTP listener received


def get(served: Contained, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(served.url + path, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def assert_refused(served: Contained, path: str, status: int = 403) -> dict[str, str]:
    """`path` answers `status` with a message, and nothing outside ROOT shows in the body."""
    code, body = get(served, path)
    assert code == status, (code, body[:300])
    assert str(served.temp).encode() not in body  # no server path, ROOT's or the outside's
    assert b"TESSERA-SECRET" not in body and served.secret_chunk not in body
    detail: dict[str, str] = json.loads(body)
    assert detail["detail"]
    return detail


def write_tiff(path: Path, values: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[-1], height=values.shape[-2],
                       count=values.shape[0], dtype=values.dtype) as dst:
        dst.write(values)


def write_vrt(path: Path, band: str) -> None:
    path.write_text(f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}">{band}</VRTDataset>')


def simple_band(source: str) -> str:
    return ('<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>'
            '</SimpleSource></VRTRasterBand>')


def mosaic_with_source(root: Path, name: str, source: str | Path, value: int = 1) -> None:
    write_label_mosaic(np.full((SIZE, SIZE), value, np.uint8), root / name, crs=None, transform=None,
                       chunk=SIZE, shard=SIZE, lineage={"source": {"path": str(source), "level": 0}})


@pytest.fixture(scope="module")
def contained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contained]:
    temp = tmp_path_factory.mktemp("containment")
    root, outside = temp / "root", temp / "outside"
    root.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(18)
    write_tiff(outside / "secret.tif", rng.integers(0, 255, (1, SIZE, SIZE), dtype=np.uint8))
    (outside / "secret.txt").write_bytes(SECRET_TEXT)
    write_label_mosaic(np.full((SIZE, SIZE), 3, np.uint8), outside / "secret.zarr", crs=None, transform=None,
                       chunk=SIZE, shard=SIZE)

    requests: list[str] = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{listener.server_address[1]}/secret.tif"

    # A plain mosaic with its source beside it: served, preview and all.
    write_tiff(root / "plain.tif", rng.integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8))
    mosaic_with_source(root, "plain.zarr", root / "plain.tif")
    # Source previews that lead outside.
    write_vrt(root / "outside.vrt", simple_band(str(outside / "secret.tif")))
    mosaic_with_source(root, "vrt_outside.zarr", root / "outside.vrt")
    write_vrt(root / "raw.vrt", '<VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">'
              f'<SourceFilename relativeToVRT="0">{outside / "secret.txt"}</SourceFilename>'
              f'<ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>{SIZE}</LineOffset>'
              '</VRTRasterBand>')
    mosaic_with_source(root, "vrt_raw.zarr", root / "raw.vrt")
    write_vrt(root / "curl.vrt", simple_band(f"/vsicurl/{remote}"))
    mosaic_with_source(root, "vrt_curl.zarr", root / "curl.vrt")
    mosaic_with_source(root, "vsicurl.zarr", f"/vsicurl/{remote}")
    write_tiff(root / "overview.tif", rng.integers(0, 255, (1, SIZE, SIZE), dtype=np.uint8))
    (root / "overview.tif.ovr").symlink_to(outside / "secret.tif")
    mosaic_with_source(root, "ovr_link.zarr", root / "overview.tif")
    # Chunks that are links out: one chunk file, and a whole chunk folder.
    secret_chunk = outside / "secret.zarr" / "labels" / "mask" / "0" / "c" / "0" / "0"
    mosaic_with_source(root, "chunk_link.zarr", root / "plain.tif")
    chunk = root / "chunk_link.zarr" / "labels" / "mask" / "0" / "c" / "0" / "0"
    chunk.unlink()
    chunk.symlink_to(secret_chunk)
    mosaic_with_source(root, "folder_link.zarr", root / "plain.tif")
    folder = root / "folder_link.zarr" / "labels" / "mask" / "0" / "c"
    for f in sorted(folder.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    folder.rmdir()
    folder.symlink_to(outside / "secret.zarr" / "labels" / "mask" / "0" / "c", target_is_directory=True)

    server, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    url = f"http://127.0.0.1:{port}"
    yield Contained(url, temp, secret_chunk.read_bytes(), requests)
    server.terminate()
    server.wait(timeout=20)
    listener.shutdown()


def test_a_plain_mosaic_and_its_source_preview_are_served(contained: Contained) -> None:
    status, body = get(contained, "/api/mosaics/plain.zarr/region.npy?window=0,0,64,64")
    assert status == 200
    assert (np.load(io.BytesIO(body)) == 1).all()
    status, body = get(contained, "/api/mosaics/plain.zarr/tiles/0/0/0.png?layer=source")
    assert status == 200 and body.startswith(b"\x89PNG")


@pytest.mark.parametrize("mid", ["vrt_outside.zarr", "vrt_raw.zarr", "vrt_curl.zarr"])
def test_a_source_preview_through_a_vrt_is_refused(contained: Contained, mid: str) -> None:
    detail = assert_refused(contained, f"/api/mosaics/{mid}/tiles/0/0/0.png?layer=source")
    assert "not a TIFF" in detail["detail"]
    assert_refused(contained, f"/api/mosaics/{mid}/tiles/0/0/0.png?layer=source")  # remembered, still refused
    assert get(contained, f"/api/mosaics/{mid}/tiles/0/0/0.png")[0] == 200  # the mask itself is served


def test_no_preview_makes_a_request_to_the_network(contained: Contained) -> None:
    for mid in ("vrt_curl.zarr", "vsicurl.zarr"):
        detail = assert_refused(contained, f"/api/mosaics/{mid}/tiles/0/0/0.png?layer=source")
        assert "127.0.0.1" not in detail["detail"]
    assert contained.requests == []


def test_a_source_whose_overview_file_is_a_link_out_is_refused(contained: Contained) -> None:
    detail = assert_refused(contained, "/api/mosaics/ovr_link.zarr/tiles/0/0/0.png?layer=source")
    assert "outside the served folders" in detail["detail"]


@pytest.mark.parametrize("mid", ["chunk_link.zarr", "folder_link.zarr"])
def test_a_chunk_that_is_a_link_out_is_not_read(contained: Contained, mid: str) -> None:
    for path in (f"/api/mosaics/{mid}/region.npy?window=0,0,64,64", f"/api/mosaics/{mid}/tiles/0/0/0.png",
                 f"/api/mosaics/{mid}/region.png?window=0,0,64,64", f"/api/mosaics/{mid}/stats"):
        detail = assert_refused(contained, path)
        assert "symbolic link" in detail["detail"]
    # The other layers' chunks are no links: they are still served.
    status, body = get(contained, f"/api/mosaics/{mid}/region.npy?layer=confidence&window=0,0,64,64")
    assert status == 200 and np.load(io.BytesIO(body)).shape == (SIZE, SIZE)
