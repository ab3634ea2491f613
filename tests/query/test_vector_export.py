"""Polygons in other people's tools: QuPath objects, GeoPackage and FlatGeobuf, each rasterised back to the
mask it came from; the CLI's refusals; the service's `format=qupath`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from pyproj import CRS
from rasterio.features import rasterize
from shapely import from_wkb
from shapely.geometry import shape
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import OutputExistsError
from pipeline.mosaic import Mosaic
from pipeline.query.vector import VectorLimits
from pipeline.query.vector_export import export_vectors, qupath_objects
from pipeline.query.window import RegionTooLargeError, level_transform, pixel_window, window_transform
from pipeline.stitching import NODATA_CLASS
from tests.query.conftest import Served

GEO_WINDOW = (100, 200, 600, 900)  # y0, x0, y1, x1 at level 0: not at the origin, so offsets count


def burn(shapes: list[tuple[Any, int]], size: tuple[int, int], transform: Affine, dtype: np.dtype) -> np.ndarray:
    """The polygons rasterised at pixel centres (rasterio's default), unburnt pixels = nodata."""
    if not shapes:
        return np.full(size, NODATA_CLASS, dtype)
    return rasterize(shapes, out_shape=size, transform=transform, fill=NODATA_CLASS, dtype=dtype)


def assert_per_class(burnt: np.ndarray, mask: np.ndarray, classes: range) -> None:
    for c in classes:
        np.testing.assert_array_equal(burnt == c, mask == c, err_msg=f"class {c}")
    np.testing.assert_array_equal(burnt, mask)


def check_qupath_structure(collection: dict[str, Any], m: Mosaic) -> None:
    """Every feature as QuPath (0.4+) reads it: objectType, and a classification with a name and an RGB colour
    (QuPath's PathClassTypeAdapter refuses a name without a colour)."""
    palette = {c.name: list(c.color) for c in m.layout.classes}
    assert collection["type"] == "FeatureCollection" and collection["features"]
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        properties = feature["properties"]
        assert set(properties) == {"objectType", "classification"} and properties["objectType"] == "annotation"
        kind = properties["classification"]
        assert set(kind) == {"name", "color"} and kind["name"] in palette
        assert kind["color"] == palette[kind["name"]]
        assert len(kind["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in kind["color"])
        for ring in feature["geometry"]["coordinates"]:
            assert list(ring[0]) == list(ring[-1]) and len(ring) >= 4


@pytest.mark.parametrize("which", ["slide", "geo"])
def test_qupath_round_trips_to_the_mask(which: str, geo_mosaic: Mosaic, slide_mosaic: Mosaic) -> None:
    """Rasterised back in level-0 pixel coordinates (identity transform), the QuPath polygons equal the mask,
    per class; class 0 is left out unless asked for."""
    m = slide_mosaic if which == "slide" else geo_mosaic
    window = None if which == "slide" else GEO_WINDOW
    mask = m.read("mask", 0)
    names = [c.name for c in m.layout.classes]
    height, width = m.layout.height, m.layout.width
    y0, x0, y1, x1 = window or (0, 0, height, width)
    expected = np.full(mask.shape, NODATA_CLASS, mask.dtype)
    expected[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    for background in (False, True):
        collection = qupath_objects(m, window=window, background=background)
        check_qupath_structure(collection, m)
        shapes = [(f["geometry"], names.index(f["properties"]["classification"]["name"]))
                  for f in collection["features"]]
        assert (0 in {v for _, v in shapes}) is background
        burnt = burn(shapes, (height, width), Affine.identity(), mask.dtype)
        want = expected if background else np.where(expected == 0, NODATA_CLASS, expected).astype(mask.dtype)
        assert_per_class(burnt, want, range(len(names)))
    assert collection["tessera"]["units"] == "px" and collection["tessera"]["crs"] is None


def test_qupath_of_a_coarser_level_is_in_level_0_pixels_clipped_to_the_image(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    level1 = qupath_objects(m, level=1, classes=["building"])
    names = [c.name for c in m.layout.classes]
    shapes = [(f["geometry"], names.index(f["properties"]["classification"]["name"])) for f in level1["features"]]
    mask = m.read("mask", 1)
    burnt = burn(shapes, mask.shape, Affine.scale(2), mask.dtype)  # level-1 pixel centres, in level-0 pixels
    np.testing.assert_array_equal(burnt == names.index("building"), mask == names.index("building"))
    level3 = qupath_objects(m, level=3)  # 1300 / 8 is not whole: the last row of pixels reaches past the image
    xs, ys = zip(*(xy for f in level3["features"] for ring in f["geometry"]["coordinates"] for xy in ring),
                 strict=True)
    assert max(xs) <= m.layout.width and max(ys) == m.layout.height


def test_qupath_polygons_keep_their_holes(slide_mosaic: Mosaic) -> None:
    collection = qupath_objects(slide_mosaic, background=True)
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in collection["features"])


@pytest.mark.parametrize("fmt", ["gpkg", "fgb"])
def test_gis_files_read_back_with_their_crs_and_rasterise_to_the_mask(fmt: str, geo_mosaic: Mosaic,
                                                                     slide_mosaic: Mosaic, tmp_path: Path) -> None:
    from pyogrio.raw import read

    for m, window in ((geo_mosaic, GEO_WINDOW), (slide_mosaic, None)):
        out = tmp_path / f"{Path(str(m.path)).stem}.{fmt}"
        path, count = export_vectors(m, out, window=window)
        meta, _, geometry, (ids, names, areas) = read(path)
        assert path == out and len(geometry) == count > 0
        layout = m.layout
        if layout.crs is None:
            assert meta["crs"] is None
        else:
            assert CRS.from_user_input(meta["crs"]) == CRS.from_wkt(layout.crs)
        assert list(meta["fields"]) == ["class", "name", "area"]
        assert [layout.classes[i].name for i in ids] == list(names)
        y0, x0, y1, x1 = window or (0, 0, layout.height, layout.width)
        mask = m.read("mask", 0)[y0:y1, x0:x1]
        win = pixel_window(layout, (y0, x0, y1, x1))
        polygons = [from_wkb(g) for g in geometry]
        burnt = burn(list(zip(polygons, ids.tolist(), strict=True)), mask.shape, window_transform(layout, win),
                     mask.dtype)
        assert_per_class(burnt, mask, range(len(layout.classes)))
        pixel_area = abs(level_transform(layout, 0).determinant)
        np.testing.assert_allclose(areas.sum(), np.count_nonzero(mask != NODATA_CLASS) * pixel_area)


def test_limits_apply_to_every_format(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    tiny = VectorLimits(features=3, vertices=10_000, bytes=1 << 20)
    with pytest.raises(RegionTooLargeError, match="over the limit of 3"):
        qupath_objects(geo_mosaic, window=GEO_WINDOW, limits=tiny)
    for fmt in ("geojson", "qupath", "gpkg", "fgb"):
        with pytest.raises(RegionTooLargeError, match="over the limit of 3"):
            export_vectors(geo_mosaic, tmp_path / f"x.{'geojson' if fmt == 'qupath' else fmt}", fmt,
                           window=GEO_WINDOW, limits=tiny)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, not even a hidden name


def test_an_existing_file_is_replaced_only_when_asked(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    out = tmp_path / "b.gpkg"
    out.write_text("mine")
    with pytest.raises(OutputExistsError):
        export_vectors(geo_mosaic, out, window=(0, 0, 50, 50))
    assert out.read_text() == "mine"
    export_vectors(geo_mosaic, out, window=(0, 0, 50, 50), overwrite=True)
    assert out.read_bytes()[:16] == b"SQLite format 3\x00" and sorted(p.name for p in tmp_path.iterdir()) == ["b.gpkg"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["query", "vectorize", *args])
    return result.exit_code, result.output


def test_cli_writes_each_format(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    path = str(geo_mosaic.path)
    code, out = run(path, "--window", "0,0,200,200", "--format", "qupath", "-o", str(tmp_path / "q.geojson"))
    assert code == 0 and "polygons ->" in out, out
    collection = json.loads((tmp_path / "q.geojson").read_text())
    assert collection == json.loads(json.dumps(qupath_objects(geo_mosaic, window=(0, 0, 200, 200))))
    code, out = run(path, "--window", "0,0,200,200", "-o", str(tmp_path / "g.fgb"))  # the format from the name
    assert code == 0 and (tmp_path / "g.fgb").read_bytes()[:3] == b"fgb", out
    code, out = run(path, "--window", "0,0,50,50", "--format", "qupath")  # printed
    assert code == 0 and json.loads(out)["features"][0]["properties"]["objectType"] == "annotation"


def test_cli_bad_input_is_one_line_and_leaves_nothing(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    path = str(geo_mosaic.path)
    (tmp_path / "there.geojson").write_text("{}")
    for args, message in [
        (("--format", "shp", "-o", str(tmp_path / "a.shp")), "format 'shp': choose one of geojson, qupath"),
        (("-o", str(tmp_path / "missing" / "a.gpkg")), "does not exist; make it first"),
        (("-o", str(tmp_path / "there.geojson")), "exists: give another name, or overwrite (--overwrite)"),
        (("--format", "gpkg"), "a gpkg file needs --out FILE"),
        (("--format", "gpkg", "-o", str(tmp_path / "a.geojson")), "a gpkg file should end in .gpkg"),
        (("--format", "qupath", "--out-crs", "EPSG:4326", "-o", str(tmp_path / "q.geojson")),
         "QuPath's coordinates are pixels"),
        (("--format", "qupath", "--object-type", "cell"), "QuPath objects are annotation or detection"),
    ]:
        code, out = run(path, "--window", "0,0,100,100", *args)
        assert code == 2, (args, out)
        assert out.startswith("error: ") and message in out and len(out.strip().splitlines()) == 1, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.geojson"]
    assert (tmp_path / "there.geojson").read_text() == "{}"
    code, out = run(path, "--window", "0,0,100,100", "--overwrite", "-o", str(tmp_path / "there.geojson"))
    assert code == 0 and json.loads((tmp_path / "there.geojson").read_text())["features"]


def test_service_answers_qupath_objects(served: Served, geo_mosaic: Mosaic) -> None:
    base = f"{served.url}/api/mosaics/scene.zarr/polygons.geojson?window=100,200,300,400"
    with urllib.request.urlopen(f"{base}&format=qupath", timeout=30) as answer:
        assert answer.headers["Content-Type"] == "application/geo+json"
        collection = json.load(answer)
    assert collection == json.loads(json.dumps(qupath_objects(geo_mosaic, window=(100, 200, 300, 400))))
    for query in ("&format=qupath&out_crs=EPSG:4326", "&format=shp"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + query, timeout=30)
        assert refused.value.code == 422


def test_polygon_shapes_are_valid(slide_mosaic: Mosaic) -> None:
    """QuPath builds its ROIs from the rings as given: each polygon must be valid as written."""
    for feature in qupath_objects(slide_mosaic)["features"]:
        assert shape(feature["geometry"]).is_valid


def test_qupath_needs_the_downsample_of_a_coarser_source_level(tmp_path: Path) -> None:
    """A mosaic segmented from level 1 of its source: QuPath's pixels are the source's level 0, so the
    coordinates are scaled by that level's downsample, which the mosaic does not record and must be given."""
    from pipeline.errors import RegionError
    from pipeline.synthetic import generate_scene, write_label_mosaic

    labels = generate_scene(64, 80, seed=5).labels
    write_label_mosaic(labels, tmp_path / "l1.zarr", crs=None, transform=None, mpp=0.5, chunk=64, shard=64,
                       lineage={"source": {"path": "slide.svs", "level": 1}})
    m = Mosaic.open(tmp_path / "l1.zarr")
    with pytest.raises(RegionError, match=r"segmented from level 1 of its source.*--downsample"):
        qupath_objects(m)
    collection = qupath_objects(m, downsample=4.0, background=True)
    shapes = [(f["geometry"], [c.name for c in m.layout.classes].index(f["properties"]["classification"]["name"]))
              for f in collection["features"]]
    burnt = burn(shapes, labels.shape, Affine.scale(4.0), labels.dtype)  # mosaic pixel centres, in source pixels
    np.testing.assert_array_equal(burnt, labels)
