"""The Zarr mosaic on its own: idempotent block writes, completeness, output checks, layout, GeoZarr."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyproj import CRS

from pipeline.blending import Accumulator
from pipeline.errors import MosaicError, OutputExistsError
from pipeline.models.bundle import ClassInfo
from pipeline.mosaic import Mosaic, MosaicLayout, is_mosaic, output_state
from pipeline.stitching import finish_block
from pipeline.tiling import Rect

CLASSES = (ClassInfo("background", (0, 0, 0)), ClassInfo("water", (0, 0, 255)), ClassInfo("road", (90, 90, 90)))
GEO_TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)
# The uuids that register the GeoZarr conventions (github.com/zarr-conventions/proj, spatial, multiscales).
PROJ = "f17cb550-5864-4468-aeb7-f3180cfb622f"
SPATIAL = "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4"
MULTISCALES = "d35379db-88df-4056-af3a-620245f8e347"


def layout(**kw: object) -> MosaicLayout:
    settings: dict[str, object] = {"height": 700, "width": 900, "classes": CLASSES, "chunk": 128, "shard": 256, **kw}
    return MosaicLayout(**settings)  # type: ignore[arg-type]


def block(region: Rect, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    acc = Accumulator(region, rng.normal(size=(3, region.height, region.width)).astype(np.float32),
                      np.ones((region.height, region.width), np.float32))
    valid = np.ones((region.height, region.width), bool)
    valid[:5] = False
    return finish_block(acc, valid, "logits")


def stored(path: Path, node: str = "") -> dict[str, Any]:
    """A node's metadata document as stored: what GDAL and every other Zarr reader sees."""
    document: dict[str, Any] = json.loads((path / node / "zarr.json").read_text())
    return document


def shard_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("c/*/*/*")) if p.is_file()}


def test_writing_a_block_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    m = Mosaic.create(tmp_path / "m.zarr", layout(), {})
    out = block(Rect(256, 512, 512, 768))
    m.write_block(out)  # type: ignore[arg-type]
    first = shard_files(tmp_path / "m.zarr")
    m.write_block(out)  # type: ignore[arg-type]
    assert first and shard_files(tmp_path / "m.zarr") == first


def test_unaligned_block_is_refused(tmp_path: Path) -> None:
    m = Mosaic.create(tmp_path / "m.zarr", layout(), {})
    with pytest.raises(MosaicError, match="not aligned"):
        m.write_block(block(Rect(100, 0, 356, 256)))  # type: ignore[arg-type]


