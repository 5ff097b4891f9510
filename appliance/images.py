"""Reading image files with errors that name the file, for datasets and folder camera sources."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from appliance.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _looks_truncated(data: bytes, suffix: str) -> bool:
    # libjpeg decodes a cut-off JPEG with only a warning and grey fill; a part image that lost its
    # bottom half must not be scored as if it were whole, so check the end markers ourselves.
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" not in data[-64:]
    if suffix == ".png":
        return b"IEND" not in data[-64:]
    return False


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as OpenCV does (BGR or gray uint8); raise ImageReadError naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(f"image {p} is empty (0 bytes)", hint="re-copy the file from the camera")
    if _looks_truncated(data, p.suffix.lower()):
        raise ImageReadError(f"image {p} is truncated (no end-of-image marker)", hint="re-copy the file")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"image {p} cannot be decoded (not an image, or corrupt)")
    if img.dtype == np.uint16:
        # 16-bit sensor data: keep the top 8 bits, as the camera pipeline does for live frames.
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise ImageReadError(f"image {p} has pixel type {img.dtype}; expected 8 or 16 bit")
    return img


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        f for f in Path(folder).iterdir()
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    )
