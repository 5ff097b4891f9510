"""Camera sources: where a station's frames come from, chosen by the `camera.source` setting.

Two behaviours, never mixed:

- On-demand sources (video file, image folder or glob, synthetic parts) decode a frame when `read()` is
  called. They never drop a frame: the caller's pace is the source's pace (back-pressure), so a recorded
  clip or a folder of parts is inspected completely and reproducibly.
- Live sources (V4L2 device, rtsp/http URL, GStreamer pipeline) run one reader thread that keeps only the
  newest frame in a one-slot buffer. A camera does not wait for the inspection, and a frame that sat in
  a queue shows a part that has already left the field of view; so a frame overwritten before it was read
  is counted as dropped, and `read()` returns the newest frame not yet returned. A failed open or read is
  a disconnect: the reader releases the capture and reopens it with capped exponential backoff.

An unusable frame (empty, wrong type, a truncated image file, an image file over `camera.max_pixels`, values
that cannot be of `camera.bit_depth`) becomes a `Frame` with `error` set instead of an exception: the pipeline
gives that part an `error` verdict and goes on with the next one. Every frame, live or from a file, reaches
the model through `images.to_8bit` with the camera's bit depth.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import cv2
import numpy as np

from appliance.settings import CameraSection
from bundle.errors import CameraError, FrameError, ImageReadError
from bundle.images import (
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    BitDepth,
    bit_depth_warning,
    decode_image,
    list_images,
    to_8bit,
)
from bundle.preprocess import check_frame

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry comes quickly (a USB re-enumeration or an RTSP server restart takes
# about a second), then doubles up to camera.reconnect_max_s so a dead camera is not hammered.
BACKOFF_START_S = 0.5
# FFmpeg (rtsp/http) timeouts. Without them OpenCV can block in open() or read() for minutes when a camera
# vanishes mid-stream (opencv/opencv#22677, #4468), and a blocked reader thread cannot be interrupted.
URL_OPEN_TIMEOUT_MS = 10_000
URL_READ_TIMEOUT_MS = 5_000
# RTSP over UDP loses packets on a busy plant network and FFmpeg then returns smeared frames that would be
# inspected as if they were real; TCP trades a little latency for whole frames. A value the plant set in
# the environment wins.
_FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_RTSP_OVER_TCP = "rtsp_transport;tcp"
# Rolling frame rate: the last few frames, forgotten after a few seconds so a stalled camera reads 0.
_RATE_FRAMES = 32
_RATE_WINDOW_S = 5.0
# close() waits this long for the reader thread; a capture stuck inside a driver call cannot be joined.
_JOIN_TIMEOUT_S = 5.0
_SYNTHETIC_SIZE = 256
_URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_EXPECTED = (
    'expected "synthetic" or "synthetic:N", a device index ("0") or /dev/videoN, an existing video file, '
    "an image folder or glob pattern, an rtsp:// or http(s):// URL, or a GStreamer pipeline ending in appsink"
)

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):[^@\s/]*@")
_GLOB_MAGIC = re.compile(r"[*?[]")
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


# --- on-demand sources: the caller's pace, no drops ---------------------------------------------------------


class OnDemandSource(FrameSource):
    """A finite or repeatable source decoded in the caller's thread, one frame per `read()`."""

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


class VideoFileSource(OnDemandSource):
    """A recorded clip, frame by frame; with loop it starts over at the end."""

    kind = "video_file"

    def __init__(
        self, path: Path, loop: bool = False, bit_depth: BitDepth = DEFAULT_BIT_DEPTH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(str(path), loop, bit_depth)
        self._path = path
        self._max_pixels = max_pixels
        self._cap = self._open()
        self._frames_this_pass = 0

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self._path))
        if not cap.isOpened():
            cap.release()
            raise CameraError(
                f"camera.source {self._path} cannot be opened as a video",
                hint="check that the file is a complete video (e.g. .mp4, .avi, .mkv) that ffmpeg can play",
            )
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > self._max_pixels:
            cap.release()
            raise CameraError(
                f"camera.source {self._path} has {width} x {height} = {width * height} pixel frames, over the "
                f"limit camera.max_pixels = {self._max_pixels}",
                hint="if the camera really delivers frames this large, raise camera.max_pixels",
            )
        return cap

    def _next(self) -> tuple[np.ndarray | None, str, str | None] | None:
        ok, image = self._cap.read()
        if ok:
            self._frames_this_pass += 1
            return image, self._path.name, None
        # read() cannot tell the end of the file from an undecodable tail; both end this pass.
        if not self._loop or self._frames_this_pass == 0:
            if self._frames_this_pass == 0 and self._index == 0:
                self._last_error = f"{self._path.name}: no frame could be decoded"
            return None
        # Reopening rewinds reliably for every container; seeking to frame 0 does not for some codecs.
        self._cap.release()
        try:
            self._cap = self._open()
        except CameraError as exc:  # the file went away while looping: the end of this source, not a crash
            self._last_error = exc.message
            return None
        self._frames_this_pass = 0
        return self._next()

    def close(self) -> None:
        super().close()
        self._cap.release()


