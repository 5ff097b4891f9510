"""Training reads image files as the station does: the camera's bit depth and pixel limit, from the command line
to the run's records."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from bundle.errors import DatasetError
from bundle.images import DEFAULT_MAX_PIXELS
from tests.conftest import tiny_config
from training.__main__ import build_parser, config_from_args
from training.__main__ import main as training_main
from training.augment import main as augment_main
from training.datasets import load_folder
from training.trainer import TrainConfig, load_checkpoint, load_samples

SIZE = 32


def mono12_dataset(root: Path, per_class: int = 3) -> Path:
    """ok/ and defect/ with 16-bit PNGs holding Mono12 data: a 0..4095 ramp, the full 12-bit range in each."""
    ramp = np.linspace(0, 4095, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    for sub in ("ok", "defect"):
        (root / sub).mkdir(parents=True)
        for i in range(per_class):
            frame = ramp.copy()
            frame[SIZE // 2, i] = 2048  # 12-bit mid-scale
            assert cv2.imwrite(str(root / sub / f"{i}.png"), frame)
    assert cv2.imread(str(root / "ok" / "0.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit files
    return root


def test_a_mono12_folder_is_read_at_full_range_with_bit_depth_12(tmp_path: Path) -> None:
    # given a dataset of 16-bit PNGs holding 12-bit data
    root = mono12_dataset(tmp_path / "mono12")

    # when it is loaded with the station's camera.bit_depth = 12
    samples = load_folder(root, bit_depth=12)

    # then every image is uint8, 4095 is 255 and 2048 is round(2048 * 255 / 4095) = 128
    assert len(samples) == 6 and {s.label for s in samples} == {0, 1}
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape == (SIZE, SIZE)
        assert int(s.image.max()) == 255 and int(s.image[-1, -1]) == 255 and int(s.image[0, 0]) == 0
    assert int(samples[0].image[SIZE // 2, 0]) == 128
    # whereas "auto" takes the same files as 16-bit data: almost black, what the station would not see
    assert {int(s.image.max()) for s in load_folder(root)} == {16}


def test_bit_depth_12_on_the_command_line_reaches_the_config_and_the_dataset(tmp_path: Path) -> None:
    root = mono12_dataset(tmp_path / "mono12")

    args = build_parser().parse_args(["--data", str(root), "--bit-depth", "12", "--max-pixels", "5_000"])
    cfg = config_from_args(args)

    assert (cfg.bit_depth, cfg.max_pixels) == (12, 5000)
    assert {int(s.image.max()) for s in load_samples(cfg)} == {255}


def test_the_command_line_defaults_are_the_stations() -> None:
    cfg = config_from_args(build_parser().parse_args(["--data", "parts"]))
    assert (cfg.bit_depth, cfg.max_pixels) == ("auto", DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("value", ["13", "twelve", "0"])
def test_a_bit_depth_the_camera_cannot_have_is_refused_by_the_parser(value: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--bit-depth", value])
    assert caught.value.code == 2
    assert f"argument --bit-depth: {value!r} is not one of auto, 8, 10, 12, 14, 16" in capsys.readouterr().err


def test_an_image_over_max_pixels_stops_training_with_its_name_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # given a Mono12 dataset with one defect image larger than the limit (40 x 40 = 1600 pixels)
    root = mono12_dataset(tmp_path / "mono12")
    cv2.imwrite(str(root / "defect" / "big.png"), np.full((40, 40), 100, np.uint16))

    # when training is started with --max-pixels 1500
    rc = training_main(["--data", str(root), "--bit-depth", "12", "--max-pixels", "1500",
                        "--out", str(tmp_path / "run"), "--quiet"])

    # then it stops with the dataset exit code and a message naming the file and the limit
    err = capsys.readouterr().err
    assert rc == DatasetError.exit_code
    assert f"error: image {root / 'defect' / 'big.png'} is 40 x 40 = 1600 pixels" in err
    assert "camera.max_pixels = 1500" in err and "Traceback" not in err
    with pytest.raises(DatasetError, match=r"defect/big\.png is 40 x 40 = 1600 pixels"):
        load_folder(root, bit_depth=12, max_pixels=1500)


def test_a_bit_depth_for_the_8_bit_datasets_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="applies to --dataset folder only"):
        TrainConfig(dataset="synthetic", bit_depth=12)
    assert TrainConfig(dataset="synthetic", bit_depth=8).bit_depth == 8


def test_a_run_saved_before_bit_depth_existed_loads_with_the_defaults(tmp_path: Path) -> None:
    old = tiny_config(tmp_path / "parts", tmp_path / "run").model_dump(mode="json")
    del old["bit_depth"], old["max_pixels"]

    cfg = TrainConfig.model_validate(old)

    assert (cfg.bit_depth, cfg.max_pixels) == ("auto", DEFAULT_MAX_PIXELS)


def test_the_run_records_how_its_images_were_read(trained_run: Path) -> None:
    final = load_checkpoint(trained_run / "final.pt")
    run = json.loads((trained_run / "run.json").read_text())
    report = json.loads((trained_run / "report" / "report.json").read_text())["extra"]
    for config in (final["config"], run["config"], report["config"]):
        assert (config["bit_depth"], config["max_pixels"]) == ("auto", DEFAULT_MAX_PIXELS)
    # The training dict travels into the bundle's metadata, where the station can compare its camera.
    for training in (final["training"], run["training"], report["training"]):
        assert (training["bit_depth"], training["max_pixels"]) == ("auto", DEFAULT_MAX_PIXELS)


def test_the_augmentation_preview_reads_images_with_the_same_limit(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    root = mono12_dataset(tmp_path / "mono12", per_class=1)

    rc = augment_main(["--images", str(root / "ok"), "--bit-depth", "12", "--max-pixels", "1000",
                       "--out", str(tmp_path / "preview.png")])

    assert rc == DatasetError.exit_code
    assert f"image {root / 'ok' / '0.png'} is 32 x 32 = 1024 pixels" in capsys.readouterr().err
