"""What inspectors' labels say about the model (appliance/review/stats.py, issue #14 parts 5 and 6).

A person's label is the truth and a defect (`fail`) is the positive class: the detection rate is TP / human
fail, the false-positive rate FP / human pass. Every rate carries a Wilson score interval, and promotion is
judged at the interval's pessimistic end.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from appliance.review.stats import (
    LabelledPart,
    PromotionCriteria,
    Rate,
    judge_promotion,
    label_stats,
    rolling,
    stats_by_period,
    wilson_interval,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc).timestamp()


_IDS = itertools.count(1)


def part(ai: str | None, human: str, *, at: float = T0, mode: str = "production", model: str = "m-1",
         inspection_id: str | None = None) -> LabelledPart:
    """One labelled part (a fresh inspection id unless given)."""
    return LabelledPart(inspection_id=inspection_id or f"i-{next(_IDS)}", labelled_at=at,
                        ai_verdict=ai, human_verdict=human, mode=mode, model_id=model)  # type: ignore[arg-type]


def matrix(tp: int = 0, fn: int = 0, fp: int = 0, tn: int = 0, *, at: float = T0, mode: str = "production",
           step: float = 1.0) -> list[LabelledPart]:
    """Labelled parts making up a confusion matrix, labelled `step` seconds apart from `at`."""
    cells = [("fail", "fail")] * tp + [("pass", "fail")] * fn + [("fail", "pass")] * fp + [("pass", "pass")] * tn
    return [part(ai, human, at=at + i * step, mode=mode) for i, (ai, human) in enumerate(cells)]


# ---------------------------------------------------------------------------------------------------------
# The Wilson interval

# R. G. Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven methods",
# Statistics in Medicine 17 (1998) 857-872, Table I, method 3 (score method without continuity correction),
# 95 per cent, four decimals. 0/10 and 10/10 are not in that table: see the derivation test below.
NEWCOMBE_1998_TABLE_I_METHOD_3 = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0000),
]


@pytest.mark.parametrize("successes, n, low, high", NEWCOMBE_1998_TABLE_I_METHOD_3)
def test_wilson_matches_newcombe_1998_table_i(successes: int, n: int, low: float, high: float) -> None:
    got_low, got_high = wilson_interval(successes, n)
    assert round(got_low, 4) == pytest.approx(low, abs=1e-9)
    assert round(got_high, 4) == pytest.approx(high, abs=1e-9)


def _score_test_limits(successes: int, n: int, z: float) -> tuple[float, float]:
    """The interval found another way: the proportions p at which the score statistic
    |p_hat - p| / sqrt(p (1 - p) / n) equals z, each found by bisection (no closed form)."""
    p_hat = successes / n

    def excess(p: float) -> float:
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

    def root(inside: float, outside: float) -> float:  # excess(inside) < 0 <= excess(outside)
        for _ in range(200):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if excess(mid) < 0 else (inside, mid)
        return (inside + outside) / 2

    low = 0.0 if successes == 0 else root(p_hat, 0.0)
    high = 1.0 if successes == n else root(p_hat, 1.0)
    return low, high


@pytest.mark.parametrize("successes, n", [(0, 10), (10, 10), (1, 10), (5, 10), (81, 263), (0, 1), (1, 1), (3, 1000)])
def test_wilson_is_the_inversion_of_the_score_test(successes: int, n: int) -> None:
    z95 = 1.959963984540054  # the 0.975 standard normal quantile, as tabulated
    low, high = _score_test_limits(successes, n, z95)
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-9)


def test_wilson_at_zero_and_all_has_closed_forms() -> None:
    """At 0/n the upper limit solves p_hat = 0 in the score equation: z^2 / (n + z^2); at n/n the lower
    limit is n / (n + z^2). For n = 10: [0, 0.2775] and [0.7225, 1]."""
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert [round(x, 4) for x in wilson_interval(0, 10)] == [0.0, 0.2775]
    assert [round(x, 4) for x in wilson_interval(10, 10)] == [0.7225, 1.0]
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_wilson_with_no_trials_says_nothing() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_narrows_with_lower_confidence_and_more_trials() -> None:
    low95, high95 = wilson_interval(81, 263)
    low90, high90 = wilson_interval(81, 263, confidence=0.90)
    assert low95 < low90 < 81 / 263 < high90 < high95
    assert wilson_interval(810, 2630)[1] - wilson_interval(810, 2630)[0] < high95 - low95


@pytest.mark.parametrize("args, named", [
    ((-1, 10), "-1"),
    ((11, 10), "11"),
    ((1, -5), "-5"),
    ((1.5, 10), "1.5"),
    ((True, 10), "True"),
    ((1, 10, 1.0), "1.0"),
    ((1, 10, 0.0), "0.0"),
    ((1, 10, float("nan")), "nan"),
    ((1, 10, 95), "95"),
])
def test_wilson_refuses_what_is_not_a_count_or_a_confidence(args: tuple, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        wilson_interval(*args)


# ---------------------------------------------------------------------------------------------------------
# What the labels add up to


def test_a_known_confusion_matrix_gives_hand_computed_rates() -> None:
    """45 defects caught, 5 missed, 10 good parts failed, 140 passed:
    detection 45/50 = 0.9, false positives 10/150 = 0.0667, agreement 185/200 = 0.925."""
    stats = label_stats(matrix(tp=45, fn=5, fp=10, tn=140))

    assert (stats.confusion.tp, stats.confusion.fn, stats.confusion.fp, stats.confusion.tn) == (45, 5, 10, 140)
    assert stats.labelled == stats.with_ai_verdict == 200 and stats.without_ai_verdict == 0
    assert stats.detection_rate is not None and stats.false_positive_rate is not None and stats.agreement
    assert (stats.detection_rate.successes, stats.detection_rate.n) == (45, 50)
    assert stats.detection_rate.value == 0.9
    assert stats.false_positive_rate.value == pytest.approx(10 / 150)
    assert stats.agreement.value == 0.925
    assert (stats.detection_rate.low, stats.detection_rate.high) == wilson_interval(45, 50)
    assert (stats.false_positive_rate.low, stats.false_positive_rate.high) == wilson_interval(10, 150)
    assert (stats.agreement.low, stats.agreement.high) == wilson_interval(185, 200)


def test_a_model_that_fails_everything_detects_all_and_rejects_all() -> None:
    stats = label_stats(matrix(tp=3, fp=7))
    assert stats.detection_rate is not None and stats.detection_rate.value == 1.0
    assert stats.false_positive_rate is not None and stats.false_positive_rate.value == 1.0
    assert stats.agreement is not None and stats.agreement.value == 0.3


def test_a_rate_with_no_denominator_is_none() -> None:
    """Only good parts labelled: nothing to say about detection; only defects: nothing about false positives."""
    only_good = label_stats(matrix(tn=20, fp=1))
    assert only_good.detection_rate is None and only_good.false_positive_rate is not None
    only_defects = label_stats(matrix(tp=4, fn=1))
    assert only_defects.false_positive_rate is None and only_defects.detection_rate is not None
    assert Rate.of(0, 0) is None
    with pytest.raises(ValueError, match="denominator"):
        Rate(0, 0, 0.95)


def test_parts_without_an_ai_verdict_are_counted_but_not_rated() -> None:
    """manual_required with no model running: the person decided alone; nothing to compare."""
    parts = matrix(tp=8, fn=2, tn=10) + [part(None, "fail", mode="manual_fallback") for _ in range(5)]
    stats = label_stats(parts)
    assert stats.labelled == 25 and stats.with_ai_verdict == 20 and stats.without_ai_verdict == 5
    assert stats.confusion.total == 20
    assert stats.detection_rate is not None and (stats.detection_rate.successes, stats.detection_rate.n) == (8, 10)
    assert stats.agreement is not None and stats.agreement.n == 20
    assert stats.modes == {"production": 20, "manual_fallback": 5}


def test_shadow_agreement_is_over_the_shadow_parts_only() -> None:
    """In production the model agreed 9 times of 10; in shadow 6 of 8 (the person decided each part, the AI
    verdict recorded beside it)."""
    production = matrix(tp=4, tn=5, fp=1, mode="production")
    shadow = matrix(tp=3, tn=3, fn=1, fp=1, mode="shadow")
    stats = label_stats(production + shadow + [part(None, "pass", mode="shadow")])
    assert stats.agreement is not None and (stats.agreement.successes, stats.agreement.n) == (15, 18)
    assert stats.shadow_labelled == 8
    assert stats.shadow_agreement is not None
    assert (stats.shadow_agreement.successes, stats.shadow_agreement.n) == (6, 8)
    assert stats.shadow_agreement.value == 0.75
    assert label_stats(production).shadow_agreement is None


def test_a_relabelled_part_counts_once_with_its_latest_label() -> None:
    first = part("fail", "pass", at=T0, inspection_id="i-relabel")
    corrected = part("fail", "fail", at=T0 + 60, inspection_id="i-relabel")
    for order in ([first, corrected], [corrected, first]):
        stats = label_stats(order)
        assert stats.labelled == 1 and (stats.confusion.tp, stats.confusion.fp) == (1, 0)


def test_no_labels_give_counts_of_zero_and_no_rates() -> None:
    stats = label_stats([])
    assert stats.labelled == stats.with_ai_verdict == stats.without_ai_verdict == stats.shadow_labelled == 0
    assert stats.detection_rate is stats.false_positive_rate is stats.agreement is stats.shadow_agreement is None
    assert stats.first_labelled_at is None and stats.last_labelled_at is None
    assert json.loads(json.dumps(stats.as_dict(), allow_nan=False))["detection_rate"] is None
    assert stats_by_period([]) == [] and stats_by_period([], period="shift", shifts=(6, 14, 22)) == []
    assert rolling([], last_n=50).labelled == 0


def test_as_dict_is_json_ready_with_rounded_floats() -> None:
    stats = label_stats([*matrix(tp=45, fn=5, fp=10, tn=140), part(None, "pass")])
    data = json.loads(json.dumps(stats.as_dict(), allow_nan=False))
    assert data["confusion"] == {"tp": 45, "fn": 5, "fp": 10, "tn": 140}
    assert data["labelled"] == 201 and data["without_ai_verdict"] == 1
    assert data["false_positive_rate"]["value"] == 0.0667
    assert data["false_positive_rate"]["successes"] == 10 and data["false_positive_rate"]["n"] == 150
    low, high = wilson_interval(45, 50)
    assert data["detection_rate"] == {"value": 0.9, "low": round(low, 4), "high": round(high, 4),
                                      "successes": 45, "n": 50}
    assert data["shadow_agreement"] is None
    assert data["models"] == {"m-1": 201} and data["confidence"] == 0.95


@pytest.mark.parametrize("field, value", [("human_verdict", "maybe"), ("ai_verdict", "manual_required"),
                                          ("ai_verdict", "error"), ("labelled_at", float("nan"))])
def test_a_label_that_is_not_a_verdict_is_refused(field: str, value: object) -> None:
    fields = {"inspection_id": "i-x", "labelled_at": T0, "ai_verdict": "pass", "human_verdict": "pass",
              "mode": "production", "model_id": "m-1", field: value}
    with pytest.raises(ValueError, match=str(value)):
        LabelledPart(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# By day, by shift, over the latest labels


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def test_days_are_utc_days() -> None:
    parts = [part("pass", "pass", at=_utc(2024, 3, 1, 23, 59, 59)),
             part("fail", "fail", at=_utc(2024, 3, 2, 0, 0, 0)),
             part("pass", "fail", at=_utc(2024, 3, 2, 18, 0, 0))]
    days = stats_by_period(parts, period="day")
    assert [d.label for d in days] == ["2024-03-01", "2024-03-02"]
    assert [d.stats.labelled for d in days] == [1, 2]
    assert days[1].start == _utc(2024, 3, 2) and days[1].end == _utc(2024, 3, 3) and days[1].shift is None
    assert days[1].stats.detection_rate is not None and days[1].stats.detection_rate.value == 0.5
    assert json.loads(json.dumps(days[1].as_dict(), allow_nan=False))["label"] == "2024-03-02"


@pytest.mark.parametrize("tz", ["Europe/Berlin", 1, timedelta(hours=1), timezone(timedelta(hours=1))])
def test_a_shift_crossing_midnight_belongs_to_the_day_it_started(tz: object) -> None:
    """Shifts at 06:00, 14:00 and 22:00 Berlin time (UTC+1 in winter): 22:30 on 1 March and 03:00 on
    2 March are the same night shift, the 1 March 22:00 one; 06:00 on 2 March starts the next."""
    berlin = ZoneInfo("Europe/Berlin")

    def local(*args: int) -> float:
        return datetime(*args, tzinfo=berlin).timestamp()

    parts = [part("fail", "fail", at=local(2024, 3, 1, 13, 59)),
             part("fail", "fail", at=local(2024, 3, 1, 22, 30)),
             part("pass", "pass", at=local(2024, 3, 2, 3, 0)),
             part("pass", "fail", at=local(2024, 3, 2, 5, 59, 59)),
             part("pass", "pass", at=local(2024, 3, 2, 6, 0))]
    shifts = stats_by_period(parts, period="shift", shifts=(22, 6, 14), tz=tz)  # any order
    assert [(s.label, s.shift, s.stats.labelled) for s in shifts] == [
        ("2024-03-01 06:00", 0, 1), ("2024-03-01 22:00", 2, 3), ("2024-03-02 06:00", 0, 1)]
    night = shifts[1]
    assert night.start == local(2024, 3, 1, 22) and night.end == local(2024, 3, 2, 6)
    assert night.stats.confusion.tp == 1 and night.stats.confusion.fn == 1 and night.stats.confusion.tn == 1


def test_a_night_shift_over_the_spring_clock_change_is_an_hour_shorter() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    at = datetime(2024, 3, 31, 1, 30, tzinfo=berlin).timestamp()  # clocks jump 02:00 -> 03:00 that night
    (night,) = stats_by_period([part("pass", "pass", at=at)], period="shift", shifts=(6, 14, 22),
                               tz="Europe/Berlin")
    assert night.label == "2024-03-30 22:00" and night.end - night.start == 7 * 3600


def test_shifts_in_utc_without_a_time_zone() -> None:
    parts = [part("pass", "pass", at=_utc(2024, 3, 2, 1, 0))]
    (night,) = stats_by_period(parts, period="shift", shifts=(6, 18))
    assert night.label == "2024-03-01 18:00" and night.start == _utc(2024, 3, 1, 18)


@pytest.mark.parametrize("kwargs, named", [
    ({"period": "week"}, "week"),
    ({"period": "shift"}, "shift start hours"),
    ({"period": "shift", "shifts": (6, 24)}, "24"),
    ({"period": "shift", "shifts": (6, 6)}, "differ"),
    ({"period": "shift", "shifts": (6,), "tz": "Mars/Olympus_Mons"}, "Mars/Olympus_Mons"),
    ({"period": "day", "tz": "Europe/Berlin"}, "UTC day"),
])
def test_periods_refuse_what_they_cannot_group_by(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        stats_by_period(matrix(tn=1), **kwargs)


def test_rolling_takes_the_most_recent_labels_whatever_the_order_given() -> None:
    """40 old labels where the model missed every defect, then 10 recent ones where it caught them all."""
    old = matrix(fn=40, at=T0)
    recent = matrix(tp=10, at=T0 + 3600)
    stats = rolling(recent + old, last_n=10)
    assert stats.labelled == 10 and stats.detection_rate is not None and stats.detection_rate.value == 1.0
    assert stats.first_labelled_at == T0 + 3600
    assert rolling(old + recent, last_n=1000).labelled == 50
    with pytest.raises(ValueError, match="0"):
        rolling(old, last_n=0)


# ---------------------------------------------------------------------------------------------------------
# Promotion: judged at the pessimistic end


CRITERIA = PromotionCriteria(min_labelled=200, min_detection_rate=0.90, max_false_positive_rate=0.05)


def test_promotion_is_met_only_once_enough_labels_arrive() -> None:
    """The same model, labelled in two batches: 50 defects caught of 50 and 50 good parts passed is not
    enough (100 of 200 labels; 0/50 false positives still allows an upper bound of 0.071); with 300 more
    (100 defects caught of 100 in all, 1 false positive of 300 good parts) it is."""
    first = matrix(tp=50, tn=50, at=T0)
    verdict = judge_promotion(label_stats(first), CRITERIA)
    assert not verdict.met and not verdict.labelled.met
    assert verdict.more_labels_needed == 100
    assert verdict.labelled.reason == ("labelled 100 of 200 required: not met, 100 more labelled parts with an "
                                       "AI verdict needed")
    assert verdict.detection_rate.met  # 50/50: lower bound 0.929
    assert not verdict.false_positive_rate.met  # 0/50: upper bound 0.071 > 0.05

    later = matrix(tp=50, fp=1, tn=249, at=T0 + 86400)
    verdict = judge_promotion(label_stats(first + later), CRITERIA)
    assert verdict.met and verdict.more_labels_needed == 0
    assert verdict.labelled.reason == "labelled 400 >= 200 required: met"
    assert verdict.detection_rate.bound == pytest.approx(wilson_interval(100, 100)[0])
    assert verdict.false_positive_rate.bound == pytest.approx(wilson_interval(1, 300)[1])
    assert verdict.reason.startswith("promotion criteria met\n")


def test_the_pessimistic_end_decides_not_the_point_estimate() -> None:
    """48 of 50 defects caught is a detection rate of 0.96, above 0.90, but its lower bound is 0.865:
    not yet evidence of 0.90. 96 of 100 (the same 0.96) has a lower bound of 0.902: met."""
    good = matrix(tn=400)
    verdict = judge_promotion(label_stats(matrix(tp=48, fn=2) + good), CRITERIA)
    assert verdict.labelled.met and verdict.false_positive_rate.met
    assert verdict.detection_rate.measured == 0.96 and verdict.detection_rate.measured > 0.90
    assert verdict.detection_rate.bound == pytest.approx(0.8654, abs=1e-4)
    assert not verdict.detection_rate.met and not verdict.met
    assert verdict.detection_rate.reason == ("detection rate 0.96 [0.865, 0.989]: lower bound 0.865 < 0.90 "
                                             "required: not met (48 of 50 defects caught)")

    verdict = judge_promotion(label_stats(matrix(tp=96, fn=4) + good), CRITERIA)
    assert verdict.detection_rate.measured == 0.96 and verdict.met


def test_a_false_positive_rate_below_the_limit_with_an_upper_bound_above_it_is_not_met() -> None:
    """2 of 100 good parts failed is 0.02, within 0.05, but the upper bound is 0.070."""
    verdict = judge_promotion(label_stats(matrix(tp=300, fp=2, tn=98)), CRITERIA)
    assert verdict.false_positive_rate.measured == 0.02
    assert verdict.false_positive_rate.interval == pytest.approx(wilson_interval(2, 100))
    assert not verdict.false_positive_rate.met and not verdict.met
    assert verdict.false_positive_rate.reason.startswith(
        "false-positive rate 0.02 [0.006, 0.07]: upper bound 0.07 > 0.05 allowed: not met")


def test_the_reason_reads_as_the_rule() -> None:
    verdict = judge_promotion(label_stats(matrix(tp=100, fn=4, tn=300)), CRITERIA)
    assert verdict.detection_rate.reason == ("detection rate 0.962 [0.905, 0.985]: lower bound 0.905 >= 0.90 "
                                             "required: met (100 of 104 defects caught)")
    assert verdict.false_positive_rate.reason == ("false-positive rate 0.00 [0.00, 0.013]: upper bound 0.013 <= "
                                                  "0.05 allowed: met (0 of 300 good parts failed)")
    assert verdict.met


def test_a_bound_that_rounds_to_the_bar_is_printed_with_the_places_that_decide() -> None:
    """The lower bound of 96/100 is 0.90163. Against a bar of 0.9017 both read 0.902 at 3 places, which
    would print as if the bar were reached: the reason takes the 4th place, where they differ."""
    criteria = PromotionCriteria(min_labelled=0, min_detection_rate=0.9017, max_false_positive_rate=1.0)
    verdict = judge_promotion(label_stats(matrix(tp=96, fn=4, tn=1)), criteria)
    assert not verdict.detection_rate.met
    assert "lower bound 0.9016 < 0.9017 required: not met" in verdict.detection_rate.reason


def test_promotion_is_judged_at_the_criteria_confidence() -> None:
    """Stats computed at 95 %; criteria at 80 %: the interval is recomputed from the counts (48/50 then
    has a lower bound of 0.904, above 0.90)."""
    criteria = PromotionCriteria(min_labelled=100, min_detection_rate=0.90, max_false_positive_rate=0.05,
                                 confidence=0.80)
    verdict = judge_promotion(label_stats(matrix(tp=48, fn=2, tn=400)), criteria)
    assert verdict.detection_rate.bound == pytest.approx(wilson_interval(48, 50, 0.80)[0])
    assert verdict.detection_rate.met and verdict.met


def test_no_labels_or_no_defects_do_not_promote() -> None:
    verdict = judge_promotion(label_stats([]), CRITERIA)
    assert not verdict.met and verdict.more_labels_needed == 200
    assert verdict.detection_rate.measured is None and verdict.detection_rate.bound is None
    assert verdict.detection_rate.reason == ("detection rate: no defective parts (human fail) with an AI verdict "
                                             "among the labels: not met")

    no_defects = judge_promotion(label_stats(matrix(tn=500)), CRITERIA)
    assert no_defects.labelled.met and no_defects.false_positive_rate.met
    assert not no_defects.detection_rate.met and not no_defects.met
    json.dumps(no_defects.as_dict(), allow_nan=False)


def test_labels_without_an_ai_verdict_do_not_count_towards_promotion() -> None:
    parts = matrix(tp=100, tn=90) + [part(None, "pass", mode="manual_fallback") for _ in range(50)]
    verdict = judge_promotion(label_stats(parts), CRITERIA)
    assert verdict.more_labels_needed == 10 and not verdict.met


@pytest.mark.parametrize("kwargs, named", [
    ({"min_labelled": -1}, "-1"),
    ({"min_detection_rate": 1.5}, "1.5"),
    ({"max_false_positive_rate": -0.1}, "-0.1"),
    ({"confidence": 1.0}, "1.0"),
])
def test_criteria_refuse_impossible_values(kwargs: dict, named: str) -> None:
    fields = {"min_labelled": 200, "min_detection_rate": 0.9, "max_false_positive_rate": 0.05, **kwargs}
    with pytest.raises(ValueError, match=named):
        PromotionCriteria(**fields)
