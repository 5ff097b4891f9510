"""What inspectors' labels say about the model: pure functions over labelled parts (issue #14, part 5 and
the promotion rule of part 6).

A person labels a part the station queued for review `pass` or `fail`; the label is the truth. The defect
(`fail`) is the positive class, so, over the parts that have an AI verdict:

    detection rate        TP / (TP + FN)   defects the model called `fail`, of all defects     (recall)
    false-positive rate   FP / (FP + TN)   good parts the model called `fail`, of all good parts
    agreement             (TP + TN) / n    the model said what the person said

Parts with no AI verdict (`manual_required` with no model running) are counted, never in a rate. Every rate
comes with its Wilson score interval (`wilson_interval`), and the promotion rule (`judge_promotion`) judges
the interval's pessimistic end, never the point estimate: a detection rate of 48/50 = 0.96 is not yet
evidence of a detection rate of at least 0.90.

Everything here is pure: no I/O, no clock (times come in the data, epoch seconds UTC). The one exception is
that a shift time zone given by name is looked up in the system's time zone database (`zoneinfo`).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from statistics import NormalDist
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HUMAN_VERDICTS = ("pass", "fail")
AI_VERDICTS = ("pass", "fail", None)
DIGITS = 4  # floats in `as_dict`


# --------------------------------------------------------------------------------------------------------
# The interval


def _z(confidence: float) -> float:
    """The two-sided standard normal quantile: z with P(|Z| <= z) = confidence (1.959964 for 0.95)."""
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
            or not math.isfinite(confidence) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    return number


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion `successes / n`, two-sided at `confidence`.

    Source: E. B. Wilson, "Probable inference, the law of succession, and statistical inference", J. Am.
    Stat. Assoc. 22 (1927) 209-212; as method 3 ("score method without continuity correction") of
    R. G. Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven
    methods", Statistics in Medicine 17 (1998) 857-872, which recommends it. With p = successes / n,
    q = 1 - p and z the standard normal quantile at 1 - (1 - confidence) / 2 (`statistics.NormalDist`):

        (2np + z^2 -/+ z * sqrt(z^2 + 4npq)) / (2 (n + z^2))

    the set of proportions a two-sided score test at that level would not reject. Unlike the textbook
    p +/- z sqrt(pq/n) it stays inside [0, 1] and has width at 0/n and n/n (0/10 gives [0, 0.2775]).
    n = 0 says nothing: (0.0, 1.0). Raises ValueError (naming the value) for a count that is not a whole
    number >= 0, successes > n, or a confidence outside (0, 1).
    """
    successes = _count("successes", successes)
    n = _count("n", n)
    confidence = _check_confidence(confidence)
    if successes > n:
        raise ValueError(f"successes ({successes}) must not exceed n ({n})")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    z2 = z * z
    p = successes / n
    centre = 2 * n * p + z2
    half = z * math.sqrt(z2 + 4 * n * p * (1.0 - p))
    denominator = 2 * (n + z2)
    low = 0.0 if successes == 0 else max(0.0, (centre - half) / denominator)
    high = 1.0 if successes == n else min(1.0, (centre + half) / denominator)
    return low, high


@dataclass(frozen=True)
class Rate:
    """successes / n with its Wilson interval at `confidence` (n >= 1: a rate with no denominator is None
    where it would appear, never a Rate)."""

    successes: int
    n: int
    confidence: float
    value: float = field(init=False)
    low: float = field(init=False)
    high: float = field(init=False)

    def __post_init__(self) -> None:
        if _count("n", self.n) == 0:
            raise ValueError("a rate needs a denominator: n must be at least 1 (no denominator: None)")
        low, high = wilson_interval(self.successes, self.n, self.confidence)
        object.__setattr__(self, "value", self.successes / self.n)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def of(cls, successes: int, n: int, confidence: float = 0.95) -> Rate | None:
        """The rate, or None when there is no denominator (n = 0)."""
        return None if n == 0 else cls(successes, n, confidence)

    def at(self, confidence: float) -> Rate:
        """The same counts with the interval at another confidence."""
        return self if confidence == self.confidence else Rate(self.successes, self.n, confidence)

    def as_dict(self) -> dict[str, Any]:
        return {"value": round(self.value, DIGITS), "low": round(self.low, DIGITS),
                "high": round(self.high, DIGITS), "successes": self.successes, "n": self.n}


# --------------------------------------------------------------------------------------------------------
# Labels and what they add up to


