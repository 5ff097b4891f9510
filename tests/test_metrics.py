"""Specification of the evaluation statistics in training.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.metrics import (
    band_outcomes,
    binary_metrics,
    confusion_matrix,
    multiclass_accuracy,
    roc_auc,
    roc_curve,
    softmax_defect_score,
    threshold_for_recall,
    uncertainty_band,
)


def mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force over all (defect, good) pairs: 1 when the defect scores higher, 1/2 on a tie."""
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def noisy_scores(seed: int, n: int = 300, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.5, n) + 2.0 * labels - 1.0)))
    if decimals is not None:
        # Rounding creates many ties, including ties between a defect and a good part.
        scores = np.round(scores, decimals)
    return labels, scores


# softmax_defect_score


def test_softmax_score_is_the_defect_class_probability():
    logits = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, -1.0]])

    scores = softmax_defect_score(logits)

    expected = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_allclose(softmax_defect_score(logits, defect_index=0), 1.0 - expected, rtol=1e-12)


def test_softmax_score_does_not_overflow_on_huge_logits():
    logits = np.array([[1000.0, 1001.0], [-1000.0, 1000.0], [65504.0, 0.0]])

    scores = softmax_defect_score(logits)

    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, [1.0 / (1.0 + math.exp(-1.0)), 1.0, 0.0], atol=1e-12)


def test_softmax_score_rejects_wrong_shape_and_non_finite_logits():
    with pytest.raises(ValueError, match="shape"):
        softmax_defect_score(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        softmax_defect_score(np.array([[0.0, np.nan]]))


# binary_metrics


def test_confusion_counts_match_hand_computation():
    # Given 4 defects and 4 good parts; a score equal to the threshold counts as flagged.
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.4, 0.1, 0.7, 0.5, 0.2, 0.0])

    m = binary_metrics(labels, scores, threshold=0.5)

    # Flagged: 0.9 (defect), 0.5 (defect), 0.7 (good), 0.5 (good).
    assert (m.tp, m.fp, m.tn, m.fn) == (2, 2, 2, 2)
    assert (m.n, m.n_defect, m.threshold) == (8, 4, 0.5)
    assert m.accuracy == pytest.approx(4 / 8)
    assert m.recall == pytest.approx(2 / 4)
    assert m.precision == pytest.approx(2 / 4)
    assert m.f1 == pytest.approx(0.5)
    assert m.false_positive_rate == pytest.approx(2 / 4)
    assert m.specificity == pytest.approx(2 / 4)


def test_asymmetric_counts_give_the_textbook_rates():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.8, 0.6, 0.3, 0.9, 0.1, 0.1, 0.2, 0.2, 0.3, 0.4])

    m = binary_metrics(labels, scores, threshold=0.5)

    assert (m.tp, m.fp, m.tn, m.fn) == (2, 1, 6, 1)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.false_positive_rate == pytest.approx(1 / 7)
    assert m.specificity == pytest.approx(6 / 7)
    assert m.accuracy == pytest.approx(8 / 10)


def test_zero_divisions_are_reported_as_zero_not_nan():
    # Given only good parts and nothing flagged: recall, precision and F1 have empty denominators.
    only_good = binary_metrics(np.zeros(5, int), np.full(5, 0.1), threshold=0.5)
    # Given nothing at all.
    empty = binary_metrics(np.array([], int), np.array([]), threshold=0.5)
    # Given only defects, all flagged: the false-positive rate has an empty denominator.
    only_defects = binary_metrics(np.ones(3, int), np.full(3, 0.9), threshold=0.5)

    for m in (only_good, empty, only_defects):
        assert not any(isinstance(v, float) and math.isnan(v) for v in m.to_dict().values())
    assert (only_good.recall, only_good.precision, only_good.f1) == (0.0, 0.0, 0.0)
    assert only_good.specificity == 1.0
    assert (empty.accuracy, empty.recall, empty.false_positive_rate) == (0.0, 0.0, 0.0)
    assert only_defects.recall == 1.0
    assert (only_defects.false_positive_rate, only_defects.specificity) == (0.0, 0.0)


def test_metrics_dict_holds_plain_python_numbers():
    labels, scores = noisy_scores(0)

    d = binary_metrics(labels, scores, 0.5).to_dict()

    assert set(d) == {
        "n", "n_defect", "tp", "fp", "tn", "fn", "accuracy", "recall", "precision", "f1",
        "false_positive_rate", "specificity", "threshold",
    }  # fmt: skip
    assert all(type(v) in (int, float) for v in d.values())
    assert json.loads(json.dumps(d)) == d


def test_binary_metrics_rejects_labels_other_than_zero_and_one():
    with pytest.raises(ValueError, match="labels"):
        binary_metrics(np.array([0, 2]), np.array([0.1, 0.9]), 0.5)
    with pytest.raises(ValueError, match="same length"):
        binary_metrics(np.array([0, 1]), np.array([0.1]), 0.5)


