"""systemd integration with a real notify socket: READY, WATCHDOG pings only while healthy, STOPPING.

The hang of an inference or a camera cannot be produced on demand by the real components, so it is
injected with thin wrappers around the real ONNX Runtime backend and a real video capture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.inference.supervisor import BackendSupervisor
from appliance.reporting.results_log import ResultsLog
from appliance.reporting.results_sink import ResultsLogSink
from appliance.runtime import operating_point
from appliance.settings import CameraSection, StationSettings
from appliance.station.pipeline import Pipeline, PipelineConfig
from appliance.station.watchdog import Watchdog, notify, watchdog_interval_s
from bundle.decision import Mode
from bundle.format import load_bundle
from bundle.onnx_runtime import OnnxRuntimeBackend
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


class NotifySocket:
    """What systemd listens on: a unix datagram socket collecting every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def wait_for(self, predicate, timeout: float) -> bool:
        """Collect messages until `predicate(messages)` holds (True) or `timeout` seconds passed (False)."""
        return wait_until(lambda: predicate(self.drain(0.1)), timeout, interval=0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path):
    # A short path: unix socket paths are limited to ~107 bytes and pytest's tmp paths can be long.
    path = Path(f"/tmp/notify-{os.getpid()}-{time.monotonic_ns()}.sock")
    s = NotifySocket(path)
    yield s
    s.close()
    path.unlink(missing_ok=True)


def test_notify_sends_one_datagram_and_is_a_no_op_outside_systemd(systemd: NotifySocket):
    assert notify("READY=1", {"NOTIFY_SOCKET": str(systemd.path)}) is True
    assert systemd.drain(0.2) == ["READY=1"]
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/socket"}) is False  # logged, never raised


def test_watchdog_interval_comes_from_systemd_and_only_for_this_process():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def test_watchdog_pings_while_healthy_and_stops_naming_the_problem(systemd: NotifySocket):
    problem: list[str | None] = [None]
    env = {"NOTIFY_SOCKET": str(systemd.path)}
    dog = Watchdog(lambda: problem[0], 0.05, send=lambda m: notify(m, env)).start()
    try:
        assert systemd.wait_for(lambda ms: ms.count("WATCHDOG=1") >= 3, 5)
        problem[0] = "inference has been running for 31 s (tensorrt)"
        assert systemd.wait_for(lambda ms: any(m.startswith("STATUS=unhealthy") for m in ms), 5)
        before = len(systemd.drain(0.1))
        # The negative ("no ping") is proved by the watchdog's own ticks: three more that each withheld a ping.
        withheld = dog.withheld
        assert wait_until(lambda: dog.withheld >= withheld + 3, 5), dog.withheld
        after = systemd.drain(0.1)  # a datagram is in the socket once sent: nothing is left on the way
        assert "WATCHDOG=1" not in after[before:]  # no pings while stuck: systemd will restart us
        assert sum(m.startswith("STATUS=unhealthy") for m in after) == 1  # named once, not every tick
        assert dog.withheld >= 3
    finally:
        dog.stop()


class HangsOnCall:
    """The real backend, except call `hang_at` blocks until released (an inference that never returns)."""

    def __init__(self, backend: OnnxRuntimeBackend, hang_at: int) -> None:
        self._inner, self._hang_at, self._calls = backend, hang_at, 0
        self.release = threading.Event()
        self.name, self.model_id, self.slots = "tensorrt", backend.model_id, backend.slots

    def input_buffer(self, slot: int):
        return self._inner.input_buffer(slot)

    def run(self, slot: int):
        self._calls += 1
        if self._calls == self._hang_at:
            self.release.wait(30)
        return self._inner.run(slot)

    def close(self) -> None:
        self._inner.close()