@dataclass(frozen=True)
class LabelledPart:
    """One part a person labelled: what the model said (None: no model ran) and what the person said.

    `labelled_at` is when the label was given, epoch seconds (UTC). `mode` is the station's mode when the
    part was inspected (`production`, `shadow`, `manual_fallback`). `ai_verdict` is `pass`, `fail` or None;
    whoever builds these from an inspection record decides what an AI `manual_required` (a score inside the
    band) or `error` becomes: they are refused here rather than counted as a verdict they are not.
    """

    inspection_id: str
    labelled_at: float
    ai_verdict: Literal["pass", "fail"] | None
    human_verdict: Literal["pass", "fail"]
    mode: str
    model_id: str

    def __post_init__(self) -> None:
        if self.human_verdict not in HUMAN_VERDICTS:
            raise ValueError(f"human_verdict must be 'pass' or 'fail', got {self.human_verdict!r} "
                             f"(inspection {self.inspection_id!r})")
        if self.ai_verdict not in AI_VERDICTS:
            raise ValueError(f"ai_verdict must be 'pass', 'fail' or None, got {self.ai_verdict!r} "
                             f"(inspection {self.inspection_id!r})")
        if isinstance(self.labelled_at, bool) or not isinstance(self.labelled_at, (int, float)) \
                or not math.isfinite(self.labelled_at):
            raise ValueError(f"labelled_at must be finite epoch seconds, got {self.labelled_at!r} "
                             f"(inspection {self.inspection_id!r})")


@dataclass(frozen=True)
class Confusion:
    """AI against the person, over parts with an AI verdict; `fail` (a defect) is the positive class."""

    tp: int = 0  # AI fail, person fail: a defect caught
    fn: int = 0  # AI pass, person fail: a defect missed
    fp: int = 0  # AI fail, person pass: a good part rejected
    tn: int = 0  # AI pass, person pass

    @property
    def defects(self) -> int:
        """Parts the person failed (the detection rate's denominator)."""
        return self.tp + self.fn

    @property
    def good(self) -> int:
        """Parts the person passed (the false-positive rate's denominator)."""
        return self.fp + self.tn

    @property
    def total(self) -> int:
        return self.tp + self.fn + self.fp + self.tn

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fn": self.fn, "fp": self.fp, "tn": self.tn}