# roc_curve and roc_auc


def test_perfect_classifier_has_auc_one_and_inverted_has_auc_zero():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])

    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, 1.0 - scores) == 0.0


def test_all_scores_tied_gives_the_diagonal_and_auc_one_half():
    labels = np.array([0, 1, 0, 1, 1])

    fpr, tpr, _ = roc_curve(labels, np.full(5, 0.4))

    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0])
    assert roc_auc(labels, np.full(5, 0.4)) == 0.5


def test_roc_curve_starts_at_origin_and_gives_a_tie_one_diagonal_point():
    # A defect and a good part tie at 0.5: one vertex, not a step, so the tie earns half credit.
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.5, 0.5, 0.2, 0.8])

    fpr, tpr, thresholds = roc_curve(labels, scores)

    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.5, 0.2])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    assert roc_auc(labels, scores) == pytest.approx(0.875)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_each_roc_point_is_the_recall_and_fpr_at_its_threshold(decimals):
    labels, scores = noisy_scores(1, decimals=decimals)

    fpr, tpr, thresholds = roc_curve(labels, scores)

    assert np.all(np.diff(thresholds) < 0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    for x, y, t in zip(fpr[1:], tpr[1:], thresholds[1:], strict=True):
        m = binary_metrics(labels, scores, t)
        assert (x, y) == (m.false_positive_rate, m.recall)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_auc_equals_mann_whitney_statistic_with_ties_counted_half(seed, decimals):
    labels, scores = noisy_scores(seed, decimals=decimals)

    assert roc_auc(labels, scores) == pytest.approx(mann_whitney_auc(labels, scores), abs=1e-12)


def test_roc_with_one_class_only_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"needs both classes.*only 'no_defect'"):
        roc_auc(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match=r"needs both classes.*only 'defect'"):
        roc_curve(np.ones(4, int), np.array([0.1, 0.2, 0.3, 0.4]))


# threshold_for_recall


def test_threshold_for_recall_hand_example():
    # Defect scores 0.9, 0.8, 0.6, 0.3: 75 % recall needs 3 flagged, so the 3rd highest, 0.6.
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.1])

    assert threshold_for_recall(labels, scores, 0.75) == 0.6
    assert threshold_for_recall(labels, scores, 0.76) == 0.3
    assert threshold_for_recall(labels, scores, 1.0) == 0.3
    assert threshold_for_recall(labels, scores, 0.25) == 0.9


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.9, 0.95, 0.99, 1.0])
def test_threshold_for_recall_meets_the_target_and_is_the_highest_that_does(seed, decimals, target):
    labels, scores = noisy_scores(seed, decimals=decimals)

    t = threshold_for_recall(labels, scores, target)

    assert t in scores
    assert binary_metrics(labels, scores, t).recall >= target
    higher = scores[scores > t]
    if higher.size:
        # The next observed score up (and so every higher threshold) misses the target.
        assert binary_metrics(labels, scores, higher.min()).recall < target


def test_threshold_for_recall_rejects_impossible_requests():
    with pytest.raises(ValueError, match="no defective parts"):
        threshold_for_recall(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        threshold_for_recall(np.array([0, 1]), np.array([0.1, 0.9]), 1.5)
    with pytest.raises(ValueError, match="target_recall"):
        threshold_for_recall(np.array([0, 1]), np.array([0.1, 0.9]), 0.0)


# uncertainty_band and band_outcomes


def test_band_hand_example_is_symmetric_and_stops_halfway_to_the_first_part_left_out():
    # Given 10 parts at distances 0.01, 0.02, ..., 0.10 from the threshold 0.5 and room for 20 % of them.
    scores = 0.5 + np.array([-0.01, 0.02, -0.03, 0.04, -0.05, 0.06, -0.07, 0.08, -0.09, 0.10])
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])

    low, high = uncertainty_band(labels, scores, 0.5, max_manual_fraction=0.2, min_width=0.0)

    # Two parts fit (0.01, 0.02); the third is at 0.03, so the half-width is 0.025.
    assert (low, high) == (pytest.approx(0.475), pytest.approx(0.525))


def test_band_takes_tied_parts_together_or_not_at_all():
    # Two parts tie at distance 0.125 (exact binary fractions, so the tie is exact): taking both would
    # exceed 1 part (10 % of 10), so neither is taken and the band stops halfway to them.
    scores = np.array([0.375, 0.625, 0.25, 0.125, 0.0, 0.75, 0.875, 1.0, 0.9375, 0.0625])
    labels = np.array([0, 1, 0, 0, 0, 1, 1, 1, 1, 0])

    low, high = uncertainty_band(labels, scores, 0.5, max_manual_fraction=0.1, min_width=0.0)

    assert (low, high) == (0.4375, 0.5625)
    assert band_outcomes(labels, scores, 0.5, low, high)["n_manual"] == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 3, 2])
