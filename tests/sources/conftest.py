"""Fixture images for the source tests: seeded generators of tiny real files, and the shared samples.

Each generator writes a small but real file of one kind the sources must read (a tiled GeoTIFF
with CRS, transform, nodata and overviews; a pyramidal OME-TIFF; an Aperio slide; ...) from a
seed, so every run sees the same bytes. The real samples are read in place from
``../shared/data`` and their tests skip, saying why, when that folder is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.enums import Resampling

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

GEOTIFF_SHAPE = (2, 301, 257)  # bands, height, width: odd sizes, so overview sizes round
GEOTIFF_ORIGIN = (500000.0, 5000000.0)
GEOTIFF_PIXEL = 10.0
GEOTIFF_OVERVIEWS = (2, 4)
OME_SHAPE = (300, 260)
OME_MPP = 0.25
SVS_SHAPE = (300, 400)
SVS_MPP = 0.25
SVS_DISC = (150, 200, 100)  # tissue disc: centre row, centre column, radius (level-0 pixels)


def north_up(pixel: float) -> Affine:
    """The fixtures' north-up transform: square `pixel`-metre pixels from GEOTIFF_ORIGIN."""
    west, north = GEOTIFF_ORIGIN
    return Affine(pixel, 0.0, west, 0.0, -pixel, north)


def geotiff_nodata_area(height: int, width: int) -> np.ndarray:
    """The nodata triangle of `write_geotiff`: True where x + y < 60."""
    rows, cols = np.mgrid[:height, :width]
    return rows + cols < 60


def write_geotiff(path: Path, seed: int = 0, crs: str = "EPSG:32632") -> Path:
    """A tiled, deflated 2-band uint16 GeoTIFF with nodata 0 in a corner and internal overviews."""
    bands, height, width = GEOTIFF_SHAPE
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 4000, size=GEOTIFF_SHAPE, dtype=np.uint16)
    data[:, geotiff_nodata_area(height, width)] = 0
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": bands,
        "dtype": "uint16",
        "crs": crs,
        "transform": north_up(GEOTIFF_PIXEL),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 64,
        "blockysize": 64,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews(list(GEOTIFF_OVERVIEWS), Resampling.nearest)
    return path


def write_alpha_geotiff(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """An RGBA GeoTIFF whose alpha band hides the left third; returns the path and the alpha."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 255, size=(4, 64, 96), dtype=np.uint8)
    data[3] = 255
    data[3, :, :32] = 0
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=64,
        width=96,
        count=4,
        dtype="uint8",
        crs="EPSG:32632",
        transform=north_up(1.0),
        photometric="RGB",
        alpha="YES",
    ) as dst:
        dst.write(data)
    return path, data[3]


def write_masked_geotiff(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A 1-band GeoTIFF with an internal mask band hiding a square; returns the path and the mask."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 255, size=(1, 80, 80), dtype=np.uint8)
    mask = np.full((80, 80), 255, dtype=np.uint8)
    mask[20:40, 30:60] = 0
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=80,
            width=80,
            count=1,
            dtype="uint8",
            crs="EPSG:32632",
            transform=north_up(1.0),
            tiled=True,
            blockxsize=16,
            blockysize=16,
        ) as dst,
    ):
        dst.write(data)
        dst.write_mask(mask)
    return path, mask > 0


def write_ome_tiff(path: Path, seed: int = 0) -> Path:
    """A tiled RGB OME-TIFF with two SubIFD pyramid levels (2x, 4x) and a physical pixel size."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(*OME_SHAPE, 3), dtype=np.uint8)
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": OME_MPP,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": OME_MPP,
        "PhysicalSizeYUnit": "µm",
    }
    options: dict[str, Any] = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=2, metadata=metadata, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    return path


def write_stack_ome_tiff(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A single-level uint16 OME-TIFF with axes ZCYX (2 planes, 4 channels); returns path and data."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 60000, size=(2, 4, 50, 70), dtype=np.uint16)
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "ZCYX"}, tile=(32, 32))
    return path, data


