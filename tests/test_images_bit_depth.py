"""Image files and camera data as the model sees them: the sensor's bit depth, and files that lie about their size.

Two kinds of problem from the field, each with the reported case and its neighbours:

- A Mono12 frame saved as a 16-bit PNG (values 0..4095) was scaled as 16-bit data: almost black, no warning.
  Now `camera.bit_depth` says what the data is, `to_8bit` converts exactly, and values the declared depth
  cannot hold are an error naming the value, the depth and the setting.
- A 69-byte PNG claiming 100000 x 100000 pixels ended `classify` with an OpenCV traceback, and a small PNG
  of 20000 x 20000 pixels decoded to a gigabyte. Now the header's pixel count is checked before decoding.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import typing
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.settings import CameraSection
from bundle import images
from bundle.errors import DatasetError, FrameError, ImageReadError
from bundle.images import (
    BIT_DEPTHS,
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    OPENCV_MAX_PIXELS,
    ImageHeader,
    bit_depth_warning,
    decode_image,
    read_header,
    read_image,
    to_8bit,
)
from training.datasets import load_folder

# --- crafted files: headers that promise more than the file holds ------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def claiming_png(width: int, height: int) -> bytes:
    """A valid PNG (signature, IHDR, one IDAT, IEND, correct CRCs) whose header claims width x height gray pixels.

    At 100000 x 100000 it is the 69-byte file of the field report.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
            + png_chunk(b"IEND", b""))


