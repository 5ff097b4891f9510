"""Evaluation statistics for the binary defect classifier: scores, confusion counts, ROC, operating points.

Pure numpy, no I/O. Class index 0 is "no_defect", 1 is "defect"; a part's score is the softmax probability
of the defect class, and a part is flagged as defective when its score is >= the threshold. Every ratio
whose denominator is zero is reported as 0.0 so that reports never carry NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def softmax_defect_score(logits: np.ndarray, defect_index: int = 1) -> np.ndarray:
    """Softmax probability of the defect class for each row of (N, C) logits, as float64 of shape (N,).

    The row maximum is subtracted before exponentiating so that large logits (FP16 engines saturate
    easily) cannot overflow.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, 2), got {logits.shape}")
    if not 0 <= defect_index < logits.shape[1]:
        raise ValueError(f"defect_index {defect_index} is out of range for {logits.shape[1]} classes")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinity: check the model output or the engine build")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp[:, defect_index] / exp.sum(axis=1)


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion counts and rates at one threshold; the positive class is "defect"."""

    n: int
    n_defect: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    recall: float  # defect detection rate: defective parts flagged / defective parts
    precision: float
    f1: float
    false_positive_rate: float  # good parts flagged / good parts
    specificity: float
    threshold: float

    def to_dict(self) -> dict[str, int | float]:
        """Plain-Python dict (ints and floats only), ready for json.dumps."""
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    # A rate over an empty group (no defects in the set, nothing flagged) is reported as 0.0, not NaN.
    return float(numerator) / float(denominator) if denominator else 0.0


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of the same length, got {labels.shape} and {scores.shape}"
        )
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (no_defect) or 1 (defect)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    return labels.astype(np.int64), scores


def _require_both_classes(labels: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "defect" if n_pos else "no_defect"
        raise ValueError(
            f"{what} needs both classes, but only '{present}' parts are present ({labels.size} parts): "
            "evaluate on a split that contains defective and good parts"
        )
    return n_pos, n_neg


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> BinaryMetrics:
    """Confusion counts and rates when parts with score >= threshold are flagged as defective."""
    labels, scores = _check_binary(labels, scores)
    flagged = scores >= threshold
    is_defect = labels == 1
    tp = int(np.sum(flagged & is_defect))
    fp = int(np.sum(flagged & ~is_defect))
    tn = int(np.sum(~flagged & ~is_defect))
    fn = int(np.sum(~flagged & is_defect))
    n = int(labels.size)
    recall = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return BinaryMetrics(
        n=n,
        n_defect=tp + fn,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_ratio(tp + tn, n),
        recall=recall,
        precision=precision,
        f1=_ratio(2.0 * precision * recall, precision + recall),
        false_positive_rate=_ratio(fp, fp + tn),
        specificity=_ratio(tn, tn + fp),
        threshold=float(threshold),
    )


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve: (fpr, tpr, thresholds), one point per distinct score, starting at (0, 0).

    thresholds[i] is the score at which point i is reached (parts with score >= thresholds[i] flagged);
    thresholds[0] is +inf (nothing flagged) and thresholds decrease strictly. Tied scores form a single
    point, so a tie between a defect and a good part is a diagonal segment, never an optimistic step.
    No collinear points are dropped.
    """
    labels, scores = _check_binary(labels, scores)
    n_pos, n_neg = _require_both_classes(labels, "ROC curve")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # The last index of each run of equal scores is where the curve gets a vertex.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return fpr, tpr, thresholds


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the exact ROC curve by the trapezoid rule.

    Equals the Mann-Whitney U statistic / (n_defect * n_no_defect): the probability that a random defective
    part scores higher than a random good part, with ties counted as 1/2.
    """
    fpr, tpr = roc_curve(labels, scores)[:2]
    # Written out rather than np.trapezoid, which numpy < 2.0 (still allowed by pyproject) lacks.
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def threshold_for_recall(labels: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """Highest threshold whose defect recall on these data is >= target_recall.

    The highest such threshold flags the fewest good parts while meeting the recall target. It is always
    one of the defect scores: the k-th highest, where k is the fewest defects that must be flagged. Recall
    is computed as k / n_defect exactly as binary_metrics does, so the returned threshold passes the same
    check in binary_metrics.
    """
    labels, scores = _check_binary(labels, scores)
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    defect_scores = np.sort(scores[labels == 1])[::-1]
    n_defect = defect_scores.size
    if n_defect == 0:
        raise ValueError(
            f"cannot choose a threshold for recall {target_recall}: no defective parts among "
            f"{labels.size} validation parts"
        )
    recall_if_k_flagged = np.arange(1, n_defect + 1) / n_defect
    k = int(np.argmax(recall_if_k_flagged >= target_recall))  # first True; the last entry is 1.0 >= target
    return float(defect_scores[k])


# Distances from the threshold closer than this are one tie: far below any real score difference (float32
# scores near 0.5 are 6e-8 apart), far above float64 rounding (1e-16), so band edges never split a tie.
_DISTANCE_TIE = 1e-9


def uncertainty_band(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    max_manual_fraction: float = 0.1,
    min_width: float = 0.02,
) -> tuple[float, float]:
    """Score band [low, high] around the threshold whose parts go to a human inspector.

    Rule: misclassifications concentrate where scores are close to the threshold, so the band is
    symmetric in score, [threshold - w, threshold + w]. Parts are taken greedily nearest first by
    |score - threshold|, and w grows while the fraction of these validation parts inside the band stays
    <= max_manual_fraction. Parts tied in distance (within 1e-9) are taken together or not at all. The
    band edge is placed halfway between the last part taken and the first part left out, so that it does
    not sit on a validation score. Parts scored exactly at the threshold are always inside, even when
    they alone exceed max_manual_fraction.

    w is then raised to at least min_width / 2: scores of the FP32, FP16 and INT8 engines differ
    slightly, and a part that close to the threshold should not get opposite verdicts from two
    engines. This floor wins over max_manual_fraction when validation scores are dense at the threshold;
    band_outcomes reports the resulting manual fraction. Finally the band is clipped to [0, 1].

    The labels are checked but deliberately not used to place the band, which would chase individual
    validation errors and not carry over to production.
    """
    labels, scores = _check_binary(labels, scores)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= max_manual_fraction <= 1.0:
        raise ValueError(f"max_manual_fraction must be in [0, 1], got {max_manual_fraction}")
    if min_width < 0.0:
        raise ValueError(f"min_width must be >= 0, got {min_width}")

    half_width = 0.0
    if scores.size:
        distances = np.sort(np.abs(scores - threshold))
        # Groups of parts tied in distance; float rounding makes equal distances on the two sides of the
        # threshold differ in the last bits, so "tied" means within _DISTANCE_TIE.
        group_start = np.flatnonzero(np.r_[True, np.diff(distances) > _DISTANCE_TIE])
        parts_inside = np.r_[group_start[1:], distances.size]  # parts in the band if groups 0..i are taken
        max_parts = int(np.floor(max_manual_fraction * scores.size + 1e-9))
        n_taken = int(np.searchsorted(parts_inside, max_parts, side="right"))
        if n_taken == group_start.size:
            half_width = float(distances[-1])
        else:
            last_in = float(distances[parts_inside[n_taken - 1] - 1]) if n_taken else 0.0
            half_width = (last_in + float(distances[group_start[n_taken]])) / 2.0
    half_width = max(half_width, min_width / 2.0)
    return max(0.0, threshold - half_width), min(1.0, threshold + half_width)


def choose_operating_point(
    labels: np.ndarray, scores: np.ndarray, target_recall: float, max_manual_fraction: float
) -> tuple[float, float, float]:
    """(threshold, band_low, band_high) chosen on these (validation) scores.

    The one rule for every operating point the project writes: the threshold for `target_recall`, then
    the uncertainty band around it. Training applies it to the PyTorch model's scores, export to each
    precision's ONNX scores, so an INT8 engine gets a threshold that fits INT8 scores.
    """
    threshold = threshold_for_recall(labels, scores, target_recall)
    low, high = uncertainty_band(labels, scores, threshold, max_manual_fraction)
    return threshold, low, high


def band_outcomes(
    labels: np.ndarray, scores: np.ndarray, threshold: float, low: float, high: float
) -> dict[str, float | int]:
    """What the band does on these data: the share sent to a human and the quality of the automatic rest.

    Parts with low <= score <= high go to a human; the rest are decided at the threshold. The auto_* rates
    are over the automatically decided parts only. errors_in_band is the number of parts the threshold
    alone would have misclassified that the band sends to a human instead.
    """
    labels, scores = _check_binary(labels, scores)
    if not low <= threshold <= high:
        raise ValueError(f"uncertainty band [{low}, {high}] must contain threshold {threshold}")
    manual = (scores >= low) & (scores <= high)
    auto = binary_metrics(labels[~manual], scores[~manual], threshold)
    wrong_at_threshold = (scores >= threshold) != (labels == 1)
    n_errors = int(np.sum(wrong_at_threshold))
    errors_in_band = int(np.sum(wrong_at_threshold & manual))
    return {
        "low": float(low),
        "high": float(high),
        "threshold": float(threshold),
        "n": int(labels.size),
        "n_manual": int(np.sum(manual)),
        "manual_fraction": _ratio(np.sum(manual), labels.size),
        "n_auto": auto.n,
        "auto_accuracy": auto.accuracy,
        "auto_recall": auto.recall,
        "auto_false_positive_rate": auto.false_positive_rate,
        "auto_missed_defects": auto.fn,
        "auto_false_alarms": auto.fp,
        "errors_at_threshold": n_errors,
        "errors_in_band": errors_in_band,
    }


def multiclass_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of predictions equal to the true class; 0.0 for empty input."""
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"true and pred must be 1-D of the same length, got {true.shape} and {pred.shape}")
    return _ratio(np.sum(true == pred), true.size)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; rows are the true class, columns the predicted class."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"true and pred must be 1-D of the same length, got {true.shape} and {pred.shape}")
    for name, values in (("true", true), ("pred", pred)):
        if values.size and (
            not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= n_classes
        ):
            raise ValueError(f"{name} must hold integer class indices in [0, {n_classes - 1}]")
    flat = true.astype(np.int64) * n_classes + pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


