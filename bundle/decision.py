"""Score -> verdict, and how the station's mode turns the AI's verdict into the part's verdict.

Pure functions and plain data, no I/O: the same on every backend and easy to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    MANUAL = "manual_required"
    ERROR = "error"


class Mode(str, Enum):
    PRODUCTION = "production"  # the AI's verdict acts
    SHADOW = "shadow"  # the AI runs and is recorded; a human decides every part
    MANUAL_FALLBACK = "manual_fallback"  # no AI verdict (GPU gone, or chosen): every part to a human


@dataclass(frozen=True)
class OperatingPoint:
    """Fail at or above `threshold`; a score inside [band_low, band_high] goes to a human."""

    threshold: float
    band_low: float
    band_high: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.band_low <= self.threshold <= self.band_high <= 1.0:
            raise ValueError(
                f"need 0 <= band_low <= threshold <= band_high <= 1, got "
                f"{self.band_low} / {self.threshold} / {self.band_high}"
            )


@dataclass(frozen=True)
class Decision:
    verdict: Verdict  # what the line acts on
    ai_verdict: Verdict | None  # what the model said (None: no model ran)
    reason: str  # why, for the inspector and the log


def defect_score(logits: np.ndarray, defect_index: int = 1) -> float:
    """Softmax probability of the defect class for one part's logits (shape (2,) or (1, 2))."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        return float("nan")
    z = z - z.max()
    e = np.exp(z)
    return float(e[defect_index] / e.sum())


def decide(score: float, op: OperatingPoint) -> Verdict:
    """The AI verdict for one part's defect probability."""
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        return Verdict.ERROR
    if op.band_low <= score <= op.band_high:
        return Verdict.MANUAL
    return Verdict.FAIL if score >= op.threshold else Verdict.PASS


def decide_part(score: float | None, op: OperatingPoint, mode: Mode, why_no_model: str = "") -> Decision:
    """The part's verdict in a mode; `score` None means no model ran (fallback, or a frame error upstream)."""
    if score is None:
        return Decision(Verdict.MANUAL, None, why_no_model or "no AI verdict")
    ai = decide(score, op)
    if ai is Verdict.ERROR:
        return Decision(Verdict.ERROR, ai, f"model output not a probability ({score})")
    if mode is Mode.SHADOW:
        return Decision(Verdict.MANUAL, ai, "shadow mode: the inspector decides")
    if mode is Mode.MANUAL_FALLBACK:
        return Decision(Verdict.MANUAL, ai, why_no_model or "manual fallback mode")
    if ai is Verdict.MANUAL:
        return Decision(ai, ai, f"defect probability {score:.3f} inside the uncertainty band")
    return Decision(ai, ai, f"defect probability {score:.3f}")
