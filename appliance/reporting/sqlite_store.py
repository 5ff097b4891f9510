"""The station's SQLite files (results log, outbox): opened one way, written in transactions that never hide
their own error, and recovered when the file is deleted, replaced or corrupted under the running station.

Why each rule:
- WAL lets a reader (an inspector's `sqlite3`, a dashboard) look while the station writes; `synchronous=FULL`
  means a committed row survives a power cut.
- A failed transaction is rolled back only if SQLite still has one open. On SQLITE_FULL or SQLITE_IOERR SQLite
  has often rolled back by itself, and a second ROLLBACK fails with "cannot rollback - no transaction is
  active", an error that would replace the real cause. The original error is always the one raised.
- A file deleted while open is not an error to SQLite: it keeps writing into the unlinked inode, and
  everything is gone when the process exits. So every transaction first compares the path's inode with the
  one opened; a deleted or replaced file is rebuilt from the still-open handle with SQLite's backup API
  (nothing committed is lost), and a replaced file is kept beside it.
- A corrupt file (SQLite reports SQLITE_CORRUPT / SQLITE_NOTADB, at open or on any later read or write) is
  moved aside as `<name>.corrupt-<UTC time>` for forensics (`sqlite3 <file> .recover`) and a fresh file is
  started, so the station keeps recording instead of refusing to start. Damage SQLite has not read yet
  (pages it still holds in its cache or WAL) is found when it reads them, at the latest at the next start.
  Nothing here opens the database file with a plain `open()`: closing such a descriptor drops every POSIX
  lock the process holds on the file, SQLite's included (sqlite.org/howtocorrupt.html, section 2.2).
- A store that cannot be opened at all (read-only or full file system, a missing folder) does not stop the
  station: every later call tries to open it again and raises the real error until it works.

Every recovery is noted in `take_notes()` for the owner to report as an event.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger("appliance.storage")

# How long a write waits for another process's lock before it fails (and the writer retries later). Short:
# the station's writers run on their own threads with a memory backlog, so a lock held by a backup tool
# shows up as a fault within seconds instead of a silent stall.
BUSY_TIMEOUT_S = 1.0
_CORRUPT = ("file is not a database", "database disk image is malformed", "malformed database schema")
_CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def is_corruption(exc: BaseException) -> bool:
    """True for SQLITE_CORRUPT / SQLITE_NOTADB (by error name on Python 3.11+, by message on 3.10)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return str(name).startswith(_CORRUPT_CODES)
    return any(text in str(exc) for text in _CORRUPT)


