"""The local results log: every inspection and every mode change, in SQLite on the station's disk.

Written whatever happens to the network: it is the station's own record (and what an auditor reads
after an incident). WAL mode lets a reader (an inspector's tool, `sqlite3`) look while the station
writes; `synchronous=FULL` by default so a power cut cannot lose a committed result. The station writes
it through a `recorder.StoreWriter`, which keeps parts in memory while the file cannot be written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.reporting.sqlite_store import SqliteStore
from appliance.station.inspection import InspectionRecord

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inspections (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id  TEXT NOT NULL UNIQUE,
    part_id        TEXT NOT NULL,
    station_id     TEXT NOT NULL,
    source_name    TEXT NOT NULL,
    frame_index    INTEGER NOT NULL,
    captured_at    REAL NOT NULL,
    decided_at     REAL NOT NULL,
    verdict        TEXT NOT NULL,
    ai_verdict     TEXT,
    score          REAL,
    mode           TEXT NOT NULL,
    backend        TEXT NOT NULL,
    model_id       TEXT NOT NULL,
    reason         TEXT NOT NULL,
    latency_ms     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inspections_part ON inspections (part_id);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class LoggedEvent:
    """One station event, as logged: epoch seconds, kind, JSON-ready detail."""

    at: float
    kind: str
    detail: dict[str, Any]


class ResultsLog(SqliteStore):
    """Append-only SQLite log; any thread may write (see SqliteStore for the fault handling)."""

    def __init__(self, path: Path, synchronous: str = "FULL", open_now: bool = True) -> None:
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, "results log", synchronous, open_now=open_now,
                         tables=("inspections", "events"))

    def write_many(self, items: list[InspectionRecord | LoggedEvent]) -> None:
        """Inspections and events in one transaction, in the given order; raises the storage error."""
        with self.transaction() as db:
            for item in items:
                if isinstance(item, InspectionRecord):
                    # OR IGNORE: a batch retried after a commit that failed to report success must not fail
                    # on the unique inspection id forever.
                    db.execute(
                        "INSERT OR IGNORE INTO inspections (inspection_id, part_id, station_id, source_name,"
                        " frame_index, captured_at, decided_at, verdict, ai_verdict, score, mode, backend, model_id,"
                        " reason, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (item.inspection_id, item.part_id, item.station_id, item.source_name, item.frame_index,
                         item.captured_at, item.decided_at, item.verdict, item.ai_verdict, item.score, item.mode,
                         item.backend, item.model_id, item.reason, json.dumps(item.latency_ms)),
                    )
                else:
                    db.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)",
                               (item.at, item.kind, json.dumps(item.detail, default=str)))

    def inspections(self) -> Iterator[InspectionRecord]:
        with self.reading() as db:
            rows = db.execute(
                "SELECT inspection_id, part_id, station_id, source_name, frame_index, captured_at, decided_at,"
                " verdict, ai_verdict, score, mode, backend, model_id, reason, latency_ms FROM inspections ORDER BY seq"
            ).fetchall()
        for row in rows:
            yield InspectionRecord(*row[:-1], latency_ms=json.loads(row[-1]))

    def events(self) -> list[tuple[float, str, dict[str, Any]]]:
        with self.reading() as db:
            rows = db.execute("SELECT at, kind, detail FROM events ORDER BY seq").fetchall()
        return [(at, kind, json.loads(detail)) for at, kind, detail in rows]

    def counts(self) -> dict[str, int]:
        with self.reading() as db:
            rows = db.execute("SELECT verdict, COUNT(*) FROM inspections GROUP BY verdict").fetchall()
        return dict(rows)
