"""Reporting over MQTT against a real Mosquitto started on a free loopback port.

Outages are real (the broker is stopped and started), kills are real (SIGKILL to an `appliance run`
process), authentication and TLS use Mosquitto's own password file and certificates made by openssl.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import BirthPayload, HealthPayload, ResultPayload, StatusPayload
from appliance.reporting.results_log import ResultsLog
from appliance.runtime import build_station, mqtt_link_config
from bundle.decision import Mode
from bundle.errors import ConfigError
from bundle.format import ROLE_FILES
from tests.support.frames import write_frames
from tests.support.mqtt import (
    Subscriber,
    broker_with_config,
    needs_mosquitto,
    prefix,
    rejections,
    start_station,
    stop_station,
    trigger_parts,
)
from tests.support.pki import make_test_pki, write_password_file
from tests.support.settings import LINE, SITE, station_settings
from tests.support.waiting import wait_until
from tools.broker import MosquittoBroker, TlsFiles

pytestmark = needs_mosquitto

REPO = Path(__file__).resolve().parents[1]
ACL = REPO / "provisioning" / "mosquitto" / "acl.conf"


def _logged_ids(db: Path) -> set[str]:
    log = ResultsLog(db)
    try:
        return {r.inspection_id for r in log.inspections()}
    finally:
        log.close()


# --- the happy path ---------------------------------------------------------------------------------------------


def test_every_result_arrives_schema_valid_with_birth_status_and_heartbeats(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    folder = write_frames(tmp_path / "frames", 10)
    settings = station_settings(tmp_path, bundle_dir, broker.port, source=folder)
    station = start_station(settings)
    assert wait_until(lambda: not station.pipeline.alive, 60)
    assert stop_station(station), "outbox not drained on a graceful stop"

    results = [ResultPayload.model_validate(m.payload) for m in control_room.of("result")]
    logged = list(ResultsLog(settings.storage.data_dir / "results.sqlite3").inspections())
    assert len(logged) == 10
    assert {r.inspection_id for r in results} == {r.inspection_id for r in logged}
    by_id = {r.inspection_id: r for r in logged}
    for r in results:
        assert r.verdict == by_id[r.inspection_id].verdict and r.part_id == by_id[r.inspection_id].part_id
        assert r.station == "st-mqtt" and not r.replayed and r.schema_version == 3
    # one connection: seq counts up without gaps across everything sent from the outbox
    seqs = sorted(m.payload["seq"] for m in control_room.messages if m.kind in ("result", "alert", "event", "health"))
    assert seqs == list(range(1, len(seqs) + 1))
    alerts = control_room.of("alert")
    assert len(alerts) == sum(r.verdict == "fail" for r in logged)
    statuses = [StatusPayload.model_validate(m.payload) for m in control_room.of("status")]
    assert [s.state for s in statuses] == ["online", "stopped"]
    assert statuses[0].bd_seq == statuses[1].bd_seq
    # The station connects before its backend is up; once it is, a rebirth names it.
    births = [BirthPayload.model_validate(m.payload) for m in control_room.of("birth")]
    assert births[-1].backend == "onnxruntime" and births[-1].model_id
    assert {b.bd_seq for b in births} == {statuses[0].bd_seq} and len({b.boot_id for b in births}) == 1
    health = [HealthPayload.model_validate(m.payload) for m in control_room.of("health")]
    assert health, "no heartbeat"
    last = health[-1]
    assert last.inspections == 10 and last.backend == "onnxruntime" and last.gpu["state"] == "not_used"
    assert last.mqtt["connected"] is True and last.disk_free_mb and last.camera["kind"] == "images"


# --- store and forward --------------------------------------------------------------------------------------------


def test_broker_down_for_10_s_mid_run_loses_nothing(tmp_path: Path, bundle_dir: Path):
    # A persistent broker and a persistent control-room session, as in a plant: what the station replays
    # after the outage is queued for the subscriber even if it reconnects later than the station.
    broker = MosquittoBroker(tmp_path / "broker", persistence=True).start()
    sub = Subscriber(broker.port, persistent=True)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        trigger_parts(station, [f"A-{i}" for i in range(5)], pause=0.1)
        assert wait_until(lambda: len(sub.of("result")) == 5)
        broker.stop()
        t0 = time.monotonic()
        trigger_parts(station, [f"B-{i}" for i in range(8)], pause=0.2)  # inspected while the broker is down
        assert wait_until(lambda: station.link.state().connected is False, 10)
        # Not a wait for the station: the outage under test lasts 10 s (the station retries meanwhile).
        time.sleep(max(0.0, 10.0 - (time.monotonic() - t0)))
        assert wait_until(lambda: station.outbox.depth() >= 8, 10)  # results (and heartbeats) held on disk
        broker.start()
        trigger_parts(station, [f"C-{i}" for i in range(3)])
        assert wait_until(lambda: len({m.payload["inspection_id"] for m in sub.of("result")}) == 16, 30)
    finally:
        drained = stop_station(station)
        sub.close()
        broker.stop()
    assert drained
    logged = _logged_ids(tmp_path / "var-st-mqtt" / "results.sqlite3")
    received = sub.of("result")
    assert {m.payload["inspection_id"] for m in received} == logged and len(logged) == 16
    # duplicates are allowed only as the same message (same message_id, same inspection)
    per_message: dict[str, str] = {}
    for m in received:
        assert per_message.setdefault(m.payload["message_id"], m.payload["inspection_id"]) == m.payload["inspection_id"]
    assert len(per_message) == 16
    replayed = {m.payload["part_id"] for m in received if m.payload["replayed"]}
    assert {f"B-{i}" for i in range(8)} <= replayed  # made during the outage, sent after it
    assert not replayed & {f"A-{i}" for i in range(5)}


def test_sigkill_shows_offline_at_once_and_the_outbox_replays_after_restart(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    config = tmp_path / "station.toml"
    data = tmp_path / "var"
    config.write_text(
        f'[station]\nid = "st-kill"\nsite = "{SITE}"\nline = "{LINE}"\n[model]\nbundle = "{bundle_dir}"\n'
        '[camera]\nsource = "synthetic"\nloop = true\n[trigger]\nmode = "triggered"\n'
        '[inference]\nbackend = "onnxruntime"\nthreads = 1\n'
        f'[mqtt]\nport = {broker.port}\nkeepalive_s = 5\nheartbeat_s = 1\nreconnect_max_s = 0.5\n'
        f'[storage]\ndata_dir = "{data}"\n'
    )

    lives: list[Path] = []

    def start() -> subprocess.Popen[str]:
        # Each life's log goes to a file: when an assertion fails, its message shows what the station said.
        lives.append(tmp_path / f"life{len(lives) + 1}.log")
        with lives[-1].open("w") as log:
            return subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config),
                                     "--trigger-stdin"], stdin=subprocess.PIPE, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, cwd=REPO)

    def last_log() -> str:
        return lives[-1].read_text()[-3000:]

    def states() -> list[tuple[str, int]]:
        return [(m.payload["state"], m.payload["bd_seq"]) for m in control_room.of("status", "st-kill")]

    proc = start()
    try:
        assert control_room.wait_for(lambda: ("online", 0) in states(), 60), states()
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert control_room.wait_for(lambda: ("offline", 0) in states(), 1.5 * 5 + 5), states()
        offline = next(m for m in control_room.of("status", "st-kill") if m.payload["state"] == "offline")
        # The kernel closes a killed process's socket, and the broker sends the will at once. Keepalive expiry
        # (1.5 x 5 s = 7.5 s) would be a wrong pass: the bound sits well below it, with room for a busy machine.
        assert offline.at - killed_at <= 2.5, f"offline {offline.at - killed_at:.1f} s after the kill"
        assert "st-kill has exceeded timeout" not in broker.log_path.read_text()

        # Second life: results made while the broker is down, then killed before they could be sent.
        proc = start()
        assert control_room.wait_for(lambda: ("online", 1) in states(), 60), states()
        broker.stop()
        assert proc.stdin is not None
        for i in range(4):
            proc.stdin.write(f"K-{i}\n")
        proc.stdin.flush()
        db = data / "results.sqlite3"
        assert wait_until(lambda: len(_logged_ids(db)) == 4, 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        before = len(control_room.of("result", "st-kill"))
        assert before == 0
        outbox = Outbox(data / "outbox.sqlite3")
        assert outbox.depth() >= 4  # on disk, although the process died
        outbox.close()

        # Third life: the new process replays what the killed one left.
        broker.start()
        assert control_room.wait_for(control_room.connected.is_set, 10)
        proc = start()
        assert control_room.wait_for(lambda: len(control_room.of("result", "st-kill")) >= 4, 60), (
            f"{len(control_room.of('result', 'st-kill'))} results replayed; station said:\n{last_log()}")
        received = control_room.of("result", "st-kill")
        assert {m.payload["inspection_id"] for m in received} == _logged_ids(db)
        assert all(m.payload["replayed"] for m in received)
        # bdSeq grows across restarts: the stale `offline` of an earlier life has a smaller number
        online = [bd for state, bd in states() if state == "online"]
        assert online[-1] > 1
    finally:
        proc.kill()
        proc.wait(10)


def test_retained_status_and_birth_come_back_after_a_broker_restart(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker):
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        assert station.link.wait_connected(10)
        connections = station.link.state().connections
        broker.restart()  # no persistence: the broker forgot every retained message
        assert wait_until(lambda: station.link.state().connections > connections, 20)
        late = Subscriber(broker.port, client_id="late-dashboard")
        try:
            assert late.wait_for(lambda: late.of("status") and late.of("birth"), 10)
            status = late.of("status")[-1]
            assert status.retain and status.payload["state"] == "online"
            assert late.of("birth")[-1].retain
        finally:
            late.close()
    finally:
        stop_station(station)


def test_outbox_overflow_sheds_heartbeats_first_and_reports_it(tmp_path: Path, bundle_dir: Path,
                                                               refused_port: int):
    settings = station_settings(tmp_path, bundle_dir, refused_port, mqtt={"outbox_max_messages": 100,
                                                                          "heartbeat_s": 0.5})
    station = start_station(settings, connect=False)  # nothing listens there: the broker is unreachable throughout
    try:
        assert wait_until(lambda: station.outbox.depth() >= 3, 10)  # a few heartbeats spooled
        trigger_parts(station, [f"P-{i}" for i in range(110)])
        assert wait_until(lambda: len(_logged_ids(settings.storage.data_dir / "results.sqlite3")) == 110, 60)
        assert wait_until(lambda: any(e["kind"] == "spool_overflow" for e in _events(station)), 10)
    finally:
        stop_station(station, drain_s=0)
    outbox = Outbox(settings.storage.data_dir / "outbox.sqlite3")
    kept = outbox.pending(1000)
    assert len(kept) == 100
    kept_parts = [json.loads(m.payload)["part_id"] for m in kept if m.kind == "result"]
    assert "P-109" in kept_parts and "P-0" not in kept_parts  # the oldest results went, the newest stayed
    overflow = [detail for kind, detail in _events_in(settings.storage.data_dir) if kind == "spool_overflow"]
    # the spooled heartbeats went first: the first report names them, and all of them went
    assert overflow and "health" in overflow[0]["shed"]
    assert sum(d["shed"].get("health", 0) for d in overflow) >= 3
    assert sum(d["shed"].get("result", 0) for d in overflow) >= 10


def _events(station) -> list[dict]:
    return [{"kind": k, **d} for _, k, d in station.results.events()]


def _events_in(data_dir: Path) -> list[tuple[str, dict]]:
    log = ResultsLog(data_dir / "results.sqlite3")
    try:
        return [(kind, detail) for _, kind, detail in log.events()]
    finally:
        log.close()


# --- commands -------------------------------------------------------------------------------------------------------


def test_commands_change_the_mode_trigger_parts_and_bad_ones_change_nothing(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    cmd = prefix("st-mqtt") + "/cmd/"
    # A retained command left on the broker would be re-applied on every reconnect: it is refused.
    control_room.publish(cmd + "mode", '{"mode": "shadow"}', retain=True)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port))
    try:
        assert control_room.wait_for(lambda: len(rejections(control_room)) == 1, 10)
        assert "retained" in rejections(control_room)[0].detail["reason"]
        assert station.pipeline.mode is Mode.PRODUCTION
        control_room.publish(cmd + "mode", b"", retain=True)  # clears it (and, empty, is not a command)

        control_room.publish(cmd + "mode", '{"mode": "shadow", "message_id": "m1"}')
        assert wait_until(lambda: station.pipeline.mode is Mode.SHADOW, 10)

        rejected_before = len(rejections(control_room))
        control_room.publish(cmd + "mode", '{"mode": "manual_fallback"}')  # not a command an operator may give
        control_room.publish(cmd + "mode", b"{not json")
        control_room.publish(cmd + "mode", '{"mode": "production", "colour": "red"}')
        control_room.publish(cmd + "trigger", '{"part_id": "bad/id"}')
        assert control_room.wait_for(lambda: len(rejections(control_room)) - rejected_before == 4, 10)
        reasons = [(e.detail["command"], e.detail["field"], e.detail["reason"])
                   for e in rejections(control_room)[rejected_before:]]
        assert reasons[0][:2] == ("cmd/mode", "mode")
        assert reasons[1][1] == "(payload)" and "not valid JSON" in reasons[1][2]
        assert reasons[2][1] == "colour" and reasons[2][2] == "unknown field"
        assert reasons[3][:2] == ("cmd/trigger", "part_id")
        assert station.pipeline.mode is Mode.SHADOW  # none of them changed anything

        control_room.publish(cmd + "trigger", '{"part_id": "SN-42", "message_id": "t1"}')
        control_room.publish(cmd + "trigger", '{"part_id": "SN-42", "message_id": "t1"}')  # a QoS 1 duplicate
        control_room.publish(cmd + "trigger", '{"part_id": "SN-43", "message_id": "t2"}')
        # Anchor: commands are applied in order, so once t3's part is reported a second SN-42 would have been too.
        control_room.publish(cmd + "trigger", '{"part_id": "SN-44", "message_id": "t3"}')
        assert control_room.wait_for(lambda: any(m.payload["part_id"] == "SN-44" for m in control_room.of("result")),
                                     20)
        assert sorted(m.payload["part_id"] for m in control_room.of("result")) == ["SN-42", "SN-43", "SN-44"]
        assert all(m.payload["mode"] == "shadow" for m in control_room.of("result"))

        births = len(control_room.of("birth"))
        control_room.publish(cmd + "rebirth", b"")
        assert control_room.wait_for(lambda: len(control_room.of("birth")) == births + 1, 10)
        changed = [m.payload for m in control_room.of("event") if m.payload["kind"] == "mode_changed"]
        assert changed and changed[0]["detail"] == {"from": "production", "to": "shadow"}
    finally:
        stop_station(station)


def test_trigger_is_refused_on_a_continuous_station(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    folder = write_frames(tmp_path / "frames", 1)
    station = start_station(station_settings(tmp_path, bundle_dir, broker.port, source=folder))
    try:
        # The station subscribes to its commands before it sends its birth (test_mqtt_commands.py).
        assert control_room.wait_for(lambda: control_room.of("birth"), 10)
        control_room.publish(prefix("st-mqtt") + "/cmd/trigger", '{"part_id": "SN-1"}')
        assert control_room.wait_for(lambda: rejections(control_room), 10)
        assert "continuous" in rejections(control_room)[0].detail["reason"]
    finally:
        stop_station(station)


# --- authentication, ACL, TLS ---------------------------------------------------------------------------------


@pytest.fixture
def secured_broker(tmp_path: Path):
    passwords = write_password_file(tmp_path / "passwd", {"st-auth": "s3cret", "st-other": "other",
                                                          "dashboard": "view", "controller": "ctl"})
    b = MosquittoBroker(tmp_path / "sbroker", password_file=passwords, acl_file=ACL).start()
    yield b
    b.stop()


def test_wrong_password_is_a_clear_error_and_the_station_keeps_inspecting(
        tmp_path: Path, bundle_dir: Path, secured_broker: MosquittoBroker):
    station = start_station(station_settings(tmp_path, bundle_dir, secured_broker.port, station_id="st-auth",
                                             mqtt={"username": "st-auth", "password": "wrong"}), connect=False)
    try:
        assert wait_until(lambda: station.link.state().last_error is not None, 10)
        error = station.link.state().last_error
        assert "refused the station's login as 'st-auth'" in error and "mqtt.password" in error
        trigger_parts(station, ["W-1", "W-2"])
        assert wait_until(lambda: len(list(station.results.inspections())) == 2, 20)
        assert wait_until(lambda: station.outbox.depth() >= 2, 5)  # spooled, waiting for a working login
        assert not station.link.state().connected
    finally:
        stop_station(station, drain_s=0)


def test_acl_lets_a_station_write_only_its_own_prefix_and_dashboards_only_read(
        tmp_path: Path, bundle_dir: Path, secured_broker: MosquittoBroker):
    dashboard = Subscriber(secured_broker.port, client_id="dash", username="dashboard", password="view")
    station = start_station(station_settings(tmp_path, bundle_dir, secured_broker.port, station_id="st-auth",
                                             mqtt={"username": "st-auth", "password": "s3cret"}))
    # An impostor: logged in as st-other but claiming st-auth's topics (station.id st-auth). Its client id
    # must differ, so it gets its own station id; its topics are then not its own user's.
    impostor = start_station(station_settings(tmp_path, bundle_dir, secured_broker.port, station_id="st-spoof",
                                              mqtt={"username": "st-other", "password": "other"}))
    try:
        assert station.link.wait_connected(10) and impostor.link.wait_connected(10)
        trigger_parts(station, ["OK-1"])
        assert dashboard.wait_for(lambda: dashboard.of("result", "st-auth"), 10)
        # The dashboard may read but not command: the broker drops its publish, the mode stays.
        dashboard.publish(prefix("st-auth") + "/cmd/mode", '{"mode": "shadow"}')  # returns once the broker has it
        # The controller may command. Anchor: its trigger reaches the station after anything the broker had
        # already accepted from the dashboard; the part it makes is still decided in production.
        controller = Subscriber(secured_broker.port, client_id="ctl", username="controller", password="ctl")
        controller.publish(prefix("st-auth") + "/cmd/trigger", '{"part_id": "ANCHOR-1", "message_id": "a1"}')
        assert dashboard.wait_for(lambda: [m for m in dashboard.of("result", "st-auth")
                                           if m.payload["part_id"] == "ANCHOR-1"], 10)
        anchor = next(m for m in dashboard.of("result", "st-auth") if m.payload["part_id"] == "ANCHOR-1")
        assert anchor.payload["mode"] == "production" and station.pipeline.mode is Mode.PRODUCTION
        controller.publish(prefix("st-auth") + "/cmd/mode", '{"mode": "shadow"}')
        assert wait_until(lambda: station.pipeline.mode is Mode.SHADOW, 10)
        controller.close()
        # The impostor's messages are refused by the broker (MQTT 5 PUBACK "Not authorized"), kept, and named.
        trigger_parts(impostor, ["X-1"])
        assert wait_until(lambda: impostor.link.state().held >= 1, 10)
        assert "Not authorized" in impostor.link.state().last_error
        assert "ACL" in impostor.link.state().last_error
        assert not dashboard.of("result", "st-spoof")
        assert impostor.outbox.depth() >= 1  # not lost: retried on the next connection
    finally:
        stop_station(station)
        stop_station(impostor, drain_s=0)
        dashboard.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_a_trusted_ca_and_a_client_certificate_delivers_results(
        tmp_path: Path, bundle_dir: Path, pki: dict[str, Path]):
    tls = TlsFiles(pki["ca.crt"], pki["server.crt"], pki["server.key"], require_client_cert=True)
    with MosquittoBroker(tmp_path / "tls-broker", tls=tls) as broker:
        station = start_station(station_settings(tmp_path, bundle_dir, broker.port, mqtt={"tls": {
            "enabled": True, "ca_file": str(pki["ca.crt"]), "cert_file": str(pki["client.crt"]),
            "key_file": str(pki["client.key"])}}))
        try:
            assert station.link.wait_connected(10), station.link.state()
            assert station.link.state().broker.startswith("mqtts://")
            trigger_parts(station, ["T-1"])
            assert wait_until(lambda: station.outbox.depth() == 0 and len(list(station.results.inspections())) == 1, 10)
        finally:
            stop_station(station)


def test_tls_with_an_untrusted_server_certificate_is_a_clear_error(
        tmp_path: Path, bundle_dir: Path, pki: dict[str, Path]):
    with MosquittoBroker(tmp_path / "tls-broker", tls=TlsFiles(pki["ca.crt"], pki["server.crt"],
                                                               pki["server.key"])) as broker:
        station = start_station(station_settings(tmp_path, bundle_dir, broker.port, mqtt={"tls": {
            "enabled": True, "ca_file": str(pki["other-ca.crt"])}}), connect=False)
        try:
            assert wait_until(lambda: station.link.state().last_error is not None, 10)
            error = station.link.state().last_error
            assert "not trusted by mqtt.tls.ca_file" in error and "other-ca.crt" in error
            trigger_parts(station, ["T-2"])
            assert wait_until(lambda: len(list(station.results.inspections())) == 1, 20)  # still inspecting
        finally:
            stop_station(station, drain_s=0)


def test_missing_tls_file_is_a_config_error_naming_the_key(tmp_path: Path, bundle_dir: Path):
    settings = station_settings(tmp_path, bundle_dir, 1883, mqtt={"tls": {"enabled": True,
                                                                          "ca_file": str(tmp_path / "nope.crt")}})
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file = .*nope\.crt.*no such file"):
        mqtt_link_config(settings)
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        build_station(settings)


def test_plain_listener_refusing_tcp_is_reported_with_host_and_port(tmp_path: Path, bundle_dir: Path,
                                                                    refused_port: int):
    port = refused_port
    station = start_station(station_settings(tmp_path, bundle_dir, port), connect=False)
    try:
        assert wait_until(lambda: station.link.state().last_error is not None, 10)
        assert f"mqtt://127.0.0.1:{port} refused the TCP connection" in station.link.state().last_error
    finally:
        stop_station(station, drain_s=0)


def test_the_shipped_broker_config_and_acl_serve_a_station_over_tls_with_a_password(
        tmp_path: Path, bundle_dir: Path, pki: dict[str, Path]):
    """provisioning/mosquitto/mosquitto.conf as shipped, only its paths and port moved into a temporary folder."""
    import getpass

    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    for name in ("ca.crt", "server.crt", "server.key"):
        (etc / "certs" / name).write_bytes(pki[name].read_bytes())
    (etc / "acl.conf").write_text(ACL.read_text())
    write_password_file(etc / "passwd", {"st-tls": "pw", "dashboard": "view"})
    shipped = (REPO / "provisioning" / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in shipped and "listener 8883" in shipped

    def conf(port: int) -> str:
        return (shipped.replace("/etc/mosquitto/", f"{etc}/").replace("/var/lib/mosquitto/", f"{tmp_path}/")
                .replace("listener 8883", f"listener {port} 127.0.0.1")
                .replace("log_dest syslog", f"log_dest file {tmp_path / 'mosquitto.log'}")
                + f"user {getpass.getuser()}\n")

    with broker_with_config(tmp_path / "broker", conf) as broker:
        port = broker.port
        dashboard = Subscriber(port, client_id="dash", username="dashboard", password="view", ca_file=pki["ca.crt"])
        station = start_station(station_settings(tmp_path, bundle_dir, port, station_id="st-tls", mqtt={
            "username": "st-tls", "password": "pw", "tls": {"enabled": True, "ca_file": str(pki["ca.crt"])}}))
        try:
            trigger_parts(station, ["TLS-1"])
            assert dashboard.wait_for(lambda: dashboard.of("result", "st-tls"), 10)
            assert dashboard.of("result", "st-tls")[0].payload["part_id"] == "TLS-1"
        finally:
            stop_station(station)
            dashboard.close()


def test_a_live_camera_that_goes_away_and_comes_back_is_reported(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    from test_camera import FlakyCamera, live_camera, write_clip

    clip = write_clip(tmp_path, 30)
    # Plays 30 frames, vanishes (three reopen attempts fail), comes back, plays, then stays gone.
    camera = FlakyCamera(clip, fps=60.0, script=["play", "fail", "fail", "fail", "play"])
    settings = station_settings(tmp_path, bundle_dir, broker.port, trigger={"mode": "continuous"})
    station = build_station(settings, source=live_camera(camera))
    station.start_reporting()
    assert station.link.wait_connected(10)
    station.pipeline.start()
    station.backend_started()
    try:
        def kinds() -> list[str]:
            return [m.payload["kind"] for m in control_room.of("event") if m.payload["kind"].startswith("camera_")]

        assert control_room.wait_for(lambda: kinds()[:3] == ["camera_lost", "camera_back", "camera_lost"], 20), kinds()
        events = [m.payload for m in control_room.of("event") if m.payload["kind"].startswith("camera_")]
        assert "rtsp://10.0.0.5/stream1" in events[0]["detail"]["source"] and events[0]["detail"]["error"]
        assert events[1]["detail"]["reconnects"] == 1
        health = control_room.of("health")[-1].payload
        assert health["camera"]["kind"] == "url" and "last_frame_age_s" in health["camera"]
    finally:
        stop_station(station)


def test_a_backend_failure_and_its_recovery_each_send_a_birth_naming_the_backend(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    # Given a station whose model file cannot be opened when its pipeline starts (the ONNX Runtime backend
    # fails, the station goes to manual_fallback, and retries the backend with backoff).
    bundle = shutil.copytree(bundle_dir, tmp_path / "bundle")
    station = build_station(station_settings(tmp_path, bundle, broker.port))
    onnx = bundle / ROLE_FILES["onnx_fp32"]
    hidden = tmp_path / "model_fp32.onnx.whole"
    shutil.copy2(onnx, hidden)
    try:
        onnx.write_bytes(b"not an onnx model")
        station.start_reporting()
        assert station.link.wait_connected(10)
        station.pipeline.start()
        station.backend_started()
        # Then the control room hears backend_failed and a birth that names no backend.
        assert control_room.wait_for(lambda: "backend_failed" in _event_kinds(control_room), 10)
        failed = next(m.payload for m in control_room.of("event") if m.payload["kind"] == "backend_failed")
        assert failed["detail"]["backend"] == "onnxruntime" and failed["detail"]["reason"]
        assert control_room.wait_for(lambda: _birth_backends(control_room)[-1:] == ["none"], 10), (
            _birth_backends(control_room))
        # When the file is whole again, the next retry (on a part, after the backoff) brings the backend back ...
        shutil.copy2(hidden, onnx)
        deadline = time.monotonic() + 30
        for i in range(1000):
            part = f"R-{i}"
            station.pipeline.trigger(part)
            assert control_room.wait_for(lambda p=part: [m for m in control_room.of("result")
                                                         if m.payload["part_id"] == p], 10)
            result = next(m.payload for m in control_room.of("result") if m.payload["part_id"] == part)
            if result["backend"] == "onnxruntime" or time.monotonic() > deadline:
                break
        assert result["backend"] == "onnxruntime", result
        # ... and a new birth names it.
        assert control_room.wait_for(lambda: _birth_backends(control_room)[-1:] == ["onnxruntime"], 10), (
            _birth_backends(control_room))
    finally:
        stop_station(station)


def _event_kinds(sub: Subscriber) -> list[str]:
    return [m.payload["kind"] for m in sub.of("event")]


def _birth_backends(sub: Subscriber) -> list[str]:
    return [BirthPayload.model_validate(m.payload).backend for m in sub.of("birth")]
