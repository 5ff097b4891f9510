"""The review queue on the station's disk: the parts set aside for a person, their pictures, and the labels
people give them.

`<storage.data_dir>/review/` holds `review.sqlite3` (a `SqliteStore`: WAL, `synchronous=FULL`, the same fault
handling as the results log) and `images/<UTC day>/<inspection id>.png|.jpg` (plus `<id>.defect.npy`, the
model's defect map as float32, where the backend gave one). Tables:

- `items`: one row per queued part: the inspection record's fields (ids, times, verdict, AI verdict, score,
  mode, backend, model id, the decision's reason), why it was queued (`QUEUE_REASONS`), when, its files and
  their bytes, and `evicted_at` once its files were deleted to keep the bounds.
- `labels`: every label ever given (a later one for the same inspection wins; the earlier ones stay): who,
  when, `pass` / `fail`, an optional defect type, where it came from (`cli`, `mqtt`, `http`) and the
  sender's message id (a label sent twice with one message id is recorded once).

Bounds (`review.max_bytes`, `review.max_age_days`) are kept after every write, on the writer's thread: files
older than the age go, and while the files are over the bytes the oldest LABELLED items go first, then the
oldest unlabelled ones. A labelled item keeps its row (its label is evidence for the statistics) with
`evicted_at` set; an unlabelled one is deleted entirely and counted in `evicted_unreviewed` (kept in the
`meta` table, reported in every heartbeat): a part set aside for a person that no person saw.

Pictures are written before their rows: a file first written to `<name>.tmp`, fsynced and renamed, so a row
never names a half-written picture; a crash between the two leaves a file no row names, removed at the next
start of the station (`sweep`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.reporting.commands import UnknownInspection
from appliance.reporting.payloads import DEFECT_TYPE_PATTERN, LABELLER_MAX_CHARS
from appliance.reporting.sqlite_store import SqliteStore
from appliance.review.stats import LabelledPart, LabelStats, label_stats
from appliance.station.inspection import InspectionRecord

log = logging.getLogger("appliance.review")

SCHEMA_VERSION = 1
DB_NAME = "review.sqlite3"
IMAGES = "images"

# Why a part is in the queue. `challenger_disagreement` is reserved for the challenger model (a second model
# run beside the production one, issue #14 part 6): a part on which the two disagree. Nothing queues it yet.
QUEUE_REASONS = ("manual_required", "shadow", "audit", "challenger_disagreement")
LABEL_VERDICTS = ("pass", "fail")
LABEL_SOURCES = ("cli", "mqtt", "http")
ImageFormat = Literal["png", "jpeg"]
_SUFFIX = {"png": ".png", "jpeg": ".jpg"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id   TEXT NOT NULL UNIQUE,
    part_id         TEXT NOT NULL,
    station_id      TEXT NOT NULL,
    source_name     TEXT NOT NULL,
    frame_index     INTEGER NOT NULL,
    captured_at     REAL NOT NULL,
    decided_at      REAL NOT NULL,
    queued_at       REAL NOT NULL,
    written_at      REAL NOT NULL,
    verdict         TEXT NOT NULL,
    ai_verdict      TEXT,
    score           REAL,
    mode            TEXT NOT NULL,
    backend         TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    decision_reason TEXT NOT NULL,
    queue_reason    TEXT NOT NULL,
    image_file      TEXT,
    defect_map_file TEXT,
    width           INTEGER,
    height          INTEGER,
    bytes           INTEGER NOT NULL,
    evicted_at      REAL
);
CREATE INDEX IF NOT EXISTS items_queued ON items (queued_at);
CREATE TABLE IF NOT EXISTS labels (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id   TEXT NOT NULL,
    verdict         TEXT NOT NULL CHECK (verdict IN ('pass', 'fail')),
    defect_type     TEXT,
    labeller        TEXT NOT NULL,
    labelled_at     REAL NOT NULL,
    source          TEXT NOT NULL CHECK (source IN ('cli', 'mqtt', 'http')),
    message_id      TEXT,
    UNIQUE (source, message_id)
);
CREATE INDEX IF NOT EXISTS labels_inspection ON labels (inspection_id, seq);
"""

