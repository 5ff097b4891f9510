"""Camera sources, with real OpenCV captures on clips and images each test writes.

Live cameras are played by `FlakyCamera`: an opener that plays a real video file through cv2.VideoCapture at
a camera's pace, whose read fails at the end of the clip (the camera vanishes), and whose next opens fail
as scripted before the camera comes back.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_images_bit_depth import claiming_png

from appliance.camera import CameraState, Frame, FrameSource, open_source
from appliance.camera.base import mask_credentials
from appliance.camera.live import gstreamer_available
from appliance.settings import CameraSection
from bundle.errors import CameraError

CLIP_SIZE = (64, 48)  # width, height
# Containers and codecs to try, in order: MJPG in AVI is built into OpenCV's own writer on every platform.
_CODECS = (("MJPG", ".avi"), ("XVID", ".avi"), ("mp4v", ".mp4"))


def shade(i: int) -> int:
    """The grey level of clip frame i: far enough apart that JPEG compression cannot confuse two frames."""
    return 8 + (i * 6) % 240


def clip_frame_number(image: np.ndarray, n: int) -> int:
    """Which clip frame (0..n-1) an image shows, from its grey level."""
    return int(np.argmin([abs(float(image.mean()) - shade(i)) for i in range(n)]))


def write_clip(folder: Path, n: int, name: str = "clip") -> Path:
    """A real video file of n flat grey frames, frame i at shade(i)."""
    w, h = CLIP_SIZE
    for fourcc, suffix in _CODECS:
        path = folder / f"{name}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, (w, h))
        if not writer.isOpened():
            continue
        for i in range(n):
            writer.write(np.full((h, w, 3), shade(i), np.uint8))
        writer.release()
        if cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) > 0:
            return path
    pytest.skip(f"this OpenCV can write none of {_CODECS}")


def write_image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    cv2.imwrite(str(path), np.full((size[1], size[0], 3), value, np.uint8))
    return path


def read_all(source: FrameSource, limit: int = 1000) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None and len(frames) < limit:
        frames.append(frame)
    return frames


class PacedCapture:
    """A real cv2.VideoCapture of a file, read no faster than `fps`, as a live camera delivers."""

    def __init__(self, clip: Path, fps: float) -> None:
        self._cap = cv2.VideoCapture(str(clip))
        self._period = 1.0 / fps
        self._due = time.monotonic()

    def isOpened(self) -> bool:  # OpenCV's spelling
        return self._cap.isOpened()

    def read(self) -> tuple[bool, np.ndarray | None]:
        self._due += self._period
        time.sleep(max(0.0, self._due - time.monotonic()))
        return self._cap.read()

    def release(self) -> None:
        self._cap.release()


class FlakyCamera:
    """Opener following a script: "play" opens the clip as a live camera, "fail" opens a device that is not
    there (a real capture that does not open); after the script every open fails (the camera stays gone)."""

    def __init__(self, clip: Path, fps: float, script: list[str]) -> None:
        self.clip, self.fps, self.script = clip, fps, list(script)
        self.opens = 0

    def __call__(self) -> PacedCapture | cv2.VideoCapture:
        step = self.script[self.opens] if self.opens < len(self.script) else "fail"
        self.opens += 1
        if step == "play":
            return PacedCapture(self.clip, self.fps)
        return cv2.VideoCapture(str(self.clip.with_name("unplugged.avi")))


def live_camera(
    opener: Callable[[], object], source: str = "rtsp://10.0.0.5/stream1", bit_depth: str | int = "auto"
) -> FrameSource:
    # A short reconnect cap keeps the backoff (0.1 s steps) fast in tests; production starts at 0.5 s.
    return open_source(CameraSection(source=source, reconnect_max_s=0.1, bit_depth=bit_depth), opener=opener)


def write_mono12(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A 16-bit gray PNG or TIFF holding `value` everywhere, as a Mono12 camera's frames are saved."""
    assert cv2.imwrite(str(path), np.full((size[1], size[0]), value, np.uint16))
    return path


def wait_for_state(source: FrameSource, condition: Callable[[CameraState], bool], timeout: float = 3.0) -> CameraState:
    deadline = time.monotonic() + timeout
    while not condition(state := source.state()):
        assert time.monotonic() < deadline, f"camera state never matched: {state}"
        time.sleep(0.005)
    return state


# --- on-demand sources -----------------------------------------------------------------------------------------


