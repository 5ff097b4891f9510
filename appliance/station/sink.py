"""Where finished inspections and station events go: the one interface every sink implements.

The pipeline hands each finished inspection and each event to ONE sink, in decision order, on its decide
(or inference) thread; the runtime makes that a `reporting.fanout.FanOut`, which gives them to every
configured sink in turn (results log, MQTT, the storage watch; later the review queue, the PLC, the HTTP
API) and isolates a failing one. Defined here, beside its caller, so the station depends on no sink.

Rules for an implementation: neither call may block on storage or the network (queue, see
reporting/recorder.py); a call may raise (the fan-out counts and reports it); `flush` waits, bounded, until
what was handed over is written, and says whether it all was.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from appliance.station.inspection import Evidence, InspectionRecord


@runtime_checkable
class Sink(Protocol):
    name: str  # e.g. "results_log", "mqtt": names the sink in logs, events and health

    def inspection(self, record: InspectionRecord, evidence: Evidence) -> None:
        """One finished inspection (decide thread) and what it was decided on (the frame; see Evidence)."""
        ...

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """One station event: kind (README, "Events") and a JSON-ready detail."""
        ...

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything handed over is written; True when it all was."""
        ...
