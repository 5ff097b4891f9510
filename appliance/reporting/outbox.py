"""Store-and-forward outbox: every MQTT message is written here before it is published, and deleted
only when the broker acknowledged it, so no result is lost through a broker outage or a crash.

paho-mqtt keeps its own queue in memory only; this file is what survives a restart. WAL mode and
`synchronous=FULL` so a committed message survives a power cut. Row ids (AUTOINCREMENT, never reused, also
not after the file was replaced: see `_opened`) are the order of insertion, and replay follows them. Do not
key anything on paho's `mid`: it restarts per connection.

"In flight" (handed to paho, not yet acknowledged) is kept in memory on purpose: after a crash nothing
is in flight, so everything the dead process had handed out is pending again on open and is resent
(consumers de-duplicate on the payload's message_id). It also saves a disk write per publish.

In-memory state (depth, in flight, shed counts) changes only after the commit it describes: a failed
transaction leaves it as it was. An acknowledgement whose DELETE fails (disk full) is remembered and the
DELETE retried with the next one; until then the message is neither pending nor counted (after a crash it
is resent, once more: consumers de-duplicate).

Bounds: at most `max_messages` rows and nothing older than `max_age_s`. When over the count, the
oldest heartbeats (kind "health") go first, as they are superseded by the next one anyway; then the
oldest of the rest. What was shed is counted per kind for the reporter's overflow event. A message the
broker keeps refusing is moved to the `dead_letters` table with the reason (`dead_letter`).
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.reporting.sqlite_store import SqliteStore

SCHEMA_VERSION = 2  # 2: dead_letters
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
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    created_at  REAL NOT NULL,
    topic       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    qos         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    moved_at    REAL NOT NULL,
    reason      TEXT NOT NULL
);
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


@dataclass(frozen=True)
class NewMessage:
    """A message to store: topic, JSON payload, QoS, kind (a PUBLISHED_KINDS name)."""

    topic: str
    payload: str
    qos: int
    kind: str


class Outbox(SqliteStore):
    """A bounded, persistent FIFO of MQTT messages; any thread may call (see SqliteStore for fault handling)."""

    def __init__(
        self,
        path: Path,
        max_messages: int = 100_000,
        max_age_s: float = 7 * 86400,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
        open_now: bool = True,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"outbox max_messages must be at least 1, got {max_messages}")
        if max_age_s <= 0:
            raise ValueError(f"outbox max_age_s must be positive, got {max_age_s}")
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._clock = clock
        # Counted here rather than COUNT(*) per put: a full outbox holds 100k rows.
        self._depth = 0
        self._in_flight: set[int] = set()
        self._acked: set[int] = set()  # acknowledged, DELETE not yet committed
        self._shed: Counter[str] = Counter()
        self._max_id = 0  # the largest id handed out by this process
        self._dead = 0
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, "MQTT outbox", synchronous, open_now=open_now,
                         tables=("outbox", "dead_letters"))

    def _opened(self, db: sqlite3.Connection) -> None:
        # A new file (the old one corrupt or gone) must not hand out ids that are still in flight or
        # acknowledged from the old one: a late PUBACK would delete a different message.
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        if seq < self._max_id:
            db.execute("INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (self._max_id,))
        ids = {row[0] for row in db.execute("SELECT id FROM outbox")} if (self._in_flight or self._acked) else set()
        self._in_flight &= ids
        self._acked &= ids
        (self._depth,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        (self._dead,) = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        # A station that was off longer than max_age_s must not replay week-old messages on start.
        self._commit_bounds(db)

    def put(self, topic: str, payload_json: str, qos: int, kind: str) -> int:
        """Store a message before publishing it; returns its id (ids grow in insertion order)."""
        return self.put_many([NewMessage(topic, payload_json, qos, kind)])[0]

    def put_many(self, messages: list[NewMessage]) -> list[int]:
        """Store several messages in one transaction (one fsync); returns their ids; raises the storage error."""
        for m in messages:
            if m.qos not in (0, 1, 2):
                raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {m.qos}")
        with self.lock:
            ids: list[int] = []
            # Insert and shed in one transaction: a crash between them cannot leave the outbox over its bound.
            with self.transaction() as db:
                for m in messages:
                    cur = db.execute(
                        "INSERT INTO outbox (created_at, topic, payload, qos, kind) VALUES (?, ?, ?, ?, ?)",
                        (self._clock(), m.topic, m.payload, m.qos, m.kind),
                    )
                    assert cur.lastrowid is not None  # always set after an INSERT into a rowid table
                    ids.append(cur.lastrowid)
                shed = self._plan_bounds(db, self._depth + len(ids))
            self._depth += len(ids)
            self._max_id = max(self._max_id, *ids) if ids else self._max_id
            self._apply_shed(shed)
        return ids

    def pending(self, limit: int = 100) -> list[OutboxMessage]:
        """Up to `limit` messages, oldest first, neither acknowledged nor in flight; raises the storage error."""
        if limit <= 0:
            return []
        with self.reading() as db:
            # In-flight rows are the few handed to paho (bounded by its in-flight window), so reading
            # that many extra rows and filtering here beats a NOT IN over a growing parameter list.
            skip = self._in_flight | self._acked
            rows = db.execute(
                "SELECT id, topic, payload, qos, kind, created_at FROM outbox ORDER BY id LIMIT ?",
                (limit + len(skip),),
            ).fetchall()
        return [OutboxMessage(*row) for row in rows if row[0] not in skip][:limit]

    def mark_in_flight(self, ids: Iterable[int]) -> None:
        """These messages were handed to the client: do not list them again until acked or released."""
        with self.lock:
            self._in_flight.update(ids)

    def ack(self, message_id: int) -> bool:
        """The broker acknowledged it: delete it. False if it was already gone (shed, or acked twice)."""
        return self.ack_many([message_id]) > 0

    def ack_many(self, ids: Iterable[int]) -> int:
        """Several acknowledgements in one transaction (one fsync instead of one per message). Returns deleted.

        The acknowledgement is remembered before the DELETE: if the DELETE fails (the error is raised), the
        messages stay out of `pending()` and `depth()` and the DELETE is retried on the next call.
        """
        with self.lock:
            new = set(ids)
            self._in_flight -= new
            self._acked |= new
            if not self._acked:
                return 0
            todo = sorted(self._acked)
            deleted = 0
            with self.transaction() as db:
                for start in range(0, len(todo), 500):  # under SQLite's bound-parameter limit
                    chunk = todo[start:start + 500]
                    cur = db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                    deleted += cur.rowcount
            self._acked.clear()
            self._depth -= deleted
        return deleted

    def dead_letter(self, message_id: int, reason: str) -> bool:
        """Move a message the broker keeps refusing to `dead_letters` with the reason; False if it is gone."""
        with self.lock:
            with self.transaction() as db:
                moved = db.execute(
                    "INSERT INTO dead_letters (id, created_at, topic, payload, qos, kind, moved_at, reason)"
                    " SELECT id, created_at, topic, payload, qos, kind, ?, ? FROM outbox WHERE id = ?",
                    (self._clock(), reason[:1000], message_id)).rowcount
                db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self._in_flight.discard(message_id)
            self._depth -= moved
            self._dead += moved
        return moved > 0

    def dead_letter_count(self) -> int:
        """Messages moved aside as undeliverable since the file was created."""
        with self.lock:
            return self._dead

    def release_in_flight(self) -> int:
        """After a disconnect: everything in flight is pending again, in its original order. Returns how many."""
        with self.lock:
            count = len(self._in_flight)
            self._in_flight.clear()
        return count

    def depth(self) -> int:
        """Messages stored and not acknowledged, in flight included (memory only: never raises)."""
        with self.lock:
            return self._depth - len(self._acked)

    def in_flight_count(self) -> int:
        with self.lock:
            return len(self._in_flight)

    def oldest_age_s(self) -> float | None:
        """Age of the oldest stored message in seconds; None when empty, closed (faulted) or unreadable."""
        if not self.is_open:
            return None  # a heartbeat must not wait for an open attempt on a faulted store
        try:
            with self.reading() as db:
                (oldest,) = db.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        except (sqlite3.Error, OSError):
            return None
        return None if oldest is None else max(0.0, self._clock() - oldest)

    def take_shed_counts(self) -> dict[str, int]:
        """Messages dropped by the bounds since the last call, per kind; resets the counts."""
        with self.lock:
            counts = dict(self._shed)
            self._shed.clear()
        return counts

    # --- bounds ---------------------------------------------------------------------------------------------------
    def _commit_bounds(self, db: sqlite3.Connection) -> None:
        """Enforce the bounds in a transaction of their own (at open)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            shed = self._plan_bounds(db, self._depth)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._apply_shed(shed)

    def _plan_bounds(self, db: sqlite3.Connection, depth: int) -> list[tuple[str, int, set[int]]]:
        """Delete what is too old, then the oldest heartbeats, then the oldest others, inside the caller's
        transaction; returns (kind, count, ids) per deletion for `_apply_shed` after the commit."""
        shed: list[tuple[str, int, set[int]]] = []
        cutoff = self._clock() - self.max_age_s
        shed += self._drop(db, "SELECT id, kind FROM outbox WHERE created_at < ?", (cutoff,))
        excess = depth - sum(n for _, n, _ in shed) - self.max_messages
        if excess > 0:
            shed += self._drop(db, "SELECT id, kind FROM outbox WHERE kind = ? ORDER BY id LIMIT ?",
                               (HEARTBEAT_KIND, excess))
            excess = depth - sum(n for _, n, _ in shed) - self.max_messages
        if excess > 0:
            shed += self._drop(db, "SELECT id, kind FROM outbox WHERE kind != ? ORDER BY id LIMIT ?",
                               (HEARTBEAT_KIND, excess))
        return shed

    @staticmethod
    def _drop(db: sqlite3.Connection, select: str, params: tuple[object, ...]) -> list[tuple[str, int, set[int]]]:
        victims = db.execute(select, params).fetchall()
        if not victims:
            return []
        by_kind: dict[str, set[int]] = {}
        for row_id, kind in victims:
            by_kind.setdefault(kind, set()).add(row_id)
        # No RETURNING: it needs SQLite 3.35, newer than some device images ship.
        ids = [row_id for row_id, _ in victims]
        for start in range(0, len(ids), 500):  # under SQLite's bound-parameter limit (999 on older builds)
            chunk = ids[start:start + 500]
            db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        return [(kind, len(kind_ids), kind_ids) for kind, kind_ids in by_kind.items()]

    def _apply_shed(self, shed: list[tuple[str, int, set[int]]]) -> None:
        for kind, count, ids in shed:
            self._depth -= count
            self._shed[kind] += count
            # A shed message may be in flight or acked: forget it so a late ack finds nothing.
            self._in_flight -= ids
            self._acked -= ids
