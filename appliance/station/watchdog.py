"""systemd integration: READY / STATUS / STOPPING / WATCHDOG notifications, without a dependency.

sd_notify is one datagram to the socket named by $NOTIFY_SOCKET. The unit (provisioning/) uses
`Type=notify` and `WatchdogSec=`: the station says READY once it inspects, and a watchdog thread pings
at half the interval *only while the station is healthy* (Pipeline.stall_reason finds nothing). A stuck
inference or a frozen camera stops the pings, systemd kills the process and restarts it within its
restart budget. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("appliance.station.watchdog")


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify message ("READY=1", "WATCHDOG=1", "STATUS=..."); False when not under systemd."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:  # systemd gone or a bad socket path: never take the station down for it
        log.warning("sd_notify %r to %s failed: %s", message.split("=")[0], address, exc)
        return False
    return True


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """systemd's WatchdogSec in seconds when it is on for this process, else None."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec) / 1e6
    except ValueError:
        return None
    return value if value > 0 else None


class Watchdog:
    """Pings systemd every `interval_s` while `problem()` returns None; names the problem once when it does not."""

    def __init__(self, problem: Callable[[], str | None], interval_s: float,
                 send: Callable[[str], bool] = notify) -> None:
        self._problem = problem
        self.interval_s = interval_s
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self.withheld = 0  # pings not sent because of a problem

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 1)

    def _run(self) -> None:
        reported: str | None = None
        while True:
            try:
                problem = self._problem()
            except Exception as exc:  # a failing check is itself a problem worth a restart
                problem = f"health check failed: {exc}"
            if problem is None:
                self._send("WATCHDOG=1")
                reported = None
            else:
                self.withheld += 1
                if problem != reported:
                    log.error("station unhealthy, not pinging the systemd watchdog (it will restart us): %s", problem)
                    self._send(f"STATUS=unhealthy: {problem}")
                    reported = problem
            if self._stop.wait(self.interval_s):
                return
