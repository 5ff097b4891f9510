"""Datasets: a customer's image folder (ok/ and defect/), ELPV solar cells, and synthetic parts.

Every source becomes a list of `Sample`s with the decoded image in memory: decoding each file once up
front finds every unreadable image before training starts (with its name), and epochs then cost only
augmentation and the network.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
# Written by the station's `appliance review export` (appliance/review/export.py) beside ok/ and defect/.
REVIEW_PROVENANCE = "provenance.json"
# What a combined dataset keeps of a review export's per-file provenance (the rest stays in the export).
_REVIEW_FIELDS = ("inspection_id", "station_id", "model_id", "ai_verdict", "score", "captured_at")
_LABEL_FIELDS = ("labeller", "labelled_at", "defect_type", "source")


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


def content_hash(image: np.ndarray) -> str:
    """sha256 of the decoded pixels with their shape and dtype: the same picture in two folders (a file copy,
    or a lossless re-encode) hashes alike; the file's name, format and timestamps do not count."""
    h = hashlib.sha256(f"{image.shape}\0{image.dtype.str}\0".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


@dataclass
class CombinedDataset:
    """Several customer-layout folders as one dataset (`load_folders`).

    samples: unique by content, in --data order (the first copy of a picture is kept).
    images: sample name -> where it came from (source, folder, file, sha256; for a review export the
      inspection, station, model and labeller from its provenance.json; other copies of the same picture).
    sources: one summary per folder (kind, counts, duplicates dropped; a review export's station, models
      and labellers). duplicates: totals over all folders.
    """

    samples: list[Sample]
    images: dict[str, dict[str, Any]]
    sources: list[dict[str, Any]]
    duplicates: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The small part (no per-image entries): for run.json's training info, final.pt and the bundle."""
        return {"sources": self.sources, "duplicates": self.duplicates}


def source_tag(index: int, n_sources: int) -> str:
    """The prefix of sample names from the `index`-th (0-based) of `n_sources` folders: none for a single
    folder (names as `load_folder` gives them, so single-folder runs split as before), else `dataN/`."""
    return "" if n_sources == 1 else f"data{index + 1}/"


def read_review_provenance(root: Path) -> dict[str, Any] | None:
    """`root/provenance.json` of a station's review export, or None when the folder has none."""
    path = Path(root) / REVIEW_PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is unreadable or not JSON ({exc})",
                           hint="export the folder again with `appliance review export`, or delete the file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise DatasetError(f"{path} is not a review export's provenance (no `files` map)",
                           hint="a dataset folder's provenance.json is written by `appliance review export`")
    return data


def _review_entry(provenance: dict[str, Any], name: str) -> tuple[dict[str, Any], bool] | None:
    """The provenance of `ok/x.png` or `defect/x.png` (moved to the other class after export: relabelled)."""
    files = provenance["files"]
    sub, _, file = name.partition("/")
    other = DEFECT_DIR if sub == OK_DIR else OK_DIR
    for key, moved in ((name, False), (f"{other}/{file}", True)):
        entry = files.get(key)
        if isinstance(entry, dict):
            return entry, moved
    return None


