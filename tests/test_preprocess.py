"""The preprocessing contract: one function, same numbers for training, calibration and runtime."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from bundle.errors import FrameError
from bundle.preprocess import PreprocessSpec, preprocess, preprocess_batch


def _frame(h: int = 120, w: int = 160, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def test_gray_values_match_an_independent_formula():
    spec = PreprocessSpec(input_height=32, input_width=48, color="gray", mean=(0.4,), std=(0.2,))
    frame = _frame()
    x = preprocess(frame, spec)
    gray = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (48, 32), interpolation=cv2.INTER_AREA)
    expected = (gray.astype(np.float64) / 255.0 - 0.4) / 0.2
    assert x.shape == (1, 32, 48) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], expected, atol=1e-5)


def test_rgb_matches_opencv_blob_from_image():
    # blobFromImage is OpenCV's own implementation of resize + swapRB + scale + mean: an independent check.
    spec = PreprocessSpec(input_height=40, input_width=40, color="rgb", mean=(0.5,) * 3, std=(0.5,) * 3,
                          interpolation="linear")
    frame = _frame(40, 40)
    x = preprocess(frame, spec)
    blob = cv2.dnn.blobFromImage(frame, scalefactor=1 / 127.5, size=(40, 40), mean=(127.5, 127.5, 127.5),
                                 swapRB=True)
    np.testing.assert_allclose(x, blob[0], atol=1e-5)


def test_writes_into_a_preallocated_buffer_in_place():
    spec = PreprocessSpec(input_height=16, input_width=16)
    buf = np.full(spec.input_shape, np.nan, dtype=np.float32)
    out = preprocess(_frame(), spec, out=buf)
    assert out is buf
    assert np.isfinite(buf).all()


def test_rejects_a_wrong_buffer():
    spec = PreprocessSpec(input_height=16, input_width=16)
    with pytest.raises(ValueError, match="expected"):
        preprocess(_frame(), spec, out=np.empty((1, 16, 17), np.float32))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_accepts_gray_bgr_and_bgra_frames(channels: int):
    for color in ("gray", "rgb"):
        n = 1 if color == "gray" else 3
        spec = PreprocessSpec(input_height=20, input_width=30, color=color, mean=(0.5,) * n, std=(0.5,) * n)
        assert preprocess(_frame(channels=channels), spec).shape == (n, 20, 30)


@pytest.mark.parametrize("rule", ["stretch", "center_crop", "letterbox"])
def test_resize_rules_give_the_input_size(rule: str):
    spec = PreprocessSpec(input_height=50, input_width=50, resize=rule)
    x = preprocess(_frame(90, 200), spec)
    assert x.shape == (1, 50, 50)


def test_letterbox_pads_with_the_pad_value():
    spec = PreprocessSpec(input_height=50, input_width=50, resize="letterbox", pad_value=0, mean=(0.0,),
                          std=(1.0,))
    x = preprocess(np.full((20, 100), 255, np.uint8), spec)
    assert x[0, 0, 25] == 0.0 and x[0, 25, 25] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [None, np.zeros((0, 0), np.uint8), np.zeros((10, 10), np.float32), "frame"])
def test_unusable_frames_raise_frame_error(bad):
    with pytest.raises(FrameError):
        preprocess(bad, PreprocessSpec())


def test_spec_validation_names_the_problem():
    with pytest.raises(ValidationError, match="mean/std"):
        PreprocessSpec(color="rgb", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValidationError, match="positive"):
        PreprocessSpec(std=(0.0,))


def test_batch_equals_single_frames():
    spec = PreprocessSpec(input_height=24, input_width=24)
    frames = [_frame(seed=i) for i in range(3)]
    batch = preprocess_batch(frames, spec)
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(batch[i], preprocess(f, spec))
