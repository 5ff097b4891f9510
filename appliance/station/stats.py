"""Running counters and latency percentiles over recent inspections: what heartbeats and `make bench` show."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

from appliance.station.inspection import InspectionRecord


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0-100), NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


class RollingStats:
    """Counts since start plus a window of the latest inspections for rates and percentiles."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)
        self.verdicts: Counter[str] = Counter()
        self.total = 0

    def add(self, record: InspectionRecord) -> None:
        with self._lock:
            self.total += 1
            self.verdicts[record.verdict] += 1
            self._recent.append((time.monotonic(), record.latency_ms))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = list(self._recent)
            out: dict[str, Any] = {"inspections": self.total, "verdicts": dict(self.verdicts)}
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            out["throughput_per_s"] = (len(recent) - 1) / (recent[-1][0] - recent[0][0])
        else:
            out["throughput_per_s"] = 0.0
        for key in ("end_to_end_ms", "infer_ms", "preprocess_ms"):
            values = [lat[key] for _, lat in recent if key in lat]
            out[f"{key}_p50"] = percentile(values, 50)
            out[f"{key}_p99"] = percentile(values, 99)
        return out
