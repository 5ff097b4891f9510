"""The station's one MQTT connection, on one thread: availability, birth, the outbox pump, commands.

Why one thread driving paho's `loop()` rather than `loop_start()`: every paho call and callback then
happens on this thread, so the map from paho's message ids to outbox rows needs no lock. And why a new
paho client per connection: each connection gets a fresh last will carrying a new bdSeq, a fresh `seq`
numbering, and no leftovers in paho's in-memory queue (paho would resend those itself after a reconnect,
stamped with the old connection's numbers). The outbox alone decides what is sent and when it is done:
a row is deleted only on the broker's PUBACK; everything else (outage, crash, refused login) leaves it
stored, and it is replayed in order, flagged `replayed`, on the next connection.

On every connect: the subscription to `<prefix>/cmd/+` (and its SUBACK), then the retained `status` =
online (with the bdSeq of this connection's will), the retained `birth`, then the outbox backlog oldest
first. Subscribing first, as Sparkplug orders it: a controller that sends a command the moment it sees the
birth must find the station listening. The subscription asks for Retain As Published, so a retained
command is recognised as retained also when it arrives live (and refused). On a graceful stop: drain the
outbox (bounded), the retained `status` = stopped, a clean DISCONNECT (so no will is sent).

MQTT 5, so the broker can say *why* it refused a publish (an ACL denial comes back as PUBACK "Not
authorized" instead of being silently dropped, as MQTT 3.1.1 would): such a message stays in the outbox
and is retried on the next connection, and the reason goes to the log and the heartbeat. No message may
block the ones behind it: one larger than the broker's Maximum Packet Size (CONNACK) is never sent, and one
refused `MAX_REFUSALS` times (PUBACK error, or the broker dropping the connection with an error while it
was the one message in flight) is moved to the outbox's `dead_letters` table with the reason. After a
broker error disconnect the next connection sends one message at a time until one is acknowledged, so
the culprit is found without blaming the others.

Every outbox call is guarded: a storage fault (disk full, locked, I/O error) is an error in the state and
the log, never the end of this thread; heartbeats and events that the outbox cannot take come through
`publish_direct`, a small memory queue published as they are.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import BirthPayload, StatusPayload, Topics, restamp
from appliance.reporting.sqlite_store import describe
from appliance.threads import FailureSink, ThreadFailure, start_guarded

log = logging.getLogger("appliance.mqtt")

CommandSink = Callable[[str, bytes, bool], None]  # (command kind e.g. "cmd/mode", payload, retained)
_LOGIN_REFUSED = {134, 135}  # MQTT 5: Bad User Name or Password, Not authorized
_SESSION_TAKEN_OVER = 142
MAX_REFUSALS = 3  # refusals of one message before it is moved to dead_letters
DIRECT_QUEUE = 100  # heartbeats and events kept in memory for publish_direct (oldest dropped beyond)
_STORAGE_RETRY_S = 1.0  # after a failed outbox read, wait this long before reading again
# Broker DISCONNECT reason codes about something the client sent (MQTT 5.0, 3.14.2.1): Protocol Error,
# Implementation specific error, Not authorized, Topic Name invalid, Packet too large, Quota exceeded,
# Payload format invalid.
_MESSAGE_ERRORS = {130, 131, 135, 144, 149, 151, 153}


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
    dead_letters: int = 0  # messages moved aside by this process as undeliverable
    max_packet_size: int | None = None  # the broker's Maximum Packet Size (CONNACK), None: no limit given

    def as_dict(self) -> dict[str, Any]:
        return {"connected": self.connected, "broker": self.broker, "connections": self.connections,
                "failed_attempts": self.failed_attempts, "last_error": self.last_error, "held": self.held,
                "dead_letters": self.dead_letters, "max_packet_size": self.max_packet_size}


def _publish_size(topic: str, payload: str) -> int:
    """Bytes of a QoS 1 PUBLISH packet (MQTT 5.0, 3.3): fixed header up to 5, topic length 2 + topic, packet
    id 2, property length 1, payload; an upper bound close enough to compare with Maximum Packet Size."""
    return 5 + 2 + len(topic.encode()) + 2 + 1 + len(payload.encode())


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
        on_failure: FailureSink | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._birth = birth
        self._on_command = on_command
        self._on_failure = on_failure
        self.failure: ThreadFailure | None = None
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
        self._direct: deque[tuple[str, str]] = deque(maxlen=DIRECT_QUEUE)  # (topic, payload), any thread appends
        # Across connections, touched only by the link thread:
        self._refusals: Counter[int] = Counter()  # outbox row -> times the broker refused it
        self._careful = False  # one message in flight at a time (after a broker error disconnect)
        self._dead = 0
        self._storage_retry_at = 0.0
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
        self._max_packet: int | None = None  # the broker's Maximum Packet Size on this connection
        self._suback: Any = None  # reason codes of the command subscription's SUBACK
        self._sub_mid: int | None = None

    # --- used by other threads -----------------------------------------------------------------------------
    def handle_commands(self, on_command: CommandSink) -> None:
        """Where commands go (the command handler, made after the pipeline it drives); before `start()`."""
        if self._thread is not None:
            raise RuntimeError("handle_commands() after start(): commands may already have been dropped")
        self._on_command = on_command

    def start(self) -> None:
        self._thread = start_guarded("mqtt-link", self._run, self._thread_failed)

    def notify(self) -> None:
        """A message was put into the outbox: publish it without waiting for the next poll."""
        self._wake.set()

    def publish_direct(self, topic: str, payload_json: str) -> None:
        """Publish from memory, bypassing the outbox (which cannot take it now): heartbeats and events during a
        storage fault. At QoS 1 while connected; kept (the newest DIRECT_QUEUE) while not; lost on a crash."""
        self._direct.append((topic, payload_json))
        self._wake.set()

    def request_rebirth(self) -> None:
        self._rebirth.set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_event.wait(timeout)

    def state(self) -> LinkState:
        with self._lock:
            return LinkState(self._connected, self.config.broker, self._connections, self._failed,
                             self._last_error, len(self._held), self._dead, self._max_packet)

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
            except (sqlite3.Error, OSError) as exc:  # the outbox (or the socket) failed under us: reconnect
                self._set_error(f"{describe(exc)}")
                self._throttle(logging.ERROR, describe(exc), f"MQTT link: {describe(exc)}; reconnecting")
            except Exception as exc:  # a bug: reconnect rather than stop reporting
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
        client.on_subscribe = self._on_subscribe
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
        self._subscribe_commands(client)
        online = StatusPayload(station=c.client_id, state="online", bd_seq=bd_seq)
        self._publish_control(client, "status", online.model_dump_json())
        self._publish_birth(client, bd_seq)
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

    def _subscribe_commands(self, client: mqtt.Client) -> None:
        """Subscribe to the command topics and wait for the SUBACK: only then is the station listening."""
        c = self.config
        self._suback = None
        # Retain As Published: a retained command delivered live keeps retain=1, so it can be refused.
        _, self._sub_mid = client.subscribe(c.topics.command_filter,
                                            options=SubscribeOptions(qos=1, retainAsPublished=True))
        deadline = time.monotonic() + c.connect_timeout_s
        while self._suback is None:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS or self._disconnect_reason is not None:
                raise LinkError(self._lost_message(MQTTErrorCode.MQTT_ERR_CONN_LOST, during="subscribe"))
            if time.monotonic() > deadline:
                raise LinkError(f"{c.broker} sent no SUBACK for {c.topics.command_filter} within "
                                f"{c.connect_timeout_s:g} s")
        failed = [rc for rc in self._suback if getattr(rc, "is_failure", False)]
        if failed:
            # Reporting still works without commands: say it loudly, keep the connection.
            message = (f"{c.broker} refused the command subscription {c.topics.command_filter}: {failed[0]} "
                       "(check the station's ACL: it must be allowed to read its own cmd/ topics)")
            self._set_error(message)
            log.error("MQTT: %s", message)

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
            self._pump_direct(client)
            self._pump(client)

    def _pump_direct(self, client: mqtt.Client) -> None:
        while self._direct:
            topic, payload = self._direct[0]
            stamped = restamp(payload, self._seq + 1, replayed=False)
            size = _publish_size(topic, stamped)
            if self._max_packet is not None and size > self._max_packet:
                # Sent, it would make the broker drop the connection (and what is in flight with it). There is
                # no outbox row to move aside: the process log is its last record.
                self._direct.popleft()
                message = (f"a message on {topic} not sent and dropped: {size} bytes, over the broker's Maximum "
                           f"Packet Size {self._max_packet}")
                self._set_error(message)
                log.error("MQTT: %s", message)
                continue
            self._seq += 1
            info = client.publish(topic, stamped, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._seq -= 1
                return  # the connection broke: kept for the next one
            self._direct.popleft()

    def _pump(self, client: mqtt.Client) -> None:
        window = 1 if self._careful else self.config.window
        room = window - len(self._inflight)
        if room <= 0 or not self._wake.is_set() or time.monotonic() < self._storage_retry_at:
            return
        # Clear before reading: a put() that lands after the read sets it again, so nothing is missed.
        self._wake.clear()
        try:
            messages = self.outbox.pending(room)
        except (sqlite3.Error, OSError) as exc:
            self._storage_failed("read the outbox", exc)
            return
        if len(messages) == room:
            self._wake.set()  # more is waiting behind this batch
        handed: list[int] = []
        for m in messages:
            if m.id in self._held:
                continue
            payload = restamp(m.payload, self._seq + 1, replayed=m.created_at < self._connected_wall)
            size = _publish_size(m.topic, payload)
            if self._max_packet is not None and size > self._max_packet:
                self._dead_letter(m.id, m.topic, f"{size} bytes, over the broker's Maximum Packet Size "
                                  f"{self._max_packet}")
                self._wake.set()
                continue
            self._seq += 1
            info = client.publish(m.topic, payload, qos=m.qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._seq -= 1
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
        if not self._acked:
            return
        rows, self._acked = self._acked, []
        for row in rows:
            self._refusals.pop(row, None)
        self._careful = False  # something got through: back to the full window
        self._wake.set()  # room in the window again
        try:
            # The outbox remembers the acknowledgements even when this DELETE fails, and retries it.
            self.outbox.ack_many(rows)
        except (sqlite3.Error, OSError) as exc:
            self._storage_failed("delete acknowledged messages from the outbox", exc)

    def _settle(self, row: int, topic: str, reason_code: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # Kept (not acked) and not resent on this connection: retried after the next connect, up to
            # MAX_REFUSALS times, then moved aside so it cannot hold up what comes after it.
            self._refusals[row] += 1
            message = (f"{self.config.broker} refused a message on {topic}: {reason_code} (check the station's "
                       "ACL: it must be allowed to write under its own prefix)")
            self._set_error(message)
            self._throttle(logging.ERROR, f"refused:{topic}", f"MQTT: {message}")
            if self._refusals[row] >= MAX_REFUSALS:
                self._dead_letter(row, topic, f"refused {self._refusals[row]} times: {reason_code}")
            else:
                self._held.add(row)
        else:
            self._acked.append(row)

    def _dead_letter(self, row: int, topic: str, reason: str) -> None:
        self._refusals.pop(row, None)
        try:
            moved = self.outbox.dead_letter(row, reason)
        except (sqlite3.Error, OSError) as exc:
            self._storage_failed("move an undeliverable message to dead_letters", exc)
            self._held.add(row)  # not resent on this connection; tried again after the next connect
            return
        if moved:
            with self._lock:
                self._dead += 1
            message = f"message {row} on {topic} moved to the outbox's dead_letters: {reason}"
            self._set_error(message)
            log.error("MQTT: %s", message)

    def _storage_failed(self, what: str, exc: BaseException) -> None:
        message = f"cannot {what} ({self.outbox.path}): {describe(exc)}"
        self._set_error(message)
        self._throttle(logging.ERROR, f"storage:{what}", f"MQTT: {message}")
        self._storage_retry_at = time.monotonic() + _STORAGE_RETRY_S
        self._wake.set()

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
        self._note_broker_error()
        self._flush_acks()
        released = self.outbox.release_in_flight()
        if released:
            log.info("MQTT: %d unacknowledged message(s) will be resent after reconnecting", released)
        self._inflight.clear()
        self._early.clear()
        self._held.clear()
        self._control.clear()

    def _note_broker_error(self) -> None:
        """A broker that dropped us with an error about what we sent: blame the one message in flight, or
        send one at a time next time to find it."""
        code = getattr(self._disconnect_reason, "value", None)
        if code not in _MESSAGE_ERRORS or not self._inflight:
            return
        if len(self._inflight) == 1:
            row = next(iter(self._inflight.values()))
            self._refusals[row] += 1
            if self._refusals[row] >= MAX_REFUSALS:
                self._dead_letter(row, "(outbox)", f"the broker disconnected {self._refusals[row]} times while it "
                                  f"was the only message in flight: {self._disconnect_reason}")
        self._careful = True

    def _thread_failed(self, failure: ThreadFailure) -> None:
        self.failure = failure
        self._set_error(failure.describe())
        if self._on_failure is not None:
            self._on_failure(failure)

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
        self._max_packet = getattr(properties, "MaximumPacketSize", None)
        self._connack = reason_code

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid == self._sub_mid:
            self._suback = list(reason_codes)

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
        # Every topic under the station's `cmd/`, known kinds or not: an unknown one (`cmd/reboot`) is the
        # command sink's to refuse with an answer, not this link's to drop in silence.
        commands = self.config.topics.prefix + "/cmd/"
        if self._on_command is None or not message.topic.startswith(commands):
            return
        kind = message.topic[len(self.config.topics.prefix) + 1:]
        try:
            self._on_command(kind, bytes(message.payload), bool(message.retain))
        except Exception:
            log.exception("MQTT: handling the command on %s failed", message.topic)