@pytest.mark.parametrize("max_fraction", [0.0, 0.05, 0.1, 0.3])
def test_band_contains_threshold_and_respects_max_manual_fraction(seed, decimals, max_fraction):
    # Rounded scores put many parts at exactly equal distances on both sides of the threshold.
    labels, scores = noisy_scores(seed, n=500, decimals=decimals)
    threshold = threshold_for_recall(labels, scores, 0.9)

    low, high = uncertainty_band(labels, scores, threshold, max_manual_fraction=max_fraction, min_width=0.0)

    assert 0.0 <= low <= threshold <= high <= 1.0
    # The one allowed excess: parts scored exactly at the threshold are always inside the band.
    allowed = max(max_fraction, float(np.mean(scores == threshold)))
    assert band_outcomes(labels, scores, threshold, low, high)["manual_fraction"] <= allowed


@pytest.mark.parametrize("decimals", [None, 3])
def test_band_grows_until_the_next_part_would_exceed_the_budget(decimals):
    labels, scores = noisy_scores(3, n=500, decimals=decimals)
    threshold = 0.5

    low, high = uncertainty_band(labels, scores, threshold, max_manual_fraction=0.1, min_width=0.0)

    # Widening to the nearest part outside (and the parts tied with it) takes too many.
    distances = np.abs(scores - threshold)
    nearest_outside = distances[(scores < low) | (scores > high)].min()
    inside_if_wider = np.sum(distances <= nearest_outside + 1e-9)
    assert inside_if_wider / scores.size > 0.1


def test_band_is_at_least_min_width_even_when_scores_crowd_the_threshold():
    # Given 30 % of parts within 0.001 of the threshold and room for only 10 %.
    rng = np.random.default_rng(0)
    scores = np.r_[0.5 + rng.uniform(-0.001, 0.001, 30), rng.uniform(0.0, 0.2, 70)]
    labels = (scores > 0.5).astype(int)

    low, high = uncertainty_band(labels, scores, 0.5, max_manual_fraction=0.1, min_width=0.02)

    assert (low, high) == (pytest.approx(0.49), pytest.approx(0.51))


def test_band_is_clipped_to_the_unit_interval():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.0, 0.001, 0.002, 0.003])

    low, high = uncertainty_band(labels, scores, 0.002, max_manual_fraction=1.0, min_width=0.02)

    assert low == 0.0
    assert high == pytest.approx(0.012)


def test_band_outcomes_hand_example():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.45, 0.2, 0.55, 0.4, 0.1])

    out = band_outcomes(labels, scores, threshold=0.5, low=0.4, high=0.6)

    # Manual: 0.45 (defect missed at 0.5), 0.55 (false alarm), 0.4 (boundary is inside).
    # Auto: 0.9 defect caught, 0.2 defect missed, 0.1 good passed.
    assert (out["n_manual"], out["n_auto"]) == (3, 3)
    assert out["manual_fraction"] == pytest.approx(0.5)
    assert out["auto_accuracy"] == pytest.approx(2 / 3)
    assert out["auto_recall"] == pytest.approx(1 / 2)
    assert out["auto_false_positive_rate"] == 0.0
    assert (out["auto_missed_defects"], out["auto_false_alarms"]) == (1, 0)
    assert (out["errors_at_threshold"], out["errors_in_band"]) == (3, 2)
    assert (out["low"], out["high"], out["threshold"]) == (0.4, 0.6, 0.5)


def test_band_outcomes_with_everything_manual_reports_zeros_not_nan():
    out = band_outcomes(np.array([0, 1]), np.array([0.4, 0.6]), 0.5, 0.0, 1.0)

    assert out["manual_fraction"] == 1.0
    assert (out["auto_accuracy"], out["auto_recall"], out["auto_false_positive_rate"]) == (0.0, 0.0, 0.0)


def test_band_that_misses_the_threshold_is_rejected():
    with pytest.raises(ValueError, match="must contain threshold"):
        band_outcomes(np.array([0, 1]), np.array([0.4, 0.6]), 0.5, 0.55, 0.6)


# multiclass_accuracy and confusion_matrix


def test_four_class_confusion_and_accuracy_hand_example():
    true = np.array([0, 0, 1, 2, 3, 3, 3])
    pred = np.array([0, 1, 1, 2, 3, 2, 3])

    cm = confusion_matrix(true, pred, 4)

    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 2]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == true.size
    assert multiclass_accuracy(true, pred) == pytest.approx(5 / 7)
    assert multiclass_accuracy(np.array([], int), np.array([], int)) == 0.0


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="same length"):
        multiclass_accuracy(np.array([0, 1]), np.array([0]))