@dataclass(frozen=True)
class McNemarResult:
    """Two classifiers' decisions on the same parts: the discordant pairs and McNemar's exact p-value.

    `only_a_right` (b) counts parts model A decided correctly and model B did not, `only_b_right` (c) the
    reverse; parts both got right or both got wrong say nothing about which model is better.
    """

    n: int
    both_right: int
    only_a_right: int
    only_b_right: int
    both_wrong: int
    p_value: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs.

    Under the null hypothesis (both models are equally often right) each of the n = b + c discordant pairs
    goes either way with probability 1/2, so min(b, c) is binomial(n, 1/2), and
        p = min(1, 2 * sum_{k=0}^{min(b,c)} C(n, k) / 2**n),
    1.0 when n = 0. Exact integer arithmetic (math.comb), one rounding at the end: no overflow or
    underflow for any n.

    McNemar, Q. (1947). Note on the sampling error of the difference between correlated proportions or
    percentages. Psychometrika 12(2), 153-157 (the test); the exact conditional (binomial) form as in
    Fagerland, M. W., Lydersen, S. & Laake, P. (2013). The McNemar test for binary matched-pairs data:
    mid-p and asymptotic are better than exact conditional. BMC Medical Research Methodology 13, 91;
    its use for two classifiers on one test set: Dietterich, T. G. (1998). Approximate statistical
    tests for comparing supervised classification learning algorithms. Neural Computation 10(7), 1895-1923.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, (2 * tail) / (1 << n))


def mcnemar_paired(labels: np.ndarray, decisions_a: np.ndarray, decisions_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test on two models' pass/fail decisions (1 = flagged defective) for the same parts."""
    labels = np.asarray(labels)
    a, b = np.asarray(decisions_a).astype(bool), np.asarray(decisions_b).astype(bool)
    if not (labels.shape == a.shape == b.shape) or labels.ndim != 1:
        raise ValueError(f"labels and decisions must be 1-D of the same length, got {labels.shape}, {a.shape}, "
                         f"{b.shape}")
    truth = labels == 1
    right_a, right_b = a == truth, b == truth
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    return McNemarResult(
        n=int(labels.size), both_right=int(np.sum(right_a & right_b)), only_a_right=only_a, only_b_right=only_b,
        both_wrong=int(np.sum(~right_a & ~right_b)), p_value=mcnemar_exact_p(only_a, only_b),
    )