def test_video_file_is_read_in_order_without_drops(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 12)

    with open_source(CameraSection(source=str(clip))) as source:
        frames = read_all(source)

        assert not source.live
        assert [f.index for f in frames] == list(range(12))
        assert [clip_frame_number(f.image, 12) for f in frames] == list(range(12))
        assert all(f.ok and f.source_name == clip.name and f.image.shape == (48, 64, 3) for f in frames)
        assert source.read() is None and source.exhausted
        state = source.state()
        assert (state.kind, state.frames_delivered, state.frames_dropped) == ("video_file", 12, 0)
        assert not state.connected


def test_looping_video_starts_over_at_the_end(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 12)

    with open_source(CameraSection(source=str(clip), loop=True)) as source:
        frames = [source.read() for _ in range(30)]

        assert [f.index for f in frames] == list(range(30))
        assert [clip_frame_number(f.image, 12) for f in frames] == [i % 12 for i in range(30)]
        assert not source.exhausted


def test_video_file_that_is_not_a_video_is_a_camera_error(tmp_path: Path) -> None:
    junk = tmp_path / "recording.avi"
    junk.write_bytes(b"not a video" * 100)

    with pytest.raises(CameraError, match="cannot be opened as a video"):
        open_source(CameraSection(source=str(junk)))


def test_folder_of_images_is_read_in_sorted_order_with_names(tmp_path: Path) -> None:
    write_image(tmp_path / "part_002.png", 100)
    write_image(tmp_path / "part_001.png", 50, size=(20, 10))
    write_image(tmp_path / "part_003.png", 150)
    (tmp_path / "notes.txt").write_text("not a part")

    with open_source(CameraSection(source=str(tmp_path))) as source:
        frames = read_all(source)

        assert [f.source_name for f in frames] == ["part_001.png", "part_002.png", "part_003.png"]
        assert [int(f.image.mean()) for f in frames] == [50, 100, 150]
        assert frames[0].image.shape == (10, 20, 3)
        assert [f.index for f in frames] == [0, 1, 2]
        assert source.exhausted and source.state().frames_delivered == 3


def test_looping_folder_starts_over_after_the_last_image(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 10)
    write_image(tmp_path / "b.png", 20)

    with open_source(CameraSection(source=str(tmp_path), loop=True)) as source:
        names = [source.read().source_name for _ in range(5)]

    assert names == ["a.png", "b.png", "a.png", "b.png", "a.png"]


