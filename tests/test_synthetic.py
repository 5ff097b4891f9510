"""Synthetic parts: deterministic by seed, defects local and visible, the customer folder layout."""

from __future__ import annotations

import numpy as np
import pytest

from bundle.errors import DatasetError
from bundle.images import list_images, read_image
from synthetic.parts import DEFECT_KINDS, render_part, render_stream
from training.synthetic import write_dataset


@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("defect", [None, *DEFECT_KINDS])
def test_same_seed_and_defect_give_identical_pixels(defect: str | None, color: bool) -> None:
    first = render_part(7, defect, size=128, color=color)
    second = render_part(7, defect, size=128, color=color)
    assert first.dtype == np.uint8
    assert first.shape == ((128, 128, 3) if color else (128, 128))
    assert np.array_equal(first, second)


def test_different_seeds_give_different_parts() -> None:
    assert not np.array_equal(render_part(1, None, size=128), render_part(2, None, size=128))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("defect", DEFECT_KINDS)
def test_defect_changes_only_a_small_region_of_the_same_part(defect: str, seed: int) -> None:
    # given an OK part and the defective part of the same seed
    ok = render_part(seed, None).astype(np.int16)
    bad = render_part(seed, defect).astype(np.int16)
    # when they are compared pixel by pixel
    changed = np.abs(bad - ok) > 3
    ys, xs = np.nonzero(changed)
    # then the defect is visible (a strong local change) and confined to a small box
    assert np.abs(bad - ok).max() >= 20
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    assert box_area < 0.05 * ok.size
    assert changed.sum() >= 8


def test_defect_is_on_the_part_not_the_belt() -> None:
    # The belt is dark: every changed pixel of a defect lies on bright metal in the OK render.
    for seed, defect in enumerate(DEFECT_KINDS * 2):
        ok = render_part(seed, None).astype(np.int16)
        changed = np.abs(render_part(seed, defect).astype(np.int16) - ok) > 3
        assert np.median(ok[changed]) > 100, defect


def test_unknown_defect_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown defect kind 'rust'"):
        render_part(0, "rust")


def test_write_dataset_writes_the_customer_layout_with_stable_names(tmp_path) -> None:
    # when a dataset of 5 OK and 6 defective parts is written
    root = write_dataset(tmp_path / "data", n_ok=5, n_defect=6, seed=3, size=64)
    # then ok/ and defect/ hold exactly those images, named by index (and kind, cycled)
    assert root == tmp_path / "data"
    assert [p.name for p in list_images(root / "ok")] == [f"ok_{i:05d}.png" for i in range(5)]
    expected = [f"defect_{i:05d}_{DEFECT_KINDS[i % 4]}.png" for i in range(6)]
    assert [p.name for p in list_images(root / "defect")] == expected
    img = read_image(root / "defect" / expected[1])
    assert img.shape == (64, 64) and img.dtype == np.uint8


def test_write_dataset_is_idempotent_and_color_is_bgr(tmp_path) -> None:
    write_dataset(tmp_path, n_ok=2, n_defect=2, seed=1, size=48, color=True)
    before = {p.name: p.read_bytes() for p in list_images(tmp_path / "defect")}
    write_dataset(tmp_path, n_ok=2, n_defect=2, seed=1, size=48, color=True)
    after = {p.name: p.read_bytes() for p in list_images(tmp_path / "defect")}
    assert before == after
    assert read_image(tmp_path / "ok" / "ok_00000.png").shape == (48, 48, 3)


def test_write_dataset_refuses_a_folder_holding_other_images(tmp_path) -> None:
    # given a folder from an earlier, bigger dataset
    write_dataset(tmp_path, n_ok=3, n_defect=1, size=48)
    # when a smaller dataset is written there, stale images would change the class balance: refused
    with pytest.raises(DatasetError, match=r"ok_00002\.png"):
        write_dataset(tmp_path, n_ok=2, n_defect=1, size=48)


def test_datasets_of_different_seeds_hold_different_parts(tmp_path) -> None:
    write_dataset(tmp_path / "a", n_ok=1, n_defect=0, seed=0, size=48)
    write_dataset(tmp_path / "b", n_ok=1, n_defect=0, seed=1, size=48)
    a = read_image(tmp_path / "a" / "ok" / "ok_00000.png")
    b = read_image(tmp_path / "b" / "ok" / "ok_00000.png")
    assert not np.array_equal(a, b)


def test_render_stream_yields_labelled_frames_deterministically() -> None:
    frames = list(render_stream(seed=5, n=12, defect_rate=0.5, size=64))
    again = list(render_stream(seed=5, n=12, defect_rate=0.5, size=64))
    assert len(frames) == 12
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img, _ in frames)
    assert {kind for _, kind in frames} <= {None, *DEFECT_KINDS}
    assert any(kind is None for _, kind in frames) and any(kind is not None for _, kind in frames)
    assert all(k1 == k2 and np.array_equal(a, b) for (a, k1), (b, k2) in zip(frames, again, strict=True))


def test_render_stream_defect_rate_bounds() -> None:
    assert all(kind is None for _, kind in render_stream(seed=0, n=5, defect_rate=0.0, size=48, color=False))
    assert all(kind is not None for _, kind in render_stream(seed=0, n=5, defect_rate=1.0, size=48))
    with pytest.raises(ValueError, match="defect_rate"):
        render_stream(seed=0, n=1, defect_rate=1.5)
