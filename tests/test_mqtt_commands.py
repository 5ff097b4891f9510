"""Commands and message sizes over MQTT, against a real Mosquitto on a free loopback port.

Real paho clients, the real `mosquitto_pub` CLI where an operator would use it, a broker configured with a
Maximum Packet Size where sizes matter. Nothing waits on a bare sleep: every "this changed nothing" is
anchored on a later command whose effect proves the station had already processed the earlier one.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from appliance.reporting.mqtt_link import LinkConfig, MqttLink
from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import BirthPayload, EventPayload, Topics
from appliance.runtime import build_station
from bundle.decision import Mode
from tests.support.frames import write_frames
from tests.support.mqtt import (
    Subscriber,
    mosquitto_pub,
    needs_mosquitto,
    prefix,
    rejections,
    start_station,
    stop_station,
)
from tests.support.pki import write_password_file
from tests.support.settings import LINE, SITE, STATION_ID, station_settings
from tests.support.waiting import wait_until
from tools.broker import MosquittoBroker

pytestmark = needs_mosquitto

STATION = STATION_ID  # station_settings' default id
CMD = prefix(STATION) + "/cmd/"
MAX_PACKET = 100_000


@pytest.fixture
def small_packet_broker(tmp_path: Path):
    """A broker that announces (CONNACK) and enforces a Maximum Packet Size of 100 000 bytes."""
    b = MosquittoBroker(tmp_path / "broker", extra=[f"max_packet_size {MAX_PACKET}"]).start()
    yield b
    b.stop()


def _results(sub: Subscriber) -> list[str]:
    """Part ids of the results the subscriber saw, in arrival order."""
    return [m.payload["part_id"] for m in sub.of("result", STATION)]


def _statuses(sub: Subscriber) -> list[str]:
    return [m.payload["state"] for m in sub.of("status", STATION)]


def _event_rows(data_dir: Path) -> list[tuple[str, int]]:
    """(kind, bytes of the stored detail) of every row of the results log's events table."""
    db = sqlite3.connect(f"file:{data_dir / 'results.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, length(CAST(detail AS BLOB)) FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


def _dead_letters(data_dir: Path) -> list[tuple[str, str, int]]:
    """(kind, reason, payload bytes) of every row of the outbox's dead_letters table."""
    db = sqlite3.connect(f"file:{data_dir / 'outbox.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, reason, length(CAST(payload AS BLOB)) FROM dead_letters").fetchall()
    finally:
        db.close()


def _trigger_and_wait(sub: Subscriber, part_id: str, message_id: str, timeout: float = 20.0) -> None:
    """The anchor: a valid trigger with a message id, and its result at the control room."""
    sub.publish(CMD + "trigger", json.dumps({"part_id": part_id, "message_id": message_id}))
    assert sub.wait_for(lambda: part_id in _results(sub), timeout), f"no result for anchor part {part_id}"


# --- oversized and malformed commands ---------------------------------------------------------------------------


def test_an_89_kB_trigger_with_9000_unknown_fields_is_one_small_rejection_and_no_reconnect_loop(
        tmp_path: Path, bundle_dir: Path, small_packet_broker: MosquittoBroker):
    # Given a triggered station on a broker that takes packets up to 100 000 bytes
    sub = Subscriber(small_packet_broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, small_packet_broker.port))
    try:
        assert station.link.state().connections == 1
        fields = {f"f{i:04d}": 1 for i in range(9000)}
        payload = json.dumps({"part_id": "SN-BIG", **fields}, separators=(",", ":"))
        assert 85_000 < len(payload) < MAX_PACKET - 200
        # When a controller sends it, then 50 valid triggers
        sub.publish(CMD + "trigger", payload)
        part_ids = [f"AFTER-{i:02d}" for i in range(50)]
        for i, part_id in enumerate(part_ids):
            sub.publish(CMD + "trigger", json.dumps({"part_id": part_id, "message_id": f"after-{i}"}))
        # Then every one of the 50 is inspected and reported
        assert sub.wait_for(lambda: len(_results(sub)) == 50, 60), f"{len(_results(sub))} of 50 results"
        assert sorted(_results(sub)) == part_ids
        # ... and the big one was answered by exactly one small rejection, and inspected nothing
        assert station.sinks.flush(10)
        rejected = [m for m in sub.of("event", STATION) if m.payload["kind"] == "command_rejected"]
        assert len(rejected) == 1
        assert rejected[0].size < 1000
        detail = rejected[0].payload["detail"]
        assert detail["command"] == "cmd/trigger" and detail["field"] == "(payload)"
        assert f"{len(payload)} bytes is over the limit of 4096 bytes (mqtt.max_command_bytes)" in detail["reason"]
        assert "SN-BIG" not in _results(sub)
        # ... on one connection all along: no reconnect loop
        state = station.link.state()
        assert state.connected and state.connections == 1 and state.failed_attempts == 0, state
        assert _statuses(sub) == ["online"]
        assert state.max_packet_size == MAX_PACKET
    finally:
        stop_station(station)
        sub.close()
    stored = [size for kind, size in _event_rows(tmp_path / f"var-{STATION}") if kind == "command_rejected"]
    assert len(stored) == 1 and stored[0] < 1000, stored


