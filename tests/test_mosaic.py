"""The Zarr mosaic on its own: idempotent block writes, completeness, output checks, layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.blending import Accumulator
from pipeline.errors import MosaicError, OutputExistsError
from pipeline.models.bundle import ClassInfo
from pipeline.mosaic import Mosaic, MosaicLayout, is_mosaic, output_state
from pipeline.stitching import finish_block
from pipeline.tiling import Rect

CLASSES = (ClassInfo("background", (0, 0, 0)), ClassInfo("water", (0, 0, 255)), ClassInfo("road", (90, 90, 90)))


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
