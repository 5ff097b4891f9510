"""Score -> verdict: pure functions, no I/O, the same on every backend."""

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


def defect_score(logits: np.ndarray, defect_index: int = 1) -> float:
    """Softmax probability of the defect class for one part's logits (shape (2,) or (1, 2))."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = z - z.max()
    e = np.exp(z)
    return float(e[defect_index] / e.sum())


def decide(score: float, op: OperatingPoint) -> Verdict:
    """The verdict for one part's defect probability."""
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        return Verdict.ERROR
    if op.band_low <= score <= op.band_high:
        return Verdict.MANUAL
    return Verdict.FAIL if score >= op.threshold else Verdict.PASS