def test_9000_unknown_fields_under_a_raised_size_limit_are_named_once_and_counted(
        tmp_path: Path, bundle_dir: Path, small_packet_broker: MosquittoBroker):
    # Given a station whose mqtt.max_command_bytes lets the 89 kB payload be parsed
    sub = Subscriber(small_packet_broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, small_packet_broker.port,
                                             mqtt={"max_command_bytes": MAX_PACKET}))
    try:
        payload = json.dumps({"part_id": "SN-BIG", **{f"f{i:04d}": 1 for i in range(9000)}}, separators=(",", ":"))
        # When it arrives, followed by an anchor trigger
        sub.publish(CMD + "trigger", payload)
        _trigger_and_wait(sub, "ANCHOR-1", "anchor-1")
        assert station.sinks.flush(10)
        # Then one rejection names the first unknown field and counts the other 8999 problems, in under 1 kB
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 1, 10)
        rejected = [m for m in sub.of("event", STATION) if m.payload["kind"] == "command_rejected"]
        assert len(rejected) == 1 and rejected[0].size < 1000
        detail = rejected[0].payload["detail"]
        assert detail["field"] == "f0000" and detail["reason"].startswith("unknown field")
        assert re.search(r"and 899\d more problems$", detail["reason"]), detail["reason"]
        assert _results(sub) == ["ANCHOR-1"]
        assert station.link.state().connections == 1
    finally:
        stop_station(station)
        sub.close()


def test_a_command_over_max_command_bytes_is_refused_by_size_and_one_at_the_limit_is_applied(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        def padded(body: dict[str, Any], size: int) -> bytes:
            text = json.dumps(body)
            return (text[:-1] + " " * (size - len(text)) + "}").encode()

        over = padded({"part_id": "SN-OVER", "message_id": "over"}, 4097)
        at_limit = padded({"part_id": "SN-AT-LIMIT", "message_id": "at-limit"}, 4096)
        assert len(over) == 4097 and len(at_limit) == 4096
        # When one byte over the default limit, then exactly at it
        sub.publish(CMD + "trigger", over)
        sub.publish(CMD + "trigger", at_limit)
        # Then the one at the limit is inspected (the anchor) and the one over it is refused, naming the size
        assert sub.wait_for(lambda: "SN-AT-LIMIT" in _results(sub), 20)
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 1, 10)
        detail = rejections(sub, STATION)[0].detail
        assert detail["field"] == "(payload)"
        assert detail["reason"] == ("payload of 4097 bytes is over the limit of 4096 bytes (mqtt.max_command_bytes)")
        assert detail["command_message_id"] is None  # never parsed, so its message id is unknown
        assert _results(sub) == ["SN-AT-LIMIT"]
    finally:
        stop_station(station)
        sub.close()


