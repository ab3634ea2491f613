"""A seeded generator of synthetic aerial scenes with known per-pixel truth.

The demo and the tests need a labelled raster of any size that looks enough like an orthophoto for
a small CNN to have something real to learn, yet is generated in seconds, with no downloads and no
licences. :func:`generate_scene` draws one; :func:`write_scene` stores it as a pair of tiled
GeoTIFFs (RGB image and class ids) on the same georeferenced grid, the input the trainer expects.

What the scene contains (sizes are in pixels and are meant for about 0.5 m per pixel):

- **background** (bare soil, class 0): everywhere nothing else is. Tan to brown, with field-sized
  patches of lighter and darker soil and a moderate medium-scale texture.
- **water** (class 1): smooth blobs, made by thresholding low-frequency noise (features about 250
  px across, with some 60 px detail to make the shores irregular) at a quantile, so every scene has
  about 11% water, whatever its size. Turbid green-blue at the shore, dark blue in the deep
  interior, nearly untextured.
- **road** (class 2): roads that cross the scene from edge to edge (one per 450 px of height plus
  width, at least two), straight or gently curved (quadratic Bezier curves), 6 to 14 px wide.
  Dark asphalt or light concrete; the wider ones carry a dashed centre line. Roads are drawn over
  water (bridges).
- **building** (class 3): axis-aligned and rotated rectangles, 8 to 36 px a side (a few large
  halls up to 90 px), clustered into settlements by a low-frequency "urban" field, with scattered
  farmhouses elsewhere. Never on water or roads, never touching each other. Roofs are terracotta,
  grey, white, brown or metal, each with its own jitter; most have a ridge that leaves one half
  brighter than the other, and every building casts a shadow to the south-east onto whatever is
  next to it.
- **vegetation** (class 4): noisy patches from a second noise field (features about 100 px across
  plus 16 px and 4 px detail for ragged edges) thresholded at a quantile: about 40% of the land.
  Grass to dark forest, with the strongest fine-scale texture of all classes (tree crowns).

How hard it is, and why: every class has its own colour distribution, but the distributions
overlap a little (dark roofs look like asphalt, concrete roads like light roofs, forest like deep
water, terracotta like soil), so colour alone does not settle every pixel; texture (per-class
multi-scale noise) and shape (long strips, rectangles with shadows, smooth blobs) do. On top come
a gentle illumination gradient, a slight optical blur and per-pixel sensor noise.

All randomness comes from one :class:`numpy.random.Generator` seeded by the caller, so a seed
always gives the same scene. Everything is vectorised: noise fields are cubic B-spline surfaces
over a coarse grid of random coefficients, evaluated with two small matrix products; roads are
stamped as discs along sampled curve points; buildings are drawn as masks inside their bounding
boxes. A 6000 x 6000 scene takes about 12 s on a busy 2-core machine and about 1.3 GB of memory
(on top of the interpreter's).

Example:
    >>> scene = generate_scene(512, 512, seed=0)
    >>> scene.image.shape, scene.labels.shape
    ((3, 512, 512), (512, 512))
    >>> write_scene(scene, "scene.tif", "labels.tif")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import rasterio.windows
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.models.bundle import ClassInfo

if TYPE_CHECKING:
    from pipeline.mosaic import Mosaic

__all__ = ["BACKGROUND", "BUILDING", "CLASSES", "ROAD", "VEGETATION", "WATER", "Scene",
           "generate_scene", "write_label_mosaic", "write_large_scene", "write_large_slide", "write_scene"]

BACKGROUND, WATER, ROAD, BUILDING, VEGETATION = 0, 1, 2, 3, 4

CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo("background", (200, 170, 120)),
    ClassInfo("water", (30, 90, 220)),
    ClassInfo("road", (70, 70, 70)),
    ClassInfo("building", (220, 40, 40)),
    ClassInfo("vegetation", (40, 170, 60)),
)
"""The synthetic classes; the index is the class id, the colour is for display only."""

BLOCK_SIZE = 256
"""Tile size of the GeoTIFFs that :func:`write_scene` writes."""

# Scene layout, in pixels (about 0.5 m each).
_WATER_FRACTION = 0.11
_VEGETATION_FRACTION = 0.40
_ROAD_SPACING = 450  # one road per this many pixels of height + width
_ROAD_WIDTH = (6.0, 14.0)
_BUILDING_CANDIDATE_AREA = 550  # one building candidate per this many square pixels
_BUILDING_SIDE = (8.0, 36.0)
_HALL_SIDE = (40.0, 90.0)
_BUILDING_MARGIN = 2
_SHADOW_GAIN = 0.55

# Appearance: mean RGB per class; road and building colours are drawn per object instead.
_CLASS_RGB = np.array(
    [[150, 128, 100], [60, 95, 95], [0, 0, 0], [0, 0, 0], [95, 128, 62]], dtype=np.float32
)
# RGB shift per unit of the coarse "variation" field: lighter/darker soil, grass to forest.
_CLASS_TINT = np.array(
    [[18, 16, 13], [0, 0, 0], [0, 0, 0], [0, 0, 0], [22, 22, 10]], dtype=np.float32
)
_DEEP_WATER_SHIFT = np.array([-38, -52, -25], dtype=np.float32)
# Luminance texture amplitude per class at two scales: fine (about 4 px) and medium (about 16 px).
_TEXTURE_FINE = np.array([6, 1.5, 3, 3, 16], dtype=np.float32)
_TEXTURE_MEDIUM = np.array([9, 2, 3, 2, 8], dtype=np.float32)
_ROAD_RGB = np.array([[88, 88, 94], [150, 146, 138]], dtype=np.float32)
_ROOF_RGB = np.array(
    [[165, 85, 65], [78, 78, 84], [160, 160, 160], [205, 205, 200], [122, 96, 76], [104, 122, 140]],
    dtype=np.float32,
)
_SENSOR_NOISE = 3.0
_BLUR_SIGMA = 0.6

# Standard deviation of a cubic B-spline surface over unit-variance coefficients: the integral of
# the squared cubic B-spline is 151/315 per axis, so the 2-D std is that number, not its root.
_BSPLINE_STD = 151.0 / 315.0


@dataclass(frozen=True, eq=False)
class Scene:
    """A synthetic scene and its truth (compared by identity: arrays have no single truth value).

    Attributes:
        image: (3, H, W) uint8 RGB.
        labels: (H, W) uint8 class ids, indexes into :data:`CLASSES`.
    """

    image: np.ndarray
    labels: np.ndarray


def generate_scene(height: int, width: int, seed: int) -> Scene:
    """Draw a synthetic aerial scene with per-pixel class labels.

    See the module docstring for what the classes look like. The same arguments always give the
    same scene.

    Args:
        height: Rows, at least 1.
        width: Columns, at least 1.
        seed: Seed of the random generator.

    Returns:
        The scene: a (3, height, width) uint8 RGB image and (height, width) uint8 labels.

    Raises:
        ConfigError: If height or width is not a positive integer.

    Example:
        >>> scene = generate_scene(256, 384, seed=7)
        >>> scene.image.dtype, bool(scene.labels.max() < len(CLASSES))
        (dtype('uint8'), True)
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"generate_scene {name}={value!r} is invalid; expected an int >= 1.")
    rng = np.random.default_rng(seed)
    shape = (height, width)

    water_field = _smooth_noise(rng, shape, 256) + 0.35 * _smooth_noise(rng, shape, 64)
    water_level = _quantile(water_field, 1.0 - _WATER_FRACTION)
    water = water_field >= water_level
    # Depth in [0, 1]: 0 at the shore, 1 well inside; it darkens the water.
    depth = np.clip((water_field - water_level) * 1.5, 0.0, 1.0)
    depth *= water
    del water_field

    medium = _smooth_noise(rng, shape, 16)
    fine = _smooth_noise(rng, shape, 4)
    vegetation_field = _smooth_noise(rng, shape, 96) + 0.45 * medium + 0.2 * fine
    vegetation = vegetation_field >= _quantile(vegetation_field, 1.0 - _VEGETATION_FRACTION)
    del vegetation_field

    labels = np.full(shape, BACKGROUND, dtype=np.uint8)
    labels[vegetation] = VEGETATION
    labels[water] = WATER
    del vegetation
    # Per-object colours of roads and buildings; other classes take theirs from _CLASS_RGB.
    object_rgb = np.zeros((3, height, width), dtype=np.uint8)

    _draw_roads(rng, labels, object_rgb)
    blocked = water | (labels == ROAD)
    del water
    urban = _smooth_noise(rng, shape, 384)
    shadow = _draw_buildings(rng, labels, object_rgb, blocked, urban)
    del blocked, urban

    luminance = _TEXTURE_FINE[labels] * fine
    luminance += _TEXTURE_MEDIUM[labels] * medium
    del fine, medium
    variation = _smooth_noise(rng, shape, 64)
    gain = 1.0 + 0.04 * _smooth_noise(rng, shape, 512)
    gain[shadow] *= _SHADOW_GAIN
    del shadow

    natural = (labels != ROAD) & (labels != BUILDING)
    depth *= natural  # bridges keep their own colour
    image = np.empty((3, height, width), dtype=np.uint8)
    for band in range(3):
        channel = np.where(natural, _CLASS_RGB[:, band][labels], object_rgb[band])
        channel += _CLASS_TINT[:, band][labels] * variation
        channel += _DEEP_WATER_SHIFT[band] * depth
        channel += luminance
        channel *= gain
        channel = ndimage.gaussian_filter(channel, _BLUR_SIGMA, truncate=3.0)
        channel += rng.standard_normal(shape, dtype=np.float32) * np.float32(_SENSOR_NOISE)
        np.clip(channel, 0, 255, out=channel)
        np.rint(channel, out=channel)
        image[band] = channel
    return Scene(image=image, labels=labels)


