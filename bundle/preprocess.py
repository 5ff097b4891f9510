"""The one preprocessing function: frame (OpenCV uint8) -> model input tensor (C, H, W float32).

Training evaluation, INT8 calibration, export parity checks and the runtime all call `preprocess` with
the `PreprocessSpec` stored in the model bundle. A mismatch between training and runtime preprocessing
is the classic silent accuracy loss, so there is exactly one implementation.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bundle.errors import FrameError

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


class PreprocessSpec(BaseModel):
    """How a camera frame becomes the network input; stored in the bundle's metadata.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_height: int = Field(224, ge=16, le=4096)
    input_width: int = Field(224, ge=16, le=4096)
    color: Literal["gray", "rgb"] = "gray"
    # stretch: resize to the input size ignoring aspect ratio; center_crop: scale the short side, crop
    # the middle; letterbox: scale the long side, pad with `pad_value`.
    resize: Literal["stretch", "center_crop", "letterbox"] = "stretch"
    interpolation: Literal["area", "linear"] = "area"
    pad_value: int = Field(0, ge=0, le=255)
    # x = (pixel / 255 - mean) / std, per channel in the model's channel order.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @model_validator(mode="after")
    def _channels_match(self) -> PreprocessSpec:
        n = self.channels
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"color={self.color!r} needs {n} mean/std values, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed frame."""
        return (self.channels, self.input_height, self.input_width)


def _to_model_colour(frame: np.ndarray, color: str) -> np.ndarray:
    """OpenCV frame (gray HxW, BGR HxWx3 or BGRA HxWx4) -> HxW gray or HxWx3 RGB, uint8."""
    if frame.ndim == 2:
        return frame if color == "gray" else cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    channels = frame.shape[2]
    if channels == 1:
        return _to_model_colour(frame[:, :, 0], color)
    if channels == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY if color == "gray" else cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY if color == "gray" else cv2.COLOR_BGRA2RGB)
    raise FrameError(f"frame has {channels} channels; expected 1, 3 (BGR) or 4 (BGRA)")


def _resize(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    h, w = img.shape[:2]
    th, tw = spec.input_height, spec.input_width
    interp = _INTERPOLATION[spec.interpolation]
    if (h, w) == (th, tw):
        return img
    if spec.resize == "stretch":
        return cv2.resize(img, (tw, th), interpolation=interp)
    if spec.resize == "center_crop":
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        scaled = cv2.resize(img, (nw, nh), interpolation=interp)
        y0, x0 = (nh - th) // 2, (nw - tw) // 2
        return scaled[y0 : y0 + th, x0 : x0 + tw]
    # letterbox
    scale = min(th / h, tw / w)
    nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
    scaled = cv2.resize(img, (nw, nh), interpolation=interp)
    canvas = np.full((th, tw, *img.shape[2:]), spec.pad_value, dtype=np.uint8)
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = scaled
    return canvas


def check_frame(frame: object) -> np.ndarray:
    """Return the frame if it can be inspected, else raise FrameError saying why."""
    if frame is None:
        raise FrameError("no frame (camera returned nothing)")
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame is a {type(frame).__name__}, not a numpy array")
    if frame.size == 0 or frame.ndim not in (2, 3) or min(frame.shape[:2]) < 2:
        raise FrameError(f"frame has unusable shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame dtype is {frame.dtype}; expected uint8")
    return frame


def preprocess(frame: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Turn one OpenCV frame into the model input (C, H, W) float32.

    `out`, when given, is written in place (a preallocated or pinned host buffer of shape
    `spec.input_shape`, float32) and returned: the runtime copies into its pinned buffer this way
    instead of allocating a new array per frame.
    """
    img = _resize(_to_model_colour(check_frame(frame), spec.color), spec)
    if out is None:
        out = np.empty(spec.input_shape, dtype=np.float32)
    elif out.shape != spec.input_shape or out.dtype != np.float32:
        raise ValueError(f"output buffer is {out.shape} {out.dtype}; expected {spec.input_shape} float32")
    planes = img[:, :, None] if img.ndim == 2 else img
    for c in range(spec.channels):
        scale = np.float32(1.0 / (255.0 * spec.std[c]))
        shift = np.float32(-spec.mean[c] / spec.std[c])
        np.multiply(planes[:, :, c], scale, out=out[c], casting="unsafe")
        out[c] += shift
    return out


def preprocess_batch(frames: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess several frames into one (N, C, H, W) float32 batch."""
    batch = np.empty((len(frames), *spec.input_shape), dtype=np.float32)
    for i, frame in enumerate(frames):
        preprocess(frame, spec, out=batch[i])
    return batch