def claiming_jpeg(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 frame header for width x height gray, EOI."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def claiming_bmp(width: int, height: int) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib), 0, 0, 14 + len(dib)) + dib


def claiming_tiff(width: int, height: int, big_endian: bool = False) -> bytes:
    """A classic TIFF whose first IFD has ImageWidth (LONG) and ImageLength (SHORT or LONG) and nothing else."""
    o = ">" if big_endian else "<"
    entries = [(256, 4, 1, width), (257, 3 if height < 65536 else 4, 1, height)]
    ifd = struct.pack(o + "H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack(o + "H", value) + b"\0\0" if kind == 3 else struct.pack(o + "I", value)
        ifd += struct.pack(o + "HHI", tag, kind, count) + packed
    ifd += struct.pack(o + "I", 0)
    return (b"MM\0*" if big_endian else b"II*\0") + struct.pack(o + "I", 8) + ifd


def claiming_bigtiff(width: int, height: int) -> bytes:
    entries = struct.pack("<HHQQ", 256, 16, 1, width) + struct.pack("<HHQQ", 257, 16, 1, height)
    return b"II+\0" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + entries + struct.pack("<Q", 0)


def claiming_webp_vp8x(width: int, height: int) -> bytes:
    payload = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def claiming_webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + b"\0" * 4
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


CLAIMING = {
    "png": claiming_png,
    "jpeg": claiming_jpeg,
    "bmp": claiming_bmp,
    "tiff": claiming_tiff,
    "bigtiff": claiming_bigtiff,
    "webp-vp8x": claiming_webp_vp8x,
    "webp-vp8l": claiming_webp_vp8l,
}


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """cv2.imdecode as bundle.images calls it, recording the size of every buffer it is given."""
    decoded: list[int] = []
    real = cv2.imdecode

    def recording(buf: np.ndarray, flags: int) -> np.ndarray | None:
        decoded.append(len(buf))
        return real(buf, flags)

    monkeypatch.setattr(images.cv2, "imdecode", recording)
    return decoded


def mono(bits: int, values: list[int]) -> np.ndarray:
    """A 16-bit gray frame (2 rows) holding `values`, as a Mono10/12/14/16 camera delivers it."""
    assert max(values) < 1 << bits
    return np.array([values, values], dtype=np.uint16)


# --- A. bit depth: the conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_to_8bit_maps_endpoints_and_midpoints_exactly(bits: int) -> None:
    top = (1 << bits) - 1
    half = 1 << (bits - 1)
    frame = mono(bits, [0, 1, half - 1, half, top - 1, top])

    out = to_8bit(frame, bits)

    # round(v * 255 / top): half - 1 lies just below 127.5, half just above.
    expected = [0, round(255 / top), 127, 128, round((top - 1) * 255 / top), 255]
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert out[0].tolist() == expected


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_to_8bit_is_round_of_v_times_255_over_full_scale_for_every_value(bits: int) -> None:
    top = (1 << bits) - 1
    every = np.arange(top + 1, dtype=np.uint16).reshape(1, -1)

    out = to_8bit(every, bits)

    # No value lies on a .5 (top is odd), so float64 rounding is exact here.
    assert np.array_equal(out[0], np.rint(np.arange(top + 1) * 255.0 / top).astype(np.uint8))
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def test_8_bit_data_is_passed_through_unchanged_with_8_and_auto() -> None:
    frame = np.array([[0, 1, 127, 128, 254, 255]] * 2, dtype=np.uint8)
    assert to_8bit(frame, 8) is frame
    assert to_8bit(frame, "auto") is frame


def test_auto_takes_a_16_bit_container_as_full_16_bit_data() -> None:
    frame = mono(16, [0, 257, 32768, 65535])
    assert to_8bit(frame, "auto")[0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(to_8bit(frame, "auto"), to_8bit(frame, 16))


def test_colour_frames_keep_their_shape() -> None:
    bgr = np.full((3, 4, 3), 4095, np.uint16)
    bgr[..., 0] = 0
    out = to_8bit(bgr, 12)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 255, 255]


@pytest.mark.parametrize(
    ("frame", "bit_depth", "words"),
    [
        (mono(16, [0, 4096]), 12, ["4096", "4095", "camera.bit_depth = 12"]),
        (mono(16, [0, 1024]), 10, ["1024", "1023", "camera.bit_depth = 10"]),
        (mono(16, [65535]), 14, ["65535", "16383", "camera.bit_depth = 14"]),
        (mono(16, [0, 200]), 8, ["16-bit", "max value 200", "camera.bit_depth = 8"]),
        (np.full((2, 2), 200, np.uint8), 12, ["8-bit", "max value 200", "camera.bit_depth = 12"]),
        (np.full((2, 2), 9, np.uint8), 16, ["8-bit", "max value 9", "camera.bit_depth = 16"]),
    ],
    ids=["over-12-bit", "over-10-bit", "over-14-bit", "16-bit-as-8", "8-bit-as-12", "8-bit-as-16"],
)
def test_values_the_declared_depth_cannot_hold_are_refused_naming_value_depth_and_setting(
    frame: np.ndarray, bit_depth: int, words: list[str]
) -> None:
    with pytest.raises(FrameError) as caught:
        to_8bit(frame, bit_depth)
    for word in words:
        assert word in caught.value.message
    assert "Mono12 -> 12" in caught.value.hint


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint32])
def test_other_pixel_types_are_refused(dtype: type) -> None:
    with pytest.raises(FrameError, match=np.dtype(dtype).name):
        to_8bit(np.zeros((2, 2), dtype), "auto")


def test_auto_warns_when_16_bit_data_fits_in_fewer_bits() -> None:
    warning = bit_depth_warning(mono(12, [0, 4095]), "auto")
    assert warning is not None and "max value 4095" in warning and "camera.bit_depth = 12" in warning
    assert "Mono10" in bit_depth_warning(mono(10, [5, 1000]), "auto")
    assert bit_depth_warning(mono(16, [0, 40000]), "auto") is None  # uses the 16-bit range
    assert bit_depth_warning(mono(12, [0, 4095]), 12) is None  # declared: nothing to guess
    assert bit_depth_warning(np.zeros((2, 2), np.uint8), "auto") is None


