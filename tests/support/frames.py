"""Synthetic part images on disk: what a camera folder, `appliance classify` or a folder source reads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from synthetic.parts import render_part

# A PNG signature and then nothing decodable: a frame the station must record as an error and go on.
NOT_A_PNG = b"\x89PNG not really IEND"
PART_SIZE = 96  # pixels: small, and larger than the session bundle's 64 px input


def part_image(seed: int, defect: str | None = None) -> np.ndarray:
    """One synthetic part, BGR, PART_SIZE px square; the same seed and defect give the same bits."""
    return render_part(seed, defect, PART_SIZE, True)


def write_part(path: Path, seed: int, defect: str | None = None) -> Path:
    """One part image at `path` (the format follows the suffix: .png, .jpg, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), part_image(seed, defect)), f"could not write {path}"
    return path


def write_frames(folder: Path, n: int, bad: int | None = None, first_seed: int = 700) -> Path:
    """`n` parts as `part_000.png` ... in `folder` (made if missing); every odd one has a crack.

    `bad`: the index of a frame written as NOT_A_PNG instead (it cannot be decoded). Returns `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"part_{i:03d}.png"
        if i == bad:
            path.write_bytes(NOT_A_PNG)
        else:
            write_part(path, first_seed + i, "crack" if i % 2 else None)
    return folder
