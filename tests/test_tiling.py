"""Tile grid and block plan invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.tiling import BlockPlan, Rect, TileGrid, axis_starts

lengths = st.integers(1, 3000)
tiles = st.sampled_from([32, 64, 96, 128, 256])


@given(length=lengths, tile=tiles, frac=st.floats(0, 0.5))
def test_axis_starts_cover_evenly_and_end_at_the_edge(length: int, tile: int, frac: float) -> None:
    overlap = int(tile * frac)
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0
    if length <= tile:
        assert list(starts) == [0]
        return
    assert starts[-1] + tile == length
    gaps = np.diff(starts)
    assert (gaps <= tile - overlap).all(), "neighbours overlap by at least `overlap`"
    assert (gaps > 0).all()
    assert gaps.max() - gaps.min() <= 1, "spread evenly"


@given(h=lengths, w=lengths, tile=tiles)
@settings(max_examples=50, deadline=None)  # images up to thousands of px a side: timing varies on a busy machine
def test_grid_covers_every_pixel(h: int, w: int, tile: int) -> None:
    grid = TileGrid(h, w, tile, tile // 4)
    covered = np.zeros((h, w), bool)
    for t in grid:
        r = grid.rect(t).intersect(grid.image)
        covered[r.y0 : r.y1, r.x0 : r.x1] = True
    assert covered.all()


def test_tile_smaller_than_twice_the_overlap_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice the overlap"):
        TileGrid(1000, 1000, 100, 64)


@given(h=st.integers(200, 2500), w=st.integers(200, 2500), tile=st.sampled_from([64, 128, 256]),
       block=st.sampled_from([256, 512, 1024]), keep=st.floats(0.2, 1.0), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_every_tile_is_routed_exactly_once(h: int, w: int, tile: int, block: int, keep: float, seed: int) -> None:
    grid = TileGrid(h, w, tile, tile // 8)
    rng = np.random.default_rng(seed)
    active = [t for t in grid if rng.random() < keep]
    plan = BlockPlan(grid, block, active)
    routed = [t for ts in plan.interior.values() for t in ts] + [t for g in plan.seams for t in g.tiles]
    assert sorted(routed) == sorted(active)
    for b, ts in plan.interior.items():
        assert all(plan.blocks_of(t) == (b,) for t in ts)
    for g in plan.seams:
        assert len(g.blocks) >= 2
        for t in g.tiles:
            assert plan.blocks_of(t) == g.blocks
            r = grid.rect(t).intersect(grid.image)
            for b in g.blocks:
                part = r.intersect(plan.rect(b))
                assert not part.empty
                assert part.intersect(plan.footprint(g.tiles, b)) == part


def test_blocks_tile_the_image_without_overlap() -> None:
    plan = BlockPlan(TileGrid(1000, 1300, 128, 16), 512)
    seen = np.zeros((1000, 1300), np.int32)
    for b in plan:
        r = plan.rect(b)
        seen[r.y0 : r.y1, r.x0 : r.x1] += 1
    assert (seen == 1).all()
    assert plan.shape == (2, 3)


def test_half_nodata_foreground_keeps_about_half_the_tiles() -> None:
    grid = TileGrid(4096, 4096, 256, 32)
    fg = np.zeros((512, 512), bool)
    fg[:, :256] = True  # left half has data; one mask pixel covers 8 px
    kept = grid.active(fg, 8.0)
    assert 0.45 <= len(kept) / len(grid) <= 0.56
    assert all(grid.rect(t).x0 < 2048 for t in kept)


def test_block_smaller_than_a_tile_is_refused() -> None:
    with pytest.raises(ConfigError, match="smaller than the tile"):
        BlockPlan(TileGrid(1000, 1000, 512, 64), 256)


def test_rect_relative_slices() -> None:
    outer, inner = Rect(10, 20, 110, 220), Rect(30, 50, 40, 60)
    assert inner.relative_to(outer) == (slice(20, 30), slice(30, 40))
    assert outer.intersect(Rect(200, 0, 300, 10)).empty