_ITEM_COLUMNS = ("seq, inspection_id, part_id, station_id, source_name, frame_index, captured_at, decided_at, "
                 "queued_at, written_at, verdict, ai_verdict, score, mode, backend, model_id, decision_reason, "
                 "queue_reason, image_file, defect_map_file, width, height, bytes, evicted_at")
_LABEL_COLUMNS = "seq, inspection_id, verdict, defect_type, labeller, labelled_at, source, message_id"


@dataclass(frozen=True)
class ReviewItem:
    """A part to queue, as the sink hands it to the writer: the record, its picture (read-only views, held
    until written) and why it is queued."""

    record: InspectionRecord
    image: np.ndarray | None
    defect_map: np.ndarray | None
    reason: str
    queued_at: float


@dataclass(frozen=True)
class Label:
    """One label as stored."""

    seq: int
    inspection_id: str
    verdict: str
    defect_type: str | None
    labeller: str
    labelled_at: float
    source: str
    message_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "inspection_id": self.inspection_id, "verdict": self.verdict,
                "defect_type": self.defect_type, "labeller": self.labeller, "labelled_at": self.labelled_at,
                "source": self.source, "message_id": self.message_id}


@dataclass(frozen=True)
class QueuedItem:
    """One queued part as stored, with its latest label (None: unlabelled) and how many labels it has."""

    seq: int
    inspection_id: str
    part_id: str
    station_id: str
    source_name: str
    frame_index: int
    captured_at: float
    decided_at: float
    queued_at: float
    written_at: float
    verdict: str
    ai_verdict: str | None
    score: float | None
    mode: str
    backend: str
    model_id: str
    decision_reason: str
    queue_reason: str
    image_file: str | None  # relative to the review folder
    defect_map_file: str | None
    width: int | None
    height: int | None
    bytes: int
    evicted_at: float | None
    label: Label | None = None
    label_count: int = 0


def _ai_verdict(verdict: str | None) -> Literal["pass", "fail"] | None:
    """The AI verdict as the statistics count it: `pass` / `fail`; an AI `manual_required` (a score inside
    the band: the model was unsure) or `error`, or none, is no verdict (counted, never in a rate)."""
    return verdict if verdict in ("pass", "fail") else None  # type: ignore[return-value]


def check_label(verdict: str, labeller: str, defect_type: str | None, source: str) -> None:
    """ValueError naming the field for a label the store refuses (the same rules as `cmd/label`)."""
    if verdict not in LABEL_VERDICTS:
        raise ValueError(f"verdict must be 'pass' or 'fail', got {verdict!r}")
    if not isinstance(labeller, str) or not labeller.strip() or len(labeller) > LABELLER_MAX_CHARS \
            or not labeller.isprintable():
        raise ValueError(f"labeller must be 1 to {LABELLER_MAX_CHARS} printable characters, not all blank, "
                         f"got {labeller!r}"[:300])
    if defect_type is not None and (not isinstance(defect_type, str)
                                    or re.fullmatch(DEFECT_TYPE_PATTERN, defect_type) is None):
        raise ValueError(f"defect_type must be 1 to 64 letters, digits and _ . - starting with a letter or digit, "
                         f"got {defect_type!r}"[:300])
    if defect_type is not None and verdict != "fail":
        raise ValueError(f"a defect type goes with a 'fail' label, not {verdict!r}")
    if source not in LABEL_SOURCES:
        raise ValueError(f"source must be one of {LABEL_SOURCES}, got {source!r}")


