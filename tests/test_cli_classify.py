"""`appliance show-bundle` and `appliance classify` on a real exported bundle."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_images_bit_depth import claiming_png

from appliance.cli import main
from tests.support.frames import NOT_A_PNG, part_image, write_part


def test_classify_prints_a_verdict_per_image_and_error_for_a_bad_one(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    write_part(tmp_path / "a_ok.png", 11)
    write_part(tmp_path / "b_pit.png", 12, "pit")
    (tmp_path / "c_broken.png").write_bytes(NOT_A_PNG)
    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line in lines[:2]:
        assert any(v in line for v in ("pass", "fail", "manual_required")) and "defect probability" in line
    assert "c_broken.png: error" in lines[2] and "cannot be decoded" in lines[2]
    assert lines[3].startswith("summary:") and "error 1" in lines[3]


def test_show_bundle_verifies_and_describes(bundle_dir: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["show-bundle", str(bundle_dir)]) == 0
    out = capsys.readouterr().out
    assert "hashes verified" in out and "model_int8_qdq.onnx" in out and "decision" in out
    from bundle.format import load_bundle

    int8 = load_bundle(bundle_dir).metadata.decision_for("int8")
    assert f"int8        engines fail at >= {int8.threshold:.4f}" in out
    assert "at its own threshold" in out


def test_missing_bundle_exits_4_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["show-bundle", str(tmp_path / "none")]) == 4
    assert "does not exist" in capsys.readouterr().err


# --- hostile files and bit depth (field report: a traceback ended the run, a Mono12 frame came out black) ---------


def mono12(part: np.ndarray) -> np.ndarray:
    """An 8-bit part image as a Mono12 camera would have delivered it: gray, values 0..4095."""
    gray = cv2.cvtColor(part, cv2.COLOR_BGR2GRAY).astype(np.uint32)
    return ((gray * 4095 + 127) // 255).astype(np.uint16)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte sizes of the buffers bundle.images gives to cv2.imdecode."""
    import bundle.images

    sizes: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(bundle.images.cv2, "imdecode", lambda buf, flags: sizes.append(len(buf)) or real(buf, flags))
    return sizes


def verdict_lines(out: str) -> dict[str, str]:
    """{file name: rest of its line} for every image line, plus "summary"."""
    lines = {}
    for line in out.splitlines():
        if line.startswith("summary:"):
            lines["summary"] = line
        else:
            path, _, rest = line.partition(": ")
            lines[Path(path).name] = rest
    return lines


def test_classify_refuses_pixel_bombs_before_decoding_and_still_classifies_the_rest(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], decoded: list[int]
):
    write_part(tmp_path / "a_ok.png", 11)
    bomb = claiming_png(100_000, 100_000)
    assert len(bomb) == 69
    (tmp_path / "b_bomb.png").write_bytes(bomb)
    (tmp_path / "c_wide.png").write_bytes(claiming_png(20_000, 20_000))
    write_part(tmp_path / "d_pit.jpg", 12, "pit")

    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir)]) == 0

    lines = verdict_lines(capsys.readouterr().out)
    assert "defect probability" in lines["a_ok.png"] and "defect probability" in lines["d_pit.jpg"]
    assert lines["b_bomb.png"].startswith("error")
    assert "100000 x 100000 = 10000000000 pixels" in lines["b_bomb.png"]
    assert "camera.max_pixels = 50000000" in lines["b_bomb.png"] and "not decoded" in lines["b_bomb.png"]
    assert lines["c_wide.png"].startswith("error") and "400000000 pixels" in lines["c_wide.png"]
    assert "error 2" in lines["summary"]
    assert len(decoded) == 2  # the two real parts only


def test_classify_max_pixels_option_sets_the_limit(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], decoded: list[int]
):
    write_part(tmp_path / "part.png", 11)

    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir), "--max-pixels", "9000"]) == 0
    lines = verdict_lines(capsys.readouterr().out)
    assert lines["part.png"].startswith("error") and "96 x 96 = 9216 pixels" in lines["part.png"]
    assert "camera.max_pixels = 9000" in lines["part.png"] and decoded == []

    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir), "--max-pixels", "9216"]) == 0
    assert "defect probability" in verdict_lines(capsys.readouterr().out)["part.png"]


