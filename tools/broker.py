"""A real Mosquitto on a free loopback port, for the tests, `make demo` and `make bench`.

Not part of the station: a station talks to the plant's broker (see provisioning/mosquitto/). This starts
`mosquitto -c <generated conf>` from the Debian package, waits until the port accepts, and can stop and
restart it on the same port to inject an outage. Optional password file, ACL file, TLS listener and
persistence, so the same helper covers the authentication and TLS tests (their throw-away certificates and
password files are made by tests/support/pki.py).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_HINT = "install the Debian package: apt-get install mosquitto mosquitto-clients (make test does it as root)"


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    require_client_cert: bool = False


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (Linux /proc; empty where it cannot be read)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _owns_listener(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the socket listening on `port`; None where /proc cannot tell."""
    inodes = _listening_inodes(port)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    if not inodes:
        return None
    for fd in fds:
        try:
            if os.readlink(fd) in {f"socket:[{i}]" for i in inodes}:
                return True
        except OSError:
            continue
    return False


class _PortTaken(RuntimeError):
    """Another process took the port between free_port() and mosquitto's bind."""


@dataclass
class MosquittoBroker:
    """One broker instance in `folder`; `start()`, `stop()`, `restart()`, or use it as a context manager.

    Without a `port`, one is chosen free; free_port() can only close its probe socket before mosquitto binds,
    so another process may take the port in between: the first start then retries on a fresh port. A given
    port (or a restart, which must keep the port its clients know) is never changed.
    """

    folder: Path
    port: int = 0  # 0: a free port, chosen now (read it from .port)
    password_file: Path | None = None
    acl_file: Path | None = None
    tls: TlsFiles | None = None
    persistence: bool = False
    # A complete configuration to use instead of the generated one (it must listen on `port`).
    config: str | None = None
    # Lines appended to the generated configuration, e.g. ["max_packet_size 100000"].
    extra: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    # Whether the port may still move: chosen here (not given, no custom config) and never started on.
    _port_movable: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.port == 0:
            self.port = free_port()
            self._port_movable = self.config is None

    @property
    def log_path(self) -> Path:
        return self.folder / "mosquitto.log"

    def config_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}",
                      f"require_certificate {'true' if self.tls.require_client_cert else 'false'}"]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            # As provisioning/mosquitto/mosquitto.conf: Mosquitto's default (1000 queued per client) silently
            # drops QoS 1 messages for a subscriber that falls behind a station replaying its outbox.
            "max_queued_messages 100000",
            # Started as root, mosquitto switches to the `mosquitto` user and then cannot read a test's files.
            f"user {getpass.getuser()}",
            *self.extra,
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        attempts = 5 if self._port_movable else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
                continue
            self._port_movable = False  # clients now know this port: a restart keeps it
            return self
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(f"mosquitto is not installed: {MOSQUITTO_HINT}")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self.config if self.config is not None else self.config_text())
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=open(self.folder / "stderr.log", "ab"))  # noqa: SIM115 - kept by the child
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._tail()
                self._proc = None
                if "Address already in use" in tail:
                    raise _PortTaken(f"port {self.port} was taken before mosquitto could bind it: {tail}")
                raise RuntimeError(f"mosquitto exited with a failure on port {self.port}: {tail}")
            if port_accepts(self.port):
                if _owns_listener(self._proc.pid, self.port) is False:
                    # Something else answers on the port: ours is about to fail its bind (or already did).
                    self.stop(kill=True)
                    raise _PortTaken(f"port {self.port} is held by another process")
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL to simulate a crash) and wait until the port is closed."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _tail(self, n: int = 10) -> str:
        texts = []
        for path in (self.folder / "stderr.log", self.log_path):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-n:]
        return " | ".join(texts) or "(no output)"

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

