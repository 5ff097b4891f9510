"""Helpers for the MQTT tests: a control-room subscriber (real paho client) and a station in this process.

Imported by the test modules (pytest puts tests/ on sys.path); not a test module itself.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.reporting.payloads import EventPayload
from appliance.runtime import Station, build_station
from appliance.settings import StationSettings
from synthetic.parts import render_part

SITE, LINE = "plant-a", "line-3"


@dataclass
class Received:
    topic: str
    kind: str
    payload: dict[str, Any]
    retain: bool
    at: float  # time.monotonic() on arrival
    size: int = 0  # payload bytes as they came over the wire


class Subscriber:
    """What a control room sees: subscribes to `inspection/#` at QoS 1 and keeps every message."""

    def __init__(self, port: int, client_id: str = "control-room", persistent: bool = False,
                 username: str | None = None, password: str | None = None, ca_file: Path | None = None,
                 topic_filter: str = "inspection/#") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._filter = topic_filter
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(10), "subscriber could not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(self._filter, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            payload = {"_raw": msg.payload.decode(errors="replace")}
        parts = msg.topic.split("/")
        kind = "/".join(parts[5:]) if len(parts) > 5 else parts[-1]
        with self._lock:
            self.messages.append(Received(msg.topic, kind, payload, bool(msg.retain), time.monotonic(),
                                          len(msg.payload)))

    def of(self, kind: str, station: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.kind == kind and (station is None or f"/{station}/" in m.topic)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        return wait_until(predicate, timeout)

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def prefix(station: str) -> str:
    """The topic prefix of a station made by station_settings."""
    return f"inspection/{SITE}/{LINE}/{station}"


def rejections(sub: Subscriber, station: str | None = None) -> list[EventPayload]:
    """The `command_rejected` events the subscriber saw, in arrival order."""
    events = [EventPayload.model_validate(m.payload) for m in sub.of("event", station)]
    return [e for e in events if e.kind == "command_rejected"]


def mosquitto_pub(port: int, topic: str, *args: str) -> None:
    """The real `mosquitto_pub` CLI (mosquitto-clients), as an operator would run it; raises if it fails."""
    tool = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    subprocess.run([tool, "-h", "127.0.0.1", "-p", str(port), "-t", topic, *args], check=True,
                   capture_output=True, timeout=10)


def write_frames(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"part_{i:03d}.png"), render_part(700 + i, "crack" if i % 2 else None, 96, True))
    return folder


def station_settings(tmp_path: Path, bundle_dir: Path, port: int, station_id: str = "st-mqtt", **sections: Any
                     ) -> StationSettings:
    values: dict[str, Any] = {
        "station": {"id": station_id, "site": SITE, "line": LINE}, "model": {"bundle": str(bundle_dir)},
        "camera": {"source": "synthetic", "loop": True}, "trigger": {"mode": "triggered"},
        "inference": {"backend": "onnxruntime", "threads": 1},
        "storage": {"data_dir": str(tmp_path / f"var-{station_id}")},
        "mqtt": {"enabled": True, "port": port, "keepalive_s": 5, "heartbeat_s": 0.5, "reconnect_max_s": 0.5,
                 "drain_timeout_s": 10},
    }
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    return StationSettings(**values)


def start_station(settings: StationSettings, connect: bool = True) -> Station:
    """As `appliance run` does; `connect`: wait until the broker accepted the station before inspecting."""
    station = build_station(settings)
    assert station.mqtt is not None
    station.mqtt.start()
    if connect:
        assert station.mqtt.link.wait_connected(10), station.mqtt.link.state()
    station.pipeline.start()
    station.mqtt.pipeline_started()
    return station


def stop_station(station: Station, drain_s: float = 10.0) -> bool:
    station.pipeline.stop()
    assert station.pipeline.join(30), "pipeline did not stop"
    drained = station.mqtt.stop(drain_s) if station.mqtt is not None else True
    station.close()
    return drained


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
