"""Reading image files safely, and bringing camera data of any bit depth to the model's 8-bit range.

Used by the folder camera sources, `appliance classify` and training's dataset loaders, so a file is judged
the same way wherever it is read:

- The pixel count is read from the file's header (PNG, JPEG, BMP, TIFF, WebP) and checked against a limit
  before anything is decoded: a 69-byte PNG can claim 100000 x 100000 pixels, and a 389 kB one decodes to
  a gigabyte. A file whose format is not one of these is refused rather than decoded, because OpenCV sniffs
  the format from the content (not the name) and some of its decoders allocate the claimed size before
  reading any pixel data, so a small file is no guarantee of a small image.
- A decoder failure of any kind is an ImageReadError naming the file, never an OpenCV traceback.
- `to_8bit` is the one conversion from the sensor's bit depth (camera.bit_depth) to uint8, for files and
  live frames alike.
"""

from __future__ import annotations

import argparse
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

# OpenCV's own limit on decoded pixels (default 2**30), read once when cv2 is imported, so it only takes
# effect when this module is the first to import cv2. It is a second line behind `check_pixels`, which works
# whatever the import order; a value the plant set in the environment wins.
OPENCV_MAX_PIXELS = 2**29
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(OPENCV_MAX_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bundle.errors import FrameError, ImageReadError  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# The bit depth of the camera's data: 8 (uint8 frames), 10/12/14/16 (uint16 frames holding values up to
# 2**N - 1, LSB-aligned as GenICam Mono10/Mono12 deliver them), or "auto": uint8 is 8-bit, uint16 is 16-bit.
BitDepth = Literal["auto", 8, 10, 12, 14, 16]
BIT_DEPTHS: tuple[BitDepth, ...] = ("auto", 8, 10, 12, 14, 16)
# Defaults of camera.bit_depth and camera.max_pixels (appliance/settings.py repeats them; a test checks).
DEFAULT_BIT_DEPTH: BitDepth = "auto"
DEFAULT_MAX_PIXELS = 50_000_000
# A file larger than this many bytes per allowed pixel (16-bit RGBA, uncompressed) plus room for metadata
# cannot be an image within the limit; it is refused before it is read into memory.
_MAX_BYTES_PER_PIXEL = 8
_METADATA_ALLOWANCE = 16 * 1024 * 1024
_BIT_DEPTH_HINT = (
    "set camera.bit_depth (appliance classify and python -m training: --bit-depth) to the camera's pixel "
    "format: Mono8 -> 8, "
    'Mono10 -> 10, Mono12 -> 12, Mono16 or MSB-aligned data -> 16 or "auto"'
)


# --- command-line values (appliance classify, python -m training, training.augment) ---------------------------


def bit_depth_option(text: str) -> BitDepth:
    """`--bit-depth` of the command lines: "auto" or 8, 10, 12, 14, 16, as camera.bit_depth."""
    value: str | int = int(text) if text.strip().isdigit() else text.strip()
    if value not in BIT_DEPTHS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, BIT_DEPTHS))}")
    return cast(BitDepth, value)