def test_corrupt_image_gives_an_error_frame_and_the_next_part_still_comes(tmp_path: Path) -> None:
    write_image(tmp_path / "001.png", 60)
    good_jpeg = cv2.imencode(".jpg", np.full((30, 40, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "002.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # cut off mid-transfer
    write_image(tmp_path / "003.png", 120)
    (tmp_path / "004.png").write_bytes(b"")

    with open_source(CameraSection(source=str(tmp_path))) as source:
        frames = read_all(source)

        assert [f.source_name for f in frames] == ["001.png", "002.jpg", "003.png", "004.png"]
        assert [f.ok for f in frames] == [True, False, True, False]
        assert frames[1].image is None and "truncated" in frames[1].error
        assert frames[3].image is None and "empty" in frames[3].error
        assert int(frames[2].image.mean()) == 120
        state = source.state()
        assert state.frames_delivered == 4 and "004.png" in state.last_error


def test_a_mono12_folder_is_scaled_by_the_declared_bit_depth_and_a_hot_frame_is_an_error(tmp_path: Path) -> None:
    write_mono12(tmp_path / "001.png", 4095)
    write_mono12(tmp_path / "002.tif", 2048)
    write_mono12(tmp_path / "003.png", 4096)  # a value no 12-bit camera sends
    write_image(tmp_path / "004.png", 100)  # an 8-bit file where 12-bit data is declared
    write_mono12(tmp_path / "005.png", 1000)

    with open_source(CameraSection(source=str(tmp_path), bit_depth=12)) as source:
        frames = read_all(source)

    assert [f.ok for f in frames] == [True, True, False, False, True]
    assert [int(frames[i].image.max()) for i in (0, 1, 4)] == [255, 128, 62]  # round(v * 255 / 4095)
    assert frames[0].image.dtype == np.uint8
    assert "max value 4096" in frames[2].error and "camera.bit_depth = 12" in frames[2].error
    assert "8-bit" in frames[3].error and "camera.bit_depth = 12" in frames[3].error


def test_a_16_bit_container_is_16_bit_data_under_auto_and_the_likely_depth_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        write_mono12(tmp_path / f"{i}.png", 4095)

    with caplog.at_level(logging.WARNING, logger="appliance.camera.base"), \
            open_source(CameraSection(source=str(tmp_path))) as source:
        frames = read_all(source)

    assert all(f.ok for f in frames) and {int(f.image.max()) for f in frames} == {16}  # round(4095 / 257)
    warnings = [r.getMessage() for r in caplog.records if "bit_depth" in r.getMessage()]
    assert len(warnings) == 1 and "camera.bit_depth = 12" in warnings[0]


def test_a_16_bit_container_with_bit_depth_8_gives_error_frames(tmp_path: Path) -> None:
    write_mono12(tmp_path / "a.png", 200)
    with open_source(CameraSection(source=str(tmp_path), bit_depth=8)) as source:
        (frame,) = read_all(source)
    assert not frame.ok and "16-bit" in frame.error and "camera.bit_depth = 8" in frame.error


def test_an_image_claiming_too_many_pixels_is_an_error_frame_and_the_next_part_still_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bundle.images

    decoded: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(bundle.images.cv2, "imdecode",
                        lambda buf, flags: decoded.append(len(buf)) or real(buf, flags))
    write_image(tmp_path / "001.png", 60)
    (tmp_path / "002.png").write_bytes(claiming_png(100_000, 100_000))
    (tmp_path / "003.png").write_bytes(claiming_png(20_000, 20_000))
    write_image(tmp_path / "004.png", 120, size=(100, 50))  # over the configured limit of 4000

    with open_source(CameraSection(source=str(tmp_path), max_pixels=4_000)) as source:
        frames = read_all(source)
        state = source.state()

    assert [f.ok for f in frames] == [True, False, False, False]
    assert "100000 x 100000 = 10000000000 pixels" in frames[1].error and "camera.max_pixels = 4000" in frames[1].error
    assert "20000 x 20000 = 400000000 pixels" in frames[2].error
    assert "100 x 50 = 5000 pixels" in frames[3].error
    assert len(decoded) == 1  # only 001.png was decoded
    assert state.frames_delivered == 4 and "004.png" in state.last_error


def test_a_video_with_frames_over_the_pixel_limit_is_a_camera_error(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 3)
    with pytest.raises(CameraError, match=r"64 x 48 = 3072 pixel frames, over the limit camera\.max_pixels = 3000"):
        open_source(CameraSection(source=str(clip), max_pixels=3_000))


def test_glob_pattern_selects_matching_images_in_sorted_order(tmp_path: Path) -> None:
    write_image(tmp_path / "b.png", 20)
    write_image(tmp_path / "a.png", 10)
    write_image(tmp_path / "c.jpg", 30)

    with open_source(CameraSection(source=str(tmp_path / "*.png"))) as source:
        assert [f.source_name for f in read_all(source)] == ["a.png", "b.png"]


def test_glob_matching_nothing_is_a_camera_error(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="matches no image files"):
        open_source(CameraSection(source=str(tmp_path / "*.png")))


def test_synthetic_source_gives_the_requested_number_of_parts() -> None:
    with open_source(CameraSection(source="synthetic:5", width=64, height=64)) as source:
        frames = read_all(source)

        assert [f.index for f in frames] == [0, 1, 2, 3, 4]
        assert all(f.ok and f.image.shape == (64, 64, 3) and f.source_name == "" for f in frames)
        assert source.exhausted and source.state().kind == "synthetic"


def test_synthetic_source_without_a_count_is_endless_and_loop_repeats_a_count() -> None:
    with open_source(CameraSection(source="synthetic", width=32)) as endless:
        assert all(endless.read() is not None for _ in range(8)) and not endless.exhausted

    with open_source(CameraSection(source="synthetic:3", loop=True, width=32)) as looped:
        frames = [looped.read() for _ in range(7)]

    assert [f.index for f in frames] == list(range(7))
    assert np.array_equal(frames[0].image, frames[3].image) and np.array_equal(frames[1].image, frames[4].image)


# --- live sources ------------------------------------------------------------------------------------------------


def test_live_source_delivers_the_newest_frame_and_counts_the_ones_it_dropped(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 40)
    camera = FlakyCamera(clip, fps=200.0, script=["play"])

    with live_camera(camera) as source:
        first = source.read(timeout=2.0)
        time.sleep(0.05)  # the inspection is slower than the camera: ~10 frames arrive meanwhile
        newest = source.read(timeout=2.0)
        following = source.read(timeout=2.0)

        assert source.live and first is not None and newest is not None and following is not None
        assert newest.index >= first.index + 5, "a stale buffered frame was returned"
        assert clip_frame_number(newest.image, 40) == newest.index
        assert following.index > newest.index, "the same frame was returned twice"

        rest = []
        while (frame := source.read(timeout=0.5)) is not None:  # until the clip ends: the camera is gone
            rest.append(frame)
        delivered = [first, newest, following, *rest]
        state = source.state()

    indices = [f.index for f in delivered]
    assert indices == sorted(set(indices))
    # Every frame the camera sent was either returned or counted as dropped.
    assert state.frames_delivered == len(delivered)
    assert state.frames_dropped == 40 - len(delivered) > 0
    assert state.fps > 0


def test_live_source_survives_a_disappearing_camera_and_counts_the_reconnect(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 30)
    # Plays the clip, its read fails at the end (camera gone), two reopen attempts fail, then it is back.
    camera = FlakyCamera(clip, fps=100.0, script=["play", "fail", "fail", "play"])

    with live_camera(camera) as source:
        assert source.read(timeout=2.0) is not None
        wait_for_state(source, lambda s: s.connected)

        down = wait_for_state(source, lambda s: not s.connected)
        assert down.reconnects == 0 and "rtsp://10.0.0.5/stream1" in down.last_error

        while (frame := source.read(timeout=3.0)) is not None and frame.index < 30:
            pass  # the rest of the first playing
        assert frame is not None, "no frame after the camera came back"
        up = source.state()

    assert camera.opens == 4
    assert up.connected and up.reconnects == 1
    assert frame.ok and clip_frame_number(frame.image, 30) == frame.index - 30  # the clip again, from its start


def test_unusable_live_frames_become_error_frames_and_16_bit_frames_are_reduced(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 6)

    class OddFormatCapture(PacedCapture):
        """The clip as a camera that sends float frames first, then 16-bit ones."""

        def __init__(self) -> None:
            super().__init__(clip, fps=100.0)
            self.count = 0

        def read(self) -> tuple[bool, np.ndarray | None]:
            ok, image = super().read()
            self.count += 1
            if not ok:
                return ok, image
            return True, image.astype(np.float32) if self.count == 1 else image.astype(np.uint16) << 8

    opens = iter([True])
    with live_camera(lambda: OddFormatCapture() if next(opens, False) else cv2.VideoCapture("")) as source:
        bad = source.read(timeout=2.0)
        good = source.read(timeout=2.0)

    assert bad is not None and bad.image is None and "float32" in bad.error
    assert good is not None and good.ok and good.image.dtype == np.uint8
    assert clip_frame_number(good.image, 6) == good.index


def test_live_mono12_frames_are_scaled_by_the_declared_bit_depth_and_a_hot_frame_is_an_error(tmp_path: Path) -> None:
    clip = write_clip(tmp_path, 6)

    class Mono12Capture(PacedCapture):
        """The clip as a Mono12 camera: 16-bit gray frames holding v * 4095 / 255; the second one too hot."""

        def __init__(self) -> None:
            super().__init__(clip, fps=20.0)
            self.count = 0

        def read(self) -> tuple[bool, np.ndarray | None]:
            ok, image = super().read()
            self.count += 1
            if not ok:
                return ok, image
            gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.uint32)
            mono12 = ((gray * 4095 + 127) // 255).astype(np.uint16)
            if self.count == 2:
                mono12[0, 0] = 4096
            return True, mono12

    opens = iter([True])
    opener = lambda: Mono12Capture() if next(opens, False) else cv2.VideoCapture("")  # noqa: E731
    with live_camera(opener, bit_depth=12) as source:
        frames = []
        while (frame := source.read(timeout=1.0)) is not None:  # until the clip ends
            frames.append(frame)

    by_index = {f.index: f for f in frames}
    hot = by_index[1]  # at 20 frames/s none is dropped while this loop waits for the next
    assert not hot.ok and "max value 4096" in hot.error and "camera.bit_depth = 12" in hot.error
    others = [f for f in frames if f.index != 1]
    assert len(others) >= 4 and all(f.ok and clip_frame_number(f.image, 6) == f.index for f in others)


def test_missing_camera_at_start_is_reported_disconnected_rather_than_raised() -> None:
    with open_source(CameraSection(source="/dev/video97", reconnect_max_s=0.1)) as source:
        assert source.read(timeout=0.2) is None
        state = wait_for_state(source, lambda s: s.last_error is not None)

    assert (state.kind, state.connected, state.frames_delivered) == ("device", False, 0)
    assert "/dev/video97" in state.last_error


def test_close_wakes_a_reader_waiting_for_a_frame(tmp_path: Path) -> None:
    source = live_camera(FlakyCamera(tmp_path / "none.avi", fps=10.0, script=[]))
    start = time.monotonic()

    threading.Timer(0.1, source.close).start()
    assert source.read() is None
    assert time.monotonic() - start < 2.0


def test_camera_state_masks_credentials_in_the_url(tmp_path: Path) -> None:
    url = "rtsp://operator:s3cret@10.0.0.5:554/stream1"
    with live_camera(FlakyCamera(tmp_path / "none.avi", 10.0, []), source=url) as source:
        state = wait_for_state(source, lambda s: s.last_error is not None)

    assert state.source == "rtsp://operator:***@10.0.0.5:554/stream1"
    assert "s3cret" not in repr(state) and "s3cret" not in repr(source)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("rtsp://admin:pa55@cam/live", "rtsp://admin:***@cam/live"),
        ("rtspsrc location=rtsp://u:p@10.1.1.1/s ! appsink", "rtspsrc location=rtsp://u:***@10.1.1.1/s ! appsink"),
        ("http://cam/mjpg?user=a&password=x1&fps=5", "http://cam/mjpg?user=a&password=***&fps=5"),
        ("rtsp://cam.local:554/stream", "rtsp://cam.local:554/stream"),
    ],
)
def test_credentials_are_masked(text: str, masked: str) -> None:
    assert mask_credentials(text) == masked


# --- which source a text names: the order of resolve.RESOLVERS -------------------------------------------------


@pytest.mark.parametrize("name", ["cam ! appsink", "shift[1]", "what?"])
def test_an_existing_folder_wins_over_pipeline_and_glob_rules(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    write_image(folder / "part.png", 80)

    with open_source(CameraSection(source=str(folder))) as source:
        frames = read_all(source)
        assert source.state().kind == "images"
    assert [f.source_name for f in frames] == ["part.png"]


def test_an_existing_image_file_named_like_a_glob_is_that_one_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "part[1].png", 80)
    write_image(tmp_path / "part1.png", 20)  # what the name would match as a glob

    with open_source(CameraSection(source=str(image))) as source:
        assert source.state().kind == "images"
        assert [(f.source_name, int(f.image.mean())) for f in read_all(source)] == [("part[1].png", 80)]


@pytest.mark.parametrize("stray", ["file", "folder"])
def test_a_path_named_0_in_the_working_directory_does_not_beat_device_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stray: str
) -> None:
    clip = write_clip(tmp_path, 10)
    monkeypatch.chdir(tmp_path)
    if stray == "file":
        Path("0").write_bytes(b"a stray file, not a video")
    else:
        Path("0").mkdir()
        write_image(Path("0") / "part.png", 80)
    camera = FlakyCamera(clip, fps=100.0, script=["play"])

    with live_camera(camera, source="0") as source:
        frame = source.read(timeout=2.0)
        state = source.state()

    assert source.live and state.kind == "device" and state.source == "0"
    assert frame is not None and frame.ok and camera.opens >= 1