def test_unfinished_mosaic_is_neither_complete_nor_an_ome_image(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = tmp_path / "m.zarr"
    m = Mosaic.create(path, layout(), {"started": "now"})
    m.write_block(block(Rect(0, 0, 256, 256)))  # type: ignore[arg-type]
    assert not Mosaic.open(path).complete
    assert "ome" not in dict(Mosaic.open(path).group.attrs)
    assert not any(node.data for node in Reader(parse_url(str(path)))())
    assert output_state(path, False, {}) == "resume"  # an interrupted job's output is resumed
    with pytest.raises(OutputExistsError, match=r"other settings .*--overwrite"):
        output_state(path, False, {"tile": 256})
    m.build_pyramid()
    m.finish({"finished": "later"})
    done = Mosaic.open(path)
    assert done.complete and done.lineage == {"started": "now", "finished": "later"}
    assert output_state(path, False, {}) == "complete"  # the same job again keeps it
    assert output_state(path, True, {}) == "absent"  # --overwrite makes it again
    with pytest.raises(OutputExistsError, match=r"complete mosaic made with other settings .*--overwrite"):
        output_state(path, False, {"tile": 256})


def test_unwritten_blocks_read_as_nodata(tmp_path: Path) -> None:
    m = Mosaic.create(tmp_path / "m.zarr", layout(), {})
    assert (m.read("mask") == 255).all()
    assert np.isnan(m.read("scores", rect=Rect(0, 0, 10, 10))).all()


def test_output_checks(tmp_path: Path) -> None:
    assert output_state(tmp_path / "new.zarr", False, {}) == "absent"
    (tmp_path / "empty").mkdir()
    assert output_state(tmp_path / "empty", False, {}) == "absent"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not a tessera mosaic"):
        output_state(tmp_path / "file.txt", True, {})
    assert not is_mosaic(tmp_path / "file.txt")
    with pytest.raises(MosaicError, match="not a tessera mosaic"):
        Mosaic.open(tmp_path / "empty")


@pytest.mark.parametrize(("h", "w", "levels"), [(100, 100, 1), (700, 900, 4), (100_000, 60_000, 11)])
def test_levels_halve_until_one_chunk(h: int, w: int, levels: int) -> None:
    lay = layout(height=h, width=w)
    assert lay.num_levels == levels
    assert max(lay.level_shape(levels - 1)) <= lay.chunk
    assert MosaicLayout.from_dict(lay.to_dict()) == lay


def test_block_levels_map_one_block_onto_one_shard_per_level() -> None:
    lay = layout(height=5000, width=5000, chunk=512, shard=2048)
    assert lay.block_levels == 2
    assert [lay.level_shard(k) for k in range(4)] == [2048, 1024, 512, 512]


def test_georeferenced_mosaic_carries_geozarr_georeferencing_and_overviews(tmp_path: Path) -> None:
    path = tmp_path / "m.zarr"
    m = Mosaic.create(path, layout(crs=CRS.from_epsg(32632).to_wkt(), transform=GEO_TRANSFORM), {})
    assert "multiscales" not in stored(path)["attributes"]  # no pyramid to read until it is finished
    m.finish({})
    a, _, c, _, e, f = GEO_TRANSFORM
    levels = []
    for k in range(4):  # 700 x 900 px, chunk 128: levels 0 to 3, a level-k pixel is 2^k level-0 pixels wide
        grid = {"spatial:transform": [a * 2**k, 0.0, c, 0.0, e * 2**k, f],
                "spatial:shape": [math.ceil(700 / 2**k), math.ceil(900 / 2**k)]}
        for node in (f"{k}/scores", f"{k}/confidence", f"labels/mask/{k}"):
            array = stored(path, node)
            attrs = array["attributes"]
            assert {key: attrs[key] for key in grid} == grid and array["shape"][-2:] == grid["spatial:shape"], node
            assert attrs["proj:code"] == "EPSG:32632"
            assert attrs["spatial:dimensions"] == ["y", "x"] == array["dimension_names"][-2:]
            assert {cv["uuid"] for cv in attrs["zarr_conventions"]} == {PROJ, SPATIAL}
        levels.append({"asset": str(k), **grid})
    # The CF grid mapping that rioxarray reads says the same, in GDAL's order.
    gt = [float(v) for v in stored(path, "0/spatial_ref")["attributes"]["GeoTransform"].split()]
    assert [gt[1], gt[2], gt[0], gt[4], gt[5], gt[3]] == levels[0]["spatial:transform"]
    for node in ("", "labels/mask"):  # the levels as the child groups 0..3, and as the child arrays 0..3
        attrs = stored(path, node)["attributes"]
        pyramid = attrs["multiscales"]["layout"]
        assert [{key: lv[key] for key in ("asset", "spatial:transform", "spatial:shape")} for lv in pyramid] == levels
        assert [lv.get("derived_from") for lv in pyramid] == [None, "0", "1", "2"]
        assert [lv["transform"] for lv in pyramid[1:]] == [{"scale": [2.0, 2.0], "translation": [0.0, 0.0]}] * 3
        assert attrs["proj:code"] == "EPSG:32632"
        assert attrs["spatial:bbox"] == [500000.0, 5199650.0, 500450.0, 5200000.0]
        assert {cv["uuid"] for cv in attrs["zarr_conventions"]} == {PROJ, SPATIAL, MULTISCALES}


def test_geozarr_without_an_authority_code_or_without_a_crs(tmp_path: Path) -> None:
    custom = CRS.from_proj4("+proj=tmerc +lon_0=9 +k=0.9996 +x_0=500000 +ellps=GRS80 +units=m")
    Mosaic.create(tmp_path / "geo.zarr", layout(crs=custom.to_wkt(), transform=GEO_TRANSFORM), {})
    attrs = stored(tmp_path / "geo.zarr", "0/confidence")["attributes"]
    assert "proj:code" not in attrs and CRS.from_wkt(attrs["proj:wkt2"]) == custom
    Mosaic.create(tmp_path / "slide.zarr", layout(mpp=0.25), {}).finish({})
    root = stored(tmp_path / "slide.zarr")["attributes"]
    assert [cv["uuid"] for cv in root["zarr_conventions"]] == [MULTISCALES]
    assert [lv["asset"] for lv in root["multiscales"]["layout"]] == ["0", "1", "2", "3"]
    for node in ("0/scores", "labels/mask/0"):
        assert not [key for key in stored(tmp_path / "slide.zarr", node)["attributes"] if ":" in key]
    assert not [key for key in root if key.startswith(("proj:", "spatial:"))]


def test_the_mask_type_follows_the_classes_and_is_recorded_only_when_it_changes() -> None:
    many = tuple(ClassInfo(f"c{i}", (i % 256, 0, 0)) for i in range(300))
    assert layout().mask_dtype == "uint8" and layout().mask_nodata == 255
    wide = layout(classes=many, layers=("spread", "uncertainty"))
    assert wide.mask_dtype == "uint16" and wide.mask_nodata == 65535 and wide.layers == ("uncertainty", "spread")
    assert MosaicLayout.from_dict(wide.to_dict()) == wide
    assert wide.to_dict()["mask_dtype"] == "uint16" and wide.to_dict()["layers"] == ["uncertainty", "spread"]
    before = layout().to_dict()  # what a mosaic made before the uint16 mask and the layers records
    assert "mask_dtype" not in before and "layers" not in before and MosaicLayout.from_dict(before) == layout()
    assert layout(classes=many[:254]).mask_dtype == "uint8" and layout(classes=many[:255]).mask_dtype == "uint16"
    with pytest.raises(MosaicError, match="does not fit 300 classes"):  # the type follows the classes
        MosaicLayout.from_dict({**wide.to_dict(), "mask_dtype": "uint8"})
    with pytest.raises(MosaicError, match="optional layers are uncertainty, spread"):
        layout(layers=("variance",))


def test_a_block_without_a_layer_or_with_another_mask_type_is_refused(tmp_path: Path) -> None:
    m = Mosaic.create(tmp_path / "m.zarr", layout(layers=("uncertainty",)), {})
    out = block(Rect(0, 0, 256, 256))
    with pytest.raises(MosaicError, match="has no uncertainty values"):
        m.write_block(out)  # type: ignore[arg-type]
    assert np.isnan(m.read("scores")).all() and (m.read("mask") == 255).all()  # refused before any write
    many = tuple(ClassInfo(f"c{i}", (i % 256, 0, 0)) for i in range(300))
    wide = Mosaic.create(tmp_path / "wide.zarr", layout(classes=many), {})
    with pytest.raises(MosaicError, match="a uint8 mask for a mosaic of uint16 masks"):
        wide.write_block(out)  # type: ignore[arg-type]
    with pytest.raises(MosaicError, match="no spread layer: segment the image with --uncertainty --tta"):
        m.read("spread")
