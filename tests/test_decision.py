"""Decisions are pure: score, operating point and mode in, verdict out."""

from __future__ import annotations

import numpy as np
import pytest

from bundle.decision import Mode, OperatingPoint, Verdict, decide, decide_part, defect_score

OP = OperatingPoint(threshold=0.5, band_low=0.4, band_high=0.6)


@pytest.mark.parametrize(
    ("score", "verdict"),
    [(0.0, Verdict.PASS), (0.39, Verdict.PASS), (0.4, Verdict.MANUAL), (0.5, Verdict.MANUAL),
     (0.6, Verdict.MANUAL), (0.61, Verdict.FAIL), (1.0, Verdict.FAIL), (float("nan"), Verdict.ERROR),
     (1.5, Verdict.ERROR)],
)
def test_verdict_by_score(score: float, verdict: Verdict):
    assert decide(score, OP) is verdict


@pytest.mark.parametrize("op", [OP, OperatingPoint(0.5, 0.4, 0.5), OperatingPoint(0.5, 0.5, 0.6)])
def test_a_score_equal_to_the_threshold_is_inside_the_band_so_a_human_decides(op: OperatingPoint):
    # The band always contains the threshold (the operating point refuses otherwise) and is checked first.
    assert decide(op.threshold, op) is Verdict.MANUAL


def test_zero_width_band_sends_only_the_threshold_score_to_a_human_fails_above_and_passes_below():
    op = OperatingPoint(0.3, 0.3, 0.3)
    assert decide(0.3, op) is Verdict.MANUAL
    assert decide(np.nextafter(0.3, 1.0), op) is Verdict.FAIL
    assert decide(np.nextafter(0.3, 0.0), op) is Verdict.PASS


def test_just_above_the_band_fails_and_just_below_it_passes():
    assert decide(np.nextafter(OP.band_high, 1.0), OP) is Verdict.FAIL
    assert decide(np.nextafter(OP.band_low, 0.0), OP) is Verdict.PASS


def test_operating_point_must_be_ordered():
    with pytest.raises(ValueError, match="band_low <= threshold"):
        OperatingPoint(0.5, 0.6, 0.7)


def test_defect_score_is_the_softmax_of_the_defect_logit():
    assert defect_score(np.array([[0.0, 0.0]])) == pytest.approx(0.5)
    assert defect_score(np.array([0.0, np.log(3.0)])) == pytest.approx(0.75)
    assert defect_score(np.array([1000.0, 0.0])) == pytest.approx(0.0)  # no overflow
    assert np.isnan(defect_score(np.array([np.nan, 0.0])))


def test_production_acts_on_the_ai_verdict():
    d = decide_part(0.9, OP, Mode.PRODUCTION)
    assert (d.verdict, d.ai_verdict) == (Verdict.FAIL, Verdict.FAIL)
    assert decide_part(0.45, OP, Mode.PRODUCTION).reason.endswith("inside the uncertainty band")


def test_shadow_records_the_ai_but_a_human_decides():
    d = decide_part(0.05, OP, Mode.SHADOW)
    assert (d.verdict, d.ai_verdict) == (Verdict.MANUAL, Verdict.PASS)


def test_no_model_means_manual_with_the_reason():
    d = decide_part(None, OP, Mode.PRODUCTION, why_no_model="GPU unavailable: CUDA error 999")
    assert (d.verdict, d.ai_verdict, d.reason) == (Verdict.MANUAL, None, "GPU unavailable: CUDA error 999")


def test_garbage_model_output_is_an_error_not_a_pass():
    assert decide_part(float("nan"), OP, Mode.PRODUCTION).verdict is Verdict.ERROR
