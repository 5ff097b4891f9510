"""Station threads that must not die quietly.

A station whose MQTT link, heartbeat monitor, store writer or pipeline stage died would keep running half
alive: inspecting without recording, or recording without reporting. Every such thread runs under
`start_guarded`: an exception that escapes its loop is logged with the traceback and handed to
`on_failure`; the runtime then stops the station, reports the reason, and exits with
`EXIT_THREAD_FAILED` so that systemd (`Restart=on-failure`) starts a whole one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("appliance.threads")

# The process exit code after a station thread died (provisioning's unit restarts on any failure code).
EXIT_THREAD_FAILED = 10
# The process exit code after a fatal CUDA error (illegal address, launch failure...): the CUDA context of this
# process is unusable for good, so only a restart gets the GPU back (appliance.inference.supervisor).
EXIT_CUDA_FATAL = 11


@dataclass(frozen=True)
class ThreadFailure:
    """Which thread died, why (exception type and message), and when (epoch seconds)."""

    thread: str
    error: str
    at: float

    def describe(self) -> str:
        return f"thread {self.thread} died: {self.error}"


FailureSink = Callable[[ThreadFailure], None]


def start_guarded(name: str, target: Callable[[], None], on_failure: FailureSink) -> threading.Thread:
    """Start a daemon thread running `target`; an exception escaping it becomes one `on_failure` call."""

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # a dying thread must say why, whatever it was
            failure = ThreadFailure(name, f"{type(exc).__name__}: {exc}", time.time())
            log.critical("%s", failure.describe(), exc_info=True)
            on_failure(failure)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class FailureLatch:
    """Keeps the first failure of a component's threads (later ones are logged by start_guarded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failure: ThreadFailure | None = None

    def __call__(self, failure: ThreadFailure) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = failure
