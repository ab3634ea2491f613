"""Confusion matrix and IoU on hand-computed examples, plus their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.errors import ConfigError
from pipeline.training.metrics import (
    IGNORE_INDEX,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)


def test_confusion_matrix_by_hand() -> None:
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 255, 2]])
    # Counted pairs (truth, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); pred 255 and truth 255 are out.
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    cm = confusion_matrix(pred, truth, num_classes=3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, expected)


def test_custom_ignore_index() -> None:
    truth = np.array([0, 1, 9])
    pred = np.array([0, 1, 1])
    np.testing.assert_array_equal(
        confusion_matrix(pred, truth, num_classes=2, ignore_index=9), [[1, 0], [0, 1]]
    )


def test_iou_by_hand() -> None:
    cm = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 2 - 2); class 2: 1 / (1 + 2 - 1)
    np.testing.assert_allclose(iou_per_class(cm), [1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(cm) == pytest.approx(4 / 6)


def test_absent_class_has_nan_iou_and_is_left_out_of_the_mean() -> None:
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    cm = confusion_matrix(pred, truth, num_classes=4)
    iou = iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [2 / 3, 1 / 2])
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_class_predicted_but_absent_from_truth_scores_zero() -> None:
    cm = confusion_matrix(np.array([0, 2]), np.array([0, 0]), num_classes=3)
    iou = iou_per_class(cm)
    assert iou[0] == 0.5 and iou[2] == 0.0 and math.isnan(iou[1])


def test_nothing_counted_gives_nan() -> None:
    cm = confusion_matrix(np.array([1, 2]), np.array([IGNORE_INDEX, IGNORE_INDEX]), num_classes=3)
    assert cm.sum() == 0
    assert np.isnan(iou_per_class(cm)).all()
    assert math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_shape_mismatch_and_out_of_range_ids_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), num_classes=2)
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), num_classes=2)
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        confusion_matrix(np.zeros(2, int), np.zeros(2, int), num_classes=0)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    num_classes=st.integers(1, 6),
    size=st.integers(0, 60),
)
def test_matrix_counts_every_labelled_pixel_once(data: st.DataObject, num_classes: int, size: int) -> None:
    ids = st.one_of(st.integers(0, num_classes - 1), st.just(IGNORE_INDEX))
    truth = data.draw(arrays(np.uint8, size, elements=ids))
    pred = data.draw(arrays(np.uint8, size, elements=ids))
    cm = confusion_matrix(pred, truth, num_classes)
    counted = (truth != IGNORE_INDEX) & (pred != IGNORE_INDEX)
    assert cm.sum() == counted.sum()
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(truth[counted], minlength=num_classes))
    np.testing.assert_array_equal(cm.sum(axis=0), np.bincount(pred[counted], minlength=num_classes))
    iou = iou_per_class(cm)
    defined = iou[~np.isnan(iou)]
    assert ((defined >= 0) & (defined <= 1)).all()
    # A perfect prediction scores 1 for every class that occurs.
    perfect = iou_per_class(confusion_matrix(truth, truth, num_classes))
    present = np.bincount(truth[truth != IGNORE_INDEX], minlength=num_classes) > 0
    assert (perfect[present] == 1).all() and np.isnan(perfect[~present]).all()


def test_segmentation_metrics_agree_with_the_confusion_matrix_and_skip_absent_classes() -> None:
    from pipeline.training.metrics import SegmentationMetrics

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (2, 40, 40))  # class 3 of 4 never occurs
    pred = np.where(rng.random((2, 40, 40)) < 0.8, truth, rng.integers(0, 3, (2, 40, 40)))
    truth[0, :5] = 255  # unlabelled
    pred[1, :3] = 255  # no prediction (outside a mosaic)
    metrics = SegmentationMetrics(4)
    for p, t in zip(pred, truth, strict=True):  # two batches add up
        metrics.update(p, t)
    scores = metrics.compute()
    cm = confusion_matrix(pred, truth, 4)
    np.testing.assert_array_equal(scores["confusion"], cm)
    np.testing.assert_allclose(scores["iou"], iou_per_class(cm))
    assert np.isnan(scores["iou"][3]) and np.isnan(scores["dice"][3])
    assert scores["miou"] == pytest.approx(mean_iou(cm))
    tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
    np.testing.assert_allclose(scores["dice"][:3], (2 * tp / (2 * tp + fp + fn))[:3])
    with pytest.raises(ConfigError, match=r"outside 0\.\.3"):
        metrics.update(np.zeros((2, 2), int), np.full((2, 2), 7))
