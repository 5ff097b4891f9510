"""The HTTP API's server: uvicorn in a thread of its own, started and stopped with the station.

- `bind()` takes the listening socket (ConfigError naming bind:port when it cannot: the port is taken, the
  address is not this machine's), before anything else of the station starts; `start()` serves on it from a
  guarded thread (appliance.threads: a server that dies is a station thread that died); `stop()` sets uvicorn's
  `should_exit`, gives open requests `GRACEFUL_S` to finish, and joins the thread.
- A client cannot hold the server: a connection must deliver a request's head within `HEAD_TIMEOUT_S` (also
  between requests on a kept-alive connection; uvicorn itself has no such limit), an idle kept-alive connection
  is closed after `KEEP_ALIVE_S`, a body must arrive within `http.upload_timeout_s` (uploads.py), at most
  `http.max_connections` connections and requests are open at once (uvicorn's limit_concurrency: 503 beyond),
  and request heads are limited to `MAX_HEAD_BYTES`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.settings import HttpSection
from appliance.threads import FailureSink, start_guarded
from bundle.errors import ConfigError

log = logging.getLogger("appliance.http")

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
GRACEFUL_S = 3
MAX_HEAD_BYTES = 16 * 1024
START_TIMEOUT_S = 10.0


class _HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive within HEAD_TIMEOUT_S
    (a client that opens connections and sends a header a minute would otherwise hold them for ever)."""

    _head_timer: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._disarm_if_head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # waiting for the next request's head
            self._disarm_if_head_arrived()  # a pipelined request may already have started

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._cancel()
        self._armed_cycle = self.cycle
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

    def _disarm_if_head_arrived(self) -> None:
        if self._head_timer is not None and self.cycle is not self._armed_cycle:
            self._cancel()

    def _cancel(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    """uvicorn serving `app` on `http.bind`:`http.port` in a thread (see the module docstring)."""

    def __init__(self, app: Any, section: HttpSection, on_failure: FailureSink) -> None:
        self.section = section
        self._on_failure = on_failure
        self.config = uvicorn.Config(
            app, http=_HeadTimeoutH11, ws="none", lifespan="off", loop="asyncio", interface="asgi3",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            limit_concurrency=section.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACEFUL_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None  # the port listened on (http.port, or the one chosen for 0)

    @property
    def address(self) -> str:
        host = self.section.bind
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def bind(self) -> None:
        """Take the listening socket; ConfigError naming bind:port when it cannot be had."""
        if self._socket is not None:
            return
        bind, port = self.section.bind, self.section.port
        where = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        try:
            infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"http.bind / http.port: cannot listen on {where}: {exc.strerror or exc}") from exc
        try:
            # Lets a restarted station take its port while the old connections are in TIME_WAIT; on Linux it
            # does not let two processes listen on one port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self.config.backlog)
        except OSError as exc:
            sock.close()
            hint = " (another process listens there: stop it or choose another http.port)" \
                if exc.errno in (98, 48) else ""
            raise ConfigError(f"http.bind / http.port: cannot listen on {where}: {exc.strerror or exc}{hint}") from exc
        self._socket = sock
        self.port = sock.getsockname()[1]

    def start(self) -> None:
        """Serve from a guarded thread (binding first if not yet bound); returns once the server accepts."""
        self.bind()
        assert self._socket is not None
        sockets = [self._socket]
        self._thread = start_guarded("http-server", lambda: self._serve(sockets), self._on_failure)
        if not _wait(lambda: self.server.started or not self._thread.is_alive(), START_TIMEOUT_S):
            raise ConfigError(f"the HTTP API on {self.address} did not start within {START_TIMEOUT_S:g} s")
        if not self.server.started:
            raise ConfigError(f"the HTTP API on {self.address} could not start (see the log)")
        log.info("HTTP API listening on http://%s", self.address)

    def _serve(self, sockets: list[socket.socket]) -> None:
        self.server.run(sockets=sockets)
        if not self.server.should_exit:
            raise RuntimeError("the HTTP server stopped without being asked to")

    def stop(self, timeout: float = GRACEFUL_S + 2.0) -> bool:
        """Stop serving (open requests get GRACEFUL_S to finish); True when the thread ended within `timeout`."""
        self.server.should_exit = True
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
            if not stopped:
                log.error("the HTTP server did not stop within %.0f s", timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        return stopped

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _wait(predicate: Any, timeout: float) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        event.wait(0.02)
    return bool(predicate())