def write_scene(
    scene: Scene,
    image_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    pixel_size: float = 0.5,
    crs: str = "EPSG:32632",
    origin: tuple[float, float] = (500000.0, 5200000.0),
    grey: bool = False,
) -> None:
    """Write a scene as two tiled GeoTIFFs on the same grid.

    Both files use 256 x 256 blocks and deflate compression, the CRS ``crs`` and a north-up
    transform whose upper-left corner is ``origin`` (x, y) with square pixels of ``pixel_size``
    CRS units. The labels are one uint8 band without nodata, with the class colours as its colour
    table.

    Args:
        scene: What :func:`generate_scene` returned.
        image_path: Where the RGB image goes (replaced if it exists).
        labels_path: Where the class ids go (replaced if it exists).
        pixel_size: Pixel side in CRS units (metres for the default UTM CRS).
        crs: Anything rasterio accepts as a CRS, e.g. ``"EPSG:32632"``.
        origin: (x, y) of the upper-left corner of the upper-left pixel.
        grey: Write one grey band (the rounded mean of red, green and blue), as a panchromatic sensor
            would, instead of the three colour bands.

    Raises:
        ConfigError: If ``pixel_size`` is not positive or the scene's arrays do not match.

    Example:
        >>> write_scene(generate_scene(512, 512, seed=0), "img.tif", "lbl.tif")  # doctest: +SKIP
    """
    if not pixel_size > 0:
        raise ConfigError(f"write_scene pixel_size={pixel_size!r} is invalid; expected > 0.")
    if scene.image.ndim != 3 or scene.image.shape[1:] != scene.labels.shape:
        raise ConfigError(
            f"Scene image {scene.image.shape} and labels {scene.labels.shape} do not match; "
            "expected (3, H, W) and (H, W)."
        )
    height, width = scene.labels.shape
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "dtype": "uint8",
        "crs": crs,
        "transform": Affine(pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1]),
        "tiled": True,
        "blockxsize": BLOCK_SIZE,
        "blockysize": BLOCK_SIZE,
        "compress": "deflate",
        "predictor": 2,
    }
    if grey:
        with rasterio.open(image_path, "w", count=1, photometric="MINISBLACK", **profile) as dst:
            dst.write(scene.image.mean(axis=0, dtype=np.float32).round().astype(np.uint8), 1)
            dst.set_band_description(1, "grey")
    else:
        with rasterio.open(image_path, "w", count=3, photometric="RGB", **profile) as dst:
            dst.write(scene.image)
            dst.descriptions = ("red", "green", "blue")
    with rasterio.open(labels_path, "w", count=1, **profile) as dst:
        dst.write(scene.labels, 1)
        dst.set_band_description(1, "class")
        dst.write_colormap(1, {i: (*info.color, 255) for i, info in enumerate(CLASSES)})


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth float32 noise with features about ``cell`` px across, mean 0 and std about 1."""
    rows = _bspline_matrix(shape[0], cell)
    cols = _bspline_matrix(shape[1], cell)
    coefficients = rng.standard_normal((rows.shape[1], cols.shape[1]), dtype=np.float32)
    field = (rows @ coefficients) @ cols.T
    field *= np.float32(1.0 / _BSPLINE_STD)
    return field


def _bspline_matrix(size: int, cell: int) -> np.ndarray:
    """(size, n) weights that evaluate a uniform cubic B-spline with knots ``cell`` px apart."""
    n = -(-size // cell) + 5
    position = (np.arange(size, dtype=np.float64) + 0.5) / cell + 1.5
    knot = np.floor(position).astype(np.int64)
    t = position - knot
    weights = np.stack(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )
    matrix = np.zeros((size, n), dtype=np.float32)
    matrix[np.arange(size)[:, None], knot[:, None] + np.arange(-1, 3)] = weights
    return matrix


def _quantile(field: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a smooth field, estimated from a strided subsample (cheap)."""
    step = max(1, int(math.sqrt(field.size / 250_000)))
    return float(np.quantile(field[::step, ::step], q))


