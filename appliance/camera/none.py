"""No camera (`camera.source = "none"`): a station that only inspects images handed to it from outside, such as
uploads to the HTTP API (`Pipeline.submit`), with no camera of its own.

The source never delivers a frame and never ends: `read()` waits its timeout (so the capture thread idles
instead of spinning) and returns None; `state()` says kind "none", connected False. Not live: it has no clock
of its own, drops nothing, and the watchdog never takes its silence for a stalled camera.
"""

from __future__ import annotations

import threading

from appliance.camera.base import Frame, FrameSource, Opener
from appliance.settings import CameraSection

NONE = "none"


class NoCameraSource(FrameSource):
    """A source without frames: every `read()` waits its timeout (until `close()`) and returns None."""

    kind = NONE

    def __init__(self) -> None:
        super().__init__(NONE)
        self._closed_event = threading.Event()

    @property
    def live(self) -> bool:
        return False

    @property
    def exhausted(self) -> bool:
        return False  # never: uploads may come at any time until the station stops

    def read(self, timeout: float | None = None) -> Frame | None:
        """None after `timeout` s (at once once closed; without a timeout, when closed)."""
        self._closed_event.wait(timeout)
        return None

    def _connected_now(self) -> bool:
        return False  # no camera is connected, nor expected

    def close(self) -> None:
        self._closed = True
        self._closed_event.set()


# --- resolver (see resolve.py for its place in the order) -----------------------------------------------------


def resolve_none(source: str, cfg: CameraSection, opener: Opener | None) -> NoCameraSource | None:
    """`none`: no camera; parts come only from `Pipeline.submit` (the HTTP API's uploads)."""
    if source != NONE:
        return None
    return NoCameraSource()