def describe(exc: BaseException) -> str:
    """`<SQLite error name or exception type>: <message>`: the text that goes into logs, events and heartbeats."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return f"{name}: {exc}"


class _ForeignFile(sqlite3.DatabaseError):
    """A valid SQLite file at the store's path that is not this store (its tables are missing)."""


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class SqliteStore:
    """One SQLite file shared by the station's threads: a re-entrant lock, `transaction()` and `reading()`.

    `open_now=True` raises the opening error at once and repairs nothing (tools that read a log); the station
    passes False: it keeps running with the store closed until it can be opened, and it alone rebuilds a
    deleted file and moves a corrupt one aside. Subclasses override `_opened(db)` to
    rebuild in-memory state from a freshly opened file.
    """

    def __init__(self, path: Path, schema: str, schema_version: int, what: str, synchronous: str = "FULL",
                 open_now: bool = True, tables: tuple[str, ...] = ("meta",)) -> None:
        self.path = path
        self.what = what
        self._tables = tables  # the store's own tables: a file with tables, none of them these, is not ours
        self.open_error: str | None = None  # why the store is closed, while it is
        self._schema = schema
        self._schema_version = schema_version
        self._synchronous = synchronous
        self.lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._notes: list[dict[str, str]] = []
        self._counters: dict[str, int] = {}  # the last value handed out per counter, whether stored or not
        self._repair = not open_now  # only the station moves a corrupt file aside; a tool reading it must not
        try:
            with self.lock:
                self._connection()
        except (sqlite3.Error, OSError) as exc:
            if open_now:
                raise
            self.open_error = describe(exc)
            log.error("%s %s cannot be opened now (%s); retrying on every write", what, path, self.open_error)

    # --- for subclasses ---------------------------------------------------------------------------------------
    def _opened(self, db: sqlite3.Connection) -> None:
        """Called with the lock held after the file was (re)opened, inside no transaction."""

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The lock and one write transaction: committed when the block ends, rolled back if it raises.

        Raises the original sqlite3.Error / OSError of the failure, never the rollback's.
        """
        with self.lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with suppress(sqlite3.Error):  # the first error is the one that matters
                        db.execute("ROLLBACK")
                self._after_error(exc)
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The lock and the open connection, for reads."""
        with self.lock:
            db = self._connection()
            try:
                yield db
            except BaseException as exc:
                self._after_error(exc)
                raise

    def next_counter(self, name: str) -> int:
        """Increment and return a persistent counter (0 the first time).

        Never raises and never goes backwards: when the file cannot be written, the value comes from memory
        (or, if this process has none yet, from the clock, larger than any stored count), and the next
        stored value continues above it.
        """
        key = f"counter:{name}"
        floor = self._counters.get(name)
        try:
            with self.transaction() as db:
                row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                value = 0 if row is None else int(row[0]) + 1
                if floor is not None:
                    value = max(value, floor + 1)
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
        except (sqlite3.Error, OSError) as exc:
            value = floor + 1 if floor is not None else int(time.time())
            log.error("%s %s: counter %s not stored (%s); using %d from memory", self.what, self.path, name,
                      describe(exc), value)
        self._counters[name] = value
        return value

    def take_notes(self) -> list[dict[str, str]]:
        """Recoveries since the last call (file rebuilt, moved aside): for the owner's events."""
        with self.lock:
            notes, self._notes = self._notes, []
        return notes

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                with suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    # --- opening and recovery ------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            self._check_identity()
        if self._db is None:
            self._open()
        assert self._db is not None
        return self._db

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                db = self._connect()
            except sqlite3.DatabaseError as exc:
                if not (is_corruption(exc) or isinstance(exc, _ForeignFile)) or not self._repair:
                    raise
                why = "replaced" if isinstance(exc, _ForeignFile) else "corrupt"
                aside = self._move_aside(why)
                self._note(f"{why}_file_moved_aside", f"{self.what} {self.path} was {why} at open ({describe(exc)}); "
                           f"moved to {aside.name}, a new file was started", moved_to=str(aside))
                db = self._connect()
            try:
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
                self._store_counters(db)
                self._opened(db)
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            self.open_error = describe(exc)
            raise
        self._db = db
        self.open_error = None

    def _store_counters(self, db: sqlite3.Connection) -> None:
        """Counters handed out from memory while the file was closed are stored now, so none goes backwards."""
        for name, value in self._counters.items():
            key = f"counter:{name}"
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None or int(row[0]) < value:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                     if not row[0].startswith("sqlite_")} - {"meta"}
            if names and not names & set(self._tables):
                # Another SQLite file at our path (a backup restored over it, a copy of something else): writing
                # our tables into it would mix two databases.
                raise _ForeignFile(f"not a {self.what}: it has tables {sorted(names)[:8]}, not {list(self._tables)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            # One transaction: a reader opening the file meanwhile sees all of the schema or none of it.
            db.executescript(f"BEGIN IMMEDIATE;\n{self._schema}\nCOMMIT;")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(self._schema_version),))
        except BaseException:
            db.close()
            raise
        return db

    def _check_identity(self) -> None:
        """Rebuild the file from the open handle when the path no longer names the file we write."""
        if not self._repair:
            return
        try:
            st = os.stat(self.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            identity = None
        if identity != self._identity:
            self._rebuild_from_handle(replaced=identity is not None)

    def _rebuild_from_handle(self, replaced: bool) -> None:
        assert self._db is not None
        old = self._db
        tmp = self.path.with_name(self.path.name + ".rebuild")
        what = "replaced by another file" if replaced else "deleted"
        with suppress(FileNotFoundError):
            tmp.unlink()
        try:
            copy = sqlite3.connect(str(tmp))
            try:
                old.backup(copy)
            finally:
                copy.close()
        except (sqlite3.Error, OSError) as exc:
            with suppress(OSError):
                tmp.unlink()
            raise sqlite3.OperationalError(f"{self.what} {self.path} was {what} while open and cannot be rebuilt "
                                           f"from the open file: {describe(exc)}") from exc
        with suppress(sqlite3.Error):
            old.close()
        self._db = None
        # The -wal and -shm at the path are the old file's (SQLite leaves them when its file was renamed away
        # or deleted): their content is in the copy; left there, they would be applied to whatever file comes
        # to that path next.
        for suffix in ("-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        note = f"{self.what} {self.path} was {what} while the station ran; rebuilt from the open file"
        if replaced:
            aside = self._move_aside("replaced")
            note += f" (the other file was kept as {aside.name})"
        os.replace(tmp, self.path)
        self._note("file_rebuilt", note)
        self._open()

    def _after_error(self, exc: BaseException) -> None:
        if self._db is None or not self._repair:
            return
        if is_corruption(exc):
            self._discard("corrupt", describe(exc))
        elif isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
            # Our tables vanished under an open connection: the file was overwritten in place by another
            # database (`cp backup.sqlite3 results.sqlite3` keeps the inode, so the identity check cannot see it).
            self._discard("replaced", describe(exc))

    def _discard(self, why: str, error: str) -> None:
        if self._db is not None:
            with suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        aside = self._move_aside(why)
        after = ("try `sqlite3 <file> .recover` on it" if why == "corrupt" else
                 "it is the other database; what the store held was overwritten with it")
        self._note(f"{why}_file_moved_aside", f"{self.what} {self.path} was found {why} ({error}); moved to "
                   f"{aside.name} ({after}), a new file is started", moved_to=str(aside))

    def _move_aside(self, why: str) -> Path:
        aside = self.path.with_name(f"{self.path.name}.{why}-{_utc_stamp()}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            with suppress(FileNotFoundError):
                os.replace(src, Path(str(aside) + suffix))
        return aside

    def _note(self, kind: str, message: str, **extra: str) -> None:
        log.error("%s", message)
        self._notes.append({"kind": kind, "store": self.what, "path": str(self.path), "message": message, **extra})
