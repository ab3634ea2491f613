"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from pipeline.synthetic import generate_scene, write_scene


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A seeded 256 px synthetic scene and its labels, as GeoTIFFs: (image, labels)."""
    folder = tmp_path_factory.mktemp("scene")
    image, labels = folder / "scene.tif", folder / "labels.tif"
    write_scene(generate_scene(256, 256, seed=11), image, labels)
    return str(image), str(labels)
