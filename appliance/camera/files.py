"""Image files as a camera: one file, a folder, or a glob pattern; each file is one part, in sorted order."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np

from appliance.camera.base import OnDemandSource, Opener
from appliance.settings import CameraSection
from bundle.errors import CameraError, ImageReadError
from bundle.images import (
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    BitDepth,
    decode_image,
    list_images,
)

_GLOB_MAGIC = re.compile(r"[*?[]")


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


# --- resolvers (see resolve.py for their order) ---------------------------------------------------------------


def resolve_folder(source: str, cfg: CameraSection, opener: Opener | None) -> ImageFilesSource | None:
    """An existing folder: the image files directly in it."""
    path = Path(source)
    if not path.is_dir():
        return None
    files = list_images(path)
    if not files:
        raise CameraError(f"camera.source folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFilesSource(str(path), files, cfg.loop, cfg.bit_depth, cfg.max_pixels)


def resolve_image_file(source: str, cfg: CameraSection, opener: Opener | None) -> ImageFilesSource | None:
    """An existing file with an image suffix: a source of that one part."""
    path = Path(source)
    if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return None
    return ImageFilesSource(str(path), [path], cfg.loop, cfg.bit_depth, cfg.max_pixels)


def resolve_glob(source: str, cfg: CameraSection, opener: Opener | None) -> ImageFilesSource | None:
    """A pattern with *, ? or [: the image files it matches."""
    if not _GLOB_MAGIC.search(source):
        return None
    files = _image_files(glob.glob(source))
    if not files:
        raise CameraError(f"camera.source glob {source!r} matches no image files ({', '.join(IMAGE_SUFFIXES)})")
    return ImageFilesSource(source, files, cfg.loop, cfg.bit_depth, cfg.max_pixels)


def _image_files(files: list[str]) -> list[Path]:
    return sorted(
        p for p in map(Path, files)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