def _draw_roads(rng: np.random.Generator, labels: np.ndarray, object_rgb: np.ndarray) -> None:
    """Stamp edge-to-edge roads into ``labels`` and their colours into ``object_rgb``."""
    height, width = labels.shape
    flat_labels = labels.reshape(-1)
    flat_rgb = object_rgb.reshape(3, -1)
    for _ in range(max(2, round((height + width) / _ROAD_SPACING))):
        start_edge, end_edge = rng.choice(4, size=2, replace=False)
        start = _edge_point(rng, int(start_edge), height, width)
        end = _edge_point(rng, int(end_edge), height, width)
        chord = end - start
        normal = np.array([-chord[1], chord[0]])
        control = (start + end) / 2 + normal * rng.uniform(-0.15, 0.15)
        radius = rng.uniform(*_ROAD_WIDTH) / 2
        rgb = _ROAD_RGB[int(rng.random() < 0.3)] + rng.uniform(-8, 8)
        length = float(np.linalg.norm(control - start) + np.linalg.norm(end - control))
        points = _bezier(start, control, end, spacing=max(1.0, radius / 2), length=length)
        flat = _stamp(points, radius, height, width)
        flat_labels[flat] = ROAD
        flat_rgb[:, flat] = np.round(rgb).astype(np.uint8)[:, None]
        if radius >= 4.5:
            # Dashed centre line: 6 px dashes, 6 px gaps.
            line = _bezier(start, control, end, spacing=1.0, length=length)
            line = line[(np.arange(len(line)) // 6) % 2 == 0]
            flat_rgb[:, _stamp(line, 0.8, height, width)] = 215


def _edge_point(rng: np.random.Generator, edge: int, height: int, width: int) -> np.ndarray:
    """A random (row, col) point on edge 0 top, 1 right, 2 bottom or 3 left of the scene."""
    along = rng.uniform(0.1, 0.9)
    return np.array(
        [
            (0.0, along * width),
            (along * height, width - 1.0),
            (height - 1.0, along * width),
            (along * height, 0.0),
        ][edge]
    )


def _bezier(
    start: np.ndarray, control: np.ndarray, end: np.ndarray, *, spacing: float, length: float
) -> np.ndarray:
    """(n, 2) points on a quadratic Bezier curve, at most ``spacing`` apart."""
    t = np.linspace(0.0, 1.0, max(2, math.ceil(length / spacing) + 1))[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _stamp(points: np.ndarray, radius: float, height: int, width: int) -> np.ndarray:
    """Flat indices of the pixels within ``radius`` of any of ``points``, clipped to the scene."""
    reach = math.ceil(radius)
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disc = dy**2 + dx**2 <= radius**2 + 0.25
    centres = np.rint(points).astype(np.int64)
    rows = (centres[:, 0:1] + dy[disc]).ravel()
    cols = (centres[:, 1:2] + dx[disc]).ravel()
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return np.unique(rows[inside] * width + cols[inside])


def _draw_buildings(
    rng: np.random.Generator,
    labels: np.ndarray,
    object_rgb: np.ndarray,
    blocked: np.ndarray,
    urban: np.ndarray,
) -> np.ndarray:
    """Draw buildings where ``blocked`` is False; return their shadow mask.

    Candidates are drawn uniformly and kept with a probability that rises with ``urban``; a
    candidate whose footprint (plus a margin) touches anything blocked is dropped.
    """
    height, width = labels.shape
    count = max(64, round(height * width / _BUILDING_CANDIDATE_AREA))
    centres = rng.uniform((0.0, 0.0), (height, width), size=(count, 2))
    low, high = _quantile(urban, 0.5), _quantile(urban, 0.95)
    at_centre = urban[centres[:, 0].astype(np.int64), centres[:, 1].astype(np.int64)]
    keep = np.clip((at_centre - low) / max(high - low, 1e-6), 0.0, 1.0)
    keep = 0.03 + 0.97 * keep**1.5
    centres = centres[rng.random(count) < keep]

    n = len(centres)
    hall = rng.random(n) < 0.05
    house = np.exp(rng.uniform(math.log(_BUILDING_SIDE[0]), math.log(_BUILDING_SIDE[1]), n))
    side = np.where(hall, rng.uniform(*_HALL_SIDE, n), house)
    aspect = rng.uniform(1.0, 2.2, n)
    half_long, half_short = side / 2, side / 2 / aspect
    angle = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.0, np.pi / 2, n))
    roof = _ROOF_RGB[rng.integers(0, len(_ROOF_RGB), n)] + rng.uniform(-12, 12, (n, 3))
    ridge = rng.random(n) < 0.6
    shadow_length = rng.uniform(2.0, 6.0, n) + 0.05 * side

    shadow = np.zeros((height, width), dtype=bool)
    for i in range(n):
        cos, sin = math.cos(angle[i]), math.sin(angle[i])
        a, b = half_long[i], half_short[i]
        reach_x = abs(a * cos) + abs(b * sin) + _BUILDING_MARGIN
        reach_y = abs(a * sin) + abs(b * cos) + _BUILDING_MARGIN
        cy, cx = centres[i]
        top, bottom = max(0, int(cy - reach_y)), min(height, int(cy + reach_y) + 2)
        left, right = max(0, int(cx - reach_x)), min(width, int(cx + reach_x) + 2)
        yy = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5 - cy
        xx = np.arange(left, right, dtype=np.float64)[None, :] + 0.5 - cx
        along = xx * cos + yy * sin
        across = yy * cos - xx * sin
        margin = (np.abs(along) <= a + _BUILDING_MARGIN) & (np.abs(across) <= b + _BUILDING_MARGIN)
        if blocked[top:bottom, left:right][margin].any():
            continue
        footprint = (np.abs(along) <= a) & (np.abs(across) <= b)
        if not footprint.any():
            continue
        blocked[top:bottom, left:right] |= margin
        labels[top:bottom, left:right][footprint] = BUILDING
        # A ridge along the long axis: the two roof halves catch the sun differently.
        brightness = np.where(across > 0, 1.12, 0.9) if ridge[i] else np.ones_like(along)
        for band in range(3):
            colour = np.clip(roof[i, band] * brightness, 0, 255).astype(np.uint8)
            object_rgb[band, top:bottom, left:right][footprint] = colour[footprint]
        # The shadow is the footprint moved towards the south-east, clipped to the scene.
        offset = round(float(shadow_length[i]))
        s_top, s_left = top + offset, left + offset
        s_bottom, s_right = min(height, bottom + offset), min(width, right + offset)
        if s_top < height and s_left < width:
            shadow[s_top:s_bottom, s_left:s_right] |= footprint[: s_bottom - s_top, : s_right - s_left]
    shadow &= labels != BUILDING
    return shadow


def write_label_mosaic(
    labels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    classes: tuple[ClassInfo, ...] = CLASSES,
    crs: str | None = "EPSG:32632",
    transform: tuple[float, ...] | None = (0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0),
    mpp: float | None = None,
    chunk: int = 256,
    shard: int = 512,
    seed: int = 0,
    lineage: dict[str, Any] | None = None,
    scores: np.ndarray | None = None,
) -> Mosaic:
    """A complete mosaic whose mask is `labels` (255 = nodata), without a model: for tests and benchmarks.

    The scores are logits of 4 for the labelled class and 0 for the others, plus seeded noise of
    standard deviation 0.5, so the confidence varies as a model's would and the argmax is the label;
    or the given (C, H, W) `scores` (e.g. `coarse_logits`), NaN where `labels` is 255. Blocks of one
    shard are written, then the pyramid, exactly as a segment job does.
    """
    from pipeline.mosaic import Mosaic, MosaicLayout
    from pipeline.stitching import BlockOutput, summarise
    from pipeline.tiling import Rect

    height, width = labels.shape
    layout = MosaicLayout(height=height, width=width, classes=classes, chunk=chunk, shard=shard,
                          crs=CRS.from_user_input(crs).to_wkt() if crs else None,
                          transform=transform if crs else None, mpp=mpp)
    mosaic = Mosaic.create(os.fspath(path), layout, dict(lineage or {}))
    for y0 in range(0, height, shard):
        for x0 in range(0, width, shard):
            region = Rect(y0, x0, min(y0 + shard, height), min(x0 + shard, width))
            block = labels[region.y0 : region.y1, region.x0 : region.x1]
            if scores is None:
                rng = np.random.default_rng((seed, y0, x0))
                values = rng.normal(0, 0.5, (len(classes), *block.shape)).astype(np.float32)
                for c in range(len(classes)):
                    values[c][block == c] += 4.0
            else:
                values = scores[:, region.y0 : region.y1, region.x0 : region.x1].astype(np.float32)
            values[:, block == 255] = np.nan
            mask, confidence = summarise(values, "logits")
            mosaic.write_block(BlockOutput(region, values, mask, confidence))
    mosaic.build_pyramid()
    mosaic.finish({})
    return mosaic


def coarse_logits(labels: np.ndarray, num_classes: int, *, sigma: float = 4.0, noise: float = 1.0,
                  seed: int = 0) -> np.ndarray:
    """(C, H, W) float32 logits like a coarse model's on a scene whose truth is `labels`.

    One-hot labels blurred with a Gaussian of `sigma` px (soft boundaries that ignore the image's
    edges, as from a low-resolution decoder), scaled to 4, plus seeded Gaussian noise of standard
    deviation `noise` smoothed over 1 px. Where the blur and noise move the argmax off the truth is
    near boundaries and in thin structures: what a dense CRF is meant to correct.
    """
    rng = np.random.default_rng(seed)
    logits = np.empty((num_classes, *labels.shape), np.float32)
    for c in range(num_classes):
        soft = ndimage.gaussian_filter((labels == c).astype(np.float32), sigma)
        jitter = rng.normal(0.0, noise, labels.shape).astype(np.float32)
        logits[c] = ndimage.gaussian_filter(4.0 * soft + jitter, 1.0)
    return logits


LARGE_BLOCK = 1024  # px: the side of the scenes a large scene is tiled from


def large_scene_blocks(seed: int, kinds: int = 4) -> list[Scene]:
    """The distinct 1024 px scenes a large scene is tiled from (see `write_large_scene`)."""
    return [generate_scene(LARGE_BLOCK, LARGE_BLOCK, seed=seed * 1000 + k) for k in range(kinds)]


def large_scene_layout(size: int, seed: int, kinds: int = 4) -> np.ndarray:
    """(blocks, blocks) int: which of the `kinds` scenes fills each 1024 px block of a large scene."""
    blocks = -(-size // LARGE_BLOCK)
    return np.random.default_rng(seed).integers(0, kinds, (blocks, blocks))


def write_large_scene(
    image_path: str | os.PathLike[str], labels_path: str | os.PathLike[str], size: int, seed: int = 0,
    compress: bool = True,
) -> None:
    """A `size` x `size` scene written block by block (memory of one 1024 px block, whatever the size).

    The scene is a seeded patchwork of four 1024 px synthetic scenes (`generate_scene`), so a 16384 px
    image takes seconds to make: for tests and benchmarks of memory and speed on large images, not of
    what a model learns. Both files are tiled GeoTIFFs as `write_scene` writes them (deflate level 1, or
    uncompressed without `compress`: ten times faster to write, 0.8 GB at 16384 px).
    """
    scenes, layout = large_scene_blocks(seed), large_scene_layout(size, seed)
    profile = {"driver": "GTiff", "height": size, "width": size, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0), "tiled": True,
               "blockxsize": BLOCK_SIZE, "blockysize": BLOCK_SIZE,
               **({"compress": "deflate", "zlevel": 1} if compress else {})}
    with rasterio.open(image_path, "w", count=3, photometric="RGB", **profile) as image, \
            rasterio.open(labels_path, "w", count=1, **profile) as labels:
        for (by, bx), kind in np.ndenumerate(layout):
            h, w = min(LARGE_BLOCK, size - by * LARGE_BLOCK), min(LARGE_BLOCK, size - bx * LARGE_BLOCK)
            window = rasterio.windows.Window(bx * LARGE_BLOCK, by * LARGE_BLOCK, w, h)
            image.write(scenes[kind].image[:, :h, :w], window=window)
            labels.write(scenes[kind].labels[:h, :w], 1, window=window)


def write_large_slide(path: str | os.PathLike[str], mask_path: str | os.PathLike[str], size: int, seed: int = 0,
                      mpp: float = 0.5, levels: int = 3, mask_size: int = 1024, compress: bool = True) -> None:
    """A whole-slide-like pyramidal OME-TIFF (`levels` levels, 2x apart, 256 px tiles, `mpp` um/px, no CRS) of
    the same patchwork as `write_large_scene`, written tile by tile, and its class mask at `mask_size` px
    (a mask image covering the whole slide, as a catalog pair's ``mask`` takes it).
    """
    import tifffile
    from PIL import Image

    scenes, layout = large_scene_blocks(seed), large_scene_layout(size, seed)
    images = np.stack([s.image for s in scenes])  # (kinds, 3, 1024, 1024)
    tile = 256

    def tiles(step: int) -> Iterator[np.ndarray]:
        side = -(-size // step)
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                ys = np.minimum(np.arange(y, y + tile), side - 1)[:, None] * step  # edge tiles: the last row again
                xs = np.minimum(np.arange(x, x + tile), side - 1)[None, :] * step
                kinds = layout[ys // LARGE_BLOCK, xs // LARGE_BLOCK]
                yield images[kinds, :, ys % LARGE_BLOCK, xs % LARGE_BLOCK]  # (tile, tile, 3)

    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm"}
    options: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb", "dtype": np.uint8,
                               **({"compression": "zlib", "compressionargs": {"level": 1}} if compress else {})}
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(size, size, 3), subifds=levels - 1, metadata=metadata, **options)
        for k in range(1, levels):
            side = -(-size // 2**k)
            tif.write(tiles(2**k), shape=(side, side, 3), subfiletype=1, **options)
    centres = ((np.arange(mask_size) + 0.5) * size / mask_size).astype(int)
    kinds = layout[centres[:, None] // LARGE_BLOCK, centres[None, :] // LARGE_BLOCK]
    mask = np.choose(kinds, [s.labels[centres[:, None] % LARGE_BLOCK, centres[None, :] % LARGE_BLOCK]
                             for s in scenes])
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)
