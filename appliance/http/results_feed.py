"""`GET /results`: pages of the results log's inspections, read over a read-only connection of its own.

The station's writer keeps its connection and lock (reporting/results_log.py); a page is read through a separate
read-only SQLite connection (WAL lets a reader look while the writer writes), so a slow or frequent reader never
holds up the writer. Pages run forward by the log's `seq` (its row number, increasing in decision order):

- no `since`: the newest `limit` inspections (oldest first); `next` is the newest one's seq;
- `since=<seq>`: the first `limit` inspections after that seq;
- `since=<ISO 8601 time>`: the first `limit` inspections decided at or after it (no time zone: UTC).

`next` is the cursor of the following page (`since=<next>`); `more` says whether more are already there.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_COLUMNS = ("seq, inspection_id, part_id, station_id, source_name, frame_index, captured_at, decided_at, verdict,"
            " ai_verdict, score, mode, backend, model_id, reason, latency_ms")


@dataclass(frozen=True)
class Since:
    seq: int | None = None
    at: float | None = None  # epoch seconds


@dataclass(frozen=True)
class Page:
    results: list[dict[str, Any]]
    next: int
    more: bool


def parse_since(text: str | None) -> Since:
    """`since` as a seq (digits) or an ISO 8601 time; ValueError says what was expected."""
    if text is None or not text.strip():
        return Since()
    text = text.strip()
    if text.isdigit():
        if len(text) > 18:  # SQLite integers are 64-bit; no results log comes near 10**18 rows
            raise ValueError(f"since={text[:60]!r}: a result seq is at most 18 digits")
        return Since(seq=int(text))
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"since={text[:60]!r} is neither a result seq (a whole number, the `next` of a page) nor an "
                         "ISO 8601 time (2025-01-31T06:00:00Z)") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    # An ISO time has microsecond resolution and the log's float times finer: a time printed from a record's
    # own decided_at may have been rounded up by up to half a microsecond, and must still include that record.
    return Since(at=at.timestamp() - 0.5e-6)


def read_page(path: Path, since: Since, limit: int) -> Page:
    """One page of the results log at `path`; sqlite3.Error when the file cannot be read."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_LIMIT}")
    if not path.exists():  # nothing recorded yet
        return Page([], since.seq or 0, False)
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    try:
        if since.seq is not None:
            rows = db.execute(f"SELECT {_COLUMNS} FROM inspections WHERE seq > ? ORDER BY seq LIMIT ?",
                              (since.seq, limit + 1)).fetchall()
        elif since.at is not None:
            rows = db.execute(f"SELECT {_COLUMNS} FROM inspections WHERE decided_at >= ? ORDER BY seq LIMIT ?",
                              (since.at, limit + 1)).fetchall()
        else:
            rows = db.execute(f"SELECT {_COLUMNS} FROM inspections ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            rows.reverse()
        more = len(rows) > limit
        rows = rows[:limit]
        if rows:
            cursor = rows[-1][0]
        elif since.seq is not None:
            cursor = since.seq
        else:  # nothing at or after that time: everything there is is older
            cursor = db.execute("SELECT COALESCE(MAX(seq), 0) FROM inspections").fetchone()[0]
    finally:
        db.close()
    names = [c.strip() for c in _COLUMNS.split(",")]
    results = []
    for row in rows:
        item = dict(zip(names, row, strict=True))
        item["latency_ms"] = json.loads(item["latency_ms"])
        results.append(item)
    return Page(results, int(cursor), more)
