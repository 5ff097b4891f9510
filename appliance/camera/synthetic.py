"""Synthetic machined parts as a camera (`camera.source = "synthetic"` or `"synthetic:N"`), for demos and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np

from appliance.camera.base import OnDemandSource, Opener
from appliance.settings import CameraSection
from bundle.errors import CameraError

# The side of the square parts when camera.width and camera.height are both unset.
DEFAULT_SIZE = 256


class SyntheticSource(OnDemandSource):
    """Synthetic machined parts (synthetic.parts): endless, or `count` parts, repeated with loop."""

    kind = "synthetic"

    def __init__(self, count: int | None = None, loop: bool = False, size: int = DEFAULT_SIZE, seed: int = 0):
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


# --- resolver (see resolve.py for its place in the order) -----------------------------------------------------


def resolve_synthetic(source: str, cfg: CameraSection, opener: Opener | None) -> SyntheticSource | None:
    """`synthetic` (endless parts) or `synthetic:N` (N parts; CameraError if N is not a positive integer)."""
    if not (source == "synthetic" or source.startswith("synthetic:")):
        return None
    # Parts are rendered square: the smaller configured side, so the part fits the requested frame.
    sides = [v for v in (cfg.width, cfg.height) if v]
    size = min(sides) if sides else DEFAULT_SIZE
    return SyntheticSource(_parse_count(source), cfg.loop, size=size)


def _parse_count(source: str) -> int | None:
    _, _, count = source.partition(":")
    if not count:
        return None
    if not count.isdigit() or int(count) < 1:
        raise CameraError(f"camera.source {source!r}: the part count after 'synthetic:' must be a positive integer")
    return int(count)
