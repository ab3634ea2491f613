"""The predictor: band selection, bilinear upsampling of low-resolution outputs, D4 TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.inference import InferenceOptions, Predictor, d4_inverse, d4_transforms
from pipeline.models.bundle import ModelBundle
from tests.conftest import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return ModelBundle.load(make_bundle(tmp_path_factory.mktemp("inf") / "b.bundle", bands=2, tile=64, overlap=8))


class HalfResolution(nn.Module):
    """Wraps a model so it answers at half the input resolution, as many segmentation heads do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.inner(x), 2)


def test_low_resolution_logits_are_upsampled_bilinearly(bundle: ModelBundle) -> None:
    tiles = np.random.default_rng(0).integers(0, 255, size=(3, 2, 64, 64)).astype(np.uint8)
    full = Predictor(bundle, InferenceOptions(device="cpu"))(tiles)
    low = ModelBundle(bundle.spec, HalfResolution(bundle.model))
    out = Predictor(low, InferenceOptions(device="cpu"))(tiles)
    assert out.shape == full.shape == (3, 3, 64, 64)
    pooled = F.avg_pool2d(torch.from_numpy(full), 2)
    expected = F.interpolate(pooled, size=(64, 64), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_d4_inverse_undoes_each_transform() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = d4_transforms(x)
    assert len(views) == 8 and len({tuple(v.flatten().tolist()) for v in views}) == 8
    for back in d4_inverse(views):
        torch.testing.assert_close(back, x)


def test_tta_is_equivariant_to_rotations(bundle: ModelBundle) -> None:
    tile = np.random.default_rng(1).integers(0, 255, size=(1, 2, 64, 64)).astype(np.uint8)
    predict = Predictor(bundle, InferenceOptions(device="cpu", tta=True))
    rotated = predict(np.ascontiguousarray(np.rot90(tile, 1, axes=(2, 3))))
    np.testing.assert_allclose(rotated, np.rot90(predict(tile), 1, axes=(2, 3)), atol=1e-4)
    plain = Predictor(bundle, InferenceOptions(device="cpu"))
    assert not np.allclose(plain(tile), predict(tile), atol=1e-4), "TTA changes the result"


def test_probabilities_sum_to_one_and_bands_are_selected(bundle: ModelBundle) -> None:
    predict = Predictor(bundle, InferenceOptions(device="cpu", scores="probabilities", batch_size=2))
    raw = np.random.default_rng(2).integers(0, 255, size=(4, 64, 64)).astype(np.uint8)
    tiles = np.stack([predict.select_bands(raw)] * 3)
    assert tiles.shape == (3, 2, 64, 64)
    np.testing.assert_array_equal(tiles[0], raw[:2])
    np.testing.assert_allclose(predict(tiles).sum(1), 1.0, atol=1e-5)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="logits"):
        InferenceOptions(scores="softmax")
    with pytest.raises(ConfigError, match="batch_size"):
        InferenceOptions(batch_size=0)
    if not torch.cuda.is_available():
        from pipeline.inference import pick_device

        with pytest.raises(ConfigError, match="no GPU"):
            pick_device("cuda")


def test_compiled_model_gives_the_eager_scores(bundle: ModelBundle, tmp_path: Path) -> None:
    """torch.compile (inductor, here on CPU) changes speed, not results; batches of 3 then 1."""
    raw = np.random.default_rng(4).integers(0, 255, (4, 2, 64, 64), dtype=np.uint8)
    eager = Predictor(bundle, InferenceOptions(device="cpu", batch_size=3))(raw)
    bundle.save(tmp_path / "copy.bundle")
    fresh = ModelBundle.load(tmp_path / "copy.bundle")
    compiled = Predictor(fresh, InferenceOptions(device="cpu", batch_size=3, compile=True))(raw)
    assert compiled.shape == eager.shape
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