class ImageFilesSource(OnDemandSource):
    """Image files in a fixed sorted order, each one part; with loop it starts over after the last."""

    kind = "images"

    def __init__(
        self, name: str, files: list[Path], loop: bool = False, bit_depth: BitDepth = DEFAULT_BIT_DEPTH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(name, loop, bit_depth)
        self._files = files
        self._max_pixels = max_pixels
        self._pos = 0

    def _next(self) -> tuple[np.ndarray | None, str, str | None] | None:
        if self._pos >= len(self._files):
            if not self._loop:
                return None
            self._pos = 0
        path = self._files[self._pos]
        self._pos += 1
        try:
            # Decoded as stored: read() brings it to 8 bits with the camera's bit depth, as for live frames.
            return decode_image(path, self._max_pixels), path.name, None
        except ImageReadError as exc:
            # A bad file is one bad part, not a stopped line.
            return None, path.name, exc.message


class SyntheticSource(OnDemandSource):
    """Synthetic machined parts (synthetic.parts): endless, or `count` parts, repeated with loop."""

    kind = "synthetic"

    def __init__(self, count: int | None = None, loop: bool = False, size: int = _SYNTHETIC_SIZE, seed: int = 0):
        # Rendered as 8-bit images whatever camera.bit_depth says: the setting describes a real camera.
        super().__init__("synthetic" if count is None else f"synthetic:{count}", loop)
        # Imported here: synthetic.parts needs only OpenCV and numpy (no torch), and stations that use
        # a real camera should not load it at all.
        from synthetic.parts import render_stream

        self._render_stream = render_stream
        self._count, self._size, self._seed = count, size, seed
        self._stream = self._new_stream()
        self._frames_this_pass = 0

    def _new_stream(self) -> Iterator[tuple[np.ndarray, str | None]]:
        # The same seed again: a looped count repeats the same parts, like a looped clip.
        return self._render_stream(self._seed, sys.maxsize if self._count is None else self._count, size=self._size)

    def _next(self) -> tuple[np.ndarray | None, str, str | None] | None:
        try:
            image, _kind = next(self._stream)
        except StopIteration:
            if not self._loop or self._frames_this_pass == 0:
                return None
            self._stream = self._new_stream()
            self._frames_this_pass = 0
            image, _kind = next(self._stream)
        self._frames_this_pass += 1
        return image, "", None


# --- live sources: a reader thread, newest frame only --------------------------------------------------------


class LiveSource(FrameSource):
    """A camera on its own clock, read by one thread into a one-slot latest-frame buffer.

    `opener` builds and opens the capture; it is called again after every disconnect (tests pass one that
    plays a video file through OpenCV and fails on purpose).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        opener: Callable[[], Capture],
        reconnect_max_s: float = 30.0,
        backoff_start_s: float = BACKOFF_START_S,
        bit_depth: BitDepth = DEFAULT_BIT_DEPTH,
    ) -> None:
        super().__init__(name, bit_depth)
        self.kind = kind
        self._opener = opener
        self._backoff_start = min(backoff_start_s, reconnect_max_s)
        self._backoff_max = reconnect_max_s
        self._cond = threading.Condition(self._lock)  # one lock for the slot and the counters
        self._latest: Frame | None = None
        self._index = 0
        self._connected = False
        self._ever_connected = False
        self._reader_done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-{kind}", daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        return True

    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not returned before; None when none arrives within `timeout` s, or closed.

        `timeout=None` waits until a frame arrives or the source is closed.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._closed or self._reader_done, timeout)
            frame, self._latest = self._latest, None
            if frame is not None:
                self._delivered += 1
            return frame

    def _connected_now(self) -> bool:
        return self._connected

    def close(self) -> None:
        """Stop the reader thread (it releases the capture itself) and wake any waiting `read()`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        if threading.current_thread() is self._thread:
            return
        self._thread.join(_JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("camera %s: reader thread still blocked in the driver after %.0f s; abandoning it",
                        self._name, _JOIN_TIMEOUT_S)

    # The reader thread. Only it touches the capture: releasing a capture from another thread while
    # read() runs inside it can crash the driver.

    def _run(self) -> None:
        cap: Capture | None = None
        delay = self._backoff_start
        down_since: float | None = None
        try:
            while not self._stop.is_set():
                if cap is None:
                    cap = self._try_open()
                    if cap is None:
                        down_since = down_since or time.monotonic()
                        log.info("camera %s: next open attempt in %.1f s", self._name, delay)
                        self._stop.wait(delay)
                        delay = min(delay * 2.0, self._backoff_max)
                        continue
                why = f"camera read failed ({self._name}): stream ended or camera gone"
                try:
                    ok, image = cap.read()
                except Exception as exc:  # a driver error mid-stream is a disconnect like any other
                    ok, image, why = False, None, f"camera read raised ({self._name}): {mask_credentials(str(exc))}"
                if not ok or image is None:
                    self._disconnected(why)
                    cap.release()
                    cap = None
                    down_since = down_since or time.monotonic()
                    # Not straight back to open(): a camera that opens and then fails at once would spin.
                    self._stop.wait(delay)
                    delay = min(delay * 2.0, self._backoff_max)
                    continue
                self._deliver(image, down_since)
                delay, down_since = self._backoff_start, None
        except Exception as exc:  # a bug here must not leave read() callers waiting on a dead thread
            log.exception("camera %s: reader thread failed", self._name)
            self._last_error = f"camera reader thread failed: {exc}"
        finally:
            if cap is not None:
                cap.release()
            with self._cond:
                self._connected = False
                self._reader_done = True
                self._cond.notify_all()

    def _try_open(self) -> Capture | None:
        try:
            cap = self._opener()
        except Exception as exc:  # an opener that raises is a camera that is not there (yet)
            self._disconnected(f"camera open failed ({self._name}): {mask_credentials(str(exc))}")
            return None
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            self._disconnected(f"camera cannot be opened ({self._name})")
            return None
        return cap

    def _disconnected(self, why: str) -> None:
        with self._lock:
            was_connected, previous = self._connected, self._last_error
            self._connected = False
            self._last_error = why
        # Rate limited by content: one line when the camera drops or the reason changes, not one per retry.
        if was_connected or why != previous:
            log.warning("camera %s disconnected: %s", self._name, why)

    def _deliver(self, raw: np.ndarray, down_since: float | None) -> None:
        image, error = self._convert(raw)
        now_mono = time.monotonic()
        with self._cond:
            frame = Frame(image, self._index, time.time(), now_mono, "", error)
            self._index += 1
            self._rate.tick(now_mono)
            if error is not None:
                self._last_error = error
            if not self._connected:
                self._connected = True
                if self._ever_connected:
                    self._reconnects += 1
                    log.warning("camera %s reconnected after %.1f s", self._name,
                                now_mono - down_since if down_since else 0.0)
                self._ever_connected = True
            if self._latest is not None:
                self._dropped += 1
            self._latest = frame
            self._cond.notify_all()


# --- choosing a source -----------------------------------------------------------------------------------------


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's opencv-python is not)."""
    return re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()) is not None


def _device_opener(target: int | str, cfg: CameraSection) -> Callable[[], Capture]:
    api = getattr(cv2, "CAP_V4L2", cv2.CAP_ANY)

    def open_device() -> Capture:
        cap = cv2.VideoCapture(target, api)
        if cap.isOpened():
            # Requests only: the driver picks the nearest mode it supports; the frames show what it chose.
            if cfg.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
            if cfg.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
            if cfg.fps:
                cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        return cap

    return open_device


def _url_opener(url: str) -> Callable[[], Capture]:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, URL_OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, URL_READ_TIMEOUT_MS]

    def open_url() -> Capture:
        if url.startswith(("rtsp://", "rtsps://")):
            os.environ.setdefault(_FFMPEG_OPTIONS_ENV, _RTSP_OVER_TCP)
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)

    return open_url