def max_pixels_option(text: str) -> int:
    """`--max-pixels` of the command lines: a positive whole number (1_000_000 allowed)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value



# --- bit depth ------------------------------------------------------------------------------------------------


def _lut(bits: int) -> np.ndarray:
    """uint8 table of round(v * 255 / (2**bits - 1)) for v in 0 .. 2**bits - 1, in exact integer arithmetic."""
    top = (1 << bits) - 1
    v = np.arange(top + 1, dtype=np.int64)
    # round(a / b) = floor((2a + b) / (2b)) for a, b >= 0. There are no ties to break: b = 2**bits - 1 is
    # odd, so 2 * v * 255 / b is never an odd integer.
    return ((2 * 255 * v + top) // (2 * top)).astype(np.uint8)


_LUTS = {bits: _lut(bits) for bits in (10, 12, 14, 16)}


def to_8bit(image: np.ndarray, bit_depth: BitDepth = DEFAULT_BIT_DEPTH) -> np.ndarray:
    """Scale a frame from the camera's bit depth to uint8; FrameError when its values cannot be of that depth.

    `image`: HxW, HxWx1, HxWx3 or HxWx4, uint8 (8-bit data) or uint16 (10..16-bit data, values 0..2**N - 1).
    Returns an array of the same shape, dtype uint8, each value round(v * 255 / (2**N - 1)) computed exactly
    (a lookup table built with integer arithmetic): 0 -> 0, 2**N - 1 -> 255, and for 12 bits 2048 -> 128.
    uint8 data with bit_depth 8 or "auto" is returned as it is (not copied). "auto" takes uint16 as 16-bit.

    Refused (FrameError naming the largest value found, the declared depth and camera.bit_depth): a value
    above 2**N - 1, uint16 data when 8 bits are declared, uint8 data when 10..16 bits are declared, and any
    other dtype.
    """
    depth = 16 if bit_depth == "auto" and image.dtype == np.uint16 else bit_depth
    if image.dtype == np.uint8:
        if depth in ("auto", 8):
            return image
        raise FrameError(
            f"frame is 8-bit (max value {_max(image)}) but camera.bit_depth = {depth} declares {depth}-bit data "
            "in a 16-bit container",
            hint=_BIT_DEPTH_HINT,
        )
    if image.dtype != np.uint16:
        raise FrameError(f"frame dtype is {image.dtype}; expected uint8 or uint16 (8 to 16-bit camera data)")
    if depth == 8:
        raise FrameError(
            f"frame is 16-bit (max value {_max(image)}) but camera.bit_depth = 8 declares 8-bit data",
            hint=_BIT_DEPTH_HINT,
        )
    top = (1 << depth) - 1
    peak = _max(image)
    if peak > top:
        raise FrameError(
            f"frame has max value {peak}, above {top}, the largest {depth}-bit value: camera.bit_depth = {depth} "
            "does not match the camera's data",
            hint=_BIT_DEPTH_HINT,
        )
    return _LUTS[depth][image]


def bit_depth_warning(image: np.ndarray, bit_depth: BitDepth) -> str | None:
    """A warning when "auto" takes a 16-bit frame as 16-bit data although every value fits in 14 bits or fewer.

    Such a frame is most likely from a Mono10/12/14 camera with camera.bit_depth unset: scaled as 16-bit it
    is almost black, and the model's verdict on it means little. None when there is nothing to say.
    """
    if bit_depth != "auto" or image.dtype != np.uint16 or image.size == 0:
        return None
    peak = _max(image)
    if peak >= 1 << 14:
        return None
    fits = next(bits for bits in (10, 12, 14) if peak < 1 << bits)
    return (
        f"16-bit frame with max value {peak} taken as 16-bit data (camera.bit_depth = auto) looks almost black; "
        f"if the camera sends {fits}-bit data (Mono{fits}), set camera.bit_depth = {fits} "
        f"(appliance classify: --bit-depth {fits})"
    )


def _max(image: np.ndarray) -> int:
    return int(image.max()) if image.size else 0


# --- header probing -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image file's header says, read without decoding."""

    format: str  # png | jpeg | bmp | tiff | webp
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): not DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length field
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257
# TIFF field types that can hold the image size: SHORT, LONG, and BigTIFF's LONG8.
_TIFF_INT = {3: "H", 4: "I", 16: "Q"}


