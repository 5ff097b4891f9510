"""README contracts of the station that had no test: topic root, reconnect and GPU retry backoff, `appliance run`'s
stop, `engines list` on a real manifest, and provisioning without a network.

Real components throughout: Mosquitto on a free loopback port, `appliance run` as a subprocess where its exit code
and signals are the contract, the session's real model bundle and ONNX Runtime. Every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.inference.supervisor import BackendSupervisor
from appliance.settings import StationSettings
from bundle.decision import Mode
from bundle.errors import GpuUnavailableError
from bundle.format import load_bundle
from bundle.onnx_runtime import OnnxRuntimeBackend
from engines.manifest import EngineManifest, manifest_path, write_manifest
from engines.store import EngineKey
from tests.support.mqtt import Subscriber, needs_mosquitto, start_station, stop_station
from tests.support.settings import LINE, SITE, station_settings
from tests.support.waiting import wait_until
from tools.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


# --- mqtt.topic_root ------------------------------------------------------------------------------------------------


@needs_mosquitto
def test_a_station_with_topic_root_plant_qa_publishes_and_takes_commands_only_there(tmp_path: Path,
                                                                                      bundle_dir: Path):
    station_id = "st-root"
    own = f"plant/qa/{SITE}/{LINE}/{station_id}"
    old = f"inspection/{SITE}/{LINE}/{station_id}"
    with MosquittoBroker(tmp_path / "broker") as broker:
        sub = Subscriber(broker.port, topic_filter="#")  # everything on the broker, under any root
        station = start_station(station_settings(tmp_path, bundle_dir, broker.port, station_id=station_id,
                                                 mqtt={"topic_root": "plant/qa"}))
        try:
            # Given a station in production, when a mode command comes on the default root, then on its own root
            assert station.pipeline.mode is Mode.PRODUCTION
            sub.publish(f"{old}/cmd/mode", json.dumps({"mode": "shadow", "message_id": "old-root"}))
            sub.publish(f"{own}/cmd/mode", json.dumps({"mode": "shadow", "message_id": "mode-1"}))
            sub.publish(f"{own}/cmd/trigger", json.dumps({"part_id": "SN-ROOT-1", "message_id": "trig-1"}))

            def seen(kind: str) -> list[dict[str, Any]]:
                return [m.payload for m in sub.messages if m.topic == f"{own}/{kind}"]

            assert wait_until(lambda: any(e["kind"] == "mode_changed" for e in seen("event"))
                              and any(r["part_id"] == "SN-ROOT-1" for r in seen("result")), 20), \
                [m.topic for m in sub.messages]
            # then the command on plant/qa switched the mode, and the part was decided in it
            assert station.pipeline.mode is Mode.SHADOW
            changes = [e["detail"] for e in seen("event") if e["kind"] == "mode_changed"]
            assert changes == [{"from": "production", "to": "shadow"}]
            assert [r["mode"] for r in seen("result")] == ["shadow"]
        finally:
            stop_station(station)
        assert wait_until(lambda: any(m.payload.get("state") == "stopped" for m in sub.messages
                                      if m.topic == f"{own}/status"), 10)
        sub.close()
    published = [m.topic for m in sub.messages if "/cmd/" not in m.topic]  # the station's, not the test's commands
    assert {t.split("/")[-1] for t in published} >= {"status", "birth", "event", "result"}
    assert all(t.startswith(own + "/") for t in published), published
    assert not [t for t in published if t.startswith("inspection/")]
    # and nothing was rejected: the old-root command never reached the station at all
    assert not [m for m in sub.messages if m.topic == f"{own}/event" and m.payload["kind"] == "command_rejected"]


# --- MQTT reconnect backoff and the rate-limited error line -----------------------------------------------------------


def test_reconnect_attempts_back_off_from_1_s_doubling_to_reconnect_max_s_and_log_the_error_once(
        tmp_path: Path, bundle_dir: Path, caplog: pytest.LogCaptureFixture, refused_port: int):
    caplog.set_level(logging.ERROR, logger="appliance.mqtt")
    port = refused_port  # nothing listens here (nor can, for the whole test): every attempt is refused at once
    settings = station_settings(tmp_path, bundle_dir, port, station_id="st-backoff", mqtt={"reconnect_max_s": 2.0})
    station = start_station(settings, connect=False)
    changes: list[tuple[int, float]] = []  # (failed_attempts, when it was first seen)
    try:
        link = station.link

        def note_change() -> bool:
            failed = link.state().failed_attempts
            if not changes or changes[-1][0] != failed:
                changes.append((failed, time.monotonic()))
            return failed >= 4

        # Polled every 50 ms for the measurement; the deadline is the synchronisation.
        assert wait_until(note_change, 15), changes
        state = link.state()
    finally:
        stop_station(station, drain_s=0)
    attempts = [(n, t) for n, t in changes if n > 0]
    assert [n for n, _ in attempts][:4] == [1, 2, 3, 4], changes  # each attempt counted once, none skipped
    gaps = [round(b - a, 2) for (_, a), (_, b) in itertools.pairwise(attempts[:4])]
    # 1 s, doubled to 2 s, then held at mqtt.reconnect_max_s = 2 s
    for gap, expected in zip(gaps, [1.0, 2.0, 2.0], strict=True):
        assert abs(gap - expected) < 0.5, gaps
    assert not state.connected and "refused the TCP connection" in (state.last_error or "")
    refused = [r for r in caplog.records
               if r.name == "appliance.mqtt" and "refused the TCP connection" in r.getMessage()]
    # Four failures of the same kind within a minute: one log line (the next may come a minute later at the earliest)
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert refused[0].levelno == logging.ERROR and f"127.0.0.1:{port}" in refused[0].getMessage()


# --- `appliance run`: --max-seconds and SIGINT ----------------------------------------------------------------------


def _station_toml(tmp_path: Path, bundle_dir: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "var"
    config = tmp_path / "station.toml"
    config.write_text(f'[station]\nid = "st-run"\n[model]\nbundle = "{bundle_dir}"\n'
                      '[camera]\nsource = "synthetic"\n[trigger]\nmode = "continuous"\n'
                      '[inference]\nbackend = "onnxruntime"\nthreads = 1\n'
                      f'[storage]\ndata_dir = "{data_dir}"\n')
    return config, data_dir


def _run_env() -> dict[str, str]:
    # No broker for these: MQTT off through the environment override (it wins over the file).
    return {**os.environ, "APPLIANCE_MQTT__ENABLED": "false", "PYTHONUNBUFFERED": "1"}


def _appliance() -> list[str]:
    return [sys.executable, "-m", "appliance.cli"]


def _recorded(data_dir: Path) -> int:
    """Inspections in the results log, read as an operator would while the station runs (no write transaction)."""
    path = data_dir / "results.sqlite3"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(path, timeout=1.0)
        try:
            return int(db.execute("SELECT count(*) FROM inspections").fetchone()[0])
        finally:
            db.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _stopped_count(log_text: str) -> int:
    found = re.findall(r"stopped: (\d+) inspections", log_text)
    assert len(found) == 1, log_text[-3000:]
    return int(found[0])


def test_appliance_run_max_seconds_3_exits_0_after_about_3_s_with_every_part_recorded(tmp_path: Path,
                                                                                        bundle_dir: Path):
    config, data_dir = _station_toml(tmp_path, bundle_dir)
    started = time.monotonic()
    done = subprocess.run([*_appliance(), "run", "--config", str(config), "--max-seconds", "3"], cwd=REPO,
                          env=_run_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    # An endless source: only the time limit ends the run. At least 3 s; the rest is start-up (imports, model load)
    # and the drain, well under the bound.
    assert 3.0 <= elapsed < 30.0, elapsed
    inspected = _stopped_count(done.stderr)
    assert inspected > 0 and _recorded(data_dir) == inspected


def test_sigint_stops_appliance_run_with_exit_0_and_every_captured_part_recorded(tmp_path: Path, bundle_dir: Path):
    config, data_dir = _station_toml(tmp_path, bundle_dir)
    log_path = tmp_path / "station.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([*_appliance(), "run", "--config", str(config)], cwd=REPO, env=_run_env(),
                                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            # Given a station that is inspecting (parts are in the results log)
            assert wait_until(lambda: _recorded(data_dir) >= 5 or proc.poll() is not None, 60), \
                log_path.read_text()[-3000:]
            assert proc.poll() is None, log_path.read_text()[-3000:]
            before = _recorded(data_dir)
            # when Ctrl-C comes
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    # then it exits 0, having recorded every part it said it inspected
    assert code == 0, text[-3000:]
    assert "received SIGINT" in text
    inspected = _stopped_count(text)
    assert inspected >= before
    assert _recorded(data_dir) == inspected


# --- GPU retry backoff (BackendSupervisor) --------------------------------------------------------------------------


class _EngineStandIn(OnnxRuntimeBackend):
    """The bundle's model run by ONNX Runtime, named as the TensorRT backend it stands in for on a machine without a
    GPU: what the supervisor does with the primary depends only on whether its factory raises."""

    name = "tensorrt"


def test_gpu_retry_after_1_s_doubles_to_gpu_retry_max_s_and_returns_to_the_primary(bundle_dir: Path):
    settings = StationSettings(model={"bundle": str(bundle_dir)}, inference={"gpu_retry_max_s": 8.0})
    bundle = load_bundle(bundle_dir)
    onnx = bundle.path("onnx_fp32")
    now = [0.0]
    attempts: list[float] = []
    gpu_ok = [False]
    events: list[tuple[str, dict[str, Any]]] = []

    def primary() -> OnnxRuntimeBackend:
        attempts.append(now[0])
        if not gpu_ok[0]:
            raise GpuUnavailableError("no CUDA device answers (the driver reports 0 devices)")
        return _EngineStandIn(onnx, threads=1, slots=1, model_id="engine@fp16")

    def fallback() -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(onnx, threads=1, slots=1, model_id=bundle.model_id)

    sup = BackendSupervisor(primary, "tensorrt", fallback, lambda kind, detail: events.append((kind, detail)),
                            retry_max_s=settings.inference.gpu_retry_max_s, clock=lambda: now[0])
    try:
        # Given a GPU that does not answer at start: the CPU fallback takes over and really infers
        sup.start()
        assert [k for k, _ in events] == ["gpu_lost", "cpu_fallback"]
        assert events[0][1]["at_start"] and "no CUDA device" in events[0][1]["reason"]
        assert sup.backend is not None and sup.backend.name == "onnxruntime" and not sup.on_primary
        assert sup.backend.run(0).shape == (1, 2)

        # When the clock runs for 40 s with a retry check every 0.25 s
        while now[0] < 40.0:
            now[0] += 0.25
            assert not sup.maybe_retry()
        # then the retries came after 1 s, doubling up to gpu_retry_max_s = 8 s
        assert attempts == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0]
        assert [b - a for a, b in itertools.pairwise(attempts)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
        assert [k for k, _ in events] == ["gpu_lost", "cpu_fallback"]  # failed retries are no new switch

        # When the GPU works again: back on the primary at the next retry, by itself
        gpu_ok[0] = True
        while not sup.maybe_retry():
            assert now[0] < 60.0, attempts
            now[0] += 0.25
        assert now[0] == 47.0
        assert [k for k, _ in events] == ["gpu_lost", "cpu_fallback", "gpu_back"]
        assert events[-1][1] == {"backend": "tensorrt", "model_id": "engine@fp16"}
        assert sup.on_primary and sup.backend.name == "tensorrt" and sup.backend.run(0).shape == (1, 2)

        # And a later loss starts the backoff again from 1 s
        sup.failed(GpuUnavailableError("CUDA device 0 stopped answering (cudaErrorDevicesUnavailable)"))
        assert [k for k, _ in events][-2:] == ["gpu_lost", "cpu_fallback"] and sup.backend.name == "onnxruntime"
        gpu_ok[0] = False
        lost_at = now[0]
        while len(attempts) < 11:  # 9 so far: 8 failures and the success at 47 s
            now[0] += 0.25
            sup.maybe_retry()
        assert attempts[-2:] == [lost_at + 1.0, lost_at + 3.0]
    finally:
        sup.close()


# --- python -m engines list --------------------------------------------------------------------------------------


def _install_manifest(store: Path, bundle_dir: Path, precision: str, validation: dict[str, Any] | None) -> Path:
    """A store entry as `make engine` leaves it: an engine file and its manifest (the engine is never deserialized)."""
    bundle = load_bundle(bundle_dir)
    onnx_sha = bundle.metadata.files["onnx_fp32"].sha256
    key = EngineKey(bundle.model_id, onnx_sha, precision, "10.3.0.30", "8.7", None, (1, 1, 1))  # type: ignore[arg-type]
    engine = store / key.file_name()
    blob = f"not a real engine ({precision})".encode()
    engine.write_bytes(blob)
    write_manifest(manifest_path(engine), EngineManifest(
        bundle_name=bundle.metadata.name, bundle_model_id=bundle.model_id, onnx_sha256=onnx_sha,
        precision=precision, tensorrt_version="10.3.0.30", cuda_version="12.6", l4t_version="36.4.0",  # type: ignore[arg-type]
        gpu_name="Orin", compute_capability="8.7", gpu_multiprocessors=16,
        build_options={"batch_profile": [1, 1, 1]}, built_utc="2025-01-02T03:04:05+00:00", build_seconds=312.4,
        engine_sha256=hashlib.sha256(blob).hexdigest(), input_name=bundle.metadata.input_name,
        output_name=bundle.metadata.output_name, input_shape=[1, 3, 64, 64], validation=validation,
    ))
    return engine


def test_engines_list_shows_a_valid_manifest_with_its_precision_and_validation_state(tmp_path: Path,
                                                                                      bundle_dir: Path):
    store = tmp_path / "engines"
    store.mkdir()
    model_id = load_bundle(bundle_dir).model_id
    validated = _install_manifest(store, bundle_dir, "fp16", {"passed": True, "decision_agreement": 1.0})
    failed = _install_manifest(store, bundle_dir, "int8", {"passed": False, "decision_agreement": 0.8})
    done = subprocess.run([sys.executable, "-m", "engines", "list", "--store", str(store)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split(":", 1)[0]: line for line in done.stdout.splitlines()}
    assert set(lines) == {validated.name, failed.name}, done.stdout
    assert lines[validated.name] == (
        f"{validated.name}: {model_id} fp16, TensorRT 10.3.0.30, Orin (sm 8.7), built 2025-01-02T03:04:05+00:00 "
        "in 312 s, validated")
    assert f"{model_id} int8," in lines[failed.name] and lines[failed.name].endswith(", NOT validated")
    assert "UNUSABLE" not in done.stdout


# --- provisioning without a network -------------------------------------------------------------------------------

# Runs `python -m provisioning` with every outgoing connection and name lookup refused (audit hooks see them all
# before they happen): any attempt to reach the network fails the run instead of passing unnoticed.
_OFFLINE = """
import runpy, sys
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise OSError(f"network unreachable in this test ({event} {args!r})")
sys.addaudithook(refuse)
sys.argv = ["python -m provisioning", *sys.argv[1:]]
runpy.run_module("provisioning", run_name="__main__", alter_sys=True)
"""


def test_provisioning_all_writes_station_toml_and_unit_without_any_network(tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "PIP_NO_INDEX": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    # The broker named here does not exist: provisioning must only write its name, never look it up.
    done = subprocess.run([sys.executable, "-c", _OFFLINE, "all", "--station", "st-07", "--site", "plant-a",
                           "--line", "line-3", "--broker", "broker.plant.invalid:8883", "--camera", "0",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "network unreachable" not in done.stderr
    station_toml, unit = out / "st-07" / "station.toml", out / "st-07" / "appliance.service"
    assert f"wrote {station_toml}" in done.stdout and f"wrote {unit}" in done.stdout
    from appliance.settings import load_settings

    settings = load_settings(station_toml)
    assert (settings.station.id, settings.station.site, settings.station.line) == ("st-07", "plant-a", "line-3")
    assert (settings.mqtt.host, settings.mqtt.port) == ("broker.plant.invalid", 8883)
    assert "WatchdogSec=30" in unit.read_text() and "Type=notify" in unit.read_text()


def test_the_offline_guard_itself_refuses_a_connection():
    """The guard above would pass vacuously if it did not fire: it must stop a real connection attempt."""
    probe = _OFFLINE.replace('runpy.run_module("provisioning", run_name="__main__", alter_sys=True)',
                             'import socket; socket.create_connection(("127.0.0.1", 9), timeout=1)')
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "network unreachable in this test" in done.stderr

