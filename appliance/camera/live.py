"""Live cameras: a V4L2/USB device, an rtsp/http(s) URL, or a GStreamer pipeline, all read by `LiveSource`.

A live camera runs on its own clock. One reader thread keeps only the newest frame in a one-slot buffer: a
camera does not wait for the inspection, and a frame that sat in a queue shows a part that has already left
the field of view; so a frame overwritten before it was read is counted as dropped, and `read()` returns the
newest frame not yet returned. A failed open or read is a disconnect: the reader releases the capture and
reopens it with capped exponential backoff. What differs between the three kinds is only the opener: the
function that builds and opens the `cv2.VideoCapture`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from appliance.camera.base import Capture, Frame, FrameSource, Opener, mask_credentials
from appliance.settings import CameraSection
from bundle.errors import CameraError
from bundle.images import DEFAULT_BIT_DEPTH, BitDepth

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
# close() waits this long for the reader thread; a capture stuck inside a driver call cannot be joined.
_JOIN_TIMEOUT_S = 5.0
_URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")


class LiveSource(FrameSource):
    """A camera on its own clock, read by one thread into a one-slot latest-frame buffer.

    `opener` builds and opens the capture; it is called again after every disconnect (tests pass one that
    plays a video file through OpenCV and fails on purpose).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        opener: Opener,
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


# --- openers: how each kind of live camera is opened ----------------------------------------------------------


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's opencv-python is not)."""
    return re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()) is not None


def _device_opener(target: int | str, cfg: CameraSection) -> Opener:
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


def _url_opener(url: str) -> Opener:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, URL_OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, URL_READ_TIMEOUT_MS]

    def open_url() -> Capture:
        if url.startswith(("rtsp://", "rtsps://")):
            os.environ.setdefault(_FFMPEG_OPTIONS_ENV, _RTSP_OVER_TCP)
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)

    return open_url


def _gstreamer_opener(pipeline: str) -> Opener:
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


# --- resolvers (see resolve.py for their order) ---------------------------------------------------------------
# A live source does not fail here when the camera is absent: it keeps retrying and reports connected=False.
# `opener`, when given, replaces the kind's own opener (a test seam); the source text is still checked.


def _live(source: str, kind: str, own_opener: Opener, cfg: CameraSection, opener: Opener | None) -> LiveSource:
    return LiveSource(mask_credentials(source), kind, opener or own_opener, cfg.reconnect_max_s,
                      bit_depth=cfg.bit_depth)


def resolve_device_index(source: str, cfg: CameraSection, opener: Opener | None) -> LiveSource | None:
    """A device index such as "0" (V4L2 /dev/video0, or the platform's camera N)."""
    if not source.isdigit():
        return None
    return _live(source, "device", _device_opener(int(source), cfg), cfg, opener)


def resolve_pipeline(source: str, cfg: CameraSection, opener: Opener | None) -> LiveSource | None:
    """A GStreamer pipeline: any text with "!" in it; CameraError unless it ends in an appsink and this
    OpenCV has GStreamer."""
    if "!" not in source:
        return None
    _check_pipeline(source)
    return _live(source, "gstreamer", _gstreamer_opener(source), cfg, opener)


def resolve_url(source: str, cfg: CameraSection, opener: Opener | None) -> LiveSource | None:
    """An rtsp://, rtsps://, http:// or https:// URL (scheme in any case), opened through FFmpeg."""
    if not source.lower().startswith(_URL_SCHEMES):
        return None
    return _live(source, "url", _url_opener(source), cfg, opener)


def resolve_device_path(source: str, cfg: CameraSection, opener: Opener | None) -> LiveSource | None:
    """/dev/videoN. Not checked for existence: a USB camera unplugged at boot appears later and is picked up
    then."""
    if not re.fullmatch(r"/dev/video\d+", source):
        return None
    return _live(source, "device", _device_opener(source, cfg), cfg, opener)