def test_a_folder_named_synthetic_does_not_beat_synthetic_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("synthetic").mkdir()
    write_image(Path("synthetic") / "part.png", 80)

    with open_source(CameraSection(source="synthetic", width=32)) as source:
        assert source.state().kind == "synthetic" and source.read().source_name == ""


def test_source_none_is_no_camera_that_waits_its_timeout_never_ends_and_wins_over_a_folder_named_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a folder called "none" with an image in the working directory (it must not become the camera)
    monkeypatch.chdir(tmp_path)
    Path("none").mkdir()
    write_image(Path("none") / "part.png", 80)

    with open_source(CameraSection(source="none")) as source:
        # When read, it waits its timeout and gives nothing, and is never exhausted (uploads may come any time)
        started = time.monotonic()
        assert source.read(timeout=0.2) is None
        waited = time.monotonic() - started
        assert 0.15 <= waited < 2.0, waited
        assert not source.exhausted and not source.live
        state = source.state()
        assert state.kind == "none" and state.source == "none" and not state.connected
        assert state.frames_delivered == 0 and state.last_frame_age_s is None

        # Then a reader waiting without a timeout is woken by close()
        got: list[Frame | None] = []
        reader = threading.Thread(target=lambda: got.append(source.read()))
        reader.start()
        time.sleep(0.1)
        assert reader.is_alive()
    reader.join(2)
    assert not reader.is_alive() and got == [None]


