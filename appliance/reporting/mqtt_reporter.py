"""What the station tells the control room, and the commands it takes from it.

`MqttReporter` is the pipeline's reporter when MQTT is on. For every part it hands the record to the
local results log's writer (the station's own record, independent of any network) and the `result` (and
an `alert` for a defect) to the outbox's writer, from which the MQTT link publishes. Nothing here waits on
the network or the disk: each writer (recorder.StoreWriter) has its own thread and an ordered, bounded
memory backlog, so a locked, full or broken store neither stalls inspection nor loses a decided part.
When a writer's backlog is full, the station turns fail-safe (manual_fallback with the reason) until the
store takes writes again. Storage faults are events and part of every heartbeat; while the outbox
cannot be written, heartbeats and events go straight to the link (`MqttLink.publish_direct`).

A monitor thread puts a `health` heartbeat into the outbox every `mqtt.heartbeat_s`, and turns what it
observes into events: a live camera lost or back, the outbox shedding messages (overflow). Commands
arriving from the link are validated (payloads.parse_command), de-duplicated on their message id (QoS 1
may deliver twice, and a trigger must not inspect two parts), and applied to the pipeline; a rejected
command changes nothing and is answered with a `command_rejected` event naming the field and reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.inference.device_health import gpu_health
from appliance.reporting.mqtt_link import LinkConfig, MqttLink
from appliance.reporting.outbox import NewMessage, Outbox
from appliance.reporting.payloads import (
    DEFAULT_MAX_COMMAND_BYTES,
    AlertPayload,
    BirthPayload,
    CommandError,
    EventPayload,
    HealthPayload,
    ModeCommand,
    RebirthCommand,
    ResultPayload,
    TriggerCommand,
    parse_command,
)
from appliance.reporting.recorder import StoreWriter
from appliance.reporting.results_log import InspectionRecord, LoggedEvent, ResultsLog
from appliance.station.pipeline import Pipeline
from appliance.threads import FailureLatch, ThreadFailure, start_guarded
from bundle.decision import Mode

log = logging.getLogger("appliance.reporting.mqtt_reporter")

BOOT_ID = uuid.uuid4().hex  # one per process: a birth with a new boot id means the station restarted
_SEEN_COMMANDS = 1024  # message ids remembered for de-duplication
_BACKEND_EVENTS = frozenset({"gpu_lost", "gpu_back", "cpu_fallback", "backend_failed", "backend_back"})
_URGENT_EVENTS = frozenset({"storage_fault", "storage_recovered", "storage_repaired", "thread_failed"})


class LogReporter:
    """Results log on disk (through its writer) plus one log line per part: works without any network.

    Also the station's storage watch: it holds every store writer (the MQTT reporter adds the outbox's),
    reports their faults as events through `event_sink`, and holds the pipeline in manual_fallback while a
    writer's backlog is full (`attach` the pipeline for that).
    """

    def __init__(self, results: ResultsLog, echo: bool = True, max_pending: int = 10_000) -> None:
        self.results = results
        self.echo = echo
        self.failures = FailureLatch()
        self.writer: StoreWriter[InspectionRecord | LoggedEvent] = StoreWriter(
            "results_log", results.path, results.write_many, max_pending=max_pending,
            on_event=self.storage_event, notes=results.take_notes, on_failure=self.failures,
            initial_error=results.open_error, dump=_dump_logged)
        self.writers: list[StoreWriter[Any]] = [self.writer]
        # Where storage events go: this reporter's event(), or the MQTT reporter's that wraps it.
        self.event_sink = self.event
        self.unrecorded = 0  # parts and events no store could take (backlog full): in the process log only
        self._unrecorded_lock = threading.Lock()  # refused() comes from the decide, writer and monitor threads
        self._pipeline: Pipeline | None = None
        self._failsafe_lock = threading.Lock()
        self._failsafe_held = False  # whether this reporter holds the pipeline in manual_fallback

    def attach(self, pipeline: Pipeline) -> None:
        """The pipeline to hold in manual_fallback while storage cannot keep up."""
        self._pipeline = pipeline

    def inspection(self, record: InspectionRecord) -> None:
        if not self.writer.submit(record):
            self.refused("results log", _dump_logged(record))
        self.update_failsafe()
        if self.echo:
            score = "-" if record.score is None else f"{record.score:.4f}"
            name = f" {record.source_name}" if record.source_name else ""
            log.info("station=%s part=%s%s verdict=%s score=%s mode=%s backend=%s e2e=%.1fms reason=%s",
                     record.station_id, record.part_id, name, record.verdict, score, record.mode, record.backend,
                     record.latency_ms.get("end_to_end_ms", float("nan")), record.reason)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        item = LoggedEvent(time.time(), kind, detail)
        if not self.writer.submit(item):
            self.refused("results log", _dump_logged(item))
        self.update_failsafe()

    def flush(self, timeout: float) -> bool:
        """Wait until every writer wrote what it holds (True) or `timeout` s passed (False)."""
        deadline = time.monotonic() + timeout
        return all([w.flush(max(0.0, deadline - time.monotonic())) for w in self.writers])

    def close(self, timeout: float = 10.0) -> bool:
        """Flush (bounded) and stop the writers; True when nothing was left unwritten."""
        deadline = time.monotonic() + timeout
        return all([w.close(max(0.0, deadline - time.monotonic())) for w in self.writers])

    def storage_status(self) -> dict[str, Any]:
        """For heartbeats: `ok`, backlog per store, the faults (store, path, error, since_ms, pending),
        `failsafe` (a backlog full: manual_fallback), `unrecorded` (taken by no store: process log only)."""
        faults = [f.as_dict() for w in self.writers if (f := w.fault()) is not None]
        return {"ok": not faults, "pending": {w.store: w.pending for w in self.writers}, "faults": faults,
                "failsafe": any(w.saturated for w in self.writers), "unrecorded": self.unrecorded}

    def storage_error(self) -> str | None:
        """The first storage fault in words, for `last_error`."""
        for w in self.writers:
            f = w.fault()
            if f is not None:
                return f"{f.store} {f.path} cannot be written: {f.error} ({f.pending} waiting in memory)"
        return None

    def refused(self, store: str, text: str) -> None:
        """A full backlog refused an item: the process log (journald) is its last record."""
        with self._unrecorded_lock:
            self.unrecorded += 1
        log.error("UNRECORDED (the %s backlog is full, storage.pending_max): %s", store, text)

    def storage_event(self, kind: str, detail: dict[str, Any]) -> None:
        self.event_sink(kind, detail)
        self.update_failsafe()

    def update_failsafe(self) -> None:
        """Hold or release the pipeline's manual_fallback as the writers' backlogs fill and drain. Called per
        part: in the common case (nothing full, nothing held) it looks at the writers and returns."""
        pipeline = self._pipeline
        if pipeline is None:
            return
        full = next((w for w in self.writers if w.saturated), None)
        with self._failsafe_lock:
            if full is None and not self._failsafe_held:
                return
            reason = None
            if full is not None:
                fault = full.fault()
                reason = (f"storage: {full.store} {full.path} cannot be written"
                          f"{f' ({fault.error})' if fault else ''} and {full.max_pending} records wait in memory, "
                          "the limit (storage.pending_max)")
            self._failsafe_held = full is not None
        # Outside the lock: entering the fallback is an event, and reporting it comes back here.
        pipeline.set_fallback("storage", reason)


def _dump_logged(item: InspectionRecord | LoggedEvent) -> str:
    if isinstance(item, InspectionRecord):
        return json.dumps({"inspection": item.to_dict()}, default=str)
    return json.dumps({"event": {"at": item.at, "kind": item.kind, "detail": item.detail}}, default=str)


def config_hash(settings_json: str) -> str:
    """A short, stable fingerprint of the effective configuration (secrets excluded by the caller)."""
    return hashlib.sha256(settings_json.encode()).hexdigest()[:16]


class MqttReporter:
    """Results log + outbox + heartbeats + commands. Create, `attach(pipeline)`, `start()`, ..., `stop()`."""

    def __init__(
        self,
        link_config: LinkConfig,
        outbox: Outbox,
        local: LogReporter,
        *,
        config_fingerprint: str,
        configured_backend: str,
        triggered: bool,
        model_id: str = "",
        heartbeat_s: float = 10.0,
        data_dir: Path = Path("."),
        sysfs: Path = Path("/sys"),
        max_pending: int = 10_000,
        max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
    ) -> None:
        self.topics = link_config.topics
        self.station = link_config.client_id
        self.outbox = outbox
        self.local = local
        self.failures = local.failures  # one latch for every thread of the reporting side
        self.link = MqttLink(link_config, outbox, self._birth, self.on_command, on_failure=self.failures)
        self.spool: StoreWriter[tuple[NewMessage, ...]] = StoreWriter(
            "outbox", outbox.path, self._write_outbox, max_pending=max_pending, on_event=local.storage_event,
            notes=outbox.take_notes, on_failure=self.failures, initial_error=outbox.open_error,
            dump=lambda messages: json.dumps([m.payload for m in messages]))
        local.writers.append(self.spool)
        local.event_sink = self.event
        self._config_fingerprint = config_fingerprint
        self._configured_backend = configured_backend
        self._model_id = model_id
        self._max_command_bytes = max_command_bytes
        self._pipeline_started = False
        self._birth_lock = threading.Lock()
        self._triggered = triggered
        self._heartbeat_s = heartbeat_s
        self._data_dir = data_dir
        self._sysfs = sysfs
        self._pipeline: Pipeline | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._camera: tuple[bool, int] | None = None  # (connected, reconnects) at the last look
        self._birth_backend: str | None = None  # what the last birth said (set on the link thread)
        self.last_error: str | None = None
        self.started = time.monotonic()

    def attach(self, pipeline: Pipeline) -> None:
        """The pipeline this reporter serves (it is built with the reporter, so it comes second)."""
        self._pipeline = pipeline
        self.local.attach(pipeline)

    def start(self) -> None:
        self.link.start()
        self._monitor = start_guarded("mqtt-monitor", self._monitor_loop, self.failures)

    def pipeline_started(self) -> None:
        """The backend is up: if a birth already went out saying `starting`, send it again naming the backend."""
        with self._birth_lock:  # against a birth being built on the link thread right now
            self._pipeline_started = True
            rebirth = self._birth_backend == "starting"
        if rebirth:
            self.link.request_rebirth()

    @property
    def failure(self) -> ThreadFailure | None:
        """The first thread of the reporting side (link, monitor, store writers) that died, if any."""
        return self.failures.failure

    def stop(self, drain_timeout_s: float = 10.0) -> bool:
        """A last heartbeat, then drain the outbox to the broker (bounded). True when nothing is left behind."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5)
        self._put_health()
        deadline = time.monotonic() + drain_timeout_s
        self.local.flush(drain_timeout_s)  # into the outbox first, then to the broker
        return self.link.stop(max(0.0, deadline - time.monotonic())) and self.spool.pending == 0

    # --- the pipeline's Reporter interface (decide thread, inference thread) ------------------------------
    def inspection(self, record: InspectionRecord) -> None:
        self.local.inspection(record)  # the local record first: it needs no network and no outbox
        result = ResultPayload.from_record(record, self.station)
        messages = [NewMessage(self.topics.of("result"), result.model_dump_json(), 1, "result")]
        if record.verdict == "fail":
            alert = AlertPayload(station=self.station, ts_ms=result.ts_ms, part_id=record.part_id,
                                 inspection_id=record.inspection_id, score=record.score, verdict="fail")
            messages.append(NewMessage(self.topics.of("alert"), alert.model_dump_json(), 1, "alert"))
        self._spool(tuple(messages), "inspection")

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.local.event(kind, detail)
        message = NewMessage(self.topics.of("event"),
                             EventPayload(station=self.station, kind=kind, detail=detail).model_dump_json(), 1, "event")
        if kind in _URGENT_EVENTS or self.spool.faulted:
            # The outbox cannot take it now, or it is about the storage itself (and may wait behind a backlog
            # that cannot be written): the control room hears it at once, and once more, with the same
            # message_id, when the outbox has it written.
            self.link.publish_direct(message.topic, message.payload)
        self._spool((message,), "event")
        if kind in _BACKEND_EVENTS:
            self.link.request_rebirth()  # the birth names the backend: keep it true

    def flush(self, timeout: float) -> bool:
        return self.local.flush(timeout)

    # --- commands (link thread) ------------------------------------------------------------------------------
    def on_command(self, kind: str, payload: bytes, retained: bool) -> None:
        message_id = None
        if not payload.strip() and retained:
            # An empty retained message is how MQTT clears a retained one (it arrives retained: the subscription
            # is Retain As Published); it carries no command to refuse. An empty live message is a command like
            # any other: a rebirth, or a trigger or mode missing its field (rejected below).
            log.info("empty retained %r message ignored (a retained command being cleared)", kind[:64])
            return
        try:
            if retained:
                # A retained command would be re-applied on every reconnect: refuse it outright.
                raise CommandError(kind, "(message)", "retained commands are refused; publish without the "
                                   "retain flag (and clear it: mosquitto_pub -r -n -t <topic>)")
            command = parse_command(kind, payload, max_bytes=self._max_command_bytes)
            message_id = command.message_id
            if message_id is not None and self._already_seen(message_id):
                log.info("command %s %s already applied; duplicate ignored", kind, message_id)
                return
            self._apply(kind, command)
            if message_id is not None:
                # Remembered once applied: a rejected command was never applied, so its redelivery is answered
                # again rather than called a duplicate.
                self._remember(message_id)
        except CommandError as exc:
            log.warning("command rejected: %s", exc)
            # exc.kind, not kind: the topic level is the sender's text, cut to the bound there.
            self.event("command_rejected", {"command": exc.kind, "field": exc.field, "reason": exc.reason,
                                            "command_message_id": message_id})

    def _apply(self, kind: str, command: TriggerCommand | ModeCommand | RebirthCommand) -> None:
        pipeline = self._pipeline
        if isinstance(command, RebirthCommand):
            self.link.request_rebirth()
            return
        if pipeline is None:
            raise CommandError(kind, "(station)", "the station is still starting")
        if isinstance(command, TriggerCommand):
            if not self._triggered:
                raise CommandError(kind, "part_id", "this station inspects continuously (trigger.mode = "
                                   "\"continuous\"); triggers are accepted only with trigger.mode = \"triggered\"")
            pipeline.trigger(command.part_id)
            log.info("trigger for part %s", command.part_id)
        elif isinstance(command, ModeCommand):
            pipeline.set_mode(Mode(command.mode))  # the pipeline reports mode_changed itself

    def _already_seen(self, message_id: str) -> bool:
        with self._seen_lock:
            return message_id in self._seen

    def _remember(self, message_id: str) -> None:
        with self._seen_lock:
            self._seen[message_id] = None
            while len(self._seen) > _SEEN_COMMANDS:
                self._seen.popitem(last=False)

    # --- birth, health, monitor --------------------------------------------------------------------------------
    def _birth(self, bd_seq: int) -> BirthPayload:
        p = self._pipeline
        # Before the pipeline's backend is up the birth says `starting`; pipeline_started() sends another.
        with self._birth_lock:
            backend = p.backend_name if p is not None and self._pipeline_started else "starting"
            self._birth_backend = backend
        cameras = [p.source.state().source] if p is not None and hasattr(p.source, "state") else []
        return BirthPayload(
            station=self.station, software_version=__version__, model_id=(p.model_id if p else "") or self._model_id,
            backend=backend, config_hash=self._config_fingerprint, cameras=cameras, boot_id=BOOT_ID, bd_seq=bd_seq,
        )

    def health(self) -> HealthPayload:
        """The heartbeat as of now."""
        p = self._pipeline
        snap = p.stats.snapshot() if p is not None else {"inspections": 0, "verdicts": {}, "throughput_per_s": 0.0}
        camera = asdict(p.source.state()) if p is not None and hasattr(p.source, "state") else {}
        try:
            disk_free_mb: float | None = shutil.disk_usage(self._data_dir).free / 2**20
        except OSError:
            disk_free_mb = None
        link = self.link.state()
        storage = self.local.storage_status()
        storage["dead_letters"] = self.outbox.dead_letter_count()
        failure = self.failure or (p.failure if p is not None else None)
        # The storage fault first: it is the one that can lose parts, and its own error text, not a later one.
        errors = [e for e in (self.local.storage_error(), failure.describe() if failure else None,
                              p.last_error if p else None, self.last_error, link.last_error) if e]
        return HealthPayload(
            station=self.station,
            mode=(p.mode.value if p else "production"),  # type: ignore[arg-type]
            backend=p.backend_name if p else "none",
            uptime_s=round(time.monotonic() - self.started, 3),
            inspections=snap["inspections"],
            defects=snap["verdicts"].get("fail", 0),
            verdicts=snap["verdicts"],
            dropped=p.dropped if p else 0,
            throughput_per_s=round(snap["throughput_per_s"], 3),
            latency_p50_ms=snap.get("end_to_end_ms_p50"),
            latency_p99_ms=snap.get("end_to_end_ms_p99"),
            camera=camera,
            gpu=gpu_health(self._configured_backend, p.backend_name if p else "none", self._sysfs),
            spool_depth=self.outbox.depth(),
            spool_oldest_age_s=self.outbox.oldest_age_s(),
            disk_free_mb=None if disk_free_mb is None else round(disk_free_mb, 1),
            mqtt=link.as_dict(),
            storage=storage,
            last_error=errors[0] if errors else None,
        )

    def _monitor_loop(self) -> None:
        next_beat = time.monotonic()  # the first heartbeat right away: a dashboard need not wait 10 s
        while not self._stop.wait(0.25):
            try:
                self._watch_camera()
                self._report_shedding()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self._heartbeat_s
                    self._put_health()
            except Exception:  # the monitor must outlive any one bad reading
                log.exception("station monitor failed; continuing")

    def _put_health(self) -> None:
        payload = self.health().model_dump_json()
        if self.spool.faulted or self.spool.pending:
            # Behind a backlog (or into a broken outbox) a heartbeat would say nothing while it matters most.
            self.link.publish_direct(self.topics.of("health"), payload)
        else:
            self._spool((NewMessage(self.topics.of("health"), payload, 1, "health"),), "heartbeat")

    def _watch_camera(self) -> None:
        p = self._pipeline
        if p is None or not getattr(p.source, "live", False):
            return  # files and folders do not disconnect
        state = p.source.state()
        # The reconnect counter catches an outage shorter than this poll, which `connected` alone would miss.
        if self._camera is None:
            was_connected, seen_reconnects = True, state.reconnects
        else:
            was_connected, seen_reconnects = self._camera
        self._camera = (state.connected, state.reconnects)
        back = state.reconnects > seen_reconnects
        lost = {"source": state.source, "error": state.last_error}
        if was_connected and (back or not state.connected):
            self.event("camera_lost", lost)
        if back or (not was_connected and state.connected):
            self.event("camera_back", {"source": state.source, "reconnects": state.reconnects})
        if back and not state.connected:
            self.event("camera_lost", lost)  # gone again since it came back

    def _report_shedding(self) -> None:
        shed = self.outbox.take_shed_counts()
        if shed:
            log.error("outbox full or too old: dropped %s; the broker has been unreachable too long", shed)
            self.event("spool_overflow", {"shed": shed, "depth": self.outbox.depth(),
                                          "max_messages": self.outbox.max_messages,
                                          "max_age_s": self.outbox.max_age_s})

    def _spool(self, messages: tuple[NewMessage, ...], what: str) -> None:
        if not self.spool.submit(messages):
            self.local.refused("outbox", json.dumps({what: [m.payload for m in messages]}))
        self.local.update_failsafe()

    def _write_outbox(self, batch: list[tuple[NewMessage, ...]]) -> None:
        """The outbox writer's write: one transaction for the batch, then wake the link to publish it."""
        self.outbox.put_many([m for messages in batch for m in messages])
        self.link.notify()
