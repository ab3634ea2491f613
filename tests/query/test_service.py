"""The HTTP service, as a real `tessera serve` process: its own OpenAPI schema fuzzed with schemathesis
(no 5xx), path traversal refused, oversized requests refused, answers equal to the Python API's."""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error

from pipeline import query
from pipeline.mosaic import Mosaic
from pipeline.query.tiles import MosaicLayer
from tests.query.conftest import Served

MOSAICS = ["scene.zarr", "slides/slide.zarr"]


def get(served: Served, path: str) -> tuple[int, bytes, str]:
    """GET a raw path (not normalised by the client), returning status, body and content type."""
    host, port = urllib.parse.urlsplit(served.url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, response.getheader("content-type") or ""


def get_json(served: Served, path: str) -> Any:
    status, body, _ = get(served, path)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.slow
def test_no_request_the_schema_allows_gets_a_server_error(served: Served) -> None:
    """Every operation of /openapi.json, fuzzed by schemathesis: schema-valid requests against each real
    mosaic and with generated names, and schema-violating (negative) ones; none may get a 5xx."""
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    calls: dict[int, int] = {}
    for operation in operations:
        named = "{mid}" in operation.path
        strategies = [operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"mid": mid})
                      for mid in MOSAICS if named]
        strategies += [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]

        @given(case=st.one_of(strategies))
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call(timeout=60)
            calls[response.status_code] = calls.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
    print(f"schemathesis: {len(operations)} operations, {sum(calls.values())} requests, "
          f"statuses {sorted(calls.items())}")
    assert not any(code >= 500 for code in calls)
    # Many requests got past validation to real data (most of the rest are regions off the image: 422).
    assert calls.get(200, 0) > 20 and sum(calls.values()) > 300, calls


def test_paths_never_escape_the_served_folder(served: Served) -> None:
    attempts = [
        "/api/mosaics/../../../etc/passwd",
        "/api/mosaics/%2e%2e/%2e%2e/etc/region.png",
        "/api/mosaics/..%2F..%2Fetc/region.npy",
        "/api/mosaics/outside.zarr",  # a symlink in ROOT to a mosaic outside it
        "/api/mosaics/outside.zarr/region.npy",
        f"/api/mosaics/{served.outside}/region.npy",
        "/api/mosaics/%2Fetc%2Fpasswd",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/vendor/leaflet/..%2F..%2F..%2Fpackage.json",
        "/view/..%2F..%2Foutside.zarr",
    ]
    for path in attempts:
        status, body, _ = get(served, path)
        assert status in (404, 422), (path, status, body[:200])
        assert b"root:" not in body and b"create_app" not in body and b"tessera-viewer" not in body
    listed = [m["id"] for m in get_json(served, "/api/mosaics")]
    assert listed == ["scene.zarr", "slides/slide.zarr"]


