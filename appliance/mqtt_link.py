"""The station's one MQTT connection, on one thread: availability, birth, the outbox pump, commands.

Why one thread driving paho's `loop()` rather than `loop_start()`: every paho call and callback then
happens on this thread, so the map from paho's message ids to outbox rows needs no lock. And why a new
paho client per connection: each connection gets a fresh last will carrying a new bdSeq, a fresh `seq`
numbering, and no leftovers in paho's in-memory queue (paho would resend those itself after a reconnect,
stamped with the old connection's numbers). The outbox alone decides what is sent and when it is done:
a row is deleted only on the broker's PUBACK; everything else (outage, crash, refused login) leaves it
stored, and it is replayed in order, flagged `replayed`, on the next connection.

On every connect: the retained `status` = online (with the bdSeq of this connection's will), the retained
`birth`, the subscription to `<prefix>/cmd/+`, then the outbox backlog oldest first. On a graceful stop:
drain the outbox (bounded), the retained `status` = stopped, a clean DISCONNECT (so no will is sent).

MQTT 5, so the broker can say *why* it refused a publish (an ACL denial comes back as PUBACK "Not
authorized" instead of being silently dropped, as MQTT 3.1.1 would): such a message stays in the outbox
and is retried on the next connection, and the reason goes to the log and the heartbeat.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from appliance.outbox import Outbox
from appliance.payloads import BirthPayload, StatusPayload, Topics, restamp

log = logging.getLogger("appliance.mqtt")

CommandSink = Callable[[str, bytes, bool], None]  # (command kind e.g. "cmd/mode", payload, retained)
_LOGIN_REFUSED = {134, 135}  # MQTT 5: Bad User Name or Password, Not authorized
_SESSION_TAKEN_OVER = 142


@dataclass(frozen=True)
class LinkConfig:
    host: str
    port: int
    client_id: str
    topics: Topics
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 10
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 30.0
    # Outbox messages handed to paho and not yet acknowledged. Bounded so a long backlog is read from
    # disk as it drains, not loaded into memory at once.
    window: int = 200
    connect_timeout_s: float = 5.0

    @property
    def broker(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class LinkState:
    """For heartbeats and `doctor`: is the station connected, and if not, why."""

    connected: bool
    broker: str
    connections: int  # successful connects since start
    failed_attempts: int  # consecutive failed attempts (0 while connected)
    last_error: str | None
    held: int  # messages the broker refused (e.g. ACL), kept for the next connection

    def as_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "broker": self.broker, "connections": self.connections,
                "failed_attempts": self.failed_attempts, "last_error": self.last_error, "held": self.held}


class LinkError(Exception):
    """One failed connection attempt, with a message a technician can act on."""


class _Throttle:
    """Log a repeating problem once, then at most once a minute with how often it recurred in between."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, key: str, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last >= self.every_s:
            suffix = f" (and {suppressed} more times since the last report)" if suppressed else ""
            log.log(level, "%s%s", message, suffix)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, suppressed + 1)

    def clear(self) -> None:
        self._last.clear()


