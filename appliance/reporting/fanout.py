"""Every finished inspection and every event to each sink in turn, one failing sink isolated from the rest.

The pipeline talks to one sink; the runtime makes it a `FanOut` of the configured ones (results log, MQTT,
storage watch; the review queue, PLC and HTTP API to come). A sink that raises does not keep the record
from the sinks after it, and does not stop inspection: its error is counted (`errors()`, in every
heartbeat's `sinks` field), logged (rate limited: a sink failing on every part must not flood the journal),
and reported to the other sinks as a `sink_failed` event: at once the first time, then at most once per
`report_every_s` with the count since.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord
from appliance.station.sink import Sink

log = logging.getLogger("appliance.reporting.fanout")


class FanOut:
    """A Sink made of sinks, called in the order added. Thread-safe; `add` only before the pipeline starts."""

    name = "fanout"

    def __init__(self, sinks: Iterable[Sink] = (), report_every_s: float = 60.0) -> None:
        self._sinks: list[Sink] = []
        self._errors: dict[str, int] = {}
        self._reported: dict[str, tuple[float, int]] = {}  # sink -> (monotonic time of the last report, errors then)
        self._lock = threading.Lock()
        # Per thread: failures due for a report, and whether sink_failed events are being delivered now.
        self._local = threading.local()
        self.report_every_s = report_every_s
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Sink) -> None:
        if any(s.name == sink.name for s in self._sinks):
            raise ValueError(f"a sink named {sink.name!r} is already in the fan-out")
        self._sinks.append(sink)
        with self._lock:
            self._errors[sink.name] = 0

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        for sink in self._sinks:
            try:
                sink.inspection(record, evidence)
            except Exception as exc:
                self._failed(sink, "inspection", exc, record.part_id)
        self._report()

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        for sink in self._sinks:
            try:
                sink.event(kind, detail)
            except Exception as exc:
                self._failed(sink, "event", exc, kind)
        self._report()

    def flush(self, timeout: float) -> bool:
        """Every sink's flush within one shared deadline; True when every sink wrote everything."""
        deadline = time.monotonic() + timeout
        done = True
        for sink in self._sinks:
            try:
                done = sink.flush(max(0.0, deadline - time.monotonic())) and done
            except Exception as exc:
                self._failed(sink, "flush", exc, "")
                done = False
        self._report()
        return done

    def errors(self) -> dict[str, int]:
        """Calls that raised, by sink name, since start (every sink listed, 0 for a healthy one)."""
        with self._lock:
            return dict(self._errors)

    def _failed(self, sink: Sink, call: str, exc: Exception, about: str) -> None:
        now = time.monotonic()
        with self._lock:
            count = self._errors[sink.name] = self._errors.get(sink.name, 0) + 1
            last_at, last_count = self._reported.get(sink.name, (None, 0))
            due = last_at is None or now - last_at >= self.report_every_s
            if due:
                self._reported[sink.name] = (now, count)
        if not due:
            return
        log.error("sink %s failed in %s (%s): %s: %s (%d error(s) since start; the other sinks still get everything)",
                  sink.name, call, about, type(exc).__name__, exc, count, exc_info=last_at is None)
        if getattr(self._local, "reporting", False):
            return  # a sink failed while taking a sink_failed event: counted and logged, not reported again
        pending = self._local.__dict__.setdefault("pending", [])
        pending.append((sink, {"sink": sink.name, "call": call, "error": f"{type(exc).__name__}: {exc}"[:500],
                               "errors": count, "errors_since_last_report": count - last_count}))

    def _report(self) -> None:
        """Give the other sinks a `sink_failed` event for each failure due for a report, once the record or event
        that failed has reached every sink (so it arrives after it, in order)."""
        pending = self._local.__dict__.get("pending")
        if not pending or getattr(self._local, "reporting", False):
            return
        self._local.pending = []
        self._local.reporting = True
        try:
            for failed, detail in pending:
                for other in self._sinks:
                    if other is not failed:
                        try:
                            other.event("sink_failed", detail)
                        except Exception as exc:
                            self._failed(other, "event", exc, "sink_failed")
        finally:
            self._local.reporting = False
