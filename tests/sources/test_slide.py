"""What is particular to `SlideSource`: microns per pixel, OpenSlide levels, tissue detection."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError, SourceNotFoundError
from pipeline.sources import SlideSource, detect_tissue, open_source
from pipeline.sources.slide import _composite, otsu_threshold
from pipeline.storage import Location, storage_for
from pipeline.storage.cache import local_copy
from tests.sources.conftest import SVS_DISC, SVS_MPP, SVS_SHAPE, write_svs


def test_cmu_svs_metadata(cmu_svs_path: Path) -> None:
    source = open_source(cmu_svs_path)
    assert isinstance(source, SlideSource)
    assert source.mpp == pytest.approx(0.499)
    assert (source.height, source.width) == (2967, 2220)  # OpenSlide's dimensions are (w, h)
    assert [(lvl.height, lvl.width, lvl.downsample) for lvl in source.levels] == [(2967, 2220, 1.0)]
    assert (source.bands, source.dtype) == (3, np.dtype("uint8"))
    assert source.crs is None and source.transform is None and source.nodata is None
    assert source.valid(1000, 1000, 64, 64).all()
    assert source.best_level(0.5, "um") == 0
    with pytest.raises(ConfigError, match="metres"):
        source.best_level(0.5, "m")


def test_a_slide_on_object_storage_reads_as_the_file_through_one_bounded_local_copy(
    cmu_svs_path: Path, s3_bucket: str, tessera_cache: Path
) -> None:
    url = Location.parse(f"{s3_bucket}/slides/CMU-1-Small.svs")
    storage_for(url).write_bytes(url, cmu_svs_path.read_bytes())
    remote, local = open_source(url.url), open_source(cmu_svs_path)
    assert isinstance(remote, SlideSource) and remote.path == url.url  # workers get the URL, not the copy
    assert (remote.mpp, remote.height, remote.width) == (local.mpp, local.height, local.width)
    np.testing.assert_array_equal(remote.read(1000, 900, 300, 200), local.read(1000, 900, 300, 200))
    again = pickle.loads(pickle.dumps(remote))
    np.testing.assert_array_equal(again.read(10, 20, 64, 64), local.read(10, 20, 64, 64))
    copies = list((tessera_cache / "objects").rglob("*.svs"))
    assert len(copies) == 1 and copies[0].read_bytes() == cmu_svs_path.read_bytes()  # fetched once

    # A bound of one slide: fetching a second evicts the copy used least recently, never the new one.
    other = Location.parse(f"{s3_bucket}/slides/other.svs")
    storage_for(other).write_bytes(other, cmu_svs_path.read_bytes())
    kept = local_copy(other, max_bytes=cmu_svs_path.stat().st_size)
    assert list((tessera_cache / "objects").rglob("*.svs")) == [kept] and not copies[0].exists()
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        open_source(f"{s3_bucket}/slides/missing.svs")


def test_cmu_svs_tissue_is_neither_empty_nor_full(cmu_svs_path: Path) -> None:
    mask, factor = open_source(cmu_svs_path).foreground(max_size=256)
    assert factor == 12 and mask.shape == (248, 185)
    assert 0.15 < mask.mean() < 0.7
    assert not mask[:37, 150:].any() and not mask[125:, :37].any()  # glass, top right and bottom left
    assert mask[210:245, 70:130].all()  # the specimen's broad lower part


def test_synthetic_slide_levels_mpp_and_best_level(svs_path: Path) -> None:
    source = open_source(svs_path)
    assert isinstance(source, SlideSource)
    assert [(lvl.height, lvl.width) for lvl in source.levels] == [SVS_SHAPE, (150, 200), (75, 100)]
    assert [source.at_level(k).mpp for k in range(3)] == pytest.approx([SVS_MPP, 2 * SVS_MPP, 4 * SVS_MPP])
    assert source.best_level(SVS_MPP, "um") == 0
    assert source.best_level(0.5, "um") == 1
    assert source.best_level(1.0, "um") == 2
    assert source.best_level(0.9, "um") == 1  # 1.0 um/px would be more than 10% coarser
    assert source.best_level(5.0, "um") == 2


def test_synthetic_slide_foreground_finds_the_disc(svs_path: Path) -> None:
    for level in (0, 1):
        source = open_source(svs_path, level=level)
        mask, factor = source.foreground(max_size=50)
        f = factor * source.levels[level].downsample  # level-0 pixels per mask cell
        rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
        row, col, radius = SVS_DISC
        disc = ((rows + 0.5) * f - row) ** 2 + ((cols + 0.5) * f - col) ** 2 < radius**2
        assert mask[disc].all()
        # Beyond the disc: only cells on its edge and the one-cell margin the mask is grown by.
        near = ndimage.binary_dilation(disc, structure=np.ones((3, 3), dtype=bool), iterations=2)
        assert not (mask & ~near).any()


def test_a_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    source = open_source(write_svs(tmp_path / "blank.svs", tissue=False))
    mask, _ = source.foreground(max_size=64)
    assert not mask.any()


def test_detect_tissue_on_plain_images() -> None:
    white = np.full((40, 40, 3), 240, dtype=np.uint8)
    pink = np.zeros((40, 40, 3), dtype=np.uint8) + np.array([200, 80, 160], dtype=np.uint8)
    assert not detect_tissue(white).any()
    assert detect_tissue(pink).all()
    half = white.copy()
    half[:, 20:] = pink[:, 20:]
    np.testing.assert_array_equal(detect_tissue(half)[:, 22:], True)
    np.testing.assert_array_equal(detect_tissue(half)[:, :18], False)


def test_detect_tissue_drops_dust_and_fills_holes() -> None:
    image = np.full((200, 200, 3), 240, dtype=np.uint8)
    image[50:150, 50:150] = (190, 70, 150)
    image[90:110, 90:110] = 240  # a lumen
    image[10, 10] = (190, 70, 150)  # dust
    tissue = detect_tissue(image)
    assert tissue[51:149, 51:149].all()  # the lumen is filled; the median filter rounds corners
    assert not tissue[10, 10]
    assert not tissue[:49].any() and not tissue[151:].any()


def test_otsu_threshold_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 1000), rng.normal(0.6, 0.05, 500)]).clip(0, 1)
    assert 0.2 < otsu_threshold(values) < 0.5
    assert otsu_threshold(np.full(10, 0.3)) == 1.0


def test_transparent_pixels_become_background() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[1, 1] = (100, 100, 100, 128)
    rgb = _composite(rgba, (255, 255, 255))
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (177, 177, 177)