@pytest.mark.parametrize(
    "pipeline",
    [
        "rtspsrc location=rtsp://cam.local/s ! rtph264depay ! avdec_h264 ! videoconvert ! appsink",
        "http://cam.local/mjpg ! appsink",  # "!" decides, even where the text starts like a URL
    ],
)
def test_text_with_an_exclamation_mark_is_a_pipeline_not_a_url(tmp_path: Path, pipeline: str) -> None:
    if not gstreamer_available():
        with pytest.raises(CameraError, match="without GStreamer"):
            open_source(CameraSection(source=pipeline))
        return
    with live_camera(FlakyCamera(tmp_path / "none.avi", 10.0, []), source=pipeline) as source:
        assert source.state().kind == "gstreamer"


def test_a_url_with_a_query_is_a_url_not_a_glob(tmp_path: Path) -> None:
    with live_camera(FlakyCamera(tmp_path / "none.avi", 10.0, []), source="http://cam.local/mjpg?fps=5") as source:
        state = wait_for_state(source, lambda s: s.last_error is not None)

    assert (state.kind, state.connected) == ("url", False)


# --- configuration errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["no-such-camera", "/data/recordings/shift1.mp4", "synthetic:many"])
def test_unknown_source_is_a_camera_error_naming_it(source: str) -> None:
    with pytest.raises(CameraError) as err:
        open_source(CameraSection(source=source))

    assert source in str(err.value)


