"""No half-alive station: a station thread that dies ends the process with EXIT_THREAD_FAILED, saying why.

Each thread gets an exception injected into its loop (a bug cannot be produced on demand any other way);
everything around it is real: `appliance.runtime.run` as `appliance run` calls it, a real Mosquitto, the
results log on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.reporting.heartbeat import HeartbeatMonitor
from appliance.reporting.mqtt_link import MqttLink
from appliance.reporting.recorder import StoreWriter
from appliance.reporting.results_log import ResultsLog
from appliance.runtime import run
from appliance.station.pipeline import Pipeline
from appliance.threads import EXIT_THREAD_FAILED
from tests.support.mqtt import Subscriber, needs_mosquitto
from tests.support.settings import station_settings
from tools.broker import MosquittoBroker

pytestmark = needs_mosquitto

# thread name -> (class, method whose body is that thread's loop)
THREADS = {
    "stage-capture": (Pipeline, "_capture_loop"),
    "stage-preprocess": (Pipeline, "_preprocess_loop"),
    "stage-infer": (Pipeline, "_infer_loop"),
    "stage-decide": (Pipeline, "_decide_loop"),
    "mqtt-link": (MqttLink, "_run"),
    "mqtt-monitor": (HeartbeatMonitor, "_run"),
    "writer-results_log": (StoreWriter, "_run"),
    "writer-outbox": (StoreWriter, "_run"),
}


@pytest.mark.parametrize("thread", sorted(THREADS))
def test_a_dead_thread_ends_the_station_with_its_own_exit_code_and_the_reason(
        thread: str, tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    cls, method = THREADS[thread]
    original = getattr(cls, method)

    def dies(self, *args, **kwargs):
        # the two writers share a class: only the one named dies
        if cls is StoreWriter and f"writer-{self.store}" != thread:
            return original(self, *args, **kwargs)
        raise RuntimeError(f"injected into {thread}")

    monkeypatch.setattr(cls, method, dies)
    control_room = Subscriber(broker.port)
    settings = station_settings(tmp_path, bundle_dir, broker.port, trigger={"mode": "continuous"},
                                camera={"source": "synthetic", "loop": True})
    try:
        with caplog.at_level(logging.CRITICAL, logger="appliance"):
            # A healthy station would run the whole 60 s; the dead thread must end it long before.
            code = run(settings, max_seconds=60)
        assert code == EXIT_THREAD_FAILED
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert any(f"thread {thread} died: RuntimeError: injected into {thread}" in m for m in said), said
        if thread != "mqtt-link":
            # Reported to the control room (over the link, which is alive in these cases).
            assert control_room.wait_for(lambda: any(
                m.payload["kind"] == "thread_failed" for m in control_room.of("event")), 10)
            failed = next(m.payload["detail"] for m in control_room.of("event") if m.payload["kind"] == "thread_failed")
            assert failed["thread"] == thread and "injected" in failed["error"] and failed["exit_code"] == 10
        if thread != "writer-results_log":
            # ... and recorded in the results log (whose writer is alive in these cases).
            log = ResultsLog(settings.storage.data_dir / "results.sqlite3")
            try:
                assert any(kind == "thread_failed" and detail["thread"] == thread for _, kind, detail in log.events())
            finally:
                log.close()
    finally:
        control_room.close()


def test_the_systemd_unit_restarts_on_the_thread_failure_exit_code():
    unit = (Path(__file__).resolve().parents[1] / "provisioning" / "templates" / "appliance.service.in").read_text()
    # on-failure restarts on any non-zero exit code, EXIT_THREAD_FAILED included; a RestartPreventExitStatus
    # naming it would defeat the point.
    assert "Restart=on-failure" in unit
    assert f"RestartPreventExitStatus={EXIT_THREAD_FAILED}" not in unit