def write_png_tiff(path: Path, seed: int = 0) -> Path:
    """A tiled RGB TIFF with PNG-compressed tiles: tifffile (imagecodecs) reads it, GDAL does not."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", compression="png")
    return path


def write_imagej_tiff(path: Path, mpp: float, seed: int = 0) -> Path:
    """A single-channel ImageJ TIFF whose calibration says `mpp` microns per pixel."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(40, 50), dtype=np.uint8)
    tifffile.imwrite(path, image, imagej=True, resolution=(1 / mpp, 1 / mpp), metadata={"unit": "um"})
    return path


def svs_image(seed: int = 0, tissue: bool = True) -> np.ndarray:
    """Level-0 RGB (h, w, 3) of the synthetic slide: grey-white glass with a stained disc."""
    rng = np.random.default_rng(seed)
    height, width = SVS_SHAPE
    image = np.full((height, width, 3), 238, dtype=np.int16)
    if tissue:
        rows, cols = np.mgrid[:height, :width]
        row, col, radius = SVS_DISC
        image[(rows - row) ** 2 + (cols - col) ** 2 < radius**2] = (180, 60, 150)
    image += rng.integers(-4, 5, size=image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def write_svs(path: Path, seed: int = 0, tissue: bool = True) -> Path:
    """An Aperio SVS with three tiled JPEG levels (1x, 2x, 4x) that OpenSlide reads as "aperio"."""
    image = svs_image(seed, tissue)
    height, width = SVS_SHAPE
    with tifffile.TiffWriter(path) as tif:
        for step in (1, 2, 4):
            level = np.ascontiguousarray(image[::step, ::step])
            size = f"{level.shape[1]}x{level.shape[0]}"
            description = (
                f"Aperio Image Library v12.0.0\r\n{width}x{height} -> {size} (64x64) JPEG/RGB Q=90"
                f"|AppMag = 40|MPP = {SVS_MPP}"
            )
            tif.write(
                level,
                tile=(64, 64),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                description=description,
                metadata=None,
            )
    return path


def write_truncated_copy(source: Path, target: Path) -> Path:
    """The first half of a file's bytes: what an interrupted copy or download leaves."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _shared(relative: str) -> Path:
    """A file in ../shared/data, or a skip that says where it was looked for."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real sample {relative} not found under {SHARED_DATA} (present in CI)")
    return path


@pytest.fixture(scope="session")
def geotiff_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_geotiff(tmp_path_factory.mktemp("geotiff") / "scene.tif")


@pytest.fixture(scope="session")
def ome_tiff_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ome_tiff(tmp_path_factory.mktemp("ome") / "section.ome.tif")


@pytest.fixture(scope="session")
def png_tiff_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png_tiff(tmp_path_factory.mktemp("png") / "png_tiles.tif")


@pytest.fixture(scope="session")
def svs_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_svs(tmp_path_factory.mktemp("svs") / "slide.svs")


@pytest.fixture(scope="session")
def rgb_byte_path() -> Path:
    """Landsat RGB, 791x718x3 uint8, EPSG:32618, nodata 0, striped."""
    return _shared("geo/rasterio/RGB.byte.tif")


@pytest.fixture(scope="session")
def spacenet_path() -> Path:
    """SpaceNet Atlanta panchromatic, 900x900x1 uint16, EPSG:32616, 0.5 m."""
    return _shared("geo/spacenet_atlanta/sample_geotiff.tif")


@pytest.fixture(scope="session")
def spacenet_mask_path() -> Path:
    """A 900x900 uint8 building mask with no georeferencing."""
    return _shared("geo/spacenet_atlanta/sample_fp_mask_from_geojson.tif")


@pytest.fixture(scope="session")
def cmu_svs_path() -> Path:
    """Aperio SVS, 2220x2967 (w x h), one level, JPEG tiles, 0.499 um/px."""
    return _shared("slides/cmu-1-small-region.svs")