def load_folders(
    roots: Sequence[str | Path], bit_depth: BitDepth = DEFAULT_BIT_DEPTH, max_pixels: int = DEFAULT_MAX_PIXELS
) -> CombinedDataset:
    """Customer-layout folders (earlier datasets, review exports) as one dataset, duplicates dropped.

    Each folder is read by `load_folder`. With more than one folder, names get the folder's position
    (`data1/ok/a.png`, `data2/defect/b.png`: --data order) and each folder's classes are their own
    stratification groups, so every folder is split train/val/test in proportion. A picture that occurs more
    than once (by `content_hash`, in one folder or across folders) is kept once, its first copy in --data
    order, and the others are counted; when the copies disagree on the class (ok in one folder, defect in
    another) none is kept: the label is in dispute, and training on either would be a guess. A single folder
    is loaded whole, as `load_folder` always has (so the splits of earlier runs on it stay reproducible), its
    duplicates counted but kept. A folder with a review export's provenance.json has each picture's
    inspection, station, model and labeller recorded.
    """
    roots = [Path(r) for r in roots]
    if not roots:
        raise DatasetError("no dataset folder given", hint="pass --data DIR (several: --data DIR1 DIR2)")
    loaded: list[tuple[Sample, str, dict[str, Any]]] = []  # sample, hash, provenance
    sources: list[dict[str, Any]] = []
    for index, root in enumerate(roots):
        tag = source_tag(index, len(roots))
        review = read_review_provenance(root)
        source: dict[str, Any] = {"tag": tag.rstrip("/") or None, "folder": str(root),
                                  "kind": "review export" if review is not None else "folder"}
        if review is not None:
            source.update(station=review.get("station"), exported_at=review.get("exported_at"),
                          software_version=review.get("software_version"))
        unlisted = relabelled = 0
        for s in load_folder(root, bit_depth=bit_depth, max_pixels=max_pixels):
            digest = content_hash(s.image)
            prov: dict[str, Any] = {"source": index + 1, "folder": str(root), "file": s.name, "sha256": digest}
            if review is not None:
                found = _review_entry(review, s.name)
                if found is None:
                    unlisted += 1
                    prov["review"] = None
                else:
                    entry, moved = found
                    label = entry.get("label") if isinstance(entry.get("label"), dict) else {}
                    prov["review"] = {**{k: entry.get(k) for k in _REVIEW_FIELDS},
                                      "verdict": label.get("verdict"),
                                      **{k: label.get(k) for k in _LABEL_FIELDS}}
                    if moved:
                        relabelled += 1
                        prov["review"]["moved_to_other_class_after_export"] = True
            group = f"{tag}{s.group}" if tag else s.group
            loaded.append((replace(s, name=f"{tag}{s.name}", group=group), digest, prov))
        if review is not None:
            source["not_in_provenance"] = unlisted
            source["moved_to_other_class_after_export"] = relabelled
        sources.append(source)

    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (_, digest, _) in enumerate(loaded):
        by_hash[digest].append(i)
    # One folder is loaded as it always was (every file: its runs' splits stay reproducible); its duplicates
    # are counted only. Combining folders drops them.
    drop = len(roots) > 1
    keep: list[int] = []
    conflicting: list[list[str]] = []
    extra_copies = 0
    for indices in by_hash.values():
        if len({loaded[i][0].label for i in indices}) > 1:
            conflicting.append([loaded[i][0].name for i in indices])
            if drop:
                continue
        extra_copies += len(indices) - 1
        keep += [indices[0]] if drop else indices
    keep.sort()

    samples: list[Sample] = []
    images: dict[str, dict[str, Any]] = {}
    kept_per_source = [0] * len(roots)
    for i in keep:
        sample, digest, prov = loaded[i]
        copies = [loaded[j][0].name for j in by_hash[digest] if j != i]
        if copies:
            prov["duplicates_dropped" if drop else "same_picture_as"] = copies
        samples.append(sample)
        images[sample.name] = prov
        kept_per_source[prov["source"] - 1] += 1
    loaded_per_source = [0] * len(roots)
    for _, _, prov in loaded:
        loaded_per_source[prov["source"] - 1] += 1
    for index, source in enumerate(sources):
        mine = [images[s.name] for s in samples if images[s.name]["source"] == index + 1]
        n_defect = sum(1 for s in samples if images[s.name]["source"] == index + 1 and s.label == 1)
        source.update(images=loaded_per_source[index], kept=kept_per_source[index],
                      dropped=loaded_per_source[index] - kept_per_source[index],
                      ok=kept_per_source[index] - n_defect, defect=n_defect)
        if source["kind"] == "review export":
            source["models"] = _tally(p["review"].get("model_id") for p in mine if p.get("review"))
            source["labellers"] = _tally(p["review"].get("labeller") for p in mine if p.get("review"))
    n_conflicting = sum(len(c) for c in conflicting)
    duplicates = {
        "images_read": len(loaded), "images_kept": len(samples),
        "duplicates_dropped": extra_copies if drop else 0,
        "conflicting_labels_dropped": n_conflicting if drop else 0,
        # The disputed pictures' copies by name (the first 20 pictures); same-label copies are listed under
        # their kept image's `duplicates_dropped` (one folder: `same_picture_as`).
        "conflicting_examples": conflicting[:20],
    }
    if not drop:
        duplicates.update(duplicates_kept=extra_copies, conflicting_labels_kept=n_conflicting)
    if not samples:
        raise DatasetError(f"no images left in {', '.join(map(str, roots))} after dropping duplicates")
    return CombinedDataset(samples, images, sources, duplicates)


def _tally(values: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[str(v)] += 1
    return dict(sorted(counts.items()))


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
