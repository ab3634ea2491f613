"""The training catalog: label rasters, GeoJSON polygons in any CRS, slide masks; and its errors."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
from PIL import Image

from pipeline.errors import ConfigError, SourceNotFoundError
from pipeline.models import ClassInfo
from pipeline.storage import Location, storage_for
from pipeline.training.catalog import Catalog, LabelledPair, load_catalog, open_pair
from pipeline.training.data import LabelledImage

BUILDINGS = (ClassInfo("background", (0, 0, 0)), ClassInfo("building", (230, 60, 60)))


@pytest.fixture(scope="module")
def atlanta(shared_data: Path) -> Path:
    return shared_data / "geo" / "spacenet_atlanta"


def whole(image: LabelledImage) -> tuple[np.ndarray, np.ndarray]:
    """The image's values and labels, read in one window (these are small)."""
    return image.read(0, 0, image.height, image.width)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_geojson_buildings_are_rasterised_onto_the_image_grid(atlanta: Path) -> None:
    """SpaceNet's own mask of the same footprints (solaris) is the truth for our rasterisation."""
    raster = open_pair(LabelledPair(image=str(atlanta / "sample_geotiff.tif"),
                                    polygons=str(atlanta / "geotiff_labels.geojson")), BUILDINGS)
    with rasterio.open(atlanta / "sample_fp_mask_from_geojson.tif") as src:
        truth = src.read(1) > 0
    values, labels = whole(raster)
    assert labels.shape == truth.shape == values.shape[1:]
    assert set(np.unique(labels)) == {0, 1}
    assert iou(labels == 1, truth) > 0.95
    assert raster.resolution == pytest.approx(0.5, abs=0.01)


def test_polygons_in_another_crs_are_reprojected(atlanta: Path, tmp_path: Path) -> None:
    collection = json.loads((atlanta / "geotiff_labels.geojson").read_text())
    for feature in collection["features"]:
        feature["geometry"] = rasterio.warp.transform_geom("EPSG:32616", "EPSG:4326", feature["geometry"])
    del collection["crs"]  # RFC 7946: no crs member means WGS84
    wgs84 = tmp_path / "wgs84.geojson"
    wgs84.write_text(json.dumps(collection))
    image = str(atlanta / "sample_geotiff.tif")
    native = open_pair(LabelledPair(image=image, polygons=str(atlanta / "geotiff_labels.geojson")), BUILDINGS)
    moved = open_pair(LabelledPair(image=image, polygons=str(wgs84)), BUILDINGS)
    assert iou(whole(native)[1] == 1, whole(moved)[1] == 1) > 0.98


def test_polygons_elsewhere_or_with_unknown_classes_are_refused(atlanta: Path, tmp_path: Path) -> None:
    collection = json.loads((atlanta / "geotiff_labels.geojson").read_text())
    far = json.loads(json.dumps(collection))
    for feature in far["features"]:  # 50 km east: right CRS, wrong place
        feature["geometry"]["coordinates"] = [[[x + 50_000, y] for x, y, *_ in ring]
                                              for ring in feature["geometry"]["coordinates"]]
    (tmp_path / "far.geojson").write_text(json.dumps(far))
    image = str(atlanta / "sample_geotiff.tif")
    with pytest.raises(ConfigError, match="do not overlap"):
        open_pair(LabelledPair(image=image, polygons=str(tmp_path / "far.geojson")), BUILDINGS)
    collection["features"][3]["properties"]["kind"] = 7
    for feature in collection["features"]:
        feature["properties"].setdefault("kind", "building")
    (tmp_path / "kinds.geojson").write_text(json.dumps(collection))
    with pytest.raises(ConfigError, match="class id 7, outside the 2 configured classes"):
        open_pair(LabelledPair(image=image, polygons=str(tmp_path / "kinds.geojson"), class_property="kind"),
                  BUILDINGS)