def read_header(data: bytes) -> ImageHeader:
    """Format and size of an image from its first bytes; ValueError says why they cannot be known.

    Formats are told apart by their signature, as OpenCV's imdecode does: PNG (IHDR), JPEG (the first SOFn
    marker), BMP (the DIB header), TIFF and BigTIFF (tags 256 and 257 of the first IFD, the page OpenCV
    decodes) and WebP (VP8, VP8L or VP8X chunk).
    """
    try:
        if data.startswith(_PNG_SIGNATURE):
            return _png_header(data)
        if data.startswith(b"\xff\xd8\xff"):
            return _jpeg_header(data)
        if data.startswith(b"BM"):
            return _bmp_header(data)
        if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return _tiff_header(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_header(data)
    except struct.error as exc:  # a field past the end of the data
        raise ValueError("its header is cut short") from exc
    raise ValueError("its format is not recognised (expected PNG, JPEG, BMP, TIFF or WebP)")


def _png_header(data: bytes) -> ImageHeader:
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise ValueError("its PNG header has no IHDR chunk first")
    width, height = struct.unpack_from(">II", data, 16)
    return ImageHeader("png", width, height)


def _jpeg_header(data: bytes) -> ImageHeader:
    i = 2
    while i < len(data) - 1:
        if data[i] != 0xFF:
            # libjpeg skips stray bytes before a marker (with a warning); do the same so both find one SOF.
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return ImageHeader("jpeg", width, height)
        if length < 2:
            raise ValueError(f"its JPEG marker at byte {i} has a bad length {length}")
        i += 2 + length
    raise ValueError("its JPEG data has no frame header (SOF marker)")


def _bmp_header(data: bytes) -> ImageHeader:
    (dib_size,) = struct.unpack_from("<I", data, 14)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack_from("<HH", data, 18)
    elif dib_size >= 16:
        width, height = struct.unpack_from("<ii", data, 18)  # a negative height means top-down rows
    else:
        raise ValueError(f"its BMP header has an unknown size {dib_size}")
    return ImageHeader("bmp", abs(width), abs(height))


def _tiff_header(data: bytes) -> ImageHeader:
    order = "<" if data[:2] == b"II" else ">"
    if data[2:4] in (b"*\0", b"\0*"):  # classic TIFF: 32-bit offsets, 12-byte entries
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        first, size, count_fmt = ifd + 2, 12, "I"
    else:  # BigTIFF: 64-bit offsets, 20-byte entries
        (ifd,) = struct.unpack_from(order + "Q", data, 8)
        (count,) = struct.unpack_from(order + "Q", data, ifd)
        first, size, count_fmt = ifd + 8, 20, "Q"
    sizes: dict[int, int] = {}
    for k in range(min(count, max(0, len(data) - first) // size)):
        tag, kind = struct.unpack_from(order + "HH", data, first + k * size)
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT) and kind in _TIFF_INT:
            value_at = first + k * size + 4 + struct.calcsize(count_fmt)
            (sizes[tag],) = struct.unpack_from(order + _TIFF_INT[kind], data, value_at)
    if _TIFF_WIDTH not in sizes or _TIFF_HEIGHT not in sizes:
        raise ValueError("its first TIFF directory has no image width and length (tags 256, 257)")
    return ImageHeader("tiff", sizes[_TIFF_WIDTH], sizes[_TIFF_HEIGHT])


def _webp_header(data: bytes) -> ImageHeader:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a 3-byte frame tag, the start code, then 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("its WebP VP8 frame has no start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":  # lossless: signature 0x2f, then width - 1 and height - 1 in 14 bits each
        if data[20:21] != b"\x2f":
            raise ValueError("its WebP VP8L stream has no signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: the canvas size, width - 1 and height - 1 in 24 bits each
        if len(data) < 30:
            raise struct.error("short VP8X chunk")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", width, height)
    raise ValueError(f"its WebP container holds an unknown chunk {chunk!r}")


# --- reading files --------------------------------------------------------------------------------------------


def _looks_truncated(data: bytes, fmt: str) -> bool:
    # libjpeg decodes a cut-off JPEG with only a warning and grey fill; a part image that lost its
    # bottom half must not be scored as if it were whole, so check the end markers ourselves.
    if fmt == "jpeg":
        return b"\xff\xd9" not in data[-64:]
    if fmt == "png":
        return b"IEND" not in data[-64:]
    return False


def _size_hint(max_pixels: int) -> str:
    return (f"if the camera really delivers images this large, raise camera.max_pixels (now {max_pixels}; "
            "appliance classify and python -m training: --max-pixels)")


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file as stored (uint8 or uint16, gray or BGR/BGRA), checking its size first.

    ImageReadError names the file and the reason: unreadable, empty, too large for `max_pixels`
    (width x height from the header, before decoding), format not recognised, truncated, or not decodable.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        limit = max_pixels * _MAX_BYTES_PER_PIXEL + _METADATA_ALLOWANCE
        if size > limit:
            raise ImageReadError(
                f"image {p} is {size} bytes, more than any image within camera.max_pixels = {max_pixels} "
                f"can take ({limit} bytes); not read", hint=_size_hint(max_pixels))
        data = p.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read image {p}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(f"image {p} is empty (0 bytes)", hint="re-copy the file from the camera")
    try:
        header = read_header(data)
    except ValueError as exc:
        raise ImageReadError(f"image {p} cannot be decoded safely: {exc}",
                             hint="save the image as PNG, JPEG, BMP, TIFF or WebP") from exc
    if header.width <= 0 or header.height <= 0:
        raise ImageReadError(f"image {p} cannot be decoded: its {header.format} header says "
                             f"{header.width} x {header.height} pixels")
    if header.pixels > max_pixels:
        raise ImageReadError(
            f"image {p} is {header.width} x {header.height} = {header.pixels} pixels ({header.format} header), "
            f"over the limit camera.max_pixels = {max_pixels}; not decoded",
            hint=_size_hint(max_pixels),
        )
    if _looks_truncated(data, header.format):
        raise ImageReadError(f"image {p} is truncated (no end-of-image marker)", hint="re-copy the file")
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # e.g. OpenCV's own size limit, or a decoder that gave up mid-file
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "OpenCV error")
        raise ImageReadError(f"image {p} cannot be decoded: {reason}") from exc
    except MemoryError as exc:
        raise ImageReadError(f"image {p} cannot be decoded: not enough memory for {header.pixels} pixels",
                             hint=f"lower camera.max_pixels (now {max_pixels})") from exc
    if img is None or img.size == 0:
        raise ImageReadError(f"image {p} cannot be decoded (not an image, or corrupt)")
    return img


def read_image(
    path: str | Path, bit_depth: BitDepth = DEFAULT_BIT_DEPTH, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read an image file as the model sees it (gray or BGR/BGRA uint8); ImageReadError names the file.

    `decode_image` (size limit, corrupt files), then `to_8bit` with the camera's `bit_depth`.
    """
    img = decode_image(path, max_pixels)
    try:
        return to_8bit(img, bit_depth)
    except FrameError as exc:
        raise ImageReadError(f"image {path}: {exc.message}", hint=exc.hint) from exc


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        f for f in Path(folder).iterdir()
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    )