@dataclass(frozen=True)
class LabelStats:
    """What a set of labels says (`label_stats`). Rates are None where their denominator is 0.

    `labelled` counts parts (each inspection once: its latest label); `with_ai_verdict` of them are in
    `confusion` and the rates, `without_ai_verdict` are not. `shadow_agreement` is the agreement over the
    parts inspected in `shadow` mode (`shadow_labelled` of them with an AI verdict). `models` and `modes`
    count the labelled parts by model id and by mode: stats meant to judge one model should hold only it.
    """

    confidence: float
    labelled: int
    with_ai_verdict: int
    without_ai_verdict: int
    confusion: Confusion
    detection_rate: Rate | None
    false_positive_rate: Rate | None
    agreement: Rate | None
    shadow_labelled: int
    shadow_agreement: Rate | None
    first_labelled_at: float | None
    last_labelled_at: float | None
    models: Mapping[str, int]
    modes: Mapping[str, int]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (heartbeats, `GET /stats`): plain types, floats rounded to 4 places, None as null."""

        def rate(r: Rate | None) -> dict[str, Any] | None:
            return None if r is None else r.as_dict()

        return {
            "confidence": self.confidence,
            "labelled": self.labelled,
            "with_ai_verdict": self.with_ai_verdict,
            "without_ai_verdict": self.without_ai_verdict,
            "confusion": self.confusion.as_dict(),
            "detection_rate": rate(self.detection_rate),
            "false_positive_rate": rate(self.false_positive_rate),
            "agreement": rate(self.agreement),
            "shadow_labelled": self.shadow_labelled,
            "shadow_agreement": rate(self.shadow_agreement),
            "first_labelled_at": None if self.first_labelled_at is None else round(self.first_labelled_at, 3),
            "last_labelled_at": None if self.last_labelled_at is None else round(self.last_labelled_at, 3),
            "models": dict(sorted(self.models.items())),
            "modes": dict(sorted(self.modes.items())),
        }


def _latest_labels(parts: Iterable[LabelledPart]) -> list[LabelledPart]:
    """Each inspection once, with its latest label (a tie: the later one given), oldest label first."""
    latest: dict[str, tuple[float, int, LabelledPart]] = {}
    for order, part in enumerate(parts):
        if not isinstance(part, LabelledPart):
            raise ValueError(f"expected LabelledPart, got {part!r}")
        seen = latest.get(part.inspection_id)
        if seen is None or (part.labelled_at, order) >= seen[:2]:
            latest[part.inspection_id] = (part.labelled_at, order, part)
    return [entry[2] for entry in sorted(latest.values(), key=lambda entry: entry[:2])]


def _agreement(parts: Iterable[LabelledPart], confidence: float) -> tuple[int, Rate | None]:
    judged = [p for p in parts if p.ai_verdict is not None]
    agree = sum(p.ai_verdict == p.human_verdict for p in judged)
    return len(judged), Rate.of(agree, len(judged), confidence)


def _stats(parts: list[LabelledPart], confidence: float) -> LabelStats:
    """LabelStats of parts already reduced to one label per inspection."""
    cells: Counter[tuple[str, str]] = Counter()
    for p in parts:
        if p.ai_verdict is not None:
            cells[(p.ai_verdict, p.human_verdict)] += 1
    confusion = Confusion(tp=cells[("fail", "fail")], fn=cells[("pass", "fail")],
                          fp=cells[("fail", "pass")], tn=cells[("pass", "pass")])
    with_ai, agreement = _agreement(parts, confidence)
    shadow_labelled, shadow_agreement = _agreement((p for p in parts if p.mode == "shadow"), confidence)
    times = [p.labelled_at for p in parts]
    return LabelStats(
        confidence=confidence,
        labelled=len(parts),
        with_ai_verdict=with_ai,
        without_ai_verdict=len(parts) - with_ai,
        confusion=confusion,
        detection_rate=Rate.of(confusion.tp, confusion.defects, confidence),
        false_positive_rate=Rate.of(confusion.fp, confusion.good, confidence),
        agreement=agreement,
        shadow_labelled=shadow_labelled,
        shadow_agreement=shadow_agreement,
        first_labelled_at=min(times) if times else None,
        last_labelled_at=max(times) if times else None,
        models=dict(Counter(p.model_id for p in parts)),
        modes=dict(Counter(p.mode for p in parts)),
    )


def label_stats(parts: Iterable[LabelledPart], confidence: float = 0.95) -> LabelStats:
    """The confusion matrix AI against person, the detection rate, false-positive rate, agreement (all and
    in shadow mode), each with its Wilson interval at `confidence`, and the counts.

    An inspection labelled more than once counts once, with its latest label (a person corrected it).
    No parts give zero counts and None for every rate.
    """
    return _stats(_latest_labels(parts), _check_confidence(confidence))


# --------------------------------------------------------------------------------------------------------
# By day, by shift, over the latest labels


@dataclass(frozen=True)
class PeriodStats:
    """One day or one shift: `[start, end)` in epoch seconds, a readable `label`, and its statistics.

    `shift` is the index into the shift start hours (None for days); `label` is the day (`2024-03-01`) or
    the day and start of the shift in the shifts' clock (`2024-03-01 22:00`): a shift crossing midnight
    carries the day it started.
    """

    label: str
    start: float
    end: float
    shift: int | None
    stats: LabelStats

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "start": self.start, "end": self.end, "shift": self.shift,
                **self.stats.as_dict()}


def _zone(tz: str | tzinfo | timedelta | float | None) -> tzinfo:
    """The shifts' clock: a `zoneinfo` name ("Europe/Berlin"), a tzinfo, a fixed offset (timedelta, or
    hours east of UTC as a number), None for UTC."""
    if tz is None:
        return timezone.utc
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {tz!r} (a zoneinfo name such as 'Europe/Berlin')") from None
    if isinstance(tz, timedelta):
        offset = tz
    elif isinstance(tz, (int, float)) and not isinstance(tz, bool) and math.isfinite(tz):
        offset = timedelta(hours=tz)
    else:
        raise ValueError(f"tz must be a zoneinfo name, a tzinfo, a timedelta or hours east of UTC, got {tz!r}")
    if not -timedelta(hours=24) < offset < timedelta(hours=24):
        raise ValueError(f"a time zone offset must be less than 24 hours, got {tz!r}")
    return timezone(offset)


def _shift_hours(shifts: Sequence[int] | None) -> tuple[int, ...]:
    if shifts is None or isinstance(shifts, (str, bytes)) or not len(shifts):
        raise ValueError(f"period='shift' needs the shift start hours, e.g. shifts=(6, 14, 22), got {shifts!r}")
    hours = []
    for hour in shifts:
        if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
            raise ValueError(f"a shift start hour must be a whole hour 0..23, got {hour!r}")
        hours.append(hour)
    if len(set(hours)) != len(hours):
        raise ValueError(f"shift start hours must differ, got {tuple(shifts)!r}")
    return tuple(sorted(hours))


def _shift_of(t: float, hours: tuple[int, ...], zone: tzinfo) -> tuple[date, int]:
    """(the day the shift started, its index) for the moment t, read on the shifts' clock."""
    local = datetime.fromtimestamp(t, zone)
    index = None
    for i, hour in enumerate(hours):
        if local.hour >= hour:
            index = i
    if index is None:  # before the first shift's start: the last shift of the day before
        return local.date() - timedelta(days=1), len(hours) - 1
    return local.date(), index


