"""Dataset loading and splitting: the customer's folder layout, bad images, deterministic splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from bundle.errors import DatasetError, ImageReadError
from bundle.images import read_image
from training.datasets import Sample, fingerprint, load_folder, stratified_split


def _folder(tmp_path: Path, n_ok: int = 3, n_defect: int = 2) -> Path:
    root = tmp_path / "parts"
    for sub, n in (("ok", n_ok), ("defect", n_defect)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / sub / f"{i}.png"), np.full((20, 20), 40 * i, np.uint8))
    return root


def test_folder_layout_loads_labels_from_subfolders(tmp_path: Path):
    samples = load_folder(_folder(tmp_path))
    assert sorted((s.name, s.label) for s in samples)[:2] == [("defect/0.png", 1), ("defect/1.png", 1)]
    assert sum(s.label == 0 for s in samples) == 3


def test_missing_class_folder_is_named(tmp_path: Path):
    root = _folder(tmp_path)
    shutil.rmtree(root / "defect")
    (root / "bad").mkdir()
    with pytest.raises(DatasetError, match=r"has no defect/ subfolder \(found: \['bad', 'ok'\]\)"):
        load_folder(root)


def test_empty_class_folder_is_named(tmp_path: Path):
    root = _folder(tmp_path, n_defect=0)
    with pytest.raises(DatasetError, match=r"defect holds no images"):
        load_folder(root)


def test_missing_dataset_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_folder(tmp_path / "nowhere")


def test_unreadable_image_is_named(tmp_path: Path):
    root = _folder(tmp_path)
    (root / "ok" / "garbage.png").write_bytes(b"this is not a png" * 10 + b"IEND")
    with pytest.raises(ImageReadError, match=r"garbage.png cannot be decoded"):
        load_folder(root)


def test_truncated_images_are_refused(tmp_path: Path):
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for suffix in (".jpg", ".png"):
        _, data = cv2.imencode(suffix, img)
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(data.tobytes()[: len(data) // 2])
        with pytest.raises(ImageReadError, match=rf"cut\{suffix} is truncated"):
            read_image(path)


def test_empty_file_is_refused(tmp_path: Path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"zero\.png is empty"):
        read_image(tmp_path / "zero.png")


def _samples(n: int = 200) -> list[Sample]:
    img = np.zeros((4, 4), np.uint8)
    return [Sample(name=f"s{i:03d}", image=img, label=int(i % 4 == 0), group="mono" if i % 3 else "poly",
                   fine_label=i % 4) for i in range(n)]


def test_split_is_deterministic_disjoint_and_stratified():
    samples = _samples()
    rest_a, held_a = stratified_split(samples, 0.25, seed=5)
    _, held_b = stratified_split(samples, 0.25, seed=5)
    assert [s.name for s in held_a] == [s.name for s in held_b]
    assert not {s.name for s in rest_a} & {s.name for s in held_a}
    assert len(rest_a) + len(held_a) == len(samples)
    # each (label, group) stratum keeps its share within rounding
    for group in ("mono", "poly"):
        total = sum(s.group == group and s.label == 1 for s in samples)
        held = sum(s.group == group and s.label == 1 for s in held_a)
        assert abs(held - 0.25 * total) <= 1
    _, held_other = stratified_split(samples, 0.25, seed=6)
    assert {s.name for s in held_other} != {s.name for s in held_a}


def test_split_refuses_a_dataset_too_small_for_both_classes():
    samples = _samples(8)
    with pytest.raises(DatasetError, match="only one class"):
        stratified_split(samples, 0.1, seed=0)


def test_fingerprint_changes_with_pixels_and_labels():
    samples = _samples(10)
    base = fingerprint(samples)
    assert fingerprint(list(reversed(samples))) == base
    changed = [*samples[:-1], Sample(name=samples[-1].name, image=samples[-1].image + 1, label=samples[-1].label)]
    assert fingerprint(changed) != base