def test_camera_settings_offer_the_depths_and_defaults_the_images_module_knows() -> None:
    field = CameraSection.model_fields["bit_depth"]
    assert typing.get_args(field.annotation) == BIT_DEPTHS
    cam = CameraSection()
    assert (cam.bit_depth, cam.max_pixels) == (DEFAULT_BIT_DEPTH, DEFAULT_MAX_PIXELS)
    assert CameraSection(bit_depth="12").bit_depth == 12  # as an environment variable delivers it
    assert CameraSection(max_pixels=OPENCV_MAX_PIXELS).max_pixels == OPENCV_MAX_PIXELS
    with pytest.raises(ValueError):
        CameraSection(max_pixels=OPENCV_MAX_PIXELS + 1)  # OpenCV's own limit (set by images) is the ceiling
    with pytest.raises(ValueError):
        CameraSection(bit_depth=11)


# --- A. bit depth: files -----------------------------------------------------------------------------------------


def mono12_part() -> np.ndarray:
    """A Mono12 frame: a bright part (3000) on a dark background (200), one pixel at full scale."""
    frame = np.full((40, 60), 200, np.uint16)
    frame[10:30, 15:45] = 3000
    frame[0, 0] = 4095
    return frame


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_mono12_frame_in_a_16_bit_file_is_read_at_full_range_with_bit_depth_12(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mono12{suffix}"
    assert cv2.imwrite(str(path), mono12_part())
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really a 16-bit file

    img = read_image(path, bit_depth=12)

    assert img.dtype == np.uint8 and img.shape == (40, 60)
    assert (int(img[20, 20]), int(img[35, 5]), int(img[0, 0])) == (187, 12, 255)  # round(v * 255 / 4095)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_the_reported_dark_frame_under_auto_is_read_as_16_bit_and_flagged(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mono12{suffix}"
    cv2.imwrite(str(path), mono12_part())

    img = read_image(path)  # bit_depth "auto": a 16-bit file is 16-bit data

    assert int(img.max()) == 16  # round(4095 / 257): the almost black frame of the field report
    assert "camera.bit_depth = 12" in bit_depth_warning(decode_image(path), "auto")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_file_over_the_declared_depth_is_an_image_error_naming_file_value_and_setting(
    tmp_path: Path, suffix: str
) -> None:
    frame = mono12_part()
    frame[5, 5] = 5000
    path = tmp_path / f"hot{suffix}"
    cv2.imwrite(str(path), frame)

    with pytest.raises(ImageReadError) as caught:
        read_image(path, bit_depth=12)

    message = caught.value.message
    assert f"hot{suffix}" in message and "max value 5000" in message and "camera.bit_depth = 12" in message


def test_an_8_bit_file_when_12_bits_are_declared_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "eight.png"
    cv2.imwrite(str(path), np.full((8, 8), 99, np.uint8))
    with pytest.raises(ImageReadError, match=r"eight\.png: frame is 8-bit \(max value 99\).*camera\.bit_depth = 12"):
        read_image(path, bit_depth=12)


def test_training_reads_a_mono12_dataset_with_its_bit_depth_and_keeps_8_bit_datasets_working(tmp_path: Path) -> None:
    for sub in ("ok", "defect"):
        (tmp_path / "mono12" / sub).mkdir(parents=True)
        (tmp_path / "plain" / sub).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "mono12" / sub / "a.png"), mono12_part())
        cv2.imwrite(str(tmp_path / "plain" / sub / "a.png"), np.full((8, 8, 3), 77, np.uint8))

    assert {int(s.image.max()) for s in load_folder(tmp_path / "mono12", bit_depth=12)} == {255}
    assert {int(s.image.max()) for s in load_folder(tmp_path / "plain")} == {77}
    with pytest.raises(DatasetError, match=r"a\.png: frame is 8-bit"):
        load_folder(tmp_path / "plain", bit_depth=12)


# --- B. hostile files: the header is read first -----------------------------------------------------------------