def new_client(c: LinkConfig, client_id: str) -> mqtt.Client:
    """A paho client with the station's protocol, credentials and TLS; LinkError names unusable TLS files."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect_timeout = c.connect_timeout_s
    client.max_inflight_messages_set(c.window)
    if c.username is not None:
        client.username_pw_set(c.username, c.password)
    if c.tls:
        try:
            client.tls_set(ca_certs=str(c.ca_file) if c.ca_file else None,
                           certfile=str(c.cert_file) if c.cert_file else None,
                           keyfile=str(c.key_file) if c.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"TLS files unusable (mqtt.tls.ca_file {c.ca_file}, cert_file {c.cert_file}, "
                            f"key_file {c.key_file}): {exc}") from exc
    return client


def open_session(client: mqtt.Client, c: LinkConfig, connack: Callable[[], Any],
                 lost: Callable[[MQTTErrorCode], str]) -> None:
    """TCP (+TLS) connect and wait for the CONNACK on this thread; LinkError in a technician's words.

    `connack()` returns what the client's on_connect stored (None until it came); `lost(rc)` words a
    connection that dropped before it.
    """
    try:
        client.connect(c.host, c.port, keepalive=c.keepalive_s, clean_start=True)
    except ssl.SSLCertVerificationError as exc:
        raise LinkError(f"TLS: {c.broker} presented a certificate not trusted by mqtt.tls.ca_file "
                        f"{c.ca_file}: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        raise LinkError(f"TLS handshake with {c.broker} failed: {exc.reason or exc} (check mqtt.tls and "
                        "that the broker's port is its TLS listener)") from exc
    except ConnectionRefusedError as exc:
        raise LinkError(f"{c.broker} refused the TCP connection: is the broker running and are "
                        "mqtt.host / mqtt.port right?") from exc
    except socket.gaierror as exc:
        raise LinkError(f"cannot resolve mqtt.host {c.host!r}: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise LinkError(f"no answer from {c.broker} within {c.connect_timeout_s:g} s") from exc
    except OSError as exc:
        raise LinkError(f"cannot connect to {c.broker}: {exc.strerror or exc}") from exc
    deadline = time.monotonic() + c.connect_timeout_s
    while connack() is None:
        rc = client.loop(timeout=0.05)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and connack() is None:
            raise LinkError(lost(rc))
        if time.monotonic() > deadline:
            raise LinkError(f"{c.broker} accepted TCP but sent no CONNACK within {c.connect_timeout_s:g} s")
    code = connack()
    if code.is_failure:
        if code.value in _LOGIN_REFUSED:
            raise LinkError(f"{c.broker} refused the station's login as {c.username!r}: {code} "
                            "(check mqtt.username and mqtt.password / mqtt.password_file)")
        raise LinkError(f"{c.broker} refused the connection: {code}")


def probe_broker(c: LinkConfig) -> str:
    """Log in once as the station would (client id `<station>-doctor`, so a running station is not knocked
    off; no will), then disconnect cleanly. Returns a description; LinkError with the station's messages."""
    client = new_client(c, f"{c.client_id}-doctor")
    got: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason_code, _p: got.append(reason_code)
    try:
        open_session(client, c, lambda: got[0] if got else None,
                     lambda rc: f"connection to {c.broker} lost during login: {mqtt.error_string(rc)}")
        client.disconnect()
        client.loop(timeout=0.1)
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
    return f"{c.broker}" + (f" as {c.username}" if c.username else " (anonymous)")


