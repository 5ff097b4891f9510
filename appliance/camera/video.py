"""A recorded video file as a camera, decoded frame by frame in the caller's pace."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from appliance.camera.base import OnDemandSource, Opener
from appliance.settings import CameraSection
from bundle.errors import CameraError
from bundle.images import DEFAULT_BIT_DEPTH, DEFAULT_MAX_PIXELS, BitDepth


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


# --- resolver (see resolve.py for its place in the order) -----------------------------------------------------


def resolve_video_file(source: str, cfg: CameraSection, opener: Opener | None) -> VideoFileSource | None:
    """Any existing file (image files were claimed before): opened as a video, CameraError if it is none."""
    path = Path(source)
    if not path.is_file():
        return None
    return VideoFileSource(path, cfg.loop, cfg.bit_depth, cfg.max_pixels)