def test_the_reported_69_byte_png_claims_100000_by_100000_pixels() -> None:
    data = claiming_png(100_000, 100_000)
    assert len(data) == 69
    assert read_header(data) == ImageHeader("png", 100_000, 100_000)


@pytest.mark.parametrize("kind", sorted(CLAIMING))
def test_headers_of_every_format_are_read_without_decoding(kind: str) -> None:
    # Within every format's field widths: JPEG 16 bits, VP8L 14 bits.
    assert read_header(CLAIMING[kind](16_001, 12_002)).pixels == 16_001 * 12_002


@pytest.mark.parametrize(
    ("suffix", "params"),
    [
        (".png", []),
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".bmp", []),
        (".tif", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),  # lossy: VP8
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # lossless: VP8L
    ],
    ids=["png", "jpeg", "jpeg-progressive", "bmp", "tiff", "webp-lossy", "webp-lossless"],
)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_header_sizes_match_what_opencv_decodes_for_real_files(suffix: str, params: list[int], channels: int) -> None:
    image = np.random.default_rng(0).integers(0, 255, (23, 37, channels), dtype=np.uint8)
    ok, buf = cv2.imencode(suffix, image if channels > 1 else image[..., 0], params)
    assert ok
    header = read_header(buf.tobytes())
    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    assert (header.width, header.height) == (decoded.shape[1], decoded.shape[0]) == (37, 23)


def test_a_16_bit_tiff_and_a_big_endian_tiff_header_are_read() -> None:
    buf = cv2.imencode(".tif", np.zeros((23, 37), np.uint16))[1]
    assert read_header(buf.tobytes()) == ImageHeader("tiff", 37, 23)
    assert read_header(claiming_tiff(37, 23, big_endian=True)) == ImageHeader("tiff", 37, 23)


def test_a_jpeg_size_is_taken_from_the_frame_header_not_from_an_embedded_thumbnail() -> None:
    buf = cv2.imencode(".jpg", np.zeros((23, 37), np.uint8))[1]
    data = buf.tobytes()
    # An APP1 segment (where EXIF thumbnails live) holding bytes that look like a small SOF0.
    fake_sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 2, 2, 1) + b"\x01\x11\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    assert read_header(data[:2] + app1 + data[2:]) == ImageHeader("jpeg", 37, 23)


def test_a_top_down_bmp_counts_its_rows() -> None:
    buf = cv2.imencode(".bmp", np.zeros((23, 37, 3), np.uint8))[1]
    data = bytearray(buf.tobytes())
    data[22:26] = struct.pack("<i", -23)
    assert read_header(bytes(data)) == ImageHeader("bmp", 37, 23)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"P5\n100000 100000\n255\n", "format is not recognised"),  # PGM: OpenCV would decode it
        (b"GIF89a", "format is not recognised"),
        (b"\x89PNG\r\n\x1a\n\0\0", "cut short"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\0", "no frame header"),
        (b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 0) + b"\0" * 4, "no image width"),
        (b"RIFF\0\0\0\0WEBPALPH", "unknown chunk"),
    ],
    ids=["pgm", "gif", "png-cut", "jpeg-no-sof", "tiff-no-size", "webp-unknown"],
)
def test_headers_that_cannot_be_read_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        read_header(data)


@pytest.mark.parametrize("kind", sorted(CLAIMING))
def test_a_file_claiming_more_pixels_than_the_limit_is_refused_before_decoding(
    tmp_path: Path, kind: str, no_decoding: list[int]
) -> None:
    path = tmp_path / "huge.img"
    path.write_bytes(CLAIMING[kind](16_000, 16_000))

    with pytest.raises(ImageReadError) as caught:
        read_image(path)

    message = caught.value.message
    assert "huge.img" in message and "16000 x 16000 = 256000000 pixels" in message
    assert f"camera.max_pixels = {DEFAULT_MAX_PIXELS}" in message and "not decoded" in message
    assert no_decoding == []


