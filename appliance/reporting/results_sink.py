"""The station's own record: every inspection and event into the local results log (through its writer),
and one log line per part. Needs no network; the first sink of every station."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from appliance.reporting.recorder import EventSink, StoreWriter
from appliance.reporting.results_log import LoggedEvent, ResultsLog
from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord
from appliance.threads import FailureSink

log = logging.getLogger("appliance.reporting.results")


class ResultsLogSink:
    """Sink `results_log`: hands records to the results log's StoreWriter (never blocks on the disk)."""

    name = "results_log"

    def __init__(self, results: ResultsLog, *, echo: bool = True, max_pending: int = 10_000,
                 on_storage_event: EventSink | None = None, on_failure: FailureSink | None = None) -> None:
        """`on_storage_event` gets the writer's storage_fault / storage_recovered / storage_repaired events
        (the runtime passes the fan-out's `event`); `on_failure` learns of a writer thread that died."""
        self.results = results
        self.echo = echo
        self.writer: StoreWriter[InspectionRecord | LoggedEvent] = StoreWriter(
            "results_log", results.path, results.write_many, max_pending=max_pending,
            on_event=on_storage_event, notes=results.take_notes, on_failure=on_failure,
            initial_error=results.open_error, dump=dump_logged)

    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        self.writer.submit(record)  # a refusal is logged in full by the writer (UNRECORDED)
        if self.echo:
            score = "-" if record.score is None else f"{record.score:.4f}"
            name = f" {record.source_name}" if record.source_name else ""
            log.info("station=%s part=%s%s verdict=%s score=%s mode=%s backend=%s e2e=%.1fms reason=%s",
                     record.station_id, record.part_id, name, record.verdict, score, record.mode, record.backend,
                     record.latency_ms.get("end_to_end_ms", float("nan")), record.reason)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.writer.submit(LoggedEvent(time.time(), kind, detail))

    def flush(self, timeout: float) -> bool:
        return self.writer.flush(timeout)


def dump_logged(item: InspectionRecord | LoggedEvent) -> str:
    """The JSON line the process log gets for a record no store took."""
    if isinstance(item, InspectionRecord):
        return json.dumps({"inspection": item.to_dict()}, default=str)
    return json.dumps({"event": {"at": item.at, "kind": item.kind, "detail": item.detail}}, default=str)
