"""The training losses: each term, the presets, class weights, the U-Net boundary weights, deep supervision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.models import DeepSupervisionOutput
from pipeline.training.losses import LOSS_PRESETS, LOSS_TERMS, SegmentationLoss, boundary_weights


def blobs(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, size, size) targets of 3 classes made of rectangles."""
    rng = np.random.default_rng(seed)
    target = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for c in (1, 2):
            y, x = rng.integers(0, size - 20, 2)
            target[i, y : y + 20, x : x + 16] = c
    return torch.from_numpy(target)


def confident(target: torch.Tensor, classes: int = 3, margin: float = 12.0) -> torch.Tensor:
    return margin * F.one_hot(target, classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_every_term_is_small_when_right_larger_when_wrong_and_has_gradients(term: str) -> None:
    target = blobs()
    loss = SegmentationLoss({term: 1.0})
    right = confident(target).requires_grad_()
    wrong = confident((target + 1) % 3)
    value = loss(right, target)
    value.backward()
    assert right.grad is not None and torch.isfinite(right.grad).all()
    assert float(value) < 0.05
    assert float(loss(wrong, target)) > 0.5


def test_ce_dice_is_cross_entropy_plus_dice_and_ignores_255() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    loss = SegmentationLoss()
    plain = SegmentationLoss({"cross_entropy": 1.0})
    assert float(plain(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target)))
    assert float(loss(logits, target)) > float(plain(logits, target))
    ignored = target.clone()
    ignored[:, :4] = 255
    changed = logits.clone()
    changed[:, :, :4] = 100.0  # whatever the model says on unlabelled pixels does not matter
    for preset in LOSS_PRESETS:
        hybrid = SegmentationLoss(preset)
        assert float(hybrid(changed, ignored)) == pytest.approx(float(hybrid(logits, ignored)), abs=1e-5), preset
    assert float(loss(logits, torch.full_like(target, 255))) == 0.0


def test_class_weights_weigh_the_cross_entropy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))
    weights = [0.2, 1.0, 5.0]
    loss = SegmentationLoss({"cross_entropy": 1.0}, class_weights=weights)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights))
    assert float(loss(logits, target)) == pytest.approx(float(expected))


def test_boundary_weights_peak_in_the_gap_between_close_objects() -> None:
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 5:18] = 1
    labels[10:30, 20:33] = 1  # a 2 px gap at columns 18-19
    w = boundary_weights(labels, w0=10.0, sigma=5.0)
    # In the gap the nearest object is 1 px away and the second 2 px: 1 + 10 exp(-9 / 50).
    assert w[20, 18] == pytest.approx(1 + 10 * np.exp(-9 / 50), rel=1e-4)
    assert w[20, 18] > 9 and w[0, 0] < w[20, 18] / 3
    assert (boundary_weights(labels[:, :19]) == 1).all()  # one object: no separation term
    assert (boundary_weights(np.full((8, 8), 255, np.uint8)) == 1).all()


def test_boundary_cross_entropy_weighs_gap_pixels_most() -> None:
    target = torch.zeros(1, 40, 40, dtype=torch.long)
    target[0, 10:30, 5:18] = 1
    target[0, 10:30, 20:33] = 1
    logits = confident(target, classes=2)
    gap_wrong, far_wrong = logits.clone(), logits.clone()
    gap_wrong[0, :, 20, 18] = logits[0, :, 20, 18].flip(0)  # one wrong pixel in the gap ...
    far_wrong[0, :, 0, 0] = logits[0, :, 0, 0].flip(0)  # ... or one far from any object
    loss = SegmentationLoss("unet_boundary")
    assert float(loss(gap_wrong, target)) > 5 * float(loss(far_wrong, target))


def test_ms_ssim_term_ranks_right_below_wrong_on_small_and_odd_windows() -> None:
    loss = SegmentationLoss({"ms_ssim": 1.0})
    for size in (24, 64, 100, 128):
        target = blobs(1, size, seed=size)
        right, wrong = confident(target), confident((target + 1) % 3)
        assert float(loss(right, target)) < 0.05 < 0.5 < float(loss(wrong, target)), size


def test_boundary_weights_treat_touching_objects_of_two_classes_as_two() -> None:
    labels = np.zeros((30, 30), np.uint8)
    labels[5:25, 5:15] = 1
    labels[5:25, 15:25] = 2  # touching, another class
    assert boundary_weights(labels)[15, 14] > 5


def test_deep_supervision_loss_is_the_mask_mean_plus_label_bce() -> None:
    torch.manual_seed(0)
    masks = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    labels = torch.randn(2, 1)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[1, 2, 2] = 2  # image 0 is all background, image 1 holds foreground
    loss = SegmentationLoss(label_weight=0.5)
    expected = (loss(masks[0], target) + loss(masks[1], target)) / 2
    expected = expected + 0.5 * F.binary_cross_entropy_with_logits(labels[:, 0], torch.tensor([0.0, 1.0]))
    actual = loss(DeepSupervisionOutput(masks=masks, labels=labels), target)
    assert float(actual) == pytest.approx(float(expected))
    without_labels = loss(DeepSupervisionOutput(masks=masks, labels=None), target)
    mask_mean = (loss(masks[0], target) + loss(masks[1], target)) / 2
    assert float(without_labels) == pytest.approx(float(mask_mean))


@pytest.mark.parametrize("terms", ["hybrid", {"crossentropy": 1.0}, {"dice": -1.0}, {}, {"dice": 0.0}, {"dice": "a"}])
def test_unknown_or_negative_terms_are_refused(terms: object) -> None:
    with pytest.raises(ConfigError, match=r"expected|give non-negative"):
        SegmentationLoss(terms)  # type: ignore[arg-type]
