"""Store-and-forward outbox: every MQTT message is written here before it is published, and deleted
only when the broker acknowledged it, so no result is lost through a broker outage or a crash.

paho-mqtt keeps its own queue in memory only; this file is what survives a restart. WAL mode and
`synchronous=FULL` so a committed message survives a power cut. Row ids (AUTOINCREMENT, never reused)
are the order of insertion, and replay follows them. Do not key anything on paho's `mid`: it restarts
per connection.

"In flight" (handed to paho, not yet acknowledged) is kept in memory on purpose: after a crash nothing
is in flight, so everything the dead process had handed out is pending again on open and is resent
(consumers de-duplicate on the payload's message_id). It also saves a disk write per publish.

Bounds: at most `max_messages` rows and nothing older than `max_age_s`. When over the count, the
oldest heartbeats (kind "health") go first, as they are superseded by the next one anyway; then the
oldest of the rest. What was shed is counted per kind for the reporter's overflow event.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.sqlite_store import open_store

SCHEMA_VERSION = 1
HEARTBEAT_KIND = "health"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  REAL NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    qos         INTEGER NOT NULL,
    kind        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at);
"""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message, as handed to the publisher."""

    id: int
    topic: str
    payload: str
    qos: int
    kind: str
    created_at: float  # epoch seconds when put


class Outbox:
    """A bounded, persistent FIFO of MQTT messages. One connection, guarded by a lock: any thread may call."""

    def __init__(
        self,
        path: Path,
        max_messages: int = 100_000,
        max_age_s: float = 7 * 86400,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"outbox max_messages must be at least 1, got {max_messages}")
        if max_age_s <= 0:
            raise ValueError(f"outbox max_age_s must be positive, got {max_age_s}")
        self._db = open_store(path, _SCHEMA, SCHEMA_VERSION, "MQTT outbox", synchronous)
        (depth,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        self.path = path
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        # Counted here rather than COUNT(*) per put: a full outbox holds 100k rows.
        self._depth: int = depth
        self._in_flight: set[int] = set()
        self._shed: Counter[str] = Counter()
        # A station that was off longer than max_age_s must not replay week-old messages on start.
        with self._transaction():
            self._enforce_bounds()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The lock and one SQLite transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def put(self, topic: str, payload_json: str, qos: int, kind: str) -> int:
        """Store a message before publishing it; returns its id (ids grow in insertion order)."""
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos}")
        try:
            # Insert and shed in one transaction: a crash between them cannot leave the outbox over its bound.
            with self._transaction():
                cur = self._db.execute(
                    "INSERT INTO outbox (created_at, topic, payload, qos, kind) VALUES (?, ?, ?, ?, ?)",
                    (self._clock(), topic, payload_json, qos, kind),
                )
                row_id = cur.lastrowid
                assert row_id is not None  # always set after an INSERT into a rowid table
                self._depth += 1
                self._enforce_bounds()
        except BaseException:
            with self._lock:  # the in-memory depth may have moved before the failure; the table is the truth
                (self._depth,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            raise
        return row_id

    def pending(self, limit: int = 100) -> list[OutboxMessage]:
        """Up to `limit` messages, oldest first, that are neither acknowledged nor in flight."""
        if limit <= 0:
            return []
        with self._lock:
            # In-flight rows are the few handed to paho (bounded by its in-flight window), so reading
            # that many extra rows and filtering here beats a NOT IN over a growing parameter list.
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, kind, created_at FROM outbox ORDER BY id LIMIT ?",
                (limit + len(self._in_flight),),
            ).fetchall()
            in_flight = set(self._in_flight)
        return [OutboxMessage(*row) for row in rows if row[0] not in in_flight][:limit]

    def mark_in_flight(self, ids: Iterable[int]) -> None:
        """These messages were handed to the client: do not list them again until acked or released."""
        with self._lock:
            self._in_flight.update(ids)

    def ack(self, message_id: int) -> bool:
        """The broker acknowledged it: delete it. False if it was already gone (shed, or acked twice)."""
        return self.ack_many([message_id]) > 0

    def ack_many(self, ids: Iterable[int]) -> int:
        """Several acknowledgements in one transaction (one fsync instead of one per message). Returns deleted."""
        ids = list(ids)
        if not ids:
            return 0
        deleted = 0
        with self._transaction():
            self._in_flight.difference_update(ids)
            for start in range(0, len(ids), 500):  # under SQLite's bound-parameter limit
                chunk = ids[start:start + 500]
                cur = self._db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                deleted += cur.rowcount
            self._depth -= deleted
        return deleted

    def next_counter(self, name: str) -> int:
        """Increment and return a persistent counter (0 the first time): the MQTT bdSeq survives restarts,
        so the `offline` will of a killed process never carries the number of the one that replaced it."""
        key = f"counter:{name}"
        with self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            value = 0 if row is None else int(row[0]) + 1
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))
        return value

    def release_in_flight(self) -> int:
        """After a disconnect: everything in flight is pending again, in its original order. Returns how many."""
        with self._lock:
            count = len(self._in_flight)
            self._in_flight.clear()
        return count

    def depth(self) -> int:
        """Messages stored and not acknowledged, in flight included."""
        with self._lock:
            return self._depth

    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def oldest_age_s(self) -> float | None:
        """Age of the oldest stored message in seconds; None when empty."""
        with self._lock:
            (oldest,) = self._db.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        return None if oldest is None else max(0.0, self._clock() - oldest)

    def take_shed_counts(self) -> dict[str, int]:
        """Messages dropped by the bounds since the last call, per kind; resets the counts."""
        with self._lock:
            counts = dict(self._shed)
            self._shed.clear()
        return counts

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _enforce_bounds(self) -> None:
        """Drop what is too old, then the oldest heartbeats, then the oldest others. Lock and transaction held."""
        cutoff = self._clock() - self.max_age_s
        expired = self._db.execute(
            "SELECT kind, COUNT(*) FROM outbox WHERE created_at < ? GROUP BY kind", (cutoff,)
        ).fetchall()
        if expired:
            self._drop("SELECT id FROM outbox WHERE created_at < ?", (cutoff,), expired)
        excess = self._depth - self.max_messages
        if excess > 0:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM (SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?)",
                (HEARTBEAT_KIND, excess),
            ).fetchone()
            if n:
                self._drop("SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?", (HEARTBEAT_KIND, n),
                           [(HEARTBEAT_KIND, n)])
                excess -= n
        if excess > 0:
            victims = "SELECT id, kind FROM outbox WHERE kind != ? ORDER BY id LIMIT ?"
            per_kind = self._db.execute(
                f"SELECT kind, COUNT(*) FROM ({victims}) GROUP BY kind", (HEARTBEAT_KIND, excess)
            ).fetchall()
            self._drop("SELECT id FROM outbox WHERE kind != ? ORDER BY id LIMIT ?", (HEARTBEAT_KIND, excess),
                       per_kind)

    def _drop(self, select_ids: str, params: tuple[object, ...], per_kind: list[tuple[str, int]]) -> None:
        # No RETURNING: it needs SQLite 3.35, newer than some device images ship.
        cur = self._db.execute(f"DELETE FROM outbox WHERE id IN ({select_ids})", params)
        self._depth -= cur.rowcount
        if self._in_flight:
            # A shed message may be in flight; forget it so a late ack finds nothing (ack() returns False).
            # Chunks of 500 stay under SQLite's bound-parameter limit (999 on older builds).
            ids = sorted(self._in_flight)
            alive: set[int] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                alive.update(row[0] for row in self._db.execute(f"SELECT id FROM outbox WHERE id IN ({marks})", chunk))
            self._in_flight &= alive
        for kind, count in per_kind:
            self._shed[kind] += count