def test_slide_with_a_mask_at_another_size(shared_data: Path, tmp_path: Path) -> None:
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    mask = np.zeros((200, 100), np.uint8)  # a quarter-ish of the slide's size, any size works
    mask[50:150, 25:75] = 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tissue = (ClassInfo("background", (255, 255, 255)), ClassInfo("tumour", (200, 0, 0)))
    raster = open_pair(LabelledPair(image=str(slide), mask=str(tmp_path / "mask.png")), tissue)
    values, labels = whole(raster)
    h, w = values.shape[1:]
    assert labels.shape == (h, w)
    assert labels.mean() == pytest.approx(mask.mean(), abs=0.01)
    assert labels[h // 2, w // 2] == 1 and labels[5, 5] == 0
    assert raster.resolution == pytest.approx(0.499, abs=0.001) and raster.resolution_unit == "um"


def test_catalog_from_mapping_and_new_pairs_since_a_date(atlanta: Path) -> None:
    image, polygons = str(atlanta / "sample_geotiff.tif"), str(atlanta / "geotiff_labels.geojson")
    catalog = Catalog.from_mapping({
        "task": "buildings",
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "building", "color": [230, 60, 60]}],
        "pairs": [{"image": image, "polygons": polygons, "added": "2026-11-01"},
                  {"image": image, "polygons": polygons, "added": "2026-11-20"}],
    })
    assert catalog.task == "buildings" and len(catalog.pairs) == 2
    newer = catalog.since(dt.datetime(2026, 11, 10, tzinfo=dt.UTC))
    assert [p.added for p in newer] == ["2026-11-20"]
    # A date has no hour: a pair added on the day of a 02:00 run is new for the next night.
    assert len(catalog.since(dt.datetime(2026, 11, 20, 2, tzinfo=dt.UTC))) == 1
    assert catalog.since(dt.datetime(2026, 11, 21, tzinfo=dt.UTC)) == ()
    assert [(r.height, r.width) for r in catalog.open(newer)] == [(900, 900)]


@pytest.mark.parametrize(("data", "message"), [
    ({"task": "t", "classes": [{"name": "a", "color": [0, 0, 0]}, {"name": "b", "color": [1, 1, 1]}], "pairs": []},
     "has no labelled pairs"),
    ({"task": "t", "classes": [{"name": "a"}], "pairs": []}, "malformed"),
    ({"task": "t", "klasses": []}, "Unknown catalog keys"),
    ({"task": "t", "classes": [{"name": "a", "color": [0, 0, 0]}, {"name": "b", "color": [1, 1, 1]}],
      "pairs": [{"image": "x.tif", "labels": "l.tif", "polygons": "p.geojson"}]}, "exactly one of"),
])
def test_bad_catalogs_are_refused_with_the_fix(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Catalog.from_mapping(data)


def test_the_spacenet_catalog_in_conf_reads(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shared_data)  # the catalog's relative paths are read from its own folder, not from here
    catalog = load_catalog("spacenet_atlanta")
    (raster,) = catalog.open()
    assert catalog.task == "buildings" and [c.name for c in catalog.classes] == ["background", "building"]
    assert 0.03 < float((whole(raster)[1] == 1).mean()) < 0.06  # 43 footprints cover about 4% of the image


def test_a_catalog_and_its_pairs_on_object_storage_read_as_local_files(atlanta: Path, s3_bucket: str,
                                                                       tmp_path: Path) -> None:
    import yaml

    mask = (np.arange(900)[:, None] // 300 % 2 * np.ones(900, np.uint8)).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    files = {"a.tif": atlanta / "sample_geotiff.tif", "a.geojson": atlanta / "geotiff_labels.geojson",
             "mask.png": tmp_path / "mask.png"}
    for name, path in files.items():
        url = Location.parse(f"{s3_bucket}/data/{name}")
        storage_for(url).write_bytes(url, path.read_bytes())
    classes = [{"name": "background", "color": [0, 0, 0]}, {"name": "building", "color": [230, 60, 60]}]
    document = {"task": "buildings", "classes": classes, "pairs": [
        {"image": f"{s3_bucket}/data/a.tif", "polygons": f"{s3_bucket}/data/a.geojson"},
        {"image": "data/a.tif", "mask": "data/mask.png"}]}  # relative: read from the catalog's folder
    url = Location.parse(f"{s3_bucket}/catalog.yaml")
    storage_for(url).write_bytes(url, yaml.safe_dump(document).encode())

    catalog = load_catalog(url.url)
    polygons, masked = catalog.open()
    local = open_pair(LabelledPair(image=str(files["a.tif"]), polygons=str(files["a.geojson"])), BUILDINGS)
    (values, labels), (local_values, local_labels) = whole(polygons), whole(local)
    assert np.array_equal(labels, local_labels) and np.array_equal(values, local_values)
    assert np.array_equal(whole(masked)[1], mask)
    # No `added` date: the pairs arrived when their objects were written.
    assert len(catalog.since(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))) == 2
    with pytest.raises(SourceNotFoundError, match=r"s3://.*/data/gone.geojson does not exist"):
        open_pair(LabelledPair(image=f"{s3_bucket}/data/a.tif", polygons=f"{s3_bucket}/data/gone.geojson"), BUILDINGS)
    with pytest.raises(ConfigError, match="No catalog at s3://"):
        load_catalog(f"{s3_bucket}/gone.yaml")


