"""Sink `mqtt`: every inspection as a `result` (and an `alert` for a defect) and every event, into the outbox
through its writer, from which the MQTT link publishes them (QoS 1, in order, surviving broker outages and
restarts: see outbox.py and mqtt_link.py).

Nothing here waits on the network or the disk. While the outbox cannot be written (or for an event about the
storage itself) an event also goes straight to the broker (`MqttLink.publish_direct`): the control room hears
it at once, and again, with the same message_id, once the outbox has it written. An event about the backend
requests a new birth, which names the backend that runs.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.reporting.mqtt_link import MqttLink
from appliance.reporting.outbox import NewMessage, Outbox
from appliance.reporting.payloads import AlertPayload, EventPayload, ResultPayload, Topics
from appliance.reporting.recorder import EventSink, StoreWriter
from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord
from appliance.threads import FailureSink

BACKEND_EVENTS = frozenset({"gpu_lost", "gpu_back", "cpu_fallback", "backend_failed", "backend_back"})
URGENT_EVENTS = frozenset({"storage_fault", "storage_recovered", "storage_repaired", "thread_failed"})


class MqttSink:
    """Results, alerts and events into the outbox's writer; urgent events also straight to the broker."""

    name = "mqtt"

    def __init__(self, link: MqttLink, outbox: Outbox, *, max_pending: int = 10_000,
                 on_storage_event: EventSink | None = None, on_failure: FailureSink | None = None) -> None:
        self.link = link
        self.outbox = outbox
        self.topics: Topics = link.config.topics
        self.station = link.config.client_id
        self.writer: StoreWriter[tuple[NewMessage, ...]] = StoreWriter(
            "outbox", outbox.path, self._write, max_pending=max_pending, on_event=on_storage_event,
            notes=outbox.take_notes, on_failure=on_failure, initial_error=outbox.open_error,
            dump=lambda messages: json.dumps([m.payload for m in messages]))

    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        result = ResultPayload.from_record(record, self.station)
        messages = [NewMessage(self.topics.of("result"), result.model_dump_json(), 1, "result")]
        if record.verdict == "fail":
            alert = AlertPayload(station=self.station, ts_ms=result.ts_ms, part_id=record.part_id,
                                 inspection_id=record.inspection_id, score=record.score, verdict="fail")
            messages.append(NewMessage(self.topics.of("alert"), alert.model_dump_json(), 1, "alert"))
        self.writer.submit(tuple(messages))

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        message = NewMessage(self.topics.of("event"),
                             EventPayload(station=self.station, kind=kind, detail=detail).model_dump_json(), 1, "event")
        if kind in URGENT_EVENTS or self.writer.faulted:
            # The outbox cannot take it now, or it is about the storage itself (and may wait behind a backlog
            # that cannot be written): the control room hears it at once.
            self.link.publish_direct(message.topic, message.payload)
        self.writer.submit((message,))
        if kind in BACKEND_EVENTS:
            self.link.request_rebirth()  # the birth names the backend: keep it true

    def publish(self, kind: str, payload: str) -> None:
        """A message of the station's own (a heartbeat) into the outbox, or straight to the broker while a
        backlog or a broken outbox would hold it back when it matters most."""
        if self.writer.faulted or self.writer.pending:
            self.link.publish_direct(self.topics.of(kind), payload)
        else:
            self.writer.submit((NewMessage(self.topics.of(kind), payload, 1, kind),))

    def flush(self, timeout: float) -> bool:
        return self.writer.flush(timeout)

    def _write(self, batch: list[tuple[NewMessage, ...]]) -> None:
        """The writer's write: one transaction for the batch, then wake the link to publish it."""
        self.outbox.put_many([m for messages in batch for m in messages])
        self.link.notify()