def _pipeline(bundle_dir: Path, results: ResultsLog, source, backend, name: str) -> Pipeline:
    """The real pipeline around `source` and `backend` (the backend given, not built from settings)."""
    bundle = load_bundle(bundle_dir)
    settings = StationSettings(model={"bundle": str(bundle_dir)}, mqtt={"enabled": False})
    config = PipelineConfig(station_id="st-dog", spec=bundle.metadata.preprocess,
                            operating_point=operating_point(settings, bundle), mode=Mode.PRODUCTION)
    return Pipeline(config, source, lambda ev: BackendSupervisor(lambda: backend, name, None, ev),
                    ResultsLogSink(results, echo=False))


def _wait_for_stall(pipeline: Pipeline, stall_s: float) -> str | None:
    """The pipeline's stall reason as soon as it has one (None if none within 10 s)."""
    wait_until(lambda: pipeline.stall_reason(stall_s) is not None, 10)
    return pipeline.stall_reason(stall_s)


def test_a_hung_inference_is_a_stall_and_clears_when_it_returns(tmp_path: Path, bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    hang = HangsOnCall(OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=1, slots=3), hang_at=3)
    results = ResultsLog(tmp_path / "results.sqlite3")
    pipeline = _pipeline(bundle_dir, results, _synthetic(6), hang, "tensorrt")
    pipeline.start()
    try:
        reason = _wait_for_stall(pipeline, 0.3)
        assert reason is not None and "inference has been running" in reason and "tensorrt" in reason
        hang.release.set()
        assert pipeline.join(20)
        assert pipeline.stall_reason(0.3) is None
        assert len(list(results.inspections())) == 6  # the hung part was still inspected
    finally:
        hang.release.set()
        pipeline.stop()
        pipeline.join(10)


def _synthetic(n: int):
    from appliance.camera import open_source

    return open_source(CameraSection(source=f"synthetic:{n}"))


def test_a_connected_camera_that_stops_delivering_is_a_stall(tmp_path: Path, bundle_dir: Path):
    from test_camera import PacedCapture, live_camera, write_clip

    clip = write_clip(tmp_path, 200)

    class Freezes(PacedCapture):
        """A real capture whose read blocks after 5 frames: a V4L2 driver hang, still 'open'."""

        frozen = threading.Event()

        def __init__(self) -> None:
            super().__init__(clip, fps=50.0)
            self.reads = 0

        def read(self):
            self.reads += 1
            if self.reads > 5:
                Freezes.frozen.wait(30)
            return super().read()

    cpu = OnnxRuntimeBackend(load_bundle(bundle_dir).path("onnx_fp32"), threads=1, slots=3)
    source = live_camera(Freezes)
    pipeline = _pipeline(bundle_dir, ResultsLog(tmp_path / "results.sqlite3"), source, cpu, "onnxruntime")
    pipeline.start()
    try:
        reason = _wait_for_stall(pipeline, 0.5)
        assert reason is not None and "delivered no frame" in reason and "rtsp://10.0.0.5/stream1" in reason
    finally:
        Freezes.frozen.set()
        pipeline.stop()
        pipeline.join(10)
        source.close()


def test_appliance_run_says_ready_pings_the_watchdog_and_says_stopping(tmp_path: Path, bundle_dir: Path,
                                                                       systemd: NotifySocket):
    config = tmp_path / "station.toml"
    config.write_text(
        f'[station]\nid = "st-sd"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "synthetic"\n'
        '[trigger]\nmode = "triggered"\n[inference]\nbackend = "onnxruntime"\nthreads = 1\n[mqtt]\nenabled = false\n'
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n'
    )
    env = dict(os.environ, NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert systemd.wait_for(lambda ms: "READY=1" in ms and ms.count("WATCHDOG=1") >= 2, 60), systemd.messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        systemd.drain(0.2)
        assert "STOPPING=1" in systemd.messages
        assert systemd.messages.index("READY=1") < systemd.messages.index("STOPPING=1")
    finally:
        proc.kill()
        proc.wait(10)
