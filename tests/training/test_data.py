"""Training data: windowed reading, the area split, the class index, window sampling, augmentation,
normalisation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import Affine

from pipeline.errors import ConfigError, SourceNotFoundError
from pipeline.models import Normalization
from pipeline.synthetic import generate_scene, write_scene
from pipeline.training.augment import Augmenter
from pipeline.training.data import (
    AreaIndex,
    LabelledImage,
    WindowBatches,
    WindowSampler,
    compute_normalization,
    open_labelled_image,
    sample_pixels,
    split_by_area,
)

IDENTITY = Normalization(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("scene")
    image, labels = folder / "scene.tif", folder / "labels.tif"
    write_scene(generate_scene(96, 128, seed=1), image, labels)
    return image, labels


def coded_arrays(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image and labels where the label at every pixel is a function of the image there: label = red % 5."""
    image = np.random.default_rng(seed).integers(0, 250, (3, height, width), dtype=np.uint8)
    return image, image[0] % 5


def written(folder: Path, image: np.ndarray, labels: np.ndarray) -> LabelledImage:
    """The arrays as tiled GeoTIFFs in `folder`, opened as a labelled image."""
    folder.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": labels.shape[0], "width": labels.shape[1], "dtype": "uint8",
               "crs": "EPSG:32632", "transform": Affine(0.5, 0, 5e5, 0, -0.5, 52e5)}
    with rasterio.open(folder / "image.tif", "w", count=len(image), **profile) as dst:
        dst.write(image)
    with rasterio.open(folder / "labels.tif", "w", count=1, **profile) as dst:
        dst.write(labels[None])
    return open_labelled_image(folder / "image.tif", folder / "labels.tif")


def coded_image(folder: Path, height: int, width: int, seed: int = 0) -> LabelledImage:
    return written(folder, *coded_arrays(height, width, seed))


