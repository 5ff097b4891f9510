"""Opening the station's SQLite files (results log, outbox) the one way they must be opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.errors import ConfigError


def open_store(
    path: Path, schema: str, schema_version: int, what: str, synchronous: str = "FULL"
) -> sqlite3.Connection:
    """Open (creating) a WAL database shared by threads, apply `schema`, record its version.

    WAL lets a reader (an inspector's `sqlite3`, a dashboard) look while the station writes;
    `synchronous=FULL` means a committed row survives a power cut. Autocommit: each statement is durable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(schema_version),))
    except sqlite3.Error as exc:
        raise ConfigError(f"{what} {path} cannot be opened: {exc}",
                          hint="check storage.data_dir exists, is writable and has free space") from exc
    return db