def test_a_2_MB_field_name_makes_neither_a_large_event_nor_a_large_results_log_row(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    # Given a station that parses commands up to the largest allowed limit (1 MiB), on a broker without a limit
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port,
                                             mqtt={"max_command_bytes": 1_048_576}))
    try:
        two_mb = ('{"' + "k" * 2_000_000 + '": 1}').encode()
        # just under the limit: parsed, so the field name itself reaches the rejection
        one_mb = ('{"part_id": "SN-X", "' + "\u00e9" * 500_000 + '": 1}').encode()
        assert len(one_mb) < 1_048_576
        # When both arrive, then an anchor trigger
        sub.publish(CMD + "trigger", two_mb)
        sub.publish(CMD + "trigger", one_mb)
        _trigger_and_wait(sub, "ANCHOR-2MB", "anchor-2mb")
        assert station.sinks.flush(10)
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 2, 10)
        # Then two small events, the second naming the field cut to a few dozen characters
        rejected = [m for m in sub.of("event", STATION) if m.payload["kind"] == "command_rejected"]
        assert [m.size < 1000 for m in rejected] == [True, True], [m.size for m in rejected]
        first, second = (m.payload["detail"] for m in rejected)
        assert first["field"] == "(payload)" and "over the limit of 1048576 bytes" in first["reason"]
        assert second["field"].startswith("\u00e9") and second["field"].endswith("...")
        assert len(second["field"]) <= 64 and second["reason"] == "unknown field"
        assert _results(sub) == ["ANCHOR-2MB"]
    finally:
        stop_station(station)
        sub.close()
    rows = _event_rows(tmp_path / f"var-{STATION}")
    assert [kind for kind, _ in rows].count("command_rejected") == 2
    assert max(size for _, size in rows) < 1000, rows


def test_a_command_on_an_unknown_command_topic_is_rejected_naming_the_topic(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        sub.publish(CMD + "reboot", '{"now": true}')
        sub.publish(CMD + "r" * 5000, '{"now": true}')  # a very long topic level is named, cut
        _trigger_and_wait(sub, "ANCHOR-TOPIC", "anchor-topic")
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 2, 10)
        first, second = (e.detail for e in rejections(sub, STATION))
        assert first["command"] == "cmd/reboot" and first["field"] == "(topic)"
        assert "not a command kind" in first["reason"]
        assert second["field"] == "(topic)" and len(second["command"]) <= 64
        assert all(m.size < 1000 for m in sub.of("event", STATION))
    finally:
        stop_station(station)
        sub.close()


def test_a_rejected_trigger_with_a_message_id_is_rejected_again_not_called_a_duplicate(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    # Given a continuous station (it refuses triggers), whose single frame is inspected at once
    folder = write_frames(tmp_path / "frames", 1)
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port, source=folder))
    try:
        # When the same trigger (one message id) is delivered twice, then a mode command as the anchor
        sub.publish(CMD + "trigger", '{"part_id": "SN-1", "message_id": "t-1"}')
        sub.publish(CMD + "trigger", '{"part_id": "SN-1", "message_id": "t-1"}')
        sub.publish(CMD + "mode", '{"mode": "shadow", "message_id": "m-1"}')
        assert wait_until(lambda: station.pipeline.mode is Mode.SHADOW, 10)
        # Then both deliveries are answered: it was never applied, so the second is no duplicate of anything
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 2, 10)
        for e in rejections(sub, STATION):
            assert e.detail["command_message_id"] == "t-1" and "continuous" in e.detail["reason"]
        # ... and an applied command with a message id still counts once
        sub.publish(CMD + "mode", '{"mode": "production", "message_id": "m-1"}')  # the same id: ignored
        sub.publish(CMD + "mode", '{"mode": "production", "message_id": "m-2"}')
        changed = lambda: [m.payload["detail"] for m in sub.of("event", STATION)  # noqa: E731
                           if m.payload["kind"] == "mode_changed"]
        assert sub.wait_for(lambda: len(changed()) == 2, 10)
        assert changed() == [{"from": "production", "to": "shadow"}, {"from": "shadow", "to": "production"}]
    finally:
        stop_station(station)
        sub.close()


# --- the broker's Maximum Packet Size ---------------------------------------------------------------------------


