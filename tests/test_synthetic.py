"""The synthetic scene generator: deterministic, every class present, real tiled GeoTIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import Affine

from pipeline.errors import ConfigError
from pipeline.models import ClassInfo
from pipeline.synthetic import BLOCK_SIZE, CLASSES, Scene, generate_scene, write_scene


@pytest.fixture(scope="module")
def scene() -> Scene:
    return generate_scene(512, 512, seed=3)


def test_classes_are_the_five_documented_ones_with_distinct_colours() -> None:
    assert [c.name for c in CLASSES] == ["background", "water", "road", "building", "vegetation"]
    assert all(isinstance(c, ClassInfo) for c in CLASSES)
    assert len({c.color for c in CLASSES}) == len(CLASSES)


def test_shapes_and_dtypes(scene: Scene) -> None:
    assert scene.image.shape == (3, 512, 512) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (512, 512) and scene.labels.dtype == np.uint8


@pytest.mark.parametrize("seed", range(5))
def test_every_class_is_present_on_a_512_scene(seed: int) -> None:
    labels = generate_scene(512, 512, seed).labels
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
    assert len(counts) == len(CLASSES)
    assert (counts > 0).all(), f"seed {seed}: class pixel counts {counts.tolist()}"


def test_same_seed_same_scene_other_seed_other_scene(scene: Scene) -> None:
    again = generate_scene(512, 512, seed=3)
    other = generate_scene(512, 512, seed=4)
    np.testing.assert_array_equal(again.image, scene.image)
    np.testing.assert_array_equal(again.labels, scene.labels)
    assert not np.array_equal(other.labels, scene.labels)


def test_classes_differ_in_colour_but_overlap(scene: Scene) -> None:
    # Learnable: the class mean colours are well apart. Not trivial: each class's colours spread.
    means = np.array([scene.image[:, scene.labels == k].mean(axis=1) for k in range(len(CLASSES))])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(CLASSES), 1)]
    assert gaps.min() > 15
    spreads = [scene.image[:, scene.labels == k].std(axis=1).mean() for k in range(len(CLASSES))]
    assert min(spreads) > 2


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(1, 160),
    width=st.integers(1, 160),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_size_gives_valid_arrays(height: int, width: int, seed: int) -> None:
    scene = generate_scene(height, width, seed)
    assert scene.image.shape == (3, height, width)
    assert scene.labels.shape == (height, width)
    assert scene.labels.max() < len(CLASSES)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (2.5, 10)])
def test_bad_sizes_are_config_errors(size: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match="expected an int >= 1"):
        generate_scene(size[0], size[1], seed=0)


def test_write_scene_gives_tiled_georeferenced_geotiffs(scene: Scene, tmp_path: Path) -> None:
    image_path, labels_path = tmp_path / "scene.tif", tmp_path / "labels.tif"
    write_scene(
        scene, image_path, labels_path, pixel_size=0.25, crs="EPSG:32633", origin=(400000.0, 5000000.0)
    )
    transform = Affine(0.25, 0.0, 400000.0, 0.0, -0.25, 5000000.0)
    with rasterio.open(image_path) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (3, 512, 512, "uint8")
        assert src.profile["tiled"] and src.block_shapes == [(BLOCK_SIZE, BLOCK_SIZE)] * 3
        assert src.compression is not None and src.compression.value == "DEFLATE"
        assert src.crs.to_epsg() == 32633 and src.transform == transform
        np.testing.assert_array_equal(src.read(), scene.image)
    with rasterio.open(labels_path) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (1, "uint8", None)
        assert src.profile["tiled"] and src.block_shapes == [(BLOCK_SIZE, BLOCK_SIZE)]
        assert src.crs.to_epsg() == 32633 and src.transform == transform
        np.testing.assert_array_equal(src.read(1), scene.labels)
        assert src.colormap(1)[3][:3] == CLASSES[3].color


def test_write_scene_defaults_are_utm_32n_half_metre(scene: Scene, tmp_path: Path) -> None:
    write_scene(scene, tmp_path / "a.tif", tmp_path / "b.tif")
    for path in (tmp_path / "a.tif", tmp_path / "b.tif"):
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 32632
            assert src.transform == Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)


def test_write_scene_grey_is_one_band_the_mean_of_the_colours(scene: Scene, tmp_path: Path) -> None:
    write_scene(scene, tmp_path / "grey.tif", tmp_path / "labels.tif", grey=True)
    with rasterio.open(tmp_path / "grey.tif") as src:
        assert src.count == 1 and src.descriptions == ("grey",) and src.dtypes == ("uint8",)
        grey = src.read(1)
    expected = np.round(scene.image.astype(np.float32).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(grey, expected)
    with rasterio.open(tmp_path / "labels.tif") as src:
        np.testing.assert_array_equal(src.read(1), scene.labels)


def test_write_scene_rejects_mismatched_arrays(tmp_path: Path) -> None:
    bad = Scene(image=np.zeros((3, 4, 4), np.uint8), labels=np.zeros((4, 5), np.uint8))
    with pytest.raises(ConfigError, match="do not match"):
        write_scene(bad, tmp_path / "a.tif", tmp_path / "b.tif")
