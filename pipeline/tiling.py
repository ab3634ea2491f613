"""The global tile grid and the plan of output blocks.

A job is planned once, in the driver, from the image size and settings alone:

- `TileGrid`: tiles of size T overlapping by at least O, spread evenly along each axis so that the first
  tile starts at 0 and the last one ends at the image edge.
- `BlockPlan`: output blocks, rectangles aligned to the Zarr shard grid, and which tiles feed which block.

Every tile is computed exactly once. A tile that lies inside one block is computed by that block's
task; a tile that straddles blocks belongs to a `TileGroup` (a seam) computed by its own task, whose
weighted contributions are routed to each block it touches. The block task adds them to its own and
is the only writer of its block. Nothing here imports Ray, Zarr or torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError

BlockId = tuple[int, int]
TileId = tuple[int, int]


@dataclass(frozen=True, order=True)
class Rect:
    """A half-open pixel rectangle [y0, y1) x [x0, x1)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def area(self) -> int:
        return max(self.height, 0) * max(self.width, 0)

    @property
    def empty(self) -> bool:
        return self.height <= 0 or self.width <= 0

    def intersect(self, other: Rect) -> Rect:
        return Rect(
            max(self.y0, other.y0), max(self.x0, other.x0), min(self.y1, other.y1), min(self.x1, other.x1)
        )

    def union(self, other: Rect) -> Rect:
        return Rect(
            min(self.y0, other.y0), min(self.x0, other.x0), max(self.y1, other.y1), max(self.x1, other.x1)
        )

    def relative_to(self, origin: Rect) -> tuple[slice, slice]:
        """Slices that index this rectangle inside an array covering `origin`."""
        return (
            slice(self.y0 - origin.y0, self.y1 - origin.y0),
            slice(self.x0 - origin.x0, self.x1 - origin.x0),
        )