def _gstreamer_opener(pipeline: str) -> Callable[[], Capture]:
    return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)


def _check_pipeline(pipeline: str) -> None:
    last = pipeline.rsplit("!", 1)[-1].split()
    if not last or last[0] != "appsink":
        raise CameraError(
            f"camera.source GStreamer pipeline {mask_credentials(pipeline)!r} does not end in an appsink",
            hint="end it with '! appsink max-buffers=1 drop=true' so OpenCV can take the newest frame",
        )
    if not gstreamer_available():
        raise CameraError(
            "camera.source is a GStreamer pipeline, but this OpenCV was built without GStreamer "
            f"(cv2 {cv2.__version__} from {Path(cv2.__file__).parent})",
            hint="on the Jetson use JetPack's OpenCV (system site-packages, built with GStreamer): create the venv "
            "with --system-site-packages and pip uninstall opencv-python opencv-python-headless, which shadow it; "
            "check with: python3 -c \"import cv2; print(cv2.getBuildInformation())\" | grep GStreamer",
        )


def _parse_synthetic(source: str) -> int | None:
    _, _, count = source.partition(":")
    if not count:
        return None
    if not count.isdigit() or int(count) < 1:
        raise CameraError(f"camera.source {source!r}: the part count after 'synthetic:' must be a positive integer")
    return int(count)