def test_the_limit_is_the_configured_one_for_real_images(tmp_path: Path, no_decoding: list[int]) -> None:
    path = tmp_path / "part.png"
    cv2.imwrite(str(path), np.zeros((100, 200), np.uint8))

    with pytest.raises(ImageReadError, match=r"200 x 100 = 20000 pixels .*camera\.max_pixels = 19999"):
        read_image(path, max_pixels=19_999)
    assert no_decoding == []
    assert read_image(path, max_pixels=20_000).shape == (100, 200)


def test_a_20000_by_20000_png_is_refused_by_default(tmp_path: Path, no_decoding: list[int]) -> None:
    # The field report's 389 kB file decodes to about 1 GB; its header alone is enough to refuse it.
    path = tmp_path / "wide.png"
    path.write_bytes(claiming_png(20_000, 20_000))
    with pytest.raises(ImageReadError, match="400000000 pixels"):
        read_image(path)
    assert no_decoding == []


def test_an_image_format_that_cannot_be_checked_is_refused(tmp_path: Path, no_decoding: list[int]) -> None:
    path = tmp_path / "part.png"  # a PGM under a PNG name: OpenCV goes by content, so would this check
    assert cv2.imwrite(str(tmp_path / "part.pgm"), np.zeros((8, 8), np.uint8))
    (tmp_path / "part.pgm").rename(path)
    with pytest.raises(ImageReadError, match=r"part\.png cannot be decoded safely: its format is not recognised"):
        read_image(path)
    assert no_decoding == []


def test_a_file_too_big_for_any_allowed_image_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    with path.open("wb") as f:
        f.write(claiming_png(10, 10))
        f.truncate(17 * 1024 * 1024)  # sparse: 17 MiB on paper, more than 1 pixel and 16 MiB of metadata
    with pytest.raises(ImageReadError, match=r"big\.png is 17825792 bytes, more than any image within camera\.max"):
        decode_image(path, max_pixels=1)


def test_an_opencv_error_while_decoding_is_an_image_error_not_a_traceback(tmp_path: Path) -> None:
    # With the header check lifted, OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS) raises cv2.error.
    path = tmp_path / "huge.png"
    path.write_bytes(claiming_png(100_000, 100_000))
    with pytest.raises(ImageReadError, match=r"huge\.png cannot be decoded: OpenCV"):
        decode_image(path, max_pixels=10**11)


def test_a_png_with_a_jpeg_inside_is_checked_as_the_jpeg_it_is(tmp_path: Path) -> None:
    # OpenCV decodes by content: the format (and its truncation check) must come from the content too.
    buf = cv2.imencode(".jpg", np.full((30, 40), 90, np.uint8))[1]
    path = tmp_path / "renamed.png"
    path.write_bytes(buf.tobytes())
    assert read_image(path).shape == (30, 40)
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_training_names_the_hostile_file_in_a_dataset(tmp_path: Path, no_decoding: list[int]) -> None:
    for sub in ("ok", "defect"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "good.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "defect" / "bomb.png").write_bytes(claiming_png(100_000, 100_000))

    with pytest.raises(DatasetError, match=r"defect/bomb\.png is 100000 x 100000 = 10000000000 pixels"):
        load_folder(tmp_path)
    assert len(no_decoding) == 1  # ok/good.png; defect/bomb.png sorts before defect/good.png


def test_importing_images_first_sets_opencvs_own_pixel_limit(tmp_path: Path) -> None:
    # A second line of defence only (it needs this module imported before cv2): OpenCV refuses the
    # 20000 x 30000 header itself instead of allocating 600 MB for it.
    path = tmp_path / "wide.png"
    path.write_bytes(claiming_png(20_000, 30_000))
    code = (
        "import sys, numpy as np; import bundle.images; import cv2\n"
        f"data = np.fromfile({str(path)!r}, np.uint8)\n"
        "try:\n    cv2.imdecode(data, cv2.IMREAD_UNCHANGED)\nexcept cv2.error as e:\n    sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 3