def test_qupath_annotations_of_a_slide_are_burnt_in_pixels_with_their_class_names(shared_data: Path,
                                                                                   tmp_path: Path) -> None:
    # QuPath exports annotations as GeoJSON in level-0 pixel coordinates (y down), the class under
    # properties.classification.name; a slide has no CRS, so nothing is reprojected.
    slide = str(shared_data / "slides" / "cmu-1-small-region.svs")
    tissue = (ClassInfo("background", (255, 255, 255)), ClassInfo("Tumor", (200, 0, 0)),
              ClassInfo("Stroma", (0, 150, 0)))

    def annotation(x0: int, y0: int, x1: int, y1: int, name: str) -> dict[str, object]:
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}

    features = [annotation(100, 200, 600, 700, "Tumor"), annotation(1500, 2000, 2000, 2800, "Stroma")]
    (tmp_path / "qupath.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (tmp_path / "old.geojson").write_text(json.dumps(features))  # older QuPath: a bare list of features
    for name in ("qupath.geojson", "old.geojson"):
        image = open_pair(LabelledPair(image=slide, polygons=str(tmp_path / name)), tissue)
        labels = image.read(0, 0, image.height, image.width)[1]
        assert labels[450, 350] == 1 and labels[2400, 1750] == 2 and labels[1000, 1000] == 0
        assert int((labels == 1).sum()) == 500 * 500 and int((labels == 2).sum()) == 500 * 800
    features.append(annotation(10, 10, 50, 50, "Necrosis"))
    (tmp_path / "unknown.geojson").write_text(json.dumps(features))
    with pytest.raises(ConfigError, match="classified 'Necrosis', which is not one of the class names"):
        open_pair(LabelledPair(image=slide, polygons=str(tmp_path / "unknown.geojson")), tissue)


def test_a_colour_mask_or_lon_lat_polygons_on_a_slide_are_refused(shared_data: Path, atlanta: Path,
                                                                     tmp_path: Path) -> None:
    slide = str(shared_data / "slides" / "cmu-1-small-region.svs")
    tissue = (ClassInfo("background", (255, 255, 255)), ClassInfo("tumour", (200, 0, 0)))
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    image = open_pair(LabelledPair(image=slide, mask=str(tmp_path / "rgb.png")), tissue)
    with pytest.raises(ConfigError, match="has 3 bands"):
        image.read(0, 0, 10, 10)
    # Georeferenced polygons on an image without a CRS would be burnt as specks at its corner.
    collection = json.loads((atlanta / "geotiff_labels.geojson").read_text())
    for feature in collection["features"]:
        feature["geometry"] = rasterio.warp.transform_geom("EPSG:32616", "EPSG:4326", feature["geometry"])
    del collection["crs"]
    (tmp_path / "wgs84.geojson").write_text(json.dumps(collection))
    with pytest.raises(ConfigError, match="look like longitudes and latitudes"):
        open_pair(LabelledPair(image=slide, polygons=str(tmp_path / "wgs84.geojson")), tissue)
