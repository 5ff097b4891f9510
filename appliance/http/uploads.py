"""An uploaded image, from the request body to a frame the pipeline takes, with every refusal a clear HTTP error.

In order, each step bounded before the next one runs:

1. the content type: `multipart/form-data` with a boundary, else 415;
2. the body's size: a Content-Length over `http.max_upload_bytes` is refused before one byte of the body is
   read, and a body without one (chunked) is counted while it arrives and refused the moment it passes the
   limit (413); the whole body must arrive within `http.upload_timeout_s` (408);
3. the form: a file field `image` (and an optional field `part_id`), parsed while the body streams in, kept in
   memory (never more than the limit), else 422;
4. the image: its header must be one of PNG, JPEG, BMP, TIFF, WebP (else 415: not an image), its width x height
   within `camera.max_pixels` (else 413, before decoding), then `bundle.images.decode_image` (422 when it
   cannot be decoded or is truncated) and `to_8bit` with `camera.bit_depth` and the frame checks the camera
   path applies (422).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bundle.errors import FrameError, ImageReadError
from bundle.images import BitDepth, decode_image, read_header, to_8bit
from bundle.preprocess import check_frame

IMAGE_FIELD = "image"
PART_ID_FIELD = "part_id"
MAX_PARTS = 4  # image, part_id, and a little room for clients that add a field of their own
MAX_FIELD_BYTES = 1024  # a form field other than the image (the part id is at most 128 characters)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# python-multipart logs a warning for every malformed body it skips; the client gets the reason (422) instead,
# and a scanner must not fill the journal.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


class UploadError(Exception):
    """A refused upload: the HTTP status and why (shown to the client as `detail`)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Upload:
    image: bytes
    filename: str  # as the client named it, reduced to safe characters ("" when it gave none)
    fields: dict[str, str] = field(default_factory=dict)


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a `multipart/form-data` content type; UploadError(415) for anything else."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = (content_type or "none")[:100]
        raise UploadError(415, f"content type {shown!r}: upload the image as multipart/form-data, "
                               f"file field {IMAGE_FIELD!r} (curl -F image=@part.png)")
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise UploadError(415, "multipart/form-data without a usable boundary")
    return boundary


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading when the client announces a body over `limit` (400 for a length that is no number)."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise UploadError(400, f"Content-Length {content_length[:40]!r} is not a number") from None
    if declared > limit:
        raise UploadError(413, f"the request body is {declared} bytes, over http.max_upload_bytes = {limit}; "
                               "not read")


class _Form:
    """Collects the parts of a multipart body in memory, within the limits above."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytearray]] = []
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.ended = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise UploadError(422, f"more than {MAX_PARTS} form fields; send {IMAGE_FIELD!r} and {PART_ID_FIELD!r}")
        self._headers = {}
        self.parts.append((self._headers, bytearray()))

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        headers, body = self.parts[-1]
        body.extend(data[start:end])
        name, filename = _disposition(headers)
        if filename is None and name != IMAGE_FIELD and len(body) > MAX_FIELD_BYTES:
            raise UploadError(422, f"form field {name!r} is over {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        self.ended = True

    def upload(self) -> Upload:
        if not self.ended:
            raise UploadError(422, "the multipart body ends before its closing boundary (cut short?)")
        image, filename, fields = None, "", {}
        for headers, body in self.parts:
            name, given = _disposition(headers)
            if name == IMAGE_FIELD:
                if image is not None:
                    raise UploadError(422, f"more than one {IMAGE_FIELD!r} field: one image per request")
                image, filename = bytes(body), _SAFE_NAME.sub("_", given or "")[:100]
            elif name and given is None:  # a text field; another file is ignored
                if name in fields:  # which of two part ids is the part? Refused, as two images are
                    raise UploadError(422, f"more than one {name[:40]!r} field: send it once")
                try:
                    fields[name] = body.decode("utf-8")
                except UnicodeDecodeError:
                    raise UploadError(422, f"form field {name[:40]!r} is not UTF-8 text") from None
        if image is None:
            raise UploadError(422, f"no file field {IMAGE_FIELD!r} in the form (curl -F image=@part.png)")
        return Upload(image, filename, fields)


def _disposition(headers: dict[str, str]) -> tuple[str, str | None]:
    """(field name, file name or None) of a part's Content-Disposition."""
    _, options = parse_options_header(headers.get("content-disposition", ""))
    name = options.get(b"name", b"").decode("utf-8", "replace")
    filename = options.get(b"filename")
    return name, None if filename is None else filename.decode("utf-8", "replace")


async def read_upload(chunks: AsyncIterator[bytes], boundary: bytes, limit: int, timeout_s: float) -> Upload:
    """The form from the body's chunks: 413 past `limit` bytes, 408 when the body takes longer than `timeout_s`."""
    form = _Form()
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    received = 0
    deadline = time.monotonic() + timeout_s
    iterator = chunks.__aiter__()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UploadError(408, f"the request body did not arrive within http.upload_timeout_s = {timeout_s:g} s")
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), remaining)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise UploadError(408, f"the request body did not arrive within http.upload_timeout_s = {timeout_s:g} s"
                              ) from None
        received += len(chunk)
        if received > limit:
            raise UploadError(413, f"the request body passed http.max_upload_bytes = {limit} bytes; the rest is "
                                   "not read")
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadError(422, f"the multipart body cannot be parsed: {exc}") from None
    try:
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(422, f"the multipart body cannot be parsed: {exc}") from None
    return form.upload()


def decode_upload(data: bytes, name: str, max_pixels: int, bit_depth: BitDepth) -> np.ndarray:
    """The uploaded file as the camera path gives a frame: uint8, gray, BGR or BGRA (see the module docstring)."""
    shown = name or "the upload"
    if not data:
        raise UploadError(422, f"{shown} is empty (0 bytes)")
    try:
        header = read_header(data)
    except ValueError as exc:
        raise UploadError(415, f"{shown} is not an image: {exc}") from None
    if header.pixels > max_pixels:
        raise UploadError(413, f"{shown} is {header.width} x {header.height} = {header.pixels} pixels "
                               f"({header.format} header), over camera.max_pixels = {max_pixels}; not decoded")
    # decode_image reads a file: the one decoder (and its checks) of every image the station takes.
    fd, path = tempfile.mkstemp(prefix="appliance-upload-", suffix=f".{header.format}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            image = decode_image(path, max_pixels)
        except ImageReadError as exc:
            status = 413 if "max_pixels" in exc.message else 422
            raise UploadError(status, exc.message.replace(path, shown)) from None
    finally:
        os.unlink(path)
    try:
        # As a camera source's frames (appliance.camera.base): the camera's bit depth, then the frame checks.
        return check_frame(to_8bit(image, bit_depth))
    except FrameError as exc:
        raise UploadError(422, f"{shown}: {exc.message}") from None
