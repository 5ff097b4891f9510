"""The mode parts are decided in: the configured mode (production, shadow, manual) and the causes that hold
the station in manual_fallback by itself (no backend can run, storage cannot keep up).

Shared by the pipeline (which reads it once per part), the command handler (which sets the configured mode)
and the storage watch (which holds and releases the `storage` cause). Entering and leaving a fallback and
changing the configured mode are events, given to `on_event` outside the lock: reporting one may come back
here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from bundle.decision import Mode

EventSink = Callable[[str, dict[str, Any]], None]


class ModeControl:
    """The configured mode plus the fallback causes; every method is thread-safe."""

    def __init__(self, mode: Mode, on_event: EventSink) -> None:
        self._lock = threading.Lock()
        self._configured = mode  # what the station returns to after a fallback
        self._fallbacks: dict[str, str] = {}  # cause ("backend", "storage") -> reason shown on every part
        self._on_event = on_event

    @property
    def configured(self) -> Mode:
        with self._lock:
            return self._configured

    def current(self) -> tuple[Mode, str]:
        """The mode a part is decided in now and, in a fallback, why ("" otherwise): one look under the lock."""
        with self._lock:
            if self._fallbacks:
                return Mode.MANUAL_FALLBACK, "; ".join(self._fallbacks.values())
            return self._configured, ""

    def set_mode(self, mode: Mode) -> None:
        """Switch the configured mode (a command from the control room). During a manual fallback the new mode
        is the one the station returns to once every cause is gone, not an override of the fallback."""
        with self._lock:
            old, self._configured = self._configured, mode
        if old is not mode:
            self._on_event("mode_changed", {"from": old.value, "to": mode.value})

    def set_fallback(self, cause: str, reason: str | None) -> None:
        """Hold manual_fallback for `cause` with `reason`, or release it (None).

        The station returns to its configured mode when no cause is left. Entering and leaving for a cause
        other than "backend" (whose supervisor reports itself) are events.
        """
        with self._lock:
            had = cause in self._fallbacks
            if reason is None:
                self._fallbacks.pop(cause, None)
            else:
                self._fallbacks[cause] = reason
            mode = Mode.MANUAL_FALLBACK if self._fallbacks else self._configured
        if cause == "backend" or had == (reason is not None):
            return
        if reason is not None:
            self._on_event("manual_fallback", {"cause": cause, "reason": reason})
        else:
            self._on_event("fallback_ended", {"cause": cause, "mode": mode.value})