def test_an_event_over_the_brokers_maximum_packet_size_goes_to_dead_letters_and_blocks_nothing(
        tmp_path: Path, bundle_dir: Path, small_packet_broker: MosquittoBroker):
    sub = Subscriber(small_packet_broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, small_packet_broker.port))
    data_dir = tmp_path / f"var-{STATION}"
    try:
        # Given the broker announced its limit in the CONNACK
        assert station.link.state().max_packet_size == MAX_PACKET
        # When the station emits an event of 200 kB, then inspects 10 parts
        station.sinks.event("test_big", {"blob": "x" * 200_000})
        part_ids = [f"DL-{i}" for i in range(10)]
        for part_id in part_ids:
            station.pipeline.trigger(part_id)
        # Then the parts arrive, in order, on the same connection
        assert sub.wait_for(lambda: len(_results(sub)) == 10, 30), _results(sub)
        assert _results(sub) == part_ids
        seqs = [m.payload["seq"] for m in sub.of("result", STATION)]
        assert seqs == sorted(seqs)
        # ... the big event was never sent: it sits in dead_letters with the size and the limit
        assert wait_until(lambda: station.link.state().dead_letters == 1, 10)
        (kind, reason, size), = _dead_letters(data_dir)
        assert kind == "event" and size > 200_000
        match = re.fullmatch(rf"(\d+) bytes, over the broker's Maximum Packet Size {MAX_PACKET}", reason)
        assert match and int(match.group(1)) > 200_000, reason
        assert not [m for m in sub.of("event", STATION) if m.payload["kind"] == "test_big"]
        # ... and the heartbeat counts it, from the outbox and from the link
        def counted() -> bool:
            beats = sub.of("health", STATION)
            return bool(beats) and beats[-1].payload["storage"].get("dead_letters") == 1 and \
                beats[-1].payload["mqtt"]["dead_letters"] == 1
        assert sub.wait_for(counted, 10)
        beat = sub.of("health", STATION)[-1].payload
        assert beat["mqtt"]["max_packet_size"] == MAX_PACKET and beat["mqtt"]["connections"] == 1
        state = station.link.state()
        assert state.connected and state.connections == 1 and state.failed_attempts == 0, state
        assert "dead_letters" in (state.last_error or "") and str(MAX_PACKET) in state.last_error
        assert _statuses(sub) == ["online"]
    finally:
        assert stop_station(station), "outbox not drained"
        sub.close()
    # the station's own record keeps the whole event: the results log is not limited by the broker
    assert [size > 200_000 for kind, size in _event_rows(data_dir) if kind == "test_big"] == [True]


def test_an_oversized_message_on_the_direct_path_is_dropped_not_sent(
        tmp_path: Path, bundle_dir: Path, small_packet_broker: MosquittoBroker):
    # The direct path carries heartbeats and events while the outbox cannot take them: an oversized one
    # must not make the broker drop the connection (and with it what is in flight).
    sub = Subscriber(small_packet_broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, small_packet_broker.port))
    try:
        big = EventPayload(station=STATION, kind="test_big", detail={"blob": "x" * 200_000}).model_dump_json()
        small = EventPayload(station=STATION, kind="test_small", detail={}).model_dump_json()
        station.link.publish_direct(prefix(STATION) + "/event", big)
        station.link.publish_direct(prefix(STATION) + "/event", small)
        for part_id in ("DIRECT-1", "DIRECT-2"):
            station.pipeline.trigger(part_id)
        assert sub.wait_for(lambda: len(_results(sub)) == 2, 20)
        assert sub.wait_for(lambda: any(m.payload["kind"] == "test_small" for m in sub.of("event", STATION)), 10)
        assert not any(m.payload["kind"] == "test_big" for m in sub.of("event", STATION))
        state = station.link.state()
        assert state.connections == 1 and state.failed_attempts == 0, state
        assert "Maximum Packet Size" in (state.last_error or "")
        assert _statuses(sub) == ["online"]
    finally:
        stop_station(station)
        sub.close()


# --- retained commands ----------------------------------------------------------------------------------------