def _shift_start(day: date, hour: int, zone: tzinfo) -> float:
    return datetime.combine(day, time(hour), tzinfo=zone).timestamp()


def stats_by_period(parts: Iterable[LabelledPart], period: Literal["day", "shift"] = "day",
                    shifts: Sequence[int] | None = None, tz: str | tzinfo | timedelta | float | None = None,
                    confidence: float = 0.95) -> list[PeriodStats]:
    """The statistics per period of `labelled_at`, oldest first; periods without labels are left out.

    `period="day"`: per UTC day (`tz` must be None). `period="shift"`: per shift, given the shift start
    hours on the shifts' clock `tz` (a `zoneinfo` name, a tzinfo, a fixed offset as a timedelta or hours
    east of UTC; None: UTC): with shifts=(6, 14, 22) a label at 03:00 belongs to the 22:00 shift of the day
    before, since a shift crossing midnight belongs to the day it started. Each inspection counts once,
    with its latest label, in the period of that label.
    """
    confidence = _check_confidence(confidence)
    latest = _latest_labels(parts)
    groups: dict[tuple[date, int | None], list[LabelledPart]] = {}
    hours: tuple[int, ...] = ()
    zone: tzinfo = timezone.utc
    if period == "day":
        if tz is not None or shifts is not None:
            raise ValueError("period='day' groups by UTC day: shifts and tz apply to period='shift' only")
        for p in latest:
            day = datetime.fromtimestamp(p.labelled_at, timezone.utc).date()
            groups.setdefault((day, None), []).append(p)
    elif period == "shift":
        hours, zone = _shift_hours(shifts), _zone(tz)
        for p in latest:
            groups.setdefault(_shift_of(p.labelled_at, hours, zone), []).append(p)
    else:
        raise ValueError(f"period must be 'day' or 'shift', got {period!r}")

    out = []
    for (day, index), members in groups.items():
        if index is None:
            start = datetime.combine(day, time(0), tzinfo=timezone.utc).timestamp()
            end, label = start + 86400.0, day.isoformat()
        else:
            start = _shift_start(day, hours[index], zone)
            end_day, end_index = (day, index + 1) if index + 1 < len(hours) else (day + timedelta(days=1), 0)
            end = _shift_start(end_day, hours[end_index], zone)
            label = f"{day.isoformat()} {hours[index]:02d}:00"
        out.append(PeriodStats(label=label, start=start, end=end, shift=index,
                               stats=_stats(members, confidence)))
    return sorted(out, key=lambda period_stats: period_stats.start)


def rolling(parts: Iterable[LabelledPart], last_n: int, confidence: float = 0.95) -> LabelStats:
    """The statistics of the `last_n` most recent labels (by `labelled_at`; each inspection once, with its
    latest label). Fewer labels than `last_n`: all of them."""
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
        raise ValueError(f"last_n must be a whole number >= 1, got {last_n!r}")
    return _stats(_latest_labels(parts)[-last_n:], _check_confidence(confidence))


# --------------------------------------------------------------------------------------------------------
# Promotion


@dataclass(frozen=True)
class PromotionCriteria:
    """What a model must show before it may decide on its own: at least `min_labelled` labelled parts with
    an AI verdict, a detection rate whose Wilson LOWER bound at `confidence` is >= `min_detection_rate`, and
    a false-positive rate whose Wilson UPPER bound is <= `max_false_positive_rate`."""

    min_labelled: int
    min_detection_rate: float
    max_false_positive_rate: float
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _count("min_labelled", self.min_labelled)
        for name in ("min_detection_rate", "max_false_positive_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a rate between 0 and 1, got {value!r}")
        _check_confidence(self.confidence)


@dataclass(frozen=True)
class CriterionResult:
    """One criterion judged: the measured value (a count, or a rate's point estimate), its interval, the
    pessimistic end the rule used (`bound`), what was required, whether it is met, and why, in words."""

    name: str
    measured: float | None
    interval: tuple[float, float] | None
    bound: float | None
    required: float
    met: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, DIGITS)

        return {"name": self.name, "measured": r(self.measured),
                "interval": None if self.interval is None else [r(x) for x in self.interval],
                "bound": r(self.bound), "required": self.required, "met": self.met, "reason": self.reason}


