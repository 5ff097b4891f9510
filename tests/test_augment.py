"""Production-condition augmentation: shape contract, each transform's effect, config limits, preview."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from bundle.errors import ConfigError
from synthetic.parts import render_part
from training.augment import (
    TRANSFORMS,
    AugmentConfig,
    LightingConfig,
    RotationConfig,
    apply_transform,
    augment,
    main,
    preview_grid,
)
from training.synthetic import write_dataset


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    return render_part(3, "crack", size=128)


@pytest.fixture(scope="module")
def bgr() -> np.ndarray:
    return render_part(4, "pit", size=128, color=True)


def _all_disabled() -> AugmentConfig:
    return AugmentConfig(**{name: {"enabled": False} for name in TRANSFORMS})


@pytest.mark.parametrize("shape", [(96, 128), (96, 128, 3), (96, 128, 1)])
def test_augment_keeps_shape_and_dtype(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for seed in range(10):
        out = augment(img, np.random.default_rng(seed), AugmentConfig())
        assert out.shape == img.shape
        assert out.dtype == np.uint8


def test_augment_rejects_images_it_cannot_handle() -> None:
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((8, 8), np.float32), np.random.default_rng(0), AugmentConfig())
    with pytest.raises(ValueError, match="shape"):
        augment(np.zeros((8, 8, 4), np.uint8), np.random.default_rng(0), AugmentConfig())


def test_same_rng_seed_gives_the_same_augmented_image(bgr: np.ndarray) -> None:
    first = augment(bgr, np.random.default_rng([1, 2, 3]), AugmentConfig())
    second = augment(bgr, np.random.default_rng([1, 2, 3]), AugmentConfig())
    other = augment(bgr, np.random.default_rng([1, 2, 4]), AugmentConfig())
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_augment_leaves_the_input_untouched_and_returns_a_new_array(gray: np.ndarray) -> None:
    # Datasets keep decoded images in memory: augmenting must never write into them.
    original = gray.copy()
    out = augment(gray, np.random.default_rng(0), AugmentConfig())
    assert np.array_equal(gray, original)
    unchanged = augment(gray, np.random.default_rng(0), _all_disabled())
    assert np.array_equal(unchanged, gray)
    assert unchanged is not gray and not np.shares_memory(unchanged, gray) and not np.shares_memory(out, gray)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("image", ["gray", "bgr"])
def test_each_transform_changes_the_image(name: str, image: str, request: pytest.FixtureRequest) -> None:
    img = request.getfixturevalue(image)
    out = apply_transform(name, img, np.random.default_rng(0), AugmentConfig())
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - img.astype(np.int16)).mean() > 0.1, name


def test_transform_runs_even_when_disabled_in_apply_transform(gray: np.ndarray) -> None:
    # apply_transform is the preview's "what does this do" view: it ignores enabled and the probabilities.
    out = apply_transform("lighting", gray, np.random.default_rng(0), _all_disabled())
    assert not np.array_equal(out, gray)


def test_unknown_transform_name_is_rejected(gray: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown transform 'blur'"):
        apply_transform("blur", gray, np.random.default_rng(0), AugmentConfig())


def test_rotation_limit_defaults_to_15_and_is_validated() -> None:
    assert AugmentConfig().rotation.max_rotation_deg == 15
    assert AugmentConfig(rotation={"max_rotation_deg": 30}).rotation.max_rotation_deg == 30
    assert RotationConfig(max_rotation_deg=45).max_rotation_deg == 45
    for bad in (46, -1):
        with pytest.raises(ValidationError, match="max_rotation_deg"):
            AugmentConfig(rotation={"max_rotation_deg": bad})


def test_zero_rotation_limit_leaves_the_image_unchanged(gray: np.ndarray) -> None:
    cfg = AugmentConfig(rotation={"max_rotation_deg": 0})
    assert np.array_equal(apply_transform("rotation", gray, np.random.default_rng(0), cfg), gray)


def test_config_rejects_unknown_keys_reversed_ranges_and_bad_probabilities() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AugmentConfig(lighting={"flicker": 0.1})
    with pytest.raises(ValidationError, match="low <= high"):
        LightingConfig(gain=(1.2, 0.8))
    with pytest.raises(ValidationError):
        AugmentConfig(noise={"p": 1.5})


def test_config_round_trips_through_json() -> None:
    cfg = AugmentConfig(rotation={"max_rotation_deg": 20}, noise={"enabled": False})
    assert AugmentConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_preview_grid_writes_a_readable_png_of_the_expected_size(tmp_path, gray, bgr) -> None:
    # given two sample images, when the preview is written
    path = preview_grid([gray, bgr], AugmentConfig(), tmp_path / "sub" / "preview.png", seed=1)
    # then it is a PNG with a row per image and a column per transform plus original and combined
    img = cv2.imread(str(path))
    assert img is not None
    n_cols = len(TRANSFORMS) + 2
    assert 150 * n_cols <= img.shape[1] <= 260 * n_cols
    assert 150 * 2 <= img.shape[0] <= 260 * 2 + 60


def test_cli_writes_a_preview_from_an_image_folder(tmp_path, capsys) -> None:
    write_dataset(tmp_path / "data", n_ok=0, n_defect=2, size=64)
    out = tmp_path / "preview.png"
    rc = main(["--out", str(out), "--images", str(tmp_path / "data" / "defect"), "--max-rotation", "20"])
    assert rc == 0
    assert cv2.imread(str(out)) is not None
    assert str(out) in capsys.readouterr().out


def test_cli_rejects_a_rotation_beyond_45_degrees_with_the_config_exit_code(tmp_path, capsys) -> None:
    rc = main(["--out", str(tmp_path / "x.png"), "--max-rotation", "46"])
    assert rc == ConfigError.exit_code
    assert "rotation.max_rotation_deg = 46.0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_reports_a_missing_image_folder(tmp_path, capsys) -> None:
    rc = main(["--out", str(tmp_path / "x.png"), "--images", str(tmp_path / "nowhere")])
    assert rc != 0
    assert "does not exist" in capsys.readouterr().err