class ReviewStore(SqliteStore):
    """The review queue's index and pictures. The station's writer thread calls `write_many`; labels may be
    recorded from any thread or another process (the `appliance review` command)."""

    def __init__(self, folder: Path, *, image_format: ImageFormat = "png", jpeg_quality: int = 95,
                 max_bytes: int = 2 * 2**30, max_age_days: float = 90.0, open_now: bool = True) -> None:
        if image_format not in _SUFFIX:
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
        self.folder = Path(folder)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.max_bytes = max_bytes
        self.max_age_s = max_age_days * 86400.0
        self._bytes = 0  # bytes of the files of items not evicted (kept by `_opened`, writes and evictions)
        self._swept = False
        self._station = not open_now  # the station's own store: it alone sweeps files no row names
        self._stats_cache: tuple[tuple[int, int], LabelStats] | None = None
        self._stats_lock = threading.Lock()
        super().__init__(self.folder / DB_NAME, _SCHEMA, SCHEMA_VERSION, "review queue", open_now=open_now,
                         tables=("items", "labels"))

    def _opened(self, db: sqlite3.Connection) -> None:
        (self._bytes,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM items WHERE evicted_at IS NULL").fetchone()

    # --- the writer thread --------------------------------------------------------------------------------------
    def write_many(self, items: list[ReviewItem]) -> None:
        """Pictures to files, then the rows in one transaction, then the bounds; raises the storage error (the
        writer keeps the items and retries: files are rewritten, rows inserted once)."""
        if self._station and not self._swept:
            self.sweep()
        rows = []
        dirs: set[Path] = set()
        for item in items:
            rows.append(self._write_files(item, dirs))
        for folder in dirs:
            _fsync_dir(folder)
        added = 0
        with self.transaction() as db:
            for row in rows:
                cur = db.execute(f"INSERT OR IGNORE INTO items ({_ITEM_COLUMNS.removeprefix('seq, ')}) VALUES "
                                 f"({', '.join('?' * (len(row)))})", row)
                added += row[-2] if cur.rowcount == 1 else 0
        self._bytes += added
        self.keep_bounds()

    def _write_files(self, item: ReviewItem, dirs: set[Path]) -> tuple[Any, ...]:
        r = item.record
        day = datetime.fromtimestamp(r.decided_at, timezone.utc).strftime("%Y-%m-%d")
        stem = r.inspection_id if _SAFE_NAME.fullmatch(r.inspection_id) else \
            "id-" + hashlib.sha256(r.inspection_id.encode("utf-8", "replace")).hexdigest()[:32]
        rel_dir = Path(IMAGES) / day
        size = 0
        image_file = defect_file = None
        width = height = None
        if item.image is not None:
            data = self._encode(item)
            if data is not None:
                image_file = str(rel_dir / (stem + _SUFFIX[self.image_format]))
                size += self._put(image_file, data, dirs)
                height, width = int(item.image.shape[0]), int(item.image.shape[1])
        if item.defect_map is not None:
            buf = io.BytesIO()
            try:
                np.save(buf, np.asarray(item.defect_map, dtype=np.float32), allow_pickle=False)
            except (TypeError, ValueError) as exc:  # the map's fault, never a storage fault to retry forever
                log.error("review: the defect map of inspection %s cannot be stored (%s); queued without it",
                          r.inspection_id, exc)
            else:
                defect_file = str(rel_dir / (stem + ".defect.npy"))
                size += self._put(defect_file, buf.getvalue(), dirs)
        return (r.inspection_id, r.part_id, r.station_id, r.source_name, r.frame_index, r.captured_at, r.decided_at,
                item.queued_at, time.time(), r.verdict, r.ai_verdict, r.score, r.mode, r.backend, r.model_id, r.reason,
                item.reason, image_file, defect_file, width, height, size, None)

    def _encode(self, item: ReviewItem) -> bytes | None:
        """The picture as PNG or JPEG; None (logged) for a frame the encoder refuses: that is the frame's
        fault, never a storage fault to retry forever."""
        import cv2

        params = [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality] if self.image_format == "jpeg" else []
        why = "the encoder refused it"
        try:
            ok, encoded = cv2.imencode(_SUFFIX[self.image_format], np.ascontiguousarray(item.image), params)
        except (cv2.error, TypeError, ValueError) as exc:
            ok, why = False, " ".join(str(exc).split())[:200]
        if not ok:
            log.error("review: the frame of inspection %s (part %s, shape %s) cannot be encoded as %s (%s); queued "
                      "without its picture", item.record.inspection_id, item.record.part_id,
                      getattr(item.image, "shape", None), self.image_format, why)
            return None
        return encoded.tobytes()

    def _put(self, rel: str, data: bytes, dirs: set[Path]) -> int:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirs.add(path.parent)
        return len(data)

    def keep_bounds(self, now: float | None = None) -> tuple[int, int]:
        """Delete files over `max_age_days` and, while over `max_bytes`, labelled items first, then unlabelled
        ones, oldest first. Returns (labelled evicted, unlabelled evicted)."""
        now = time.time() if now is None else now
        victims: list[tuple[int, str, str | None, str | None, int, bool]] = []
        with self.reading() as db:
            over_age = db.execute(
                "SELECT seq, inspection_id, image_file, defect_map_file, bytes, EXISTS (SELECT 1 FROM labels l WHERE "
                "l.inspection_id = items.inspection_id) FROM items WHERE evicted_at IS NULL AND queued_at < ? "
                "ORDER BY seq", (now - self.max_age_s,)).fetchall()
            victims += over_age
            total = self._bytes - sum(v[4] for v in over_age)
            if total > self.max_bytes:
                chosen = {v[0] for v in over_age}
                for row in db.execute(
                        "SELECT seq, inspection_id, image_file, defect_map_file, bytes, EXISTS (SELECT 1 FROM labels l "
                        "WHERE l.inspection_id = items.inspection_id) AS labelled FROM items WHERE evicted_at IS NULL "
                        "ORDER BY labelled DESC, seq"):
                    if total <= self.max_bytes:
                        break
                    if row[0] in chosen:
                        continue
                    victims.append(row)
                    total -= row[4]
        if not victims:
            return 0, 0
        return self._evict(victims, now)

    def _evict(self, victims: list[Any], now: float) -> tuple[int, int]:
        labelled = [v for v in victims if v[5]]
        unlabelled = [v for v in victims if not v[5]]
        with self.transaction() as db:
            # Labelled-ness is read again inside the transaction: a label given meanwhile keeps its row.
            keep_rows = {row[0] for row in db.execute(
                f"SELECT DISTINCT inspection_id FROM labels WHERE inspection_id IN "
                f"({', '.join('?' * len(unlabelled))})", [v[1] for v in unlabelled])} if unlabelled else set()
            now_labelled = [v for v in unlabelled if v[1] in keep_rows]
            unlabelled = [v for v in unlabelled if v[1] not in keep_rows]
            labelled += now_labelled
            db.executemany("UPDATE items SET evicted_at = ? WHERE seq = ?", [(now, v[0]) for v in labelled])
            db.executemany("DELETE FROM items WHERE seq = ?", [(v[0],) for v in unlabelled])
            for key, n in (("evicted_reviewed", len(labelled)), ("evicted_unreviewed", len(unlabelled))):
                if n:
                    db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                               "CAST(value AS INTEGER) + excluded.value", (key, str(n)))
        self._bytes -= sum(v[4] for v in labelled) + sum(v[4] for v in unlabelled)
        for v in [*labelled, *unlabelled]:
            for rel in (v[2], v[3]):
                if rel:
                    try:
                        (self.folder / rel).unlink(missing_ok=True)
                    except OSError as exc:
                        log.error("review: %s could not be deleted (%s); it is removed at the next start",
                                  self.folder / rel, exc)
        if unlabelled:
            log.warning("review: %d unlabelled item(s) deleted to keep review.max_bytes (%d) / review.max_age_days "
                        "(%.1f): no person saw them (%s)", len(unlabelled), self.max_bytes, self.max_age_s / 86400,
                        ", ".join(v[1] for v in unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else ""))
        return len(labelled), len(unlabelled)

    def sweep(self) -> int:
        """Delete picture files no row names (a crash between file and row, a store file moved aside); returns
        how many. The station calls it once, before its first write."""
        self._swept = True
        root = self.folder / IMAGES
        if not root.is_dir():
            return 0
        with self.reading() as db:
            named = {row[0] for row in db.execute(
                "SELECT image_file FROM items WHERE image_file IS NOT NULL AND evicted_at IS NULL "
                "UNION SELECT defect_map_file FROM items WHERE defect_map_file IS NOT NULL AND evicted_at IS NULL")}
        removed = 0
        for path in sorted(root.rglob("*")):
            if path.is_file() and str(path.relative_to(self.folder)) not in named:
                with suppress(OSError):
                    path.unlink()
                    removed += 1
        for day in sorted(root.iterdir()):
            with suppress(OSError):
                day.rmdir()  # only when empty
        if removed:
            log.warning("review: %d picture file(s) no queued item names were deleted from %s", removed, root)
        return removed

    # --- labels (any thread, any process) -----------------------------------------------------------------------
    def record_label(self, inspection_id: str, verdict: str, *, labeller: str, defect_type: str | None = None,
                     source: str, message_id: str | None = None, at: float | None = None) -> Label:
        """Store one label for a queued inspection and return it; the same (source, message id) again returns the
        label stored the first time. UnknownInspection (a LookupError) for an inspection the queue does not
        hold, ValueError for a value it refuses, sqlite3.Error / OSError when the file cannot be written."""
        check_label(verdict, labeller, defect_type, source)
        labelled_at = time.time() if at is None else at
        with self.transaction() as db:
            if message_id is not None:
                row = db.execute(f"SELECT {_LABEL_COLUMNS} FROM labels WHERE source = ? AND message_id = ?",
                                 (source, message_id)).fetchone()
                if row is not None:
                    known = Label(*row)
                    if known.inspection_id != inspection_id:  # not a resend: a reused id must not drop a label
                        raise ValueError(f"message_id {message_id!r} was already used for the label of inspection "
                                         f"{known.inspection_id}, not {inspection_id}: send a new message_id")
                    return known
            if db.execute("SELECT 1 FROM items WHERE inspection_id = ?", (inspection_id,)).fetchone() is None:
                raise UnknownInspection(inspection_id)
            cur = db.execute("INSERT INTO labels (inspection_id, verdict, defect_type, labeller, labelled_at, source, "
                             "message_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (inspection_id, verdict, defect_type, labeller, labelled_at, source, message_id))
            seq = int(cur.lastrowid or 0)
        return Label(seq, inspection_id, verdict, defect_type, labeller, labelled_at, source, message_id)

    def labels(self, inspection_id: str | None = None, after_seq: int = 0) -> list[Label]:
        """Labels in the order given (all, one inspection's, or those after a sequence number)."""
        where, args = "WHERE seq > ?", [after_seq]
        if inspection_id is not None:
            where += " AND inspection_id = ?"
            args.append(inspection_id)
        with self.reading() as db:
            return [Label(*row) for row in db.execute(f"SELECT {_LABEL_COLUMNS} FROM labels {where} ORDER BY seq",
                                                      args)]

    # --- reading ------------------------------------------------------------------------------------------------
    def items(self, *, include_evicted: bool = False, labelled: bool | None = None,
              model_id: str | None = None) -> list[QueuedItem]:
        """Queued items, unlabelled first, then labelled, each oldest first, with their latest label.
        `labelled`: only labelled (True) or unlabelled (False) ones; `model_id`: one model's only."""
        where = [] if include_evicted else ["evicted_at IS NULL"]
        args: list[Any] = []
        if model_id is not None:
            where.append("model_id = ?")
            args.append(model_id)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_ITEM_COLUMNS} FROM items{condition} ORDER BY seq"
        with self.reading() as db:
            rows = db.execute(sql, args).fetchall()
            latest: dict[str, tuple[Label, int]] = {}
            for row in db.execute(f"SELECT {_LABEL_COLUMNS} FROM labels ORDER BY seq"):
                label = Label(*row)
                count = latest[label.inspection_id][1] + 1 if label.inspection_id in latest else 1
                latest[label.inspection_id] = (label, count)
        out = []
        for row in rows:
            label, count = latest.get(row[1], (None, 0))
            item = QueuedItem(*row, label=label, label_count=count)
            if labelled is None or (label is not None) == labelled:
                out.append(item)
        return sorted(out, key=lambda i: (i.label is not None, i.seq))

    def item(self, inspection_id: str) -> QueuedItem | None:
        with self.reading() as db:
            row = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE inspection_id = ?", (inspection_id,)).fetchone()
        if row is None:
            return None
        labels = self.labels(inspection_id)
        return QueuedItem(*row, label=labels[-1] if labels else None, label_count=len(labels))

    def labelled_parts(self, model_id: str | None = None) -> list[LabelledPart]:
        """Every label joined with its item's AI verdict, mode and model: what `appliance.review.stats` takes
        (an AI `manual_required` or `error` counts as no AI verdict). All labels of an inspection are given:
        the statistics count its latest."""
        sql = ("SELECT l.inspection_id, l.labelled_at, i.ai_verdict, l.verdict, i.mode, i.model_id FROM labels l "
               "JOIN items i ON i.inspection_id = l.inspection_id")
        args: tuple[Any, ...] = ()
        if model_id is not None:
            sql += " WHERE i.model_id = ?"
            args = (model_id,)
        with self.reading() as db:
            rows = db.execute(sql + " ORDER BY l.seq", args).fetchall()
        return [LabelledPart(iid, at, _ai_verdict(ai), human, mode, model) for iid, at, ai, human, mode, model in rows]

    def stats(self, model_id: str | None = None, confidence: float = 0.95) -> LabelStats:
        return label_stats(self.labelled_parts(model_id), confidence)

    def counter(self, key: str) -> int:
        with self.reading() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    @property
    def bytes(self) -> int:
        """Bytes of the pictures and defect maps of the items not evicted."""
        return self._bytes

    def summary(self) -> dict[str, Any]:
        """For heartbeats: counts, bytes, evictions, and the labels' confusion matrix and rates (all models)."""
        with self.reading() as db:
            queued, unlabelled = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(NOT EXISTS (SELECT 1 FROM labels l WHERE l.inspection_id = "
                "items.inspection_id)), 0) FROM items WHERE evicted_at IS NULL").fetchone()
            (last_label, label_rows) = db.execute("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM labels").fetchone()
            evicted = dict(db.execute("SELECT key, CAST(value AS INTEGER) FROM meta WHERE key IN "
                                      "('evicted_unreviewed', 'evicted_reviewed')").fetchall())
        key = (last_label, label_rows)
        with self._stats_lock:
            if self._stats_cache is None or self._stats_cache[0] != key:
                self._stats_cache = (key, self.stats())
            stats = self._stats_cache[1]

        def rate(r: Any) -> dict[str, Any] | None:
            return None if r is None else r.as_dict()

        return {"queued": queued, "unlabelled": unlabelled, "labelled": stats.labelled, "bytes": self._bytes,
                "evicted_unreviewed": evicted.get("evicted_unreviewed", 0),
                "evicted_reviewed": evicted.get("evicted_reviewed", 0),
                "confusion": stats.confusion.as_dict(), "detection_rate": rate(stats.detection_rate),
                "false_positive_rate": rate(stats.false_positive_rate), "agreement": rate(stats.agreement)}


def _fsync_dir(folder: Path) -> None:
    """A renamed file's directory entry survives a power cut only once its directory is synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_item(item: ReviewItem) -> str:
    """The process log's line for an item no store took (never the pixels)."""
    r = item.record
    return (f"review item not kept: inspection {r.inspection_id} part {r.part_id} ({item.reason}, verdict {r.verdict}, "
            f"AI {r.ai_verdict}, score {r.score}); the part itself is in the results log")


def iter_rows(items: Iterable[QueuedItem]) -> Iterable[dict[str, Any]]:
    """Items as JSON-ready dicts (the CLI's --json)."""
    for i in items:
        yield {"inspection_id": i.inspection_id, "part_id": i.part_id, "station_id": i.station_id,
               "queued_at": i.queued_at, "decided_at": i.decided_at, "queue_reason": i.queue_reason,
               "verdict": i.verdict, "ai_verdict": i.ai_verdict, "score": i.score, "mode": i.mode,
               "backend": i.backend, "model_id": i.model_id, "image_file": i.image_file,
               "defect_map_file": i.defect_map_file, "evicted": i.evicted_at is not None,
               "label": None if i.label is None else i.label.as_dict(), "labels": i.label_count}