def test_unknown_source_says_what_is_expected() -> None:
    expected = r"'camera-one' does not exist and is not a known source; expected .*GStreamer pipeline ending in appsink"
    with pytest.raises(CameraError, match=expected):
        open_source(CameraSection(source="camera-one"))


def test_empty_source_says_what_is_expected() -> None:
    with pytest.raises(CameraError, match=r"camera.source is empty; expected "):
        open_source(CameraSection(source="  "))


def test_an_existing_path_that_is_neither_file_nor_folder_is_a_camera_error(tmp_path: Path) -> None:
    fifo = tmp_path / "camera-pipe"
    os.mkfifo(fifo)

    with pytest.raises(CameraError, match=r"is neither a file nor a folder; expected "):
        open_source(CameraSection(source=str(fifo)))


def test_gstreamer_pipeline_on_an_opencv_without_gstreamer_says_to_use_jetpacks(tmp_path: Path) -> None:
    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer; the error path cannot occur")
    pipeline = "videotestsrc ! videoconvert ! video/x-raw,format=BGR ! appsink max-buffers=1 drop=true"

    with pytest.raises(CameraError, match="without GStreamer") as err:
        open_source(CameraSection(source=pipeline))

    assert "JetPack" in str(err.value) and "opencv-python" in str(err.value)


def test_gstreamer_pipeline_must_end_in_an_appsink() -> None:
    with pytest.raises(CameraError, match="does not end in an appsink"):
        open_source(CameraSection(source="videotestsrc ! autovideosink"))


def test_camera_package_loads_without_torch_the_training_package_or_synthetic_parts() -> None:
    # The station image on the Jetson has no torch; synthetic parts import synthetic.parts only when used.
    # Every module of the package is imported, so a source added later is held to the same rule.
    code = (
        "import importlib, pkgutil, sys, appliance.camera as cam\n"
        "names = [m.name for m in pkgutil.iter_modules(cam.__path__, 'appliance.camera.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert {'appliance.camera.base', 'appliance.camera.live', 'appliance.camera.resolve'} <= set(names)\n"
        "sys.exit(('torch' in sys.modules) + 2 * ('training' in sys.modules) + 4 * ('synthetic.parts' in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr or f"exit {done.returncode}: 1 torch, 2 training, 4 synthetic.parts"
