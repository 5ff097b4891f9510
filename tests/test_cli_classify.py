"""`appliance show-bundle` and `appliance classify` on a real exported bundle."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from appliance.cli import main
from training.synthetic import render_part


def test_classify_prints_a_verdict_per_image_and_error_for_a_bad_one(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    cv2.imwrite(str(tmp_path / "a_ok.png"), render_part(11, None, 96, True))
    cv2.imwrite(str(tmp_path / "b_pit.png"), render_part(12, "pit", 96, True))
    (tmp_path / "c_broken.png").write_bytes(b"\x89PNG garbage IEND")
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
    from appliance.bundle import load_bundle

    int8 = load_bundle(bundle_dir).metadata.decision_for("int8")
    assert f"int8        engines fail at >= {int8.threshold:.4f}" in out
    assert "at its own threshold" in out


def test_missing_bundle_exits_4_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["show-bundle", str(tmp_path / "none")]) == 4
    assert "does not exist" in capsys.readouterr().err