def axis_starts(length: int, tile: int, overlap: int) -> np.ndarray:
    """Start offsets of tiles along one axis: first at 0, last ending at `length`, evenly spread.

    The spacing never exceeds `tile - overlap`, so neighbouring tiles overlap by at least `overlap`.
    An axis shorter than one tile gets a single tile at 0 (read past the edge with reflect padding).
    """
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles covering a `height` x `width` image.

    Args:
        height, width: image size in pixels at the working level.
        tile: tile size T (square).
        overlap: minimum overlap O between neighbouring tiles; must satisfy T >= 2 * O.

    Raises:
        ConfigError: if the sizes are not positive or the tile is smaller than twice the overlap.
    """

    height: int
    width: int
    tile: int
    overlap: int
    ys: np.ndarray = field(init=False, repr=False, compare=False)
    xs: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"image size {self.height}x{self.width} must be positive")
        if self.overlap < 0:
            raise ConfigError(f"overlap {self.overlap} must be >= 0")
        if self.tile < 2 * self.overlap or self.tile <= 0:
            raise ConfigError(
                f"tile size {self.tile} is smaller than twice the overlap {self.overlap}: "
                f"use a tile of at least {max(2 * self.overlap, 1)} px or a smaller overlap"
            )
        object.__setattr__(self, "ys", axis_starts(self.height, self.tile, self.overlap))
        object.__setattr__(self, "xs", axis_starts(self.width, self.tile, self.overlap))

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return len(self.ys), len(self.xs)

    @property
    def image(self) -> Rect:
        return Rect(0, 0, self.height, self.width)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def __iter__(self) -> Iterator[TileId]:
        rows, cols = self.shape
        return ((i, j) for i in range(rows) for j in range(cols))

    def rect(self, tile: TileId) -> Rect:
        """The tile's full rectangle (may extend past the image when the image is smaller than a tile)."""
        y, x = int(self.ys[tile[0]]), int(self.xs[tile[1]])
        return Rect(y, x, y + self.tile, x + self.tile)

    def edges(self, tile: TileId) -> tuple[bool, bool, bool, bool]:
        """Whether the tile touches the image's top, bottom, left and right edge."""
        rows, cols = self.shape
        i, j = tile
        return i == 0, i == rows - 1, j == 0, j == cols - 1

    def active(self, foreground: np.ndarray | None, factor: float) -> list[TileId]:
        """Tiles with any foreground, from a low-resolution mask whose pixel covers `factor` px.

        The footprint is rounded outwards, so a tile is only skipped when it surely holds no foreground.
        """
        if foreground is None:
            return list(self)
        mh, mw = foreground.shape
        # A summed-area table answers "any foreground in this footprint" in O(1) per tile.
        sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
        sat[1:, 1:] = foreground.astype(np.int64).cumsum(0).cumsum(1)
        kept = []
        for tile in self:
            r = self.rect(tile).intersect(self.image)
            y0, x0 = max(int(r.y0 // factor), 0), max(int(r.x0 // factor), 0)
            y1, x1 = min(math.ceil(r.y1 / factor), mh), min(math.ceil(r.x1 / factor), mw)
            if y1 > y0 and x1 > x0 and sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0] > 0:
                kept.append(tile)
        return kept


@dataclass(frozen=True)
class TileGroup:
    """Tiles computed together, once, whose contributions go to the blocks in `blocks`."""

    blocks: tuple[BlockId, ...]
    tiles: tuple[TileId, ...]


@dataclass(frozen=True)
class BlockPlan:
    """Output blocks of `block` x `block` px and the routing of tiles to them.

    Args:
        grid: the tile grid.
        block: block edge in pixels; a multiple of the mosaic's shard edge, at least one tile.
        tiles: the tiles to compute (after skipping background); default all.
    """

    grid: TileGrid
    block: int
    tiles: Sequence[TileId] | None = None
    interior: dict[BlockId, tuple[TileId, ...]] = field(init=False, repr=False, compare=False)
    seams: tuple[TileGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block < self.grid.tile:
            raise ConfigError(
                f"block size {self.block} is smaller than the tile size {self.grid.tile}: "
                f"use a block of at least one tile (a multiple of the shard size)"
            )
        by_blocks: dict[tuple[BlockId, ...], list[TileId]] = defaultdict(list)
        for tile in self.grid if self.tiles is None else self.tiles:
            by_blocks[self.blocks_of(tile)].append(tile)
        interior = {key[0]: tuple(t) for key, t in by_blocks.items() if len(key) == 1}
        seams = tuple(TileGroup(key, tuple(t)) for key, t in sorted(by_blocks.items()) if len(key) > 1)
        object.__setattr__(self, "interior", interior)
        object.__setattr__(self, "seams", seams)

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.grid.height / self.block), math.ceil(self.grid.width / self.block)

    def __iter__(self) -> Iterator[BlockId]:
        rows, cols = self.shape
        return ((r, c) for r in range(rows) for c in range(cols))

    def rect(self, block: BlockId) -> Rect:
        r, c = block
        b = self.block
        return Rect(r * b, c * b, min((r + 1) * b, self.grid.height), min((c + 1) * b, self.grid.width))

    def blocks_of(self, tile: TileId) -> tuple[BlockId, ...]:
        """The blocks a tile's in-image part touches, in row-major order."""
        r = self.grid.rect(tile).intersect(self.grid.image)
        b = self.block
        return tuple(
            (br, bc)
            for br in range(r.y0 // b, (r.y1 - 1) // b + 1)
            for bc in range(r.x0 // b, (r.x1 - 1) // b + 1)
        )

    def footprint(self, tiles: Sequence[TileId], block: BlockId) -> Rect:
        """The part of `block` that the union of `tiles` covers."""
        box = self.grid.rect(tiles[0])
        for t in tiles[1:]:
            box = box.union(self.grid.rect(t))
        return box.intersect(self.rect(block))

    def seams_of(self) -> dict[BlockId, list[int]]:
        """For each block, the indices (into `seams`) of the seam groups that feed it."""
        feeds: dict[BlockId, list[int]] = defaultdict(list)
        for k, group in enumerate(self.seams):
            for b in group.blocks:
                feeds[b].append(k)
        return feeds

    def busy_blocks(self) -> list[BlockId]:
        """Blocks that receive at least one tile, row-major; all others are left as nodata."""
        fed = set(self.interior) | {b for g in self.seams for b in g.blocks}
        return [b for b in self if b in fed]
