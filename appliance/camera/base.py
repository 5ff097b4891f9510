"""What every camera source shares: the `Frame` it returns, the `CameraState` it reports, and the two base
classes a source derives from.

Two behaviours, never mixed:

- On-demand sources (`OnDemandSource`: video file, image folder or glob, synthetic parts) decode a frame when
  `read()` is called. They never drop a frame: the caller's pace is the source's pace (back-pressure), so a
  recorded clip or a folder of parts is inspected completely and reproducibly.
- Live sources (`live.LiveSource`: V4L2 device, rtsp/http URL, GStreamer pipeline) run one reader thread
  that keeps only the newest frame; a frame overwritten before it was read is counted as dropped.

An unusable frame (empty, wrong type, a truncated image file, an image file over `camera.max_pixels`, values
that cannot be of `camera.bit_depth`) becomes a `Frame` with `error` set instead of an exception: the pipeline
gives that part an `error` verdict and goes on with the next one. Every frame, live or from a file, reaches
the model through `images.to_8bit` with the camera's bit depth (`FrameSource._convert`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np

from bundle.errors import FrameError
from bundle.images import DEFAULT_BIT_DEPTH, BitDepth, bit_depth_warning, to_8bit
from bundle.preprocess import check_frame

log = logging.getLogger(__name__)

# Rolling frame rate: the last few frames, forgotten after a few seconds so a stalled camera reads 0.
_RATE_FRAMES = 32
_RATE_WINDOW_S = 5.0

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):[^@\s/]*@")
_SECRET_PARAMS = re.compile(r"(?P<key>(?:password|passwd|pwd|token|secret)=)[^&\s]+", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """Hide passwords in camera URLs or pipelines (rtsp://user:***@host) for logs and heartbeats."""
    text = _URL_CREDENTIALS.sub(r"\g<head>:***@", text)
    return _SECRET_PARAMS.sub(r"\g<key>***", text)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame from a camera source; `error` set means the frame cannot be inspected (image is None)."""

    image: np.ndarray | None
    # Frames taken from the source since it was opened, continuing across loops and reconnects; on a live
    # source a gap between two frames read is the number dropped in between.
    index: int
    captured_at: float  # time.time(), for reports
    monotonic: float  # time.monotonic(), for ages and intervals that a clock change must not distort
    source_name: str = ""  # file name for video file and image sources, else ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class CameraState:
    """A snapshot of a source's health for heartbeats (dataclasses.asdict gives a JSON-ready dict)."""

    kind: str  # synthetic | device | video_file | images | url | gstreamer
    source: str  # with credentials masked
    connected: bool
    fps: float  # measured over the last frames taken from the source
    frames_delivered: int  # frames returned by read(), error frames included
    frames_dropped: int  # live sources: frames replaced by a newer one before read() took them
    reconnects: int  # live sources: times frames resumed after a disconnect
    last_frame_age_s: float | None  # since the last frame taken from the source; None before the first
    last_error: str | None


class Capture(Protocol):
    """What a live reader needs of a capture: cv2.VideoCapture, or a test's wrapper around one."""

    def isOpened(self) -> bool: ...  # OpenCV's spelling

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


# Builds and opens a capture; a live source calls it again after every disconnect. `open_source(cfg, opener)`
# hands one to every resolver: live sources use it instead of their own (a test seam), the others ignore it.
Opener = Callable[[], Capture]


class _RateMeter:
    """Frames per second over the last few frames; 0 when the newest is older than the window."""

    def __init__(self) -> None:
        self._stamps: deque[float] = deque(maxlen=_RATE_FRAMES)

    def tick(self, now: float) -> None:
        self._stamps.append(now)

    @property
    def last(self) -> float | None:
        return self._stamps[-1] if self._stamps else None

    def fps(self, now: float) -> float:
        stamps = [t for t in self._stamps if now - t <= _RATE_WINDOW_S]
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            return 0.0
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _sane(image: object, bit_depth: BitDepth = DEFAULT_BIT_DEPTH) -> tuple[np.ndarray | None, str | None]:
    """The frame as uint8 if it can be inspected, else (None, why); see images.to_8bit for `bit_depth`."""
    try:
        if isinstance(image, np.ndarray):
            # The same conversion as images.read_image, so a sensor looks alike live and from files.
            image = to_8bit(image, bit_depth)
        return check_frame(image), None
    except FrameError as exc:
        return None, exc.message


class FrameSource(ABC):
    """A camera source: `read()` frames until it returns None, `state()` for heartbeats, then `close()`."""

    kind: str = ""

    def __init__(self, name: str, bit_depth: BitDepth = DEFAULT_BIT_DEPTH) -> None:
        self._name = mask_credentials(name)
        self._bit_depth = bit_depth
        self._bit_depth_checked = False
        self._lock = threading.Lock()  # guards the counters below: state() may come from another thread
        self._rate = _RateMeter()
        self._delivered = 0
        self._dropped = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._closed = False

    @property
    @abstractmethod
    def live(self) -> bool:
        """True when the source runs on its own clock and drops frames the caller did not read in time."""

    def _convert(self, raw: object) -> tuple[np.ndarray | None, str | None]:
        """`_sane` with this source's bit depth; warns when "auto" meets data that looks like 10-14 bits."""
        if not self._bit_depth_checked and isinstance(raw, np.ndarray) and raw.size:
            # The first frame only: a Mono12 camera shows it at once, and a full-range 16-bit camera should
            # not pay a pass over every frame for a warning it never needs.
            self._bit_depth_checked = True
            warning = bit_depth_warning(raw, self._bit_depth)
            if warning:
                log.warning("camera %s: %s", self._name, warning)
        return _sane(raw, self._bit_depth)

    @property
    def exhausted(self) -> bool:
        """True once a finite source has delivered its last frame (never for live sources)."""
        return False

    @abstractmethod
    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None: end of a finite source, closed, or (live) nothing new within `timeout`."""

    @abstractmethod
    def _connected_now(self) -> bool:
        """Whether frames can come right now (called with the lock held)."""

    def state(self) -> CameraState:
        """A snapshot of the source's health."""
        now = time.monotonic()
        with self._lock:
            last = self._rate.last
            return CameraState(
                kind=self.kind,
                source=self._name,
                connected=self._connected_now(),
                fps=round(self._rate.fps(now), 2),
                frames_delivered=self._delivered,
                frames_dropped=self._dropped,
                reconnects=self._reconnects,
                last_frame_age_s=None if last is None else round(now - last, 3),
                last_error=self._last_error,
            )

    @abstractmethod
    def close(self) -> None:
        """Stop reading and release the device or file; idempotent."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"


class OnDemandSource(FrameSource):
    """A finite or repeatable source decoded in the caller's thread, one frame per `read()`; never drops.

    A subclass sets `kind` and implements `_next()`; with `loop` it starts over at the end of its data.
    """

    def __init__(self, name: str, loop: bool, bit_depth: BitDepth = DEFAULT_BIT_DEPTH) -> None:
        super().__init__(name, bit_depth)
        self._loop = loop
        self._exhausted = False
        self._index = 0

    @property
    def live(self) -> bool:
        return False

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    @abstractmethod
    def _next(self) -> tuple[np.ndarray | None, str, str | None] | None:
        """(image, source_name, error) of the next frame, or None at the end of the data."""

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, decoded now; `timeout` is ignored (nothing to wait for but the decoder)."""
        if self._closed or self._exhausted:
            return None
        item = self._next()
        if item is None:
            self._exhausted = True
            return None
        image, name, error = item
        if error is None:
            image, error = self._convert(image)
        now_mono = time.monotonic()
        frame = Frame(image, self._index, time.time(), now_mono, name, error)
        with self._lock:
            self._index += 1
            self._delivered += 1
            self._rate.tick(now_mono)
            if error is not None:
                self._last_error = f"{name}: {error}" if name else error
        return frame

    def _connected_now(self) -> bool:
        return not self._closed and not self._exhausted

    def close(self) -> None:
        self._closed = True
