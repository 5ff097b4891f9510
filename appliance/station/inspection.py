"""The station's product: one finished inspection as every sink receives it (results log, MQTT, the review
queue and PLC to come), and the evidence behind it for the sinks that keep pictures. Plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InspectionRecord:
    """One finished inspection, as logged and reported."""

    inspection_id: str
    part_id: str
    station_id: str
    source_name: str
    frame_index: int
    captured_at: float
    decided_at: float
    verdict: str
    ai_verdict: str | None
    score: float | None
    mode: str
    backend: str
    model_id: str
    reason: str
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evidence:
    """What the station saw for one inspection, handed to sinks beside its record (never logged or published).

    `image`: the decoded frame as the camera gave it (uint8, (H, W) gray or (H, W, 3) BGR), a read-only view:
    a sink that keeps it past its call must hold this reference (the pipeline makes no copy), never write to
    it; None when the frame could not be read. `defect_map`: where the model looked ((h, w) float32, the
    model's defect map output), None while the backend gives none.
    """

    image: np.ndarray | None = None
    defect_map: np.ndarray | None = None

    @classmethod
    def of(cls, image: np.ndarray | None, defect_map: np.ndarray | None = None) -> Evidence:
        """Evidence holding read-only views of `image` and `defect_map` (no pixel is copied)."""
        return cls(_read_only(image), _read_only(defect_map))


NO_EVIDENCE = Evidence()


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    view = array.view()
    view.flags.writeable = False
    return view
