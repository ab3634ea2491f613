"""`tessera query info|region|stats|vectorize|export`: the library's answers, from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from typer.testing import CliRunner

from pipeline import query
from pipeline.cli import app
from pipeline.mosaic import Mosaic
from pipeline.tiling import Rect


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["query", *args])
    return result.exit_code, result.output


def test_info_region_and_stats(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    path = str(geo_mosaic.path)
    code, out = run("info", path)
    info = json.loads(out)
    assert code == 0 and info["kind"] == "geo" and info["units"] == "m" and len(info["levels"]) == 4
    w, s, e, n = info["bounds_wgs84"]
    assert 8.99 < w < e < 9.02 and 46.9 < s < n < 47.0
    code, out = run("region", path, "--window", "10,20,110,220", "--level", "1", "-o", str(tmp_path / "r.npy"))
    report = json.loads(out)
    assert code == 0 and report["shape"] == [100, 200] and report["level"] == 1
    values = np.load(tmp_path / "r.npy")
    np.testing.assert_array_equal(values, geo_mosaic.read("mask", 1, Rect(10, 20, 110, 220)))
    assert report["pixels"]["water"] == int(np.count_nonzero(values == 1))
    code, out = run("stats", path)
    assert code == 0 and json.loads(out) == query.mosaic_stats(geo_mosaic).to_dict()
    polygon = {"type": "Polygon", "coordinates": [[[500100.3, 5199900.1], [500400.7, 5199880.2],
                                                   [500300.9, 5199600.4], [500100.3, 5199900.1]]]}
    (tmp_path / "field.geojson").write_text(json.dumps({"type": "Feature", "geometry": polygon}))
    code, out = run("stats", path, "--polygon", str(tmp_path / "field.geojson"))
    assert code == 0 and json.loads(out) == query.class_areas(geo_mosaic, polygon=polygon).to_dict()


def test_vectorize_and_export(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    path = str(geo_mosaic.path)
    code, out = run("vectorize", path, "--window", "100,100,400,400", "--classes", "building",
                    "--out-crs", "EPSG:4326", "-o", str(tmp_path / "b.geojson"))
    collection = json.loads((tmp_path / "b.geojson").read_text())
    count = len(collection["features"])
    assert code == 0 and f"{count} polygon{'' if count == 1 else 's'} -> " in out
    assert {f["properties"]["name"] for f in collection["features"]} == {"building"}
    code, out = run("export", path, "-o", str(tmp_path / "mask.tif"), "--level", "1")
    with rasterio.open(tmp_path / "mask.tif") as cog:
        assert code == 0 and cog.shape == (650, 750) and cog.overviews(1)
        np.testing.assert_array_equal(cog.read(1), geo_mosaic.read("mask", 1))
    code, _ = run("export", path, "-o", str(tmp_path / "mask.png"), "--level", "2")
    assert code == 0 and (tmp_path / "mask.png").stat().st_size > 1000


def test_bad_input_is_one_line_and_exit_2(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    path = str(geo_mosaic.path)
    for args, message in [
        (("region", path, "--window", "0,0,10"), "four integers"),
        (("region", path, "--window", "5000,0,5100,10"), "outside the mosaic"),
        (("region", path, "--bbox", "0,0,1,1", "--crs", "EPSG:4326"), "outside the mosaic"),
        (("vectorize", path, "--classes", "roof"), "unknown classes roof"),
        (("export", path, "-o", str(tmp_path / "x.jpg")), "give a .tif (COG) or a .png"),
        (("stats", str(tmp_path)), "not a tessera mosaic"),
    ]:
        code, out = run(*args)
        assert code == 2, (args, out)
        assert out.startswith("error: ") and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "x.jpg").exists()
