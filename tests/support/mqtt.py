"""MQTT test support: a control room (real paho client), the operator's `mosquitto_pub`, a station in this
process, and loopback ports without a race.

The broker is tools.broker.MosquittoBroker (the demo and the bench start one too); the `broker` and
`control_room` fixtures in tests/conftest.py give a test its own.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.reporting.payloads import EventPayload
from appliance.runtime import Station, build_station
from appliance.settings import StationSettings
from tests.support.settings import LINE, SITE
from tests.support.waiting import wait_until
from tools.broker import MOSQUITTO_HINT, MosquittoBroker, _PortTaken, find_mosquitto, free_port

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason=f"mosquitto not installed: {MOSQUITTO_HINT}")


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

    def wait_for(self, predicate: Callable[[], object], timeout: float = 20.0) -> bool:
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


# --- a station in this process ------------------------------------------------------------------------------------


def start_station(settings: StationSettings, connect: bool = True) -> Station:
    """As `appliance run` does; `connect`: wait until the broker accepted the station before inspecting."""
    station = build_station(settings)
    assert station.link is not None
    station.start_reporting()
    if connect:
        assert station.link.wait_connected(10), station.link.state()
    station.pipeline.start()
    station.backend_started()
    return station


def trigger_parts(station: Station, part_ids: Iterable[str], pause: float = 0.0) -> None:
    """Trigger one part per id, in order. `pause` spaces them out in time as a line would deliver them
    (a fault then lasts across several parts); it is pacing, never a wait for the station."""
    for part_id in part_ids:
        station.pipeline.trigger(part_id)
        if pause:
            time.sleep(pause)


def stop_station(station: Station, drain_s: float = 10.0) -> bool:
    station.pipeline.stop()
    assert station.pipeline.join(30), "pipeline did not stop"
    drained = station.stop_reporting(drain_s)
    station.close()
    return drained


# --- ports without a race -----------------------------------------------------------------------------------------


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses every TCP connection while the block runs: bound here, never listening.

    Not free_port(): its probe socket is closed when it returns, so another process (a broker of another test)
    could listen there before the test connects. A port held bound cannot be taken meanwhile.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@contextmanager
def broker_with_config(folder: Path, config_for: Callable[[int], str], attempts: int = 5
                       ) -> Iterator[MosquittoBroker]:
    """A MosquittoBroker running a complete configuration of the test's own, which must name its port.

    MosquittoBroker moves to a fresh port by itself only for the configuration it generates; here the port is
    chosen, the configuration made for it, and both made again if another process takes the port before
    mosquitto binds it.
    """
    for attempt in range(attempts):
        port = free_port()
        broker = MosquittoBroker(folder, port=port, config=config_for(port))
        try:
            broker.start()
        except _PortTaken:
            if attempt == attempts - 1:
                raise
            continue
        try:
            yield broker
        finally:
            broker.stop()
        return