def test_oversized_requests_are_refused(served: Served) -> None:
    status, body, _ = get(served, "/api/mosaics/scene.zarr/region.npy?level=0")  # 1.95 Mpx, limit 1 Mpx
    assert status == 413 and b"coarser level" in body
    assert get(served, "/api/mosaics/scene.zarr/region.npy?level=1")[0] == 200  # 0.49 Mpx
    assert get(served, "/api/mosaics/scene.zarr/region.png?window=0,0,1,1" + "0" * 100)[0] == 422
    assert get(served, "/api/mosaics/scene.zarr/region.png?level=99")[0] == 422
    # A body over the 1 MiB limit: refused on its stated length, before it is sent (the server answers
    # and closes; a client still sending would see a broken pipe instead of the answer).
    host, port = urllib.parse.urlsplit(served.url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/mosaics/scene.zarr/areas")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"request body over" in response.read()
    conn.close()
    # Sent in chunks, without a length: counted as it arrives (1 MiB + 16 KiB of valid JSON).
    big = b'{"polygon": {"type": "Polygon", "coordinates": []}}' + b" " * ((1 << 20) + (16 << 10))
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
    conn.request("POST", "/api/mosaics/scene.zarr/areas", body=chunks, headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    # All class scores of a region weigh one value per class: the limit counts them.
    assert get(served, "/api/mosaics/scene.zarr/region.npy?layer=scores&level=1")[0] == 413
    assert get(served, "/api/mosaics/scene.zarr/region.npy?layer=scores&level=2")[0] == 200


def test_out_of_range_and_unknown_get_a_4xx_with_a_message(served: Served) -> None:
    status, body, _ = get(served, "/api/mosaics/scene.zarr/region.png?window=5000,0,5100,10")
    assert status == 422 and b"outside the mosaic" in body
    status, body, _ = get(served, "/api/mosaics/nothing.zarr/stats")
    assert status == 404 and b"GET /api/mosaics lists" in body
    status, body, _ = get(served, "/api/mosaics/scene.zarr/tiles/3/9/0.png")
    assert status == 422 and b"does not exist at zoom 3" in body
    status, body, _ = get(served, "/api/mosaics/scene.zarr/point?x=9&y=95&crs=EPSG:4326")
    assert status == 422 and b"cannot be reprojected" in body
    status, body, _ = get(served, "/api/mosaics/scene.zarr/region.png?bbox=-1e308,-1e308,1e308,1e308&level=2")
    assert status == 200
    # The slide's source is not on disk: its preview tiles are 404, the mask's are there.
    status, body, _ = get(served, "/api/mosaics/slides/slide.zarr/tiles/0/0/0.png?layer=source")
    assert status == 404 and b"not readable here" in body
    assert get(served, "/api/mosaics/slides/slide.zarr/tiles/0/0/0.png")[0] == 200


def test_answers_equal_the_python_api(served: Served, geo_mosaic: Mosaic, slide_mosaic: Mosaic) -> None:
    m = geo_mosaic
    status, body, kind = get(served, "/api/mosaics/scene.zarr/region.npy?layer=scores&window=10,20,200,300&level=1")
    assert status == 200 and kind == "application/octet-stream"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)),
                                  query.read_region(m, "scores", window=(10, 20, 200, 300), level=1))
    meta = get_json(served, "/api/mosaics/scene.zarr")
    assert meta["tiles"]["scheme"] == "xyz" and meta["units"] == "m" and len(meta["levels"]) == 4
    z, x, y = meta["tiles"]["max_zoom"], 0, 0
    # The tile over the mosaic's centre at the top zoom, decoded, equals the library's tile.
    lon = (meta["bounds_wgs84"][0] + meta["bounds_wgs84"][2]) / 2
    lat = (meta["bounds_wgs84"][1] + meta["bounds_wgs84"][3]) / 2
    n = 2**z
    x = int((lon + 180) / 360 * n)
    y = int((1 - np.arcsinh(np.tan(np.radians(lat))) / np.pi) / 2 * n)
    status, body, kind = get(served, f"/api/mosaics/scene.zarr/tiles/{z}/{x}/{y}.png")
    assert status == 200 and kind == "image/png"
    with Image.open(io.BytesIO(body)) as tile:
        np.testing.assert_array_equal(np.asarray(tile), query.xyz_tile(MosaicLayer(m), z, x, y)[0])
    status, body, _ = get(served, f"/api/mosaics/scene.zarr/tiles/{z}/{x}/{y}.png?layer=source")
    with Image.open(io.BytesIO(body)) as tile:
        assert status == 200 and tile.mode == "RGBA" and np.asarray(tile)[..., 3].max() == 255
    stats = get_json(served, "/api/mosaics/scene.zarr/stats")
    assert stats["classes"] == query.mosaic_stats(m).to_dict()["classes"]
    polygon = {"type": "Polygon", "coordinates": [[[500100.3, 5199900.1], [500400.7, 5199880.2],
                                                   [500300.9, 5199600.4], [500100.3, 5199900.1]]]}
    request = urllib.request.Request(f"{served.url}/api/mosaics/scene.zarr/areas",
                                     data=json.dumps({"polygon": polygon}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response) == query.class_areas(m, polygon=polygon).to_dict()
    fc = get_json(served, "/api/mosaics/scene.zarr/polygons.geojson?window=100,100,300,300&classes=building")
    assert fc == json.loads(json.dumps(query.vectorize(m, window=(100, 100, 300, 300), classes=["building"])))
    # The slide: micrometres, the pixel tile scheme.
    slide = get_json(served, "/api/mosaics/slides/slide.zarr")
    assert slide["kind"] == "slide" and slide["units"] == "um" and slide["tiles"]["scheme"] == "pixel"
    at = get_json(served, "/api/mosaics/slides/slide.zarr/point?x=50.1&y=25.1")
    assert at == json.loads(json.dumps(query.point(slide_mosaic, 50.1, 25.1)))
