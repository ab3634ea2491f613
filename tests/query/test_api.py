"""The Python query API against the mosaic's own arrays: regions, areas, polygons, exports, tiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.features import rasterize
from rasterio.warp import transform as warp_points
from rasterio.warp import transform_geom

from pipeline import query
from pipeline.errors import MosaicError, RegionError
from pipeline.mosaic import Mosaic
from pipeline.query.tiles import MosaicLayer, pixel_max_zoom, tile_bounds
from pipeline.query.window import RegionTooLargeError, level_transform
from pipeline.tiling import Rect
from tests.query.conftest import GEO_CRS, GEO_TRANSFORM

WGS84 = "EPSG:4326"


def corner(window: tuple[int, int, int, int], level: int = 0) -> tuple[float, float, float, float]:
    """The bbox of a level's pixel window in the mosaic's CRS."""
    t = Affine(*GEO_TRANSFORM) @ Affine.scale(2**level)
    y0, x0, y1, x1 = window
    (minx, maxy), (maxx, miny) = t @ (x0, y0), t @ (x1, y1)
    return minx, miny, maxx, maxy


def test_window_reads_match_the_stored_arrays_at_every_level(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    for level in range(m.layout.num_levels):
        h, w = m.layout.level_shape(level)
        window = (h // 5, w // 7, h // 5 + h // 3, w // 7 + w // 2)
        for layer in ("mask", "confidence", "scores"):
            got = query.read_region(m, layer, window=window, level=level)
            whole = m.read(layer, level)
            np.testing.assert_array_equal(got, whole[..., window[0] : window[2], window[1] : window[3]])
    # A window reaching past the edge is clipped to the image.
    h, w = m.layout.level_shape(0)
    assert query.read_region(m, window=(h - 10, w - 20, h + 50, w + 50)).shape == (10, 20)


def test_xarray_region_carries_coordinates_crs_and_transform(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    arr = query.read_region(m, "scores", window=(100, 200, 164, 296), level=1, as_xarray=True)
    assert arr.dims == ("c", "y", "x") and arr.shape == (5, 64, 96)
    assert list(arr.c.values) == [c.name for c in m.layout.classes]
    expected = level_transform(m.layout, 1) @ Affine.translation(200, 100)
    assert arr.rio.transform() == expected and arr.rio.crs.to_epsg() == 32632
    # Pixel centres: the first column's x is the window's left edge plus half a level-1 pixel (1 m).
    assert arr.x.values[0] == pytest.approx(expected.c + 0.5)
    np.testing.assert_array_equal(arr.values, m.read("scores", 1, Rect(100, 200, 164, 296)))
    assert arr.attrs["resolution"] == 1.0 and arr.attrs["units"] == "m"


def test_bbox_in_another_crs_reads_the_pixels_under_it(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    window = (300, 400, 700, 900)
    minx, miny, maxx, maxy = corner(window)
    # The same box in WGS84: its reprojected bounds cover the window (a UTM box is not square in lat/lon).
    lons, lats = warp_points(GEO_CRS, WGS84, [minx, maxx, minx, maxx], [miny, miny, maxy, maxy])
    bbox = (min(lons), min(lats), max(lons), max(lats))
    arr = query.read_region(m, bbox=bbox, crs=WGS84, as_xarray=True)
    y0, x0, y1, x1 = arr.attrs["window"]
    assert y0 <= window[0] and x0 <= window[1] and y1 >= window[2] and x1 >= window[3]
    assert (y1 - y0) - (window[2] - window[0]) < 10 and (x1 - x0) - (window[3] - window[1]) < 10
    np.testing.assert_array_equal(arr.values, m.read("mask", 0, Rect(y0, x0, y1, x1)))
    # In the mosaic's own CRS, the bbox of a window gives exactly that window.
    same = query.read_region(m, bbox=corner(window), as_xarray=True)
    assert same.attrs["window"] == list(window)
    # A target resolution of 2.2 m picks level 2 (2 m pixels), the coarsest no coarser than asked.
    coarse = query.read_region(m, bbox=corner(window), resolution=2.2, as_xarray=True)
    assert coarse.attrs["level"] == 2 and coarse.attrs["window"] == [75, 100, 175, 225]


def test_class_areas_are_pixel_counts_times_pixel_area(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    names = [c.name for c in m.layout.classes]
    mask = m.read("mask", 0)
    counts = np.bincount(mask.ravel(), minlength=256)
    whole = query.class_areas(m)
    assert whole.unit == "m2" and whole.nodata_pixels == counts[255] == 40 * 300
    for i, name in enumerate(names):
        assert whole.pixels[name] == counts[i] and whole.areas[name] == pytest.approx(counts[i] * 0.25)
    # Out of core with dask, chunk by chunk: the same figures, plus the mean confidence per class.
    stats = query.mosaic_stats(m)
    assert stats.pixels == whole.pixels and stats.areas == pytest.approx(whole.areas)
    conf = m.read("confidence", 0).astype(np.float64)
    assert stats.mean_confidence is not None
    assert stats.mean_confidence["water"] == pytest.approx(conf[mask == 1].mean(), rel=1e-6)
    # A window, and a coarser level (approximate, 4x the pixel area).
    part = query.class_areas(m, window=(500, 600, 800, 1000))
    sub = np.bincount(mask[500:800, 600:1000].ravel(), minlength=256)
    assert [part.pixels[n] for n in names] == sub[: len(names)].tolist()
    level1 = query.class_areas(m, level=1)
    assert level1.total_area == pytest.approx(whole.total_area, rel=0.01)


def test_polygon_areas_count_the_pixels_whose_centres_are_inside(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    # A triangle (with a hole) given in WGS84, like a field boundary from a web map.
    # Vertices off the half-metre grid, so that no pixel centre lies exactly on an edge.
    ring = [(500100.13, 5199900.31), (500650.57, 5199850.29), (500300.71, 5199450.43), (500100.13, 5199900.31)]
    hole = [(500250.19, 5199800.07), (500350.37, 5199800.61), (500300.83, 5199700.11), (500250.19, 5199800.07)]
    utm = {"type": "Polygon", "coordinates": [ring, hole]}
    wgs = transform_geom(GEO_CRS, WGS84, utm, precision=-1)
    got = query.class_areas(m, polygon={"type": "Feature", "geometry": wgs, "properties": {}}, crs=WGS84)
    inside = rasterize([(utm, 1)], out_shape=m.layout.level_shape(0), transform=Affine(*GEO_TRANSFORM)) == 1
    mask = m.read("mask", 0)
    for i, c in enumerate(m.layout.classes):
        direct = int(np.count_nonzero(inside & (mask == i)))
        assert got.pixels[c.name] == direct
        assert got.areas[c.name] == pytest.approx(got.pixels[c.name] * 0.25)
    assert got.nodata_pixels == np.count_nonzero(inside & (mask == 255))
    assert query.class_areas(m, polygon=utm).pixels == got.pixels  # the same polygon in the mosaic's CRS


def test_polygons_rasterised_back_give_the_same_mask(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    window = (200, 300, 900, 1200)
    collection = query.vectorize(m, window=window)
    t = level_transform(m.layout, 0) @ Affine.translation(window[1], window[0])
    shape = (window[2] - window[0], window[3] - window[1])
    back = rasterize(((f["geometry"], f["properties"]["class"]) for f in collection["features"]),
                     out_shape=shape, transform=t, fill=255, dtype="uint8")
    # Every pixel comes back with its class (IoU 1.0 for every class); nodata is never vectorised.
    np.testing.assert_array_equal(back, m.read("mask", 0, Rect(*window)))
    assert {f["properties"]["name"] for f in collection["features"]} == {c.name for c in m.layout.classes}
    # Simplified and in WGS84: fewer vertices, coordinates in degrees inside the mosaic's bounds.
    buildings = query.vectorize(m, window=window, classes=["building"], simplify=1.0, out_crs=WGS84)
    plain = query.vectorize(m, window=window, classes=["building"])
    assert len(buildings["features"]) == len(plain["features"]) > 0

    def vertices(fc: dict) -> int:
        return sum(len(ring) for f in fc["features"] for ring in f["geometry"]["coordinates"])

    assert vertices(buildings) < vertices(plain)
    lon, lat = buildings["features"][0]["geometry"]["coordinates"][0][0]
    assert 8.9 < lon < 9.1 and 46.9 < lat < 47.0


def test_cog_export_has_the_mosaic_georeference_and_overviews(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    m = geo_mosaic
    out = query.export_cog(m, tmp_path / "mask.tif")
    with rasterio.open(out) as cog:
        assert cog.crs.to_epsg() == 32632 and cog.transform == Affine(*GEO_TRANSFORM)
        assert cog.shape == m.layout.level_shape(0) and cog.nodata == 255
        assert cog.overviews(1), "a COG must carry overviews"
        assert cog.colormap(1)[1][:3] == m.layout.classes[1].color
        np.testing.assert_array_equal(cog.read(1), m.read("mask", 0))
    # A bbox in WGS84 at level 1: the transform is that window's, the values the level's.
    minx, miny, maxx, maxy = corner((400, 400, 800, 1000))
    lons, lats = warp_points(GEO_CRS, WGS84, [minx, maxx], [miny, maxy])
    part = query.export_cog(m, tmp_path / "part.tif", "confidence", bbox=(lons[0], lats[0], lons[1], lats[1]),
                            crs=WGS84, level=1)
    with rasterio.open(part) as cog:
        col, row = ~(level_transform(m.layout, 1)) @ (cog.transform.c, cog.transform.f)
        r, c = round(row), round(col)
        assert cog.transform.a == 1.0 and math.isclose(row, r) and math.isclose(col, c)
        stored = m.read("confidence", 1, Rect(r, c, r + cog.height, c + cog.width)).astype(np.float32)
        np.testing.assert_array_equal(cog.read(1), stored)
    assert not list(tmp_path.glob(".*")), "no staging files left behind"


def test_png_export_is_paletted_with_transparent_nodata(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    m = geo_mosaic
    out = query.export_png(m, tmp_path / "mask.png", window=(0, 0, 300, 400), level=0)
    with Image.open(out) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), m.read("mask", 0, Rect(0, 0, 300, 400)))
        assert image.getpalette()[3:6] == list(m.layout.classes[1].color)
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        np.testing.assert_array_equal(alpha == 0, m.read("mask", 0, Rect(0, 0, 300, 400)) == 255)
    # Without a region: the finest level that fits the pixel limit.
    small = query.export_png(m, tmp_path / "small.png", max_pixels=400 * 400)
    with Image.open(small) as image:
        assert image.size == (375, 325)  # level 2


def test_map_tiles_show_the_mask_where_it_is(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    layer = MosaicLayer(m)
    mask = m.read("mask", 0)
    row, col = 650, 700
    x, y = Affine(*GEO_TRANSFORM) @ (col + 0.5, row + 0.5)
    (mx,), (my,) = warp_points(GEO_CRS, "EPSG:3857", [x], [y])
    z = 20  # 0.15 m tile pixels: finer than the mosaic's 0.5 m
    n = 2**z
    tx, ty = int((mx + 20037508.342789244) / (40075016.68557849 / n)), int((20037508.342789244 - my) / (
        40075016.68557849 / n))
    tile = query.xyz_tile(layer, z, tx, ty)
    minx, _, maxx, maxy = tile_bounds(z, tx, ty)
    px, py = int((mx - minx) / (maxx - minx) * 256), int((maxy - my) / (maxx - minx) * 256)
    assert tile.shape == (1, 256, 256) and tile[0, py, px] == mask[row, col]
    # A tile far from the mosaic is all nodata; zoomed out (38 m tile pixels) the mosaic is a small patch.
    assert (query.xyz_tile(layer, 10, 0, 0) == 255).all()
    far = query.xyz_tile(layer, 12, tx >> 8, ty >> 8)
    assert 0 < np.count_nonzero(far != 255) < 40 * 40
    with pytest.raises(RegionError, match="does not exist at zoom 3"):
        query.xyz_tile(layer, 3, 8, 0)
    # The pixel pyramid: at the top zoom a tile is level-0 pixels one to one.
    top = pixel_max_zoom(m.layout.level_shape(0))
    np.testing.assert_array_equal(query.pixel_tile(layer, top, 1, 2)[0], mask[512:768, 256:512])
    whole = query.pixel_tile(layer, 0, 0, 0)[0]  # zoom 0: the whole image in one tile, from level 3
    np.testing.assert_array_equal(whole[:163, :188], m.read("mask", 3))
    assert (whole[163:] == 255).all() and (whole[:, 188:] == 255).all()


def test_map_tiles_agree_with_a_gdal_warp(geo_mosaic: Mosaic) -> None:
    """Tiles sample the pixel under each tile pixel's centre from interpolated coordinates; GDAL's
    nearest-neighbour warp of the same level agrees on all but a few pixels along class edges."""
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, reproject

    m = geo_mosaic
    layer = MosaicLayer(m)
    (mx,), (my,) = warp_points(GEO_CRS, "EPSG:3857", [500375.0], [5199675.0])  # the mosaic's centre
    for z, level in ((15, 2), (17, 0), (19, 0), (21, 0)):  # the level a tile reads: pixels no larger than its own
        n = 2**z
        span = 40075016.68557849 / n
        tx, ty = int((mx + 20037508.342789244) / span), int((20037508.342789244 - my) / span)
        ours = query.xyz_tile(layer, z, tx, ty)[0]
        gdal = np.full((256, 256), 255, np.uint8)
        reproject(m.read("mask", level), gdal, src_transform=level_transform(m.layout, level), src_crs=GEO_CRS,
                  src_nodata=255, dst_transform=from_bounds(*tile_bounds(z, tx, ty), 256, 256),
                  dst_crs="EPSG:3857", dst_nodata=255, resampling=Resampling.nearest)
        assert (ours != 255).mean() > 0.2
        assert (ours == gdal).mean() > 0.995, (z, (ours == gdal).mean())


def test_source_preview_tiles_stay_in_register_with_the_mask(slide_mosaic: Mosaic) -> None:
    """A preview at a third of the slide's resolution, tiled in the slide's pixel pyramid: at every zoom,
    each tile pixel shows the preview pixel over the same place as the mask's pixel."""
    from pipeline.query.preview import SourcePreview

    m = slide_mosaic
    h, w = m.layout.level_shape(0)
    rows, cols = np.mgrid[0 : (h + 2) // 3, 0 : (w + 2) // 3]
    rgba = np.stack([rows % 256, cols % 256, cols // 256, np.full_like(rows, 255)]).astype(np.uint8)
    frame = level_transform(m.layout, 0) @ Affine.scale(3)
    preview = SourcePreview(rgba, frame, None)
    top = pixel_max_zoom((h, w))
    for z in range(top + 1):
        s = 2 ** (top - z)
        tile = query.pixel_tile(preview, z, 0, 0, frame=level_transform(m.layout, 0), shape=(h, w))
        centre = (np.arange(256) + 0.5) * s  # level-0 pixel centres of the tile's pixels
        inside = np.arange(256) * s < h
        expected = (centre[inside] // 3).astype(int)
        np.testing.assert_array_equal(tile[0, : inside.sum(), 0], expected % 256)
        assert (tile[3, inside.sum() :] == 0).all()  # below the image: transparent


def test_point_reports_class_and_confidence(geo_mosaic: Mosaic) -> None:
    m = geo_mosaic
    row, col = 650, 700
    x, y = Affine(*GEO_TRANSFORM) @ (col + 0.5, row + 0.5)
    lons, lats = warp_points(GEO_CRS, WGS84, [x], [y])
    got = query.point(m, lons[0], lats[0], WGS84)
    cls = int(m.read("mask", 0)[row, col])
    assert (got["row"], got["col"], got["class"]) == (row, col, cls)
    assert got["name"] == m.layout.classes[cls].name
    assert got["confidence"] == pytest.approx(float(m.read("confidence", 0)[row, col]))
    assert query.point(m, *(Affine(*GEO_TRANSFORM) @ (10.5, 10.5)))["name"] == "nodata"
    with pytest.raises(RegionError, match="outside the mosaic"):
        query.point(m, 0.0, 0.0, WGS84)
    with pytest.raises(RegionError, match="cannot be reprojected"):
        query.point(m, 9.0, 95.0, WGS84)  # no latitude 95


def test_slide_mosaics_answer_in_micrometres(slide_mosaic: Mosaic) -> None:
    m = slide_mosaic
    mask = m.read("mask", 0)
    areas = query.class_areas(m, bbox=(0.0, 0.0, 100.0, 50.0))  # um: 400 x 200 px at 0.25 um/px
    sub = mask[:200, :400]
    assert areas.unit == "um2" and sum(areas.pixels.values()) == sub.size
    assert areas.areas["water"] == pytest.approx(np.count_nonzero(sub == 1) * 0.0625)
    got = query.point(m, 50.1, 25.1)
    assert (got["row"], got["col"]) == (100, 200)
    fc = query.vectorize(m, window=(0, 0, 100, 100))
    xs = [x for f in fc["features"] for x, _ in f["geometry"]["coordinates"][0]]
    assert max(xs) == pytest.approx(25.0)  # micrometres
    with pytest.raises(RegionError, match="has no CRS"):
        query.read_region(m, bbox=(0, 0, 1, 1), crs=WGS84)
    with pytest.raises(RegionError, match="no CRS"):
        query.export_cog(m, "x.tif")


def test_bad_regions_are_refused_with_the_fix(geo_mosaic: Mosaic, tmp_path: Path) -> None:
    m = geo_mosaic
    with pytest.raises(RegionError, match=r"outside the mosaic: level 0 is 1300 x 1500 px"):
        query.read_region(m, window=(2000, 0, 2100, 10))
    with pytest.raises(RegionError, match="outside the mosaic"):
        query.read_region(m, bbox=(0, 0, 1, 1), crs=WGS84)
    with pytest.raises(RegionError, match="levels 0 to 3"):
        query.read_region(m, level=7)
    with pytest.raises(RegionError, match="max x > min x"):
        query.read_region(m, bbox=(5, 0, 1, 1))
    with pytest.raises(RegionError, match="unknown CRS"):
        query.read_region(m, bbox=(0, 0, 1, 1), crs="EPSG:99999999")
    with pytest.raises(RegionTooLargeError, match="coarser level"):
        query.read_region(m, max_pixels=1000)
    with pytest.raises(RegionError, match="unknown classes roof"):
        query.vectorize(m, classes=["roof"])
    for polygon in ({"type": "Point", "coordinates": [0, 0]}, {"type": "Feature", "geometry": None},
                    {"geometry": [1, 2]}):
        with pytest.raises(RegionError, match="Polygon"):
            query.class_areas(m, polygon=polygon)
    # A finite but enormous box clips to the image instead of overflowing.
    assert query.read_region(m, bbox=(-1e308, -1e308, 1e308, 1e308), level=3).shape == (163, 188)
    with pytest.raises(MosaicError, match="not a tessera mosaic"):
        Mosaic.open(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_mosaic_opens_through_fsspec(geo_mosaic: Mosaic) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in Path(geo_mosaic.path).rglob("*"):
        if path.is_file():
            fs.pipe(f"/copy.zarr/{path.relative_to(geo_mosaic.path).as_posix()}", path.read_bytes())
    remote = Mosaic.open("memory://copy.zarr")
    assert remote.complete and remote.layout == geo_mosaic.layout
    np.testing.assert_array_equal(query.read_region(remote, window=(0, 0, 300, 300)),
                                  geo_mosaic.read("mask", 0, Rect(0, 0, 300, 300)))
    with pytest.raises(MosaicError, match="not a tessera mosaic"):
        Mosaic.open("memory://nothing.zarr")
