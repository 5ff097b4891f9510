"""Datasets: a customer's image folder (ok/ and defect/), ELPV solar cells, and synthetic parts.

Every source becomes a list of `Sample`s with the decoded image in memory: decoding each file once up
front finds every unreadable image before training starts (with its name), and epochs then cost only
augmentation and the network.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.errors import DatasetError
from bundle.images import (
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    BitDepth,
    list_images,
    read_image,
)

OK_DIR, DEFECT_DIR = "ok", "defect"


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # OpenCV uint8, gray HxW or BGR HxWx3
    label: int  # 0 = no_defect, 1 = defect
    # Stratification group (e.g. ELPV module type) and an optional finer label (ELPV's 4 levels).
    group: str = ""
    fine_label: int = -1


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over names, labels and pixels: two trainings on the same fingerprint saw the same data."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.name):
        h.update(f"{s.name}\0{s.label}\0{s.image.shape}\0".encode())
        h.update(np.ascontiguousarray(s.image).data)
    return h.hexdigest()


def load_folder(
    root: str | Path, bit_depth: BitDepth = DEFAULT_BIT_DEPTH, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Sample]:
    """Load a customer dataset: `root/ok/*.png|jpg...` and `root/defect/*`, both non-empty.

    Images are read as the station reads them (bundle.images.read_image): `bit_depth` as the station's
    camera.bit_depth (a dataset saved from a Mono12 camera needs 12), files over `max_pixels` refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    missing = [d for d in (OK_DIR, DEFECT_DIR) if d not in subdirs]
    if missing:
        raise DatasetError(
            f"dataset folder {root} has no {' or '.join(missing)}/ subfolder (found: {subdirs or 'none'})",
            hint=f"put good parts in {root}/{OK_DIR}/ and defective parts in {root}/{DEFECT_DIR}/",
        )
    samples: list[Sample] = []
    for label, sub in ((0, OK_DIR), (1, DEFECT_DIR)):
        files = list_images(root / sub)
        if not files:
            raise DatasetError(
                f"class folder {root / sub} holds no images (.png, .jpg, .bmp, .tif, .webp)",
                hint="each class needs examples; a few hundred per class is a good start",
            )
        samples += [
            Sample(name=f"{sub}/{f.name}", image=read_image(f, bit_depth, max_pixels), label=label, group=sub)
            for f in files
        ]
    return samples


def elpv_package_dir() -> Path:
    """The data folder of the installed `elpv-dataset` package (labels.csv + images/)."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DatasetError("the ELPV dataset is not installed", hint="pip install -e '.[bench]'") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def load_elpv(root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Sample]:
    """ELPV solar cells: defective when the annotated probability is >= 0.5.

    `root` is a folder in the package's layout (labels.csv: `path probability type` per line, images
    beside it); default: the installed PyPI package `elpv-dataset`. Sample names drop the file suffix,
    so a re-encoded copy (e.g. JPEG, to fit a GPU machine's transfer limit) splits identically.
    Its files are 8-bit, so they are read with the default bit depth; `max_pixels` as for `load_folder`.
    Licence CC BY-NC-SA 4.0: used to measure; neither the data nor models trained on it are shipped.
    """
    root = Path(root) if root is not None else elpv_package_dir()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels} does not exist: {root} is not an ELPV data folder")
    samples = []
    for lineno, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, prob, module_type = line.split()
            p = float(prob)
        except ValueError as exc:
            raise DatasetError(f"{labels}:{lineno}: expected `path probability type`, got {line!r}") from exc
        samples.append(Sample(
            name=Path(rel).with_suffix("").as_posix(), image=read_image(root / rel, max_pixels=max_pixels),
            label=int(p >= 0.5),
            group=module_type, fine_label=round(p * 3),  # 0, 1/3, 2/3, 1 -> levels 0..3
        ))
    if not samples:
        raise DatasetError(f"{labels} lists no images")
    return samples


def load_synthetic(
    n_ok: int, n_defect: int, seed: int = 0, size: int = 256, color: bool = False, severity: float = 1.0
) -> list[Sample]:
    """Synthetic machined parts rendered in memory (deterministic by seed)."""
    from synthetic.parts import DEFECT_KINDS, render_part

    samples = [
        Sample(name=f"ok/{seed}_{i:05d}", image=render_part(seed * 1_000_003 + i, None, size, color), label=0,
               group="ok")
        for i in range(n_ok)
    ]
    for i in range(n_defect):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        img = render_part(seed * 1_000_003 + n_ok + i, kind, size, color, severity)
        samples.append(Sample(name=f"defect/{seed}_{i:05d}_{kind}", image=img, label=1, group=kind))
    return samples


def stratified_split(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split into (rest, held_out) with `fraction` of every (label, group, fine_label) stratum held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be between 0 and 1, got {fraction}")
    strata: dict[tuple[int, str, int], list[Sample]] = defaultdict(list)
    for s in samples:
        strata[(s.label, s.group, s.fine_label)].append(s)
    rng = np.random.default_rng(seed)
    rest: list[Sample] = []
    held: list[Sample] = []
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda s: s.name)
        order = rng.permutation(len(members))
        n_held = round(len(members) * fraction)
        held += [members[i] for i in order[:n_held]]
        rest += [members[i] for i in order[n_held:]]
    for part, what in ((rest, "training"), (held, "held-out")):
        if len({s.label for s in part}) < 2:
            raise DatasetError(
                f"the {what} split has only one class ({len(part)} images): the dataset is too small",
                hint="add images of both classes",
            )
    return rest, held


def class_counts(samples: Sequence[Sample]) -> tuple[int, int]:
    """(no_defect, defect) counts."""
    n_defect = sum(s.label for s in samples)
    return len(samples) - n_defect, n_defect
