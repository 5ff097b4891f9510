"""The station's heartbeat and what a monitor thread sees between parts.

Every `mqtt.heartbeat_s` (the first at once) a `health` message, built from the pipeline's typed status, the
MQTT link's state, the storage watch, the fan-out's sink errors and the review queue's summary (a callable the
runtime passes in: reporting does not import review). Between heartbeats the monitor turns what
it observes into events: a live camera lost or back (the reconnect counter catches an outage shorter than
one look), and the outbox shedding messages (overflow).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.inference.device_health import gpu_health
from appliance.reporting.mqtt_link import MqttLink
from appliance.reporting.mqtt_sink import MqttSink
from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import HealthPayload
from appliance.reporting.presence import StatusSource
from appliance.reporting.recorder import EventSink
from appliance.reporting.storage_watch import StorageWatch
from appliance.threads import FailureLatch, start_guarded

log = logging.getLogger("appliance.reporting.heartbeat")

LOOK_EVERY_S = 0.25  # how often the monitor looks at the camera and the outbox


class HeartbeatMonitor:
    """`start()` the monitor thread; `stop()` ends it and sends one last heartbeat."""

    def __init__(
        self,
        status: StatusSource,
        mqtt: MqttSink,
        storage: StorageWatch,
        *,
        on_event: EventSink,
        failures: FailureLatch,
        sink_errors: Callable[[], dict[str, int]] = dict,
        review: Callable[[], dict[str, Any]] | None = None,
        configured_backend: str = "auto",
        heartbeat_s: float = 10.0,
        data_dir: Path = Path("."),
        sysfs: Path = Path("/sys"),
    ) -> None:
        self._status = status
        self._mqtt = mqtt
        self._link: MqttLink = mqtt.link
        self._outbox: Outbox = mqtt.outbox
        self._storage = storage
        self._on_event = on_event
        self._failures = failures
        self._sink_errors = sink_errors
        self._review = review
        self._configured_backend = configured_backend
        self._heartbeat_s = heartbeat_s
        self._data_dir = data_dir
        self._sysfs = sysfs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._camera: tuple[bool, int] | None = None  # (connected, reconnects) at the last look
        self.started = time.monotonic()

    def start(self) -> None:
        self._thread = start_guarded("mqtt-monitor", self._run, self._failures)

    def stop(self) -> None:
        """End the monitor thread, then put one last heartbeat into the outbox (or straight to the broker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.beat()

    def health(self) -> HealthPayload:
        """The heartbeat as of now."""
        s = self._status.status()
        try:
            disk_free_mb: float | None = shutil.disk_usage(self._data_dir).free / 2**20
        except OSError:
            disk_free_mb = None
        link = self._link.state()
        storage = self._storage.status()
        storage["dead_letters"] = self._outbox.dead_letter_count()
        failure = self._failures.failure
        # The storage fault first: it is the one that can lose parts, and its own error text, not a later one.
        errors = [e for e in (self._storage.error(), failure.describe() if failure else None, s.failure,
                              s.last_error, link.last_error) if e]
        return HealthPayload(
            station=self._mqtt.station,
            mode=s.mode,  # type: ignore[arg-type]
            backend=s.backend,
            uptime_s=round(time.monotonic() - self.started, 3),
            inspections=s.inspections,
            defects=s.defects,
            verdicts=s.verdicts,
            dropped=s.dropped,
            throughput_per_s=round(s.throughput_per_s, 3),
            latency_p50_ms=s.latency_p50_ms,
            latency_p99_ms=s.latency_p99_ms,
            camera=asdict(s.camera),
            gpu=gpu_health(self._configured_backend, s.backend, self._sysfs),
            queues=s.queues,
            spool_depth=self._outbox.depth(),
            spool_oldest_age_s=self._outbox.oldest_age_s(),
            disk_free_mb=None if disk_free_mb is None else round(disk_free_mb, 1),
            mqtt=link.as_dict(),
            storage=storage,
            sinks=self._sink_errors(),
            review=self._review_summary(),
            last_error=errors[0] if errors else None,
        )

    def _review_summary(self) -> dict[str, Any] | None:
        """The review queue's summary; a failure to make it is reported in it, never a heartbeat lost."""
        if self._review is None:
            return None
        try:
            return self._review()
        except Exception as exc:
            log.exception("review summary for the heartbeat failed")
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}

    def beat(self) -> None:
        """One heartbeat now."""
        self._mqtt.publish("health", self.health().model_dump_json())

    def _run(self) -> None:
        next_beat = time.monotonic()  # the first heartbeat right away: a dashboard need not wait 10 s
        while not self._stop.wait(LOOK_EVERY_S):
            try:
                self._watch_camera()
                self._report_shedding()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self._heartbeat_s
                    self.beat()
            except Exception:  # the monitor must outlive any one bad reading
                log.exception("station monitor failed; continuing")

    def _watch_camera(self) -> None:
        status = self._status.status()
        if not status.camera_live:
            return  # files and folders do not disconnect
        state = status.camera
        # The reconnect counter catches an outage shorter than this poll, which `connected` alone would miss.
        if self._camera is None:
            was_connected, seen_reconnects = True, state.reconnects
        else:
            was_connected, seen_reconnects = self._camera
        self._camera = (state.connected, state.reconnects)
        back = state.reconnects > seen_reconnects
        lost = {"source": state.source, "error": state.last_error}
        if was_connected and (back or not state.connected):
            self._on_event("camera_lost", lost)
        if back or (not was_connected and state.connected):
            self._on_event("camera_back", {"source": state.source, "reconnects": state.reconnects})
        if back and not state.connected:
            self._on_event("camera_lost", lost)  # gone again since it came back

    def _report_shedding(self) -> None:
        shed = self._outbox.take_shed_counts()
        if shed:
            log.error("outbox full or too old: dropped %s; the broker has been unreachable too long", shed)
            self._on_event("spool_overflow", {"shed": shed, "depth": self._outbox.depth(),
                                              "max_messages": self._outbox.max_messages,
                                              "max_age_s": self._outbox.max_age_s})