@dataclass(frozen=True)
class PromotionVerdict:
    """`met` only when every criterion is; `more_labels_needed` is how many more labelled parts the count
    criterion wants (0 once it is met)."""

    met: bool
    labelled: CriterionResult
    detection_rate: CriterionResult
    false_positive_rate: CriterionResult
    more_labels_needed: int

    @property
    def criteria(self) -> tuple[CriterionResult, ...]:
        return self.labelled, self.detection_rate, self.false_positive_rate

    @property
    def reason(self) -> str:
        """The three reasons, one a line, after the overall answer."""
        head = "promotion criteria met" if self.met else "promotion criteria not met"
        return "\n".join([head, *(c.reason for c in self.criteria)])

    def as_dict(self) -> dict[str, Any]:
        return {"met": self.met, "more_labels_needed": self.more_labels_needed,
                "criteria": [c.as_dict() for c in self.criteria]}


def _fmt(x: float, digits: int = 3) -> str:
    """0.962 -> "0.962", 0.91 -> "0.91", 0.9 -> "0.90": `digits` places, one trailing zero dropped."""
    text = f"{x:.{digits}f}"
    return text[:-1] if text.endswith("0") and digits > 2 else text


def _fmt_against(bound: float, required: float) -> tuple[str, str]:
    """The bound and the requirement, with enough places that the printed comparison reads as judged."""
    for digits in range(3, 8):
        shown = _fmt(bound, digits), _fmt(required, digits)
        if bound == required or shown[0] != shown[1]:
            return shown
    return repr(bound), repr(required)


def _judge_rate(label: str, rate: Rate | None, required: float, lower: bool, what: str,
                missing: str) -> CriterionResult:
    name = label.replace(" ", "_").replace("-", "_")
    if rate is None:
        return CriterionResult(name, None, None, None, required, False, f"{label}: {missing}: not met")
    bound = rate.low if lower else rate.high
    met = bound >= required if lower else bound <= required
    shown_bound, shown_required = _fmt_against(bound, required)
    end, sign, word = ("lower", ">=", "required") if lower else ("upper", "<=", "allowed")
    if not met:
        sign = "<" if lower else ">"
    reason = (f"{label} {_fmt(rate.value)} [{_fmt(rate.low)}, {_fmt(rate.high)}]: {end} bound {shown_bound} "
              f"{sign} {shown_required} {word}: {'met' if met else 'not met'} ({rate.successes} of {rate.n} {what})")
    return CriterionResult(name, rate.value, (rate.low, rate.high), bound, required, met, reason)


def judge_promotion(stats: LabelStats, criteria: PromotionCriteria) -> PromotionVerdict:
    """Whether the labels show the model good enough to promote, judged at the pessimistic end.

    The detection rate's Wilson lower bound must reach `min_detection_rate` and the false-positive rate's
    upper bound must stay within `max_false_positive_rate`, both at `criteria.confidence` (the intervals are
    recomputed from the counts when `stats` were made at another confidence); a point estimate above the
    bar with a lower bound below it is not met. Fewer than `min_labelled` parts with an AI verdict is not
    met, saying how many more are needed; no defects (or no good parts) among them is not met either.
    """
    counted = stats.with_ai_verdict
    more = max(0, criteria.min_labelled - counted)
    if more:
        count_reason = (f"labelled {counted} of {criteria.min_labelled} required: not met, {more} more labelled "
                        "parts with an AI verdict needed")
    else:
        count_reason = f"labelled {counted} >= {criteria.min_labelled} required: met"
    labelled = CriterionResult("labelled", float(counted), None, float(counted), float(criteria.min_labelled),
                               not more, count_reason)

    def at(rate: Rate | None) -> Rate | None:
        return None if rate is None else rate.at(criteria.confidence)

    detection = _judge_rate("detection rate", at(stats.detection_rate), criteria.min_detection_rate, True,
                            "defects caught", "no defective parts (human fail) with an AI verdict among the labels")
    false_positive = _judge_rate("false-positive rate", at(stats.false_positive_rate),
                                 criteria.max_false_positive_rate, False, "good parts failed",
                                 "no good parts (human pass) with an AI verdict among the labels")
    met = labelled.met and detection.met and false_positive.met
    return PromotionVerdict(met=met, labelled=labelled, detection_rate=detection,
                            false_positive_rate=false_positive, more_labels_needed=more)