def test_retained_commands_published_live_with_mosquitto_pub_are_refused(
        tmp_path: Path, bundle_dir: Path):
    # Given a running, connected station; a persistent broker, so retained commands survive its restart
    broker = MosquittoBroker(tmp_path / "broker", persistence=True).start()
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    port = broker.port
    try:
        # (the second birth names the backend once it is up: count from there)
        assert sub.wait_for(lambda: any(m.payload["backend"] == "onnxruntime" for m in sub.of("birth", STATION)), 10)
        births = len(sub.of("birth", STATION))
        # When an operator publishes retained commands with the CLI (QoS 1 and 0, MQTT 3.1.1 and 5)
        mosquitto_pub(port, CMD + "mode", "-r", "-q", "1", "-m", '{"mode": "shadow"}')
        mosquitto_pub(port, CMD + "trigger", "-r", "-q", "1", "-m", '{"part_id": "RET-1", "message_id": "ret-1"}')
        mosquitto_pub(port, CMD + "rebirth", "-r", "-q", "0", "-V", "mqttv5", "-m", "{}")
        # ... followed by a live trigger with a message id
        mosquitto_pub(port, CMD + "trigger", "-q", "1", "-m", '{"part_id": "LIVE-1", "message_id": "live-1"}')
        assert sub.wait_for(lambda: "LIVE-1" in _results(sub), 20)
        # Then each retained one was refused, naming "retained", and none changed anything
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 3, 10)
        refused = rejections(sub, STATION)
        assert [e.detail["command"] for e in refused] == ["cmd/mode", "cmd/trigger", "cmd/rebirth"]
        assert all("retained" in e.detail["reason"] for e in refused)
        assert station.pipeline.mode is Mode.PRODUCTION
        assert _results(sub) == ["LIVE-1"]
        assert "RET-1" not in {r.part_id for r in station.results.inspections()}
        assert len(sub.of("birth", STATION)) == births

        # When the station reconnects (broker restart) and gets the retained commands on subscribing
        connections = station.link.state().connections
        broker.restart()
        assert wait_until(lambda: station.link.state().connections == connections + 1, 20)
        assert sub.wait_for(sub.connected.is_set, 10)
        assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 6, 20), \
            [e.detail for e in rejections(sub, STATION)]
        mosquitto_pub(port, CMD + "trigger", "-q", "1", "-m", '{"part_id": "LIVE-2", "message_id": "live-2"}')
        # Then they are refused again and still change nothing
        assert sub.wait_for(lambda: "LIVE-2" in _results(sub), 20)
        assert all("retained" in e.detail["reason"] for e in rejections(sub, STATION))
        assert station.pipeline.mode is Mode.PRODUCTION
        assert [p for p in _results(sub) if not p.startswith("LIVE-")] == []

        # When the operator clears them (an empty retained message), the clearing is no command to refuse
        for kind in ("mode", "trigger", "rebirth"):
            mosquitto_pub(port, CMD + kind, "-r", "-n")
        mosquitto_pub(port, CMD + "trigger", "-q", "1", "-m", '{"part_id": "LIVE-3", "message_id": "live-3"}')
        assert sub.wait_for(lambda: "LIVE-3" in _results(sub), 20)
        assert len(rejections(sub, STATION)) == 6
        # ... and a dashboard that subscribes now finds no retained command left
        late = Subscriber(port, client_id="late-dashboard")
        try:
            assert late.wait_for(lambda: late.of("health", STATION), 10)
            assert not [m.topic for m in late.messages if m.kind.startswith("cmd/")]
        finally:
            late.close()
    finally:
        for kind in ("mode", "trigger", "rebirth"):
            if broker.running:
                mosquitto_pub(port, CMD + kind, "-r", "-n")
        stop_station(station)
        sub.close()
        broker.stop()


