"""Labelled review items as a training dataset: the customer layout `training.datasets.load_folder` reads
(`make train DATA=DIR`): `DIR/ok/` (parts a person passed) and `DIR/defect/` (parts a person failed), one
picture per inspection as the station stored it (`<inspection id>.png` or `.jpg`), and `DIR/provenance.json`
saying where each file came from: station, times, model, the AI's verdict and score, the label and who gave it.

Each inspection is exported once, under its latest label. Items whose picture was evicted (review.max_bytes /
max_age_days) or never stored are left out and counted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.review.queue import QueuedItem, ReviewStore

OK_DIR, DEFECT_DIR = "ok", "defect"  # training.datasets.OK_DIR / DEFECT_DIR: the customer layout
PROVENANCE = "provenance.json"


def iso(epoch_s: float | None) -> str | None:
    """UTC ISO 8601 with milliseconds and a Z, e.g. 2024-03-01T12:00:00.123Z."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class ExportResult:
    out: Path
    counts: dict[str, int] = field(default_factory=lambda: {OK_DIR: 0, DEFECT_DIR: 0})
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def files(self) -> int:
        return sum(self.counts.values())


def _provenance(item: QueuedItem) -> dict[str, Any]:
    assert item.label is not None
    label = item.label
    return {
        "inspection_id": item.inspection_id, "part_id": item.part_id, "station_id": item.station_id,
        "source_name": item.source_name, "captured_at": iso(item.captured_at), "decided_at": iso(item.decided_at),
        "queued_at": iso(item.queued_at), "queue_reason": item.queue_reason, "mode": item.mode,
        "model_id": item.model_id, "backend": item.backend, "verdict": item.verdict, "ai_verdict": item.ai_verdict,
        "score": item.score, "width": item.width, "height": item.height,
        "label": {"verdict": label.verdict, "defect_type": label.defect_type, "labeller": label.labeller,
                  "labelled_at": iso(label.labelled_at), "source": label.source},
        "labels_given": item.label_count,
    }


def export_labelled(store: ReviewStore, out: Path, *, station: dict[str, str],
                    model_id: str | None = None) -> ExportResult:
    """Copy every labelled item's picture into `out/ok/` or `out/defect/` and write `out/provenance.json`.

    `out` must not exist or be empty (an export is never mixed into another folder); ValueError otherwise.
    `station`: who exported (station id, site, line) for the provenance; `model_id`: only that model's items.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: export into a new one")
    items = store.items(include_evicted=True, labelled=True, model_id=model_id)
    result = ExportResult(out)
    for sub in (OK_DIR, DEFECT_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for item in sorted(items, key=lambda i: i.seq):
        assert item.label is not None
        if item.evicted_at is not None:
            why = "picture_evicted"
        elif item.image_file is None:
            why = "no_picture"
        elif not (store.folder / item.image_file).is_file():
            why = "picture_missing"
        else:
            why = ""
        if why:
            result.skipped[why] = result.skipped.get(why, 0) + 1
            continue
        assert item.image_file is not None
        sub = DEFECT_DIR if item.label.verdict == "fail" else OK_DIR
        name = f"{sub}/{item.inspection_id}{Path(item.image_file).suffix}"
        shutil.copy2(store.folder / item.image_file, out / name)
        files[name] = _provenance(item)
        result.counts[sub] += 1
    provenance = {
        "format": "customer folder (training.datasets.load_folder): ok/ and defect/; `make train DATA=<this folder>`",
        "exported_at": iso(time.time()), "software_version": __version__, "station": station,
        "review_store": str(store.path), "model_filter": model_id, "counts": result.counts, "skipped": result.skipped,
        "models": _count(files, "model_id"), "labellers": _count(files, "label", "labeller"), "files": files,
    }
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=False) + "\n")
    return result


def _count(files: dict[str, Any], *keys: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in files.values():
        value = entry
        for key in keys:
            value = value[key]
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))
