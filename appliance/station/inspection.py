"""The station's product: one finished inspection, as every sink receives it (results log, MQTT, the
review queue and PLC to come). Plain data, no behaviour beyond `to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