def test_classify_survives_any_failure_of_one_image(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    # A decoder error, exhausted memory and a bug deep in preprocessing: each one image's error line.
    import bundle.preprocess

    for name in ("a", "b", "c", "d"):
        write_part(tmp_path / f"{name}.png", 11)
    failures = iter([cv2.error("OpenCV(5.0.0) resize.cpp:1: error: (-215:Assertion failed) inv_scale_x > 0\n"),
                     MemoryError(), ValueError("output buffer is (1, 2) float32")])
    real = bundle.preprocess.preprocess

    def failing(*args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle.preprocess, "preprocess", failing)

    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir)]) == 0

    lines = verdict_lines(capsys.readouterr().out)
    assert lines["a.png"].startswith("error") and "error: OpenCV(5.0.0)" in lines["a.png"]
    assert lines["b.png"].startswith("error") and "out of memory" in lines["b.png"]
    assert lines["c.png"].startswith("error") and "ValueError: output buffer" in lines["c.png"]
    assert "defect probability" in lines["d.png"]
    assert "error 3" in lines["summary"]


def test_classify_with_bit_depth_12_sees_a_mono12_part_as_the_8_bit_part_it_shows(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    part = part_image(12, "pit")
    cv2.imwrite(str(tmp_path / "a_eight.png"), cv2.cvtColor(part, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "b_mono12.png"), mono12(part))
    cv2.imwrite(str(tmp_path / "c_mono12.tif"), mono12(part))
    hot = mono12(part)
    hot[0, 0] = 4096
    cv2.imwrite(str(tmp_path / "d_hot.png"), hot)

    assert main(["classify", str(tmp_path / "a_eight.png"), "--bundle", str(bundle_dir)]) == 0
    eight = verdict_lines(capsys.readouterr().out)["a_eight.png"]
    files = [str(tmp_path / name) for name in ("b_mono12.png", "c_mono12.tif", "d_hot.png")]
    assert main(["classify", *files, "--bundle", str(bundle_dir), "--bit-depth", "12"]) == 0
    lines = verdict_lines(capsys.readouterr().out)

    # round(round(v * 4095 / 255) * 255 / 4095) == v: the same pixels, so the same score.
    assert lines["b_mono12.png"] == eight and lines["c_mono12.tif"] == eight
    assert lines["d_hot.png"].startswith("error")
    assert "max value 4096" in lines["d_hot.png"] and "camera.bit_depth = 12" in lines["d_hot.png"]


def test_classify_under_auto_warns_on_a_16_bit_file_that_holds_12_bit_data(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    cv2.imwrite(str(tmp_path / "mono12.png"), mono12(part_image(11)))

    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir)]) == 0

    line = verdict_lines(capsys.readouterr().out)["mono12.png"]
    assert "defect probability" in line and "warning:" in line and "--bit-depth 12" in line


def test_classify_bit_depth_8_refuses_16_bit_files(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    cv2.imwrite(str(tmp_path / "mono12.png"), mono12(part_image(11)))
    assert main(["classify", str(tmp_path), "--bundle", str(bundle_dir), "--bit-depth", "8"]) == 0
    line = verdict_lines(capsys.readouterr().out)["mono12.png"]
    assert line.startswith("error") and "16-bit" in line and "camera.bit_depth = 8" in line


@pytest.mark.parametrize("option", [["--bit-depth", "11"], ["--bit-depth", "twelve"], ["--max-pixels", "0"]])
def test_classify_rejects_impossible_options(option: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["classify", "x.png", *option])
    assert exited.value.code == 2 and option[1] in capsys.readouterr().err


def test_classify_help_documents_the_exit_code_and_the_options(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Exit code 0 when every image got its line (error lines included)" in help_text
    assert "--bit-depth {auto,8,10,12,14,16}" in help_text and "camera.bit_depth" in help_text
    from bundle.images import DEFAULT_MAX_PIXELS

    assert f"camera.max_pixels (default {DEFAULT_MAX_PIXELS})" in help_text