class MqttLink:
    """Owns the broker connection. `start()`, `notify()` after each outbox put, `stop()` at the end."""

    def __init__(
        self,
        config: LinkConfig,
        outbox: Outbox,
        birth: Callable[[int], BirthPayload],
        on_command: CommandSink | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._birth = birth
        self._on_command = on_command
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._wake.set()  # whatever a previous run left in the outbox goes first
        self._rebirth = threading.Event()
        self._connected_event = threading.Event()
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._throttle = _Throttle()
        self._lock = threading.Lock()  # guards the fields state() reads
        self._connected = False
        self._connections = 0
        self._failed = 0
        self._last_error: str | None = None
        # Per connection, touched only by the link thread:
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._early: dict[int, Any] = {}  # acks that came before publish() returned (QoS 0)
        self._acked: list[int] = []
        self._held: set[int] = set()
        self._control: dict[int, bool] = {}  # mids of status/birth -> acknowledged
        self._connack: Any = None
        self._disconnect_reason: Any = None
        self._seq = 0
        self._bd_seq = 0  # of the current connection: its will, online status and birth carry it
        self._connected_wall = 0.0

    # --- used by other threads -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A message was put into the outbox: publish it without waiting for the next poll."""
        self._wake.set()

    def request_rebirth(self) -> None:
        self._rebirth.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_event.wait(timeout)

    def state(self) -> LinkState:
        with self._lock:
            return LinkState(self._connected, self.config.broker, self._connections, self._failed,
                             self._last_error, len(self._held))

    def stop(self, drain_timeout_s: float = 10.0) -> bool:
        """Publish what the outbox holds (up to `drain_timeout_s`), say `stopped`, disconnect cleanly.

        Returns True when the outbox is empty afterwards. Not connected: returns at once; the outbox
        keeps everything for the next start.
        """
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(drain_timeout_s + self.config.connect_timeout_s + 5.0)
        return self.outbox.depth() == 0

    # --- the link thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.config.reconnect_initial_s
        while not self._stopping.is_set():
            client: mqtt.Client | None = None
            try:
                client = self._connect()
                delay = self.config.reconnect_initial_s
                self._serve(client)
            except LinkError as exc:
                self._set_error(str(exc))
                with self._lock:
                    self._failed += 1
                self._throttle(logging.ERROR, str(exc), f"MQTT: {exc}; results are kept in the outbox "
                               f"({self.outbox.depth()} waiting), retrying")
            except Exception as exc:  # never let the link thread die: the station would stop reporting
                self._set_error(f"{type(exc).__name__}: {exc}")
                log.exception("MQTT link failed unexpectedly; reconnecting")
            finally:
                self._teardown(client)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _set_error(self, message: str | None) -> None:
        with self._lock:
            self._last_error = message

    def _new_client(self, bd_seq: int) -> mqtt.Client:
        c = self.config
        client = new_client(c, c.client_id)
        will = StatusPayload(station=c.client_id, state="offline", bd_seq=bd_seq)
        client.will_set(c.topics.of("status"), will.model_dump_json(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect(self) -> mqtt.Client:
        bd_seq = self._bd_seq = self.outbox.next_counter("bd_seq")
        client = self._new_client(bd_seq)
        self._connack = self._disconnect_reason = None
        open_session(client, self.config, lambda: self._connack, lambda rc: self._lost_message(rc, during="login"))
        self._on_connected(client, bd_seq)
        return client

    def _on_connected(self, client: mqtt.Client, bd_seq: int) -> None:
        c = self.config
        self._seq = 0
        self._connected_wall = time.time()
        online = StatusPayload(station=c.client_id, state="online", bd_seq=bd_seq)
        self._publish_control(client, "status", online.model_dump_json())
        self._publish_birth(client, bd_seq)
        client.subscribe(c.topics.command_filter, qos=1)
        self._wake.set()
        with self._lock:
            self._connected = True
            self._connections += 1
            failed, self._failed = self._failed, 0
            self._last_error = None
        self._throttle.clear()
        self._connected_event.set()
        log.info("MQTT: connected to %s as %s (bdSeq %d%s); %d message(s) in the outbox", c.broker, c.client_id,
                 bd_seq, f", after {failed} failed attempt(s)" if failed else "", self.outbox.depth())

    def _publish_birth(self, client: mqtt.Client, bd_seq: int) -> None:
        birth = self._birth(bd_seq)
        self._publish_control(client, "birth", birth.model_dump_json())

    def _publish_control(self, client: mqtt.Client, kind: str, payload: str) -> int:
        info = client.publish(self.config.topics.of(kind), payload, qos=1, retain=True)
        self._control[info.mid] = False
        return info.mid

    def _serve(self, client: mqtt.Client) -> None:
        """Pump the outbox until the connection drops (LinkError) or a stop has drained it (return)."""
        while True:
            rc = client.loop(timeout=0.02)
            self._flush_acks()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._disconnect_reason is not None:
                raise LinkError(self._lost_message(rc, during="session"))
            if self._rebirth.is_set():
                self._rebirth.clear()
                self._publish_birth(client, self._bd_seq)
            if self._stopping.is_set() and (self.outbox.depth() <= len(self._held)
                                            or time.monotonic() > self._drain_deadline):
                self._say_stopped(client)
                return
            self._pump(client)

    def _pump(self, client: mqtt.Client) -> None:
        room = self.config.window - len(self._inflight)
        if room <= 0 or not self._wake.is_set():
            return
        # Clear before reading: a put() that lands after the read sets it again, so nothing is missed.
        self._wake.clear()
        messages = self.outbox.pending(room)
        if len(messages) == room:
            self._wake.set()  # more is waiting behind this batch
        handed: list[int] = []
        for m in messages:
            if m.id in self._held:
                continue
            self._seq += 1
            payload = restamp(m.payload, self._seq, replayed=m.created_at < self._connected_wall)
            info = client.publish(m.topic, payload, qos=m.qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._wake.set()  # the connection broke under us: this and the rest stay pending
                break
            handed.append(m.id)
            early = self._early.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = m.id
            else:
                self._settle(m.id, m.topic, early)
        self.outbox.mark_in_flight(handed)

    def _flush_acks(self) -> None:
        if self._acked:
            self.outbox.ack_many(self._acked)
            self._acked.clear()
            self._wake.set()  # room in the window again

    def _settle(self, row: int, topic: str, reason_code: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # Kept (not acked) and not resent on this connection: retried after the next connect.
            self._held.add(row)
            message = (f"{self.config.broker} refused a message on {topic}: {reason_code} (check the station's "
                       "ACL: it must be allowed to write under its own prefix)")
            self._set_error(message)
            self._throttle(logging.ERROR, f"refused:{topic}", f"MQTT: {message}")
        else:
            self._acked.append(row)

    def _say_stopped(self, client: mqtt.Client) -> None:
        c = self.config
        left = self.outbox.depth()
        if left:
            log.warning("MQTT: stopping with %d message(s) still in the outbox; they are sent on the next start", left)
        stopped = StatusPayload(station=c.client_id, state="stopped", bd_seq=self._bd_seq)
        mid = self._publish_control(client, "status", stopped.model_dump_json())
        deadline = time.monotonic() + 2.0
        while not self._control.get(mid) and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._flush_acks()
        client.disconnect()  # a clean DISCONNECT: the broker discards the will
        log.info("MQTT: disconnected from %s (status stopped)", c.broker)

    def _teardown(self, client: mqtt.Client | None) -> None:
        if self._connected:
            with self._lock:
                self._connected = False
            self._connected_event.clear()
        if client is not None:
            # Only the socket is closed: a DISCONNECT here would make the broker discard the will, and
            # after a failure the control room should see `offline`.
            try:
                sock = client.socket()
                if sock is not None:
                    sock.close()
            except Exception:  # closing a broken socket must not mask why it broke
                log.debug("MQTT: error while closing the socket", exc_info=True)
        self._flush_acks()
        released = self.outbox.release_in_flight()
        if released:
            log.info("MQTT: %d unacknowledged message(s) will be resent after reconnecting", released)
        self._inflight.clear()
        self._early.clear()
        self._held.clear()
        self._control.clear()

    def _lost_message(self, rc: MQTTErrorCode, during: str) -> str:
        reason = self._disconnect_reason
        if reason is not None and getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            return (f"{self.config.broker} dropped the station because another client connected with the same "
                    f"client id {self.config.client_id!r}: two stations share station.id")
        if reason is not None and getattr(reason, "value", 0) in _LOGIN_REFUSED:
            return f"{self.config.broker} refused the station during {during}: {reason}"
        detail = str(reason) if reason is not None else mqtt.error_string(rc)
        return f"connection to {self.config.broker} lost during {during}: {detail}"

    # --- paho callbacks (on the link thread, inside loop() or publish()) -------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack = reason_code

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._disconnect_reason = reason_code

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if mid in self._control:
            self._control[mid] = True
            return
        row = self._inflight.pop(mid, None)
        if row is None:
            self._early[mid] = reason_code  # fired before publish() returned; settled by _pump
            return
        self._settle(row, "(outbox)", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = self.config.topics.kind_of(message.topic)
        if kind is None or self._on_command is None:
            return
        try:
            self._on_command(kind, bytes(message.payload), bool(message.retain))
        except Exception:
            log.exception("MQTT: handling the command on %s failed", message.topic)