def test_a_retained_trigger_left_on_the_broker_does_not_inspect_a_part_when_the_station_connects(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    sub = Subscriber(broker.port)
    try:
        mosquitto_pub(broker.port, CMD + "trigger", "-r", "-q", "1", "-m", '{"part_id": "RET-OLD"}')
        station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
        try:
            assert sub.wait_for(lambda: len(rejections(sub, STATION)) == 1, 10)
            assert "retained" in rejections(sub, STATION)[0].detail["reason"]
            _trigger_and_wait(sub, "LIVE-OLD", "live-old")
            assert _results(sub) == ["LIVE-OLD"]
            assert [r.part_id for r in station.results.inspections()] == ["LIVE-OLD"]
        finally:
            mosquitto_pub(broker.port, CMD + "trigger", "-r", "-n")
            stop_station(station)
    finally:
        sub.close()


# --- commands right after the birth ---------------------------------------------------------------------------------


class _Controller:
    """A controller (real paho client) that commands a station the instant it sees one of its messages."""

    def __init__(self, port: int, topics: Topics, on: str) -> None:
        self.topics = topics
        self.on = on  # "birth" or "status"
        self.seen: list[int] = []  # bd_seq of each birth / online status it reacted to
        self.acked: dict[int, threading.Event] = {}  # bd_seq -> the broker acknowledged the command (PUBACK)
        self._mids: dict[int, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"controller-{on}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.of(on), qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.connected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10), "controller could not subscribe"

    def acked_event(self, bd_seq: int) -> threading.Event:
        with self._lock:
            return self.acked.setdefault(bd_seq, threading.Event())

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        if self.on == "status" and data["state"] != "online":
            return
        bd_seq = data["bd_seq"]
        # At once, from inside the callback: no sleep, no waiting for anything else.
        info = client.publish(self.topics.of("cmd/mode"),
                              json.dumps({"mode": "shadow", "message_id": f"{self.on}-{bd_seq}"}), qos=1)
        with self._lock:
            self.seen.append(bd_seq)
            self._mids[info.mid] = bd_seq

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            bd_seq = self._mids.pop(mid, None)
        if bd_seq is not None:
            self.acked_event(bd_seq).set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _link(port: int, outbox: Outbox, birth: Any, commands: list[tuple[str, bytes, bool]]
          ) -> MqttLink:
    topics = Topics("inspection", SITE, LINE, "st-birth")
    config = LinkConfig(host="127.0.0.1", port=port, client_id="st-birth", topics=topics, keepalive_s=5,
                        reconnect_initial_s=0.2, reconnect_max_s=0.5)
    return MqttLink(config, outbox, birth, lambda kind, payload, retained: commands.append((kind, payload, retained)))


def _birth(bd_seq: int) -> BirthPayload:
    return BirthPayload(station="st-birth", software_version="test", model_id="m", backend="onnxruntime",
                        config_hash="0" * 16, cameras=[], boot_id="b" * 32, bd_seq=bd_seq)


def _message_ids(commands: list[tuple[str, bytes, bool]]) -> list[str]:
    return [json.loads(payload)["message_id"] for _, payload, _ in commands]


def test_a_command_sent_the_instant_the_birth_arrives_is_never_lost(tmp_path: Path, broker: MosquittoBroker):
    topics = Topics("inspection", SITE, LINE, "st-birth")
    controller = _Controller(broker.port, topics, on="birth")
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    commands: list[tuple[str, bytes, bool]] = []
    try:
        for i in range(20):  # twenty fresh connections of the station's link
            link = _link(broker.port, outbox, _birth, commands)
            link.start()
            try:
                assert link.wait_connected(10), link.state()
                assert wait_until(lambda n=i + 1: len(commands) == n, 10), (
                    f"connection {i + 1}: the command sent on the birth was lost; got {_message_ids(commands)}")
            finally:
                assert link.stop(5)
        assert controller.seen == list(range(20))  # one birth per connection, bdSeq 0..19
        assert _message_ids(commands) == [f"birth-{bd_seq}" for bd_seq in range(20)]
        assert all(kind == "cmd/mode" and not retained for kind, _, retained in commands)
    finally:
        controller.close()
        outbox.close()


def test_a_command_sent_on_the_online_status_is_not_lost_however_long_the_birth_takes(
        tmp_path: Path, broker: MosquittoBroker):
    # The status `online` goes out before the birth. Here the birth is held back until the broker has
    # acknowledged the controller's command, so the command is routed while the station is between the two:
    # only a station that subscribed (and had the SUBACK) before saying `online` receives it.
    topics = Topics("inspection", SITE, LINE, "st-birth")
    controller = _Controller(broker.port, topics, on="status")
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    commands: list[tuple[str, bytes, bool]] = []

    def slow_birth(bd_seq: int) -> BirthPayload:
        assert controller.acked_event(bd_seq).wait(10), f"the controller's command for bdSeq {bd_seq} was not acked"
        return _birth(bd_seq)

    try:
        for i in range(5):
            link = _link(broker.port, outbox, slow_birth, commands)
            link.start()
            try:
                assert link.wait_connected(15), link.state()
                assert wait_until(lambda n=i + 1: len(commands) == n, 10), (
                    f"connection {i + 1}: the command sent on `online` was lost; got {_message_ids(commands)}")
            finally:
                assert link.stop(5)
        assert _message_ids(commands) == [f"status-{bd_seq}" for bd_seq in range(5)]
    finally:
        controller.close()
        outbox.close()


# --- part ids ---------------------------------------------------------------------------------------------------------


def test_continuous_part_ids_are_unique_across_restarts_and_carry_the_run_number(tmp_path: Path, bundle_dir: Path):
    folder = write_frames(tmp_path / "frames", 3)
    settings = station_settings(tmp_path, bundle_dir, station_id="st-runs", source=folder)  # MQTT off
    part_ids: list[str] = []
    for _ in range(2):  # two starts of the station on the same storage.data_dir
        station = build_station(settings)
        assert station.link is None
        station.pipeline.start()
        assert station.pipeline.join(60), "pipeline did not finish"
        part_ids += [r.part_id for r in station.results.inspections()][len(part_ids):]
        assert station.close()
    assert len(part_ids) == 6 and len(set(part_ids)) == 6, part_ids
    parsed = [re.fullmatch(r"st-runs-r(\d+)-(\d{8})", p) for p in part_ids]
    assert all(parsed), part_ids
    assert [int(m.group(1)) for m in parsed] == [0, 0, 0, 1, 1, 1]
    assert [int(m.group(2)) for m in parsed] == [1, 2, 3, 1, 2, 3]


def test_a_message_the_broker_refuses_three_times_goes_to_dead_letters_and_the_rest_flows(
        tmp_path: Path, bundle_dir: Path):
    # Given a broker whose ACL lets user st-other write only under st-other's prefix, and a station logged in
    # as st-other but named st-spoof: the broker refuses every one of its messages (MQTT 5 PUBACK 0x87)
    acl = Path(__file__).resolve().parents[1] / "provisioning" / "mosquitto" / "acl.conf"
    passwords = write_password_file(tmp_path / "passwd", {"st-other": "other", "dashboard": "view"})
    broker = MosquittoBroker(tmp_path / "sbroker", password_file=passwords, acl_file=acl).start()
    settings = station_settings(tmp_path, bundle_dir, broker.port, station_id="st-spoof",
                                mqtt={"username": "st-other", "password": "other", "heartbeat_s": 3600})
    station = start_station(settings)
    data_dir = settings.storage.data_dir
    try:
        station.pipeline.trigger("REFUSED-1")
        assert wait_until(lambda: station.link.state().held >= 1, 10)
        # When the station reconnects twice more (each connection retries what was refused on the last one)
        for _ in range(2):
            connections = station.link.state().connections
            broker.restart()
            assert wait_until(lambda n=connections: station.link.state().connections > n, 20)
        # Then after the third refusal the result (and what else was refused since the first connection) is moved
        # aside with the reason; messages made later are still being retried, never more than three times
        assert wait_until(lambda: "result" in {kind for kind, _, _ in _dead_letters(data_dir)}, 20), (
            station.link.state(), station.outbox.depth())
        # the link counts a move just after the row is written: wait for the two to agree
        assert wait_until(lambda: station.link.state().dead_letters == len(_dead_letters(data_dir)), 5)
        rows = _dead_letters(data_dir)
        assert all(reason.startswith("refused 3 times: Not authorized") for _, reason, _ in rows), rows
        assert station.link.state().connected
    finally:
        stop_station(station, drain_s=0)
        broker.stop()


def test_an_empty_command_sent_live_is_answered_and_an_empty_retained_one_clears_quietly(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    sub = Subscriber(broker.port)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        # Given empty live commands (mosquitto_pub -n, or only spaces), then an anchor
        sub.publish(CMD + "trigger", b"")
        sub.publish(CMD + "mode", b"   ")
        sub.publish(CMD + "reboot", b"")
        sub.publish(CMD + "mode", b"", retain=True)  # clearing a retained message: no command at all
        _trigger_and_wait(sub, "EMPTY-ANCHOR", "anchor-1")
        # Then each live one got exactly one answer naming what is missing, and the clearing none
        answered = sorted((e.detail["command"], e.detail["field"]) for e in rejections(sub, STATION))
        assert answered == [("cmd/mode", "mode"), ("cmd/reboot", "(topic)"), ("cmd/trigger", "part_id")]
        assert station.pipeline.mode is Mode.PRODUCTION
    finally:
        stop_station(station)
        sub.close()


def test_part_ids_from_standard_input_follow_the_trigger_rule(monkeypatch: pytest.MonkeyPatch):
    import io

    from appliance.runtime import _stdin_triggers

    class Triggers:
        def __init__(self) -> None:
            self.ids: list[str] = []

        def trigger(self, part_id: str) -> None:
            self.ids.append(part_id)

    monkeypatch.setattr("sys.stdin", io.StringIO("SN-1\nbad/id\n\n" + "x" * 300 + "\nsp ace\nSN-2:a.b_c\n"))
    got = Triggers()
    _stdin_triggers(got)  # type: ignore[arg-type]
    assert got.ids == ["SN-1", "SN-2:a.b_c"]