def _image_files(files: list[str]) -> list[Path]:
    return sorted(
        p for p in map(Path, files)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def open_source(cfg: CameraSection, opener: Callable[[], Capture] | None = None) -> FrameSource:
    """Open the source named by `cfg.source`; CameraError names the source and what was expected.

    `opener` replaces the capture of a live source (device, URL, pipeline): a test seam for a camera that
    disappears and returns. Live sources do not fail here when the camera is absent: they keep retrying and
    report `connected=False` in `state()`.
    """
    source = cfg.source.strip()
    if not source:
        raise CameraError(f"camera.source is empty; {_EXPECTED}")
    shown = mask_credentials(source)

    if source == "synthetic" or source.startswith("synthetic:"):
        # Parts are rendered square: the smaller configured side, so the part fits the requested frame.
        sides = [v for v in (cfg.width, cfg.height) if v]
        size = min(sides) if sides else _SYNTHETIC_SIZE
        return SyntheticSource(_parse_synthetic(source), cfg.loop, size=size)

    if source.isdigit():
        # Before the path checks: a stray file named "0" in the working directory must not win.
        return LiveSource(shown, "device", opener or _device_opener(int(source), cfg), cfg.reconnect_max_s,
                          bit_depth=cfg.bit_depth)

    path = Path(source)
    # Existing paths first: a folder or file name may contain "!" or "[" like a pipeline or a glob.
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise CameraError(f"camera.source folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return ImageFilesSource(str(path), files, cfg.loop, cfg.bit_depth, cfg.max_pixels)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageFilesSource(str(path), [path], cfg.loop, cfg.bit_depth, cfg.max_pixels)
        return VideoFileSource(path, cfg.loop, cfg.bit_depth, cfg.max_pixels)

    live_opener: Callable[[], Capture] | None = None
    kind = ""
    if "!" in source:
        # Before the URL check: a pipeline often contains one (rtspsrc location=rtsp://...).
        _check_pipeline(source)
        kind, live_opener = "gstreamer", _gstreamer_opener(source)
    elif source.lower().startswith(_URL_SCHEMES):
        kind, live_opener = "url", _url_opener(source)
    elif re.fullmatch(r"/dev/video\d+", source):
        # Not checked for existence: a USB camera unplugged at boot appears later and is picked up then.
        kind, live_opener = "device", _device_opener(source, cfg)
    if kind:
        return LiveSource(shown, kind, opener or live_opener, cfg.reconnect_max_s, bit_depth=cfg.bit_depth)

    if _GLOB_MAGIC.search(source):
        files = _image_files(glob.glob(source))
        if not files:
            raise CameraError(f"camera.source glob {source!r} matches no image files ({', '.join(IMAGE_SUFFIXES)})")
        return ImageFilesSource(source, files, cfg.loop, cfg.bit_depth, cfg.max_pixels)
    if path.exists():
        raise CameraError(f"camera.source {shown!r} is neither a file nor a folder; {_EXPECTED}")
    raise CameraError(f"camera.source {shown!r} does not exist and is not a known source; {_EXPECTED}")