class ArrayTruth:
    """Truth held in memory (for sampler tests)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.key = "array-" + hashlib.sha256(labels.tobytes()).hexdigest()[:16]

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self.labels[y0 : y0 + h, x0 : x0 + w]

    def reopened(self) -> ArrayTruth:
        return self


# Reading


def test_windows_read_give_the_files_values_bands_and_resolution(scene_files: tuple[Path, Path]) -> None:
    image = open_labelled_image(*scene_files)
    with rasterio.open(scene_files[0]) as src, rasterio.open(scene_files[1]) as labels_src:
        whole, labels = src.read(), labels_src.read(1)
    assert image.bands == (1, 2, 3) and image.resolution == 0.5 and image.dtype == np.uint8
    assert (image.height, image.width) == (96, 128)
    values, truth = image.read(10, 20, 30, 40)
    np.testing.assert_array_equal(values, whole[:, 10:40, 20:60])
    np.testing.assert_array_equal(truth, labels[10:40, 20:60])
    picked = open_labelled_image(*scene_files, bands=[3, 1])
    np.testing.assert_array_equal(picked.read(0, 0, 96, 128)[0], whole[[2, 0]])
    assert picked.bands == (3, 1)
    mapped = open_labelled_image(*scene_files, label_map={1: 4})
    np.testing.assert_array_equal(mapped.read(0, 0, 96, 128)[1], np.where(labels == 1, 4, labels))


def test_missing_files_are_source_not_found(scene_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = scene_files
    with pytest.raises(SourceNotFoundError, match=r"nope\.tif does not exist"):
        open_labelled_image(tmp_path / "nope.tif", labels)
    with pytest.raises(FileNotFoundError, match="labels raster"):
        open_labelled_image(image, tmp_path / "nope.tif")


def test_bad_bands_are_config_errors(scene_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="has 3 band"):
        open_labelled_image(*scene_files, bands=[4])
    with pytest.raises(ConfigError, match="bands"):
        open_labelled_image(*scene_files, bands=[])


def test_labels_on_another_grid_are_config_errors(scene_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = scene_files
    profile = {"driver": "GTiff", "count": 1, "dtype": "uint8", "crs": "EPSG:32632"}
    smaller = tmp_path / "smaller.tif"
    with rasterio.open(smaller, "w", height=90, width=128, transform=Affine(0.5, 0, 5e5, 0, -0.5, 52e5),
                       **profile) as dst:
        dst.write(np.zeros((1, 90, 128), np.uint8))
    with pytest.raises(ConfigError, match=r"90 x 128 pixels but image .* is 96 x 128"):
        open_labelled_image(image, smaller)
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", height=96, width=128, transform=Affine(0.5, 0, 6e5, 0, -0.5, 52e5),
                       **profile) as dst:
        dst.write(np.zeros((1, 96, 128), np.uint8))
    with pytest.raises(ConfigError, match="different georeferencing"):
        open_labelled_image(image, shifted)


# The split and window sampling


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(32, 400),
    width=st.integers(32, 400),
    val_fraction=st.floats(0.01, 0.9),
    window=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 1000),
)
def test_windows_never_cross_the_split(
    height: int, width: int, val_fraction: float, window: int, seed: int
) -> None:
    try:
        split = split_by_area(height, width, val_fraction, window)
    except ConfigError:
        assert height - max(1, round(height * val_fraction)) < window or width < window
        return
    assert split.height - split.val_start >= 1 and split.val_start >= window
    corners = WindowSampler(split, window, np.random.default_rng(seed)).sample(200)
    rows, cols = corners[:, 0], corners[:, 1]
    assert (rows >= 0).all() and (rows + window <= split.val_start).all()
    assert (cols >= 0).all() and (cols + window <= width).all()


def test_windows_reach_every_corner_of_the_training_area() -> None:
    split = split_by_area(100, 80, 0.2, 32)
    corners = WindowSampler(split, 32, np.random.default_rng(0)).sample(5000)
    assert corners[:, 0].min() == 0 and corners[:, 0].max() == split.val_start - 32
    assert corners[:, 1].min() == 0 and corners[:, 1].max() == 80 - 32


def test_batches_hold_no_validation_pixel(tmp_path: Path) -> None:
    image, labels = coded_arrays(200, 100)
    split = split_by_area(200, 100, 0.3, 64)
    labels[split.val] = 4  # a class that, below, occurs only in the validation rows
    labels[split.train][labels[split.train] == 4] = 3
    raster = written(tmp_path, image, labels)
    index = AreaIndex.build(raster.truth, split.train, 100, 16, cache=False)
    batches = WindowBatches(raster, split, IDENTITY, 64, 8, np.random.default_rng(0), jitter=0.0, balance=0.5,
                            index=index)
    for _ in range(20):
        _, y = next(batches)
        assert not (y == 4).any()


def test_holdout_band_is_below_validation_and_never_sampled() -> None:
    split = split_by_area(1000, 300, 0.2, 64, holdout_fraction=0.15)
    assert (split.train, split.val, split.holdout) == (slice(0, 650), slice(650, 850), slice(850, 1000))
    corners = WindowSampler(split, 64, np.random.default_rng(0)).sample(2000)
    assert (corners[:, 0] + 64 <= split.val_start).all()
    assert split_by_area(1000, 300, 0.2, 64).holdout == slice(1000, 1000)  # none asked for: empty
    with pytest.raises(ConfigError, match="holdout_fraction"):
        split_by_area(1000, 300, 0.2, 64, holdout_fraction=1.0)


def test_class_balanced_windows_see_a_rare_class_far_more_often() -> None:
    labels = np.zeros((600, 600), np.uint8)
    labels[100:110, 400:410] = 1  # 0.03% of the pixels
    labels[300:, :] = 255  # unlabelled rows do not count as a class
    split = split_by_area(600, 600, 0.3, 64)

    truth = ArrayTruth(labels)
    index = AreaIndex.build(truth, split.train, 600, 16, cache=False)

    def share_with_rare_class(balance: float) -> float:
        sampler = WindowSampler(split, 64, np.random.default_rng(1), index=index, balance=balance, truth=truth)
        corners = sampler.sample(2000)
        assert (corners[:, 0] + 64 <= split.val_start).all() and (corners >= 0).all()
        return float(np.mean([(labels[r : r + 64, c : c + 64] == 1).any() for r, c in corners]))

    uniform, balanced = share_with_rare_class(0.0), share_with_rare_class(1.0)
    assert uniform < 0.05
    assert balanced == pytest.approx(0.5, abs=0.06)  # two classes present in the training band: half each


def test_split_rejects_bad_fractions_and_small_rasters() -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_by_area(100, 100, fraction, 32)
    with pytest.raises(ConfigError, match="smaller than one 64 x 64 training window"):
        split_by_area(70, 100, 0.2, 64)
    with pytest.raises(ConfigError, match="training window"):
        split_by_area(200, 40, 0.2, 64)


# Augmentation


def test_augmenter_draws_all_eight_symmetries_and_keeps_labels_aligned() -> None:
    image, truth = coded_arrays(16, 16)
    raw = torch.from_numpy(image[None].astype(np.float32)).repeat(64, 1, 1, 1)
    labels = torch.from_numpy(truth[None].astype(np.int64)).repeat(64, 1, 1)
    torch.manual_seed(0)
    x, y = Augmenter(IDENTITY, jitter=0.0, elastic=0.0)(raw, labels)
    torch.testing.assert_close(y, x[:, 0].round().long() % 5)  # label = red % 5 still holds everywhere
    assert len({bytes(x[i].numpy().tobytes()) for i in range(64)}) == 8


def test_elastic_deformation_moves_pixels_but_invents_no_class() -> None:
    image, truth = coded_arrays(64, 64)
    labels = torch.from_numpy(truth[None].astype(np.int64)).repeat(8, 1, 1)
    labels[:, :10] = 255
    raw = torch.from_numpy(image[None].astype(np.float32)).repeat(8, 1, 1, 1)
    torch.manual_seed(1)
    _, plain = Augmenter(IDENTITY, jitter=0.0, elastic=0.0)(raw, labels)
    torch.manual_seed(1)
    _, bent = Augmenter(IDENTITY, jitter=0.0, elastic=1.0, elastic_alpha=2.0, elastic_sigma=4.0)(raw, labels)
    assert set(bent.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert 0.02 < float((bent != plain).float().mean()) < 0.9
    assert abs(float((bent == 255).float().mean()) - float((plain == 255).float().mean())) < 0.05


def test_batches_keep_image_and_labels_aligned(tmp_path: Path) -> None:
    raster = coded_image(tmp_path, 120, 90, seed=2)
    split = split_by_area(120, 90, 0.2, 32)
    batches = WindowBatches(raster, split, IDENTITY, 32, 6, np.random.default_rng(1), jitter=0.0, elastic=0.0)
    for _ in range(10):
        x, y = next(batches)
        assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (6, 32, 32) and y.dtype == torch.int64
        torch.testing.assert_close(y, x[:, 0].round().long() % 5)


def test_batches_are_normalised_and_seeded(tmp_path: Path) -> None:
    raster = coded_image(tmp_path, 120, 90)
    split = split_by_area(120, 90, 0.2, 32)
    norm = compute_normalization(sample_pixels(raster, split.train))

    def first(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(WindowBatches(raster, split, norm, 32, 64, np.random.default_rng(seed)))

    x, y = first(5)
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    again, other = first(5), first(6)
    torch.testing.assert_close(again[0], x)
    torch.testing.assert_close(again[1], y)
    assert not torch.equal(other[0], x)


def test_colour_jitter_scales_brightness_and_contrast_within_its_strength() -> None:
    norm = Normalization(scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    raw = torch.full((32, 3, 8, 8), 128.0)  # uniform, so the random symmetries change nothing
    labels = torch.zeros(32, 8, 8, dtype=torch.long)
    torch.manual_seed(0)
    plain, _ = Augmenter(norm, jitter=0.0, elastic=0.0)(raw, labels)
    jittered, _ = Augmenter(norm, jitter=0.2, elastic=0.0)(raw, labels)
    torch.testing.assert_close(plain, torch.full_like(plain, 128 / 255))
    per_sample = jittered.mean(dim=(1, 2, 3))
    assert float(per_sample.std()) > 0.02  # each window gets its own draw
    assert float((jittered - plain).abs().max()) < 0.35  # +-20% brightness and contrast of a 0.5 grey


# Normalisation


def test_uint8_normalisation_uses_1_over_255_and_band_statistics() -> None:
    image = np.stack([np.full((10, 10), 51, np.uint8), np.tile(np.array([0, 255], np.uint8), (10, 5))])
    norm = compute_normalization(image)
    assert norm.scale == pytest.approx(1 / 255)
    assert norm.mean == pytest.approx((0.2, 0.5))
    assert norm.std == pytest.approx((1.0, 0.5))  # a constant band gets std 1


def test_other_dtypes_are_scaled_by_their_largest_value() -> None:
    image = np.array([[[0, 1000], [2000, 4000]]], np.uint16)
    norm = compute_normalization(image)
    assert norm.scale == pytest.approx(1 / 4000)
    assert norm.mean == pytest.approx((7000 / 4 / 4000,))
    floats = compute_normalization(np.array([[[-2.0, 1.0]]], np.float32))
    assert floats.scale == pytest.approx(0.5)


# The class index


def test_the_class_index_counts_every_label_of_its_area_and_is_cached(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    labels = np.random.default_rng(3).choice(np.array([0, 1, 2, 255], np.uint8), (1500, 1100), p=[.7, .2, .05, .05])
    raster = written(tmp_path / "data", np.zeros((1, 1500, 1100), np.uint8), labels)
    rows = slice(200, 1333)  # neither on a cell nor on a tile edge
    index = AreaIndex.build(raster.truth, rows, 1100, cell=16)
    np.testing.assert_array_equal(index.totals(), np.bincount(labels[rows].ravel(), minlength=256))
    assert list(index.values) == [0, 1, 2, 255] and index.counts.shape == (71, 69, 4)
    # Per cell too: cell (3, 5) covers rows 248..263 and columns 80..95.
    cell = labels[rows][48:64, 80:96]
    assert index.counts[3, 5].tolist() == [int((cell == v).sum()) for v in (0, 1, 2, 255)]
    # Built once: the second build reads the cache, a changed truth (another label_map) builds anew.
    assert len(list((tmp_path / "cache" / "class-index").iterdir())) == 1
    np.testing.assert_array_equal(AreaIndex.build(raster.truth, rows, 1100, cell=16).counts, index.counts)
    mapped = open_labelled_image(tmp_path / "data" / "image.tif", tmp_path / "data" / "labels.tif",
                                 label_map={255: 3})
    assert list(AreaIndex.build(mapped.truth, rows, 1100, cell=16).values) == [0, 1, 2, 3]
    assert len(list((tmp_path / "cache" / "class-index").iterdir())) == 2


def test_a_large_area_is_sampled_from_windows_spread_over_it(tmp_path: Path) -> None:
    # A band of rows whose values encode the row: the sample covers the area's rows, and only those.
    height, width = 2400, 2000
    rows_coded = np.broadcast_to((np.arange(height) // 10 % 250).astype(np.uint8)[:, None], (height, width))
    raster = written(tmp_path, np.stack([rows_coded, rows_coded]), np.zeros((height, width), np.uint8))
    area = slice(100, 2300)
    sample = sample_pixels(raster, area, most=100_000)
    assert sample.shape[0] == 2 and 50_000 <= sample.shape[2] <= 100_000
    seen = np.unique(sample[0])
    assert seen.min() == 10 and seen.max() == 229  # rows 100 .. 2299
    assert np.diff(seen).max() <= 16  # 16 rows of windows spread over the band: no gap over 160 rows


def test_a_damaged_class_index_in_the_cache_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    labels = np.arange(64 * 64, dtype=np.int64).reshape(64, 64).astype(np.uint8) % 3
    truth = ArrayTruth(labels)
    index = AreaIndex.build(truth, slice(0, 64), 64, cell=16)
    (saved,) = (tmp_path / "cache" / "class-index").iterdir()
    saved.write_bytes(saved.read_bytes()[:100])  # cut short, as by a full disk
    again = AreaIndex.build(truth, slice(0, 64), 64, cell=16)
    np.testing.assert_array_equal(again.counts, index.counts)
    assert len(saved.read_bytes()) > 100  # replaced by a whole one
