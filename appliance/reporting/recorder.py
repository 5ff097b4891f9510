"""Between the decision and the disk: an ordered, bounded in-memory backlog in front of each SQLite store.

The decide thread never writes to disk itself. It hands every finished inspection and every event to one
`StoreWriter` per store (the results log, the outbox), each with its own thread, which writes its backlog
in decision order, in batches (one transaction and one fsync per batch). When a write fails (the file
locked by another process, disk full, read-only file system, I/O error, file deleted or corrupt) the
items stay at the head of the backlog, in order, and the writer retries with capped backoff. The stores
do not wait for each other: a locked results log does not hold back the outbox, nor the other way round.

While a write fails the writer holds a `StoreFault` (store, path, the original error text, since when,
backlog depth) for heartbeats, and says so once through `on_event`: `storage_fault` when it starts,
`storage_recovered` when a write succeeds again, `storage_repaired` for a file the store rebuilt or moved
aside. The backlog is bounded (`storage.pending_max`): when it is full the writer is `saturated` (the
station turns fail-safe: manual_fallback) and an item it cannot take is refused, counted in `refused`,
and logged in full (an `UNRECORDED` line), the last record left. Saturation ends when the store accepts writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from appliance.reporting.sqlite_store import describe
from appliance.threads import FailureSink, start_guarded

log = logging.getLogger("appliance.reporting.recorder")

T = TypeVar("T")
EventSink = Callable[[str, dict[str, Any]], None]

RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
BATCH = 64  # items per transaction: one fsync covers a burst of parts


@dataclass(frozen=True)
class StoreFault:
    """A store that is not accepting writes: which, where, the error as SQLite or the OS said it, since when."""

    store: str  # "results_log" | "outbox"
    path: str
    error: str
    since: float  # epoch seconds of the first failed write of this fault
    pending: int  # items waiting in memory

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "path": self.path, "error": self.error,
                "since_ms": round(self.since * 1000), "pending": self.pending}


class StoreWriter(Generic[T]):
    """One store's backlog and writer thread. `submit()` from any thread; `flush()` / `close()` at the end.

    `write(items)` must write all of `items` in one transaction or raise; `notes()` returns the store's
    recovery notes (SqliteStore.take_notes). The thread starts on the first `submit()`. `initial_error`: the
    store could not be opened, so the writer starts faulted (heartbeats say so before the first write
    fails). `dump(item)` is the text the process log gets for an item left unwritten at the stop.
    """

    def __init__(
        self,
        store: str,
        path: Path,
        write: Callable[[list[T]], None],
        *,
        max_pending: int = 10_000,
        on_event: EventSink | None = None,
        notes: Callable[[], list[dict[str, str]]] | None = None,
        on_failure: FailureSink | None = None,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        initial_error: str | None = None,
        dump: Callable[[T], str] = repr,
        limit_setting: str = "storage.pending_max",
        refusal: tuple[str, int, float] = ("UNRECORDED", logging.ERROR, 0.0),
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.store = store
        self.path = path
        self.max_pending = max_pending
        self._write = write
        self._on_event = on_event
        self._notes = notes
        self._on_failure = on_failure
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dump = dump
        self._limit_setting = limit_setting  # named in the refusal line: the setting that bounds this backlog
        # How a refused item is logged: (word, level, at most one line per this many seconds; 0: every item). A
        # record store's refusal is the record's last trace (UNRECORDED, every one); a best-effort store's (the
        # review queue) is not, and a burst of them should not flood the journal.
        self._refusal_word, self._refusal_level, self._refusal_every_s = refusal
        self._refusal_logged_at: float | None = None
        self._refused_unlogged = 0
        self._fault_error: str | None = initial_error
        self._fault_since = time.time() if initial_error else 0.0
        self._announced = False  # storage_fault sent for the current fault
        self._saturated = False
        self.refused = 0

    # --- any thread ---------------------------------------------------------------------------------------------
    def submit(self, item: T) -> bool:
        """Queue `item` behind everything before it; False when the backlog is full: then the item is counted
        in `refused` and written in full to the process log (journald), its last record."""
        with self._cond:
            accepted = len(self._items) < self.max_pending
            if not accepted:
                self._saturated = True
                self.refused += 1
            else:
                self._items.append(item)
                if len(self._items) >= self.max_pending:
                    self._saturated = True
                if self._thread is None and not self._stopping:
                    self._thread = start_guarded(f"writer-{self.store}", self._run, self._failed_thread)
                self._cond.notify_all()
        if not accepted:  # outside the lock: the dump may be long
            self._log_refusal(item)
        return accepted

    def _log_refusal(self, item: T) -> None:
        now = time.monotonic()
        with self._cond:
            last = self._refusal_logged_at
            if last is not None and now - last < self._refusal_every_s:
                self._refused_unlogged += 1
                return
            self._refusal_logged_at, more, self._refused_unlogged = now, self._refused_unlogged, 0
        since = f" (and {more} more since the last such line)" if more else ""
        log.log(self._refusal_level, "%s (the %s backlog is full, %s)%s: %s", self._refusal_word, self.store,
                self._limit_setting, since, self._dump(item))

    def fault(self) -> StoreFault | None:
        with self._cond:
            if self._fault_error is None:
                return None
            return StoreFault(self.store, str(self.path), self._fault_error, self._fault_since, len(self._items))

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def saturated(self) -> bool:
        """The backlog reached max_pending during the current fault."""
        with self._cond:
            return self._saturated

    @property
    def faulted(self) -> bool:
        with self._cond:
            return self._fault_error is not None

    def flush(self, timeout: float) -> bool:
        """Wait until the backlog is written (True) or `timeout` seconds passed (False)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._items or self._stopping_done(), timeout)
            return not self._items

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for up to `timeout`, then stop the thread. True when nothing was left unwritten."""
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # A write in progress may wait out SQLite's busy timeout; what it does not finish is logged below.
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._cond:
            left = list(self._items)
        if left:
            log.error("%s %s: %d item(s) could not be written before the stop (%s); each follows as an UNRECORDED "
                      "line, their last record", self.store, self.path, len(left), self._fault_error)
            for item in left:
                log.error("UNRECORDED at stop (%s): %s", self.store, self._dump(item))
        return drained and not left

    # --- the writer thread ---------------------------------------------------------------------------------------
    def _stopping_done(self) -> bool:
        return self._stopping and (self._thread is None or not self._thread.is_alive())

    def _run(self) -> None:
        delay = self._retry_initial
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._stopping)
                if not self._items:
                    return
                batch = list(islice(self._items, BATCH))
            try:
                self._write(batch)
            except Exception as exc:
                self._report_notes()
                self._write_failed(exc)
                with self._cond:
                    if self._stopping:
                        return  # close() gave up waiting; what is left is logged there
                    self._cond.wait(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            with self._cond:
                for _ in batch:
                    self._items.popleft()
                recovered = self._announced
                down_s = time.time() - self._fault_since
                self._fault_error = None
                self._announced = False
                self._saturated = False
                left = len(self._items)
                self._cond.notify_all()
            self._report_notes()
            if recovered:
                log.warning("%s %s accepts writes again after %.1f s; %d item(s) still to write", self.store,
                            self.path, down_s, left)
                self._emit("storage_recovered", {"store": self.store, "path": str(self.path),
                                                 "down_s": round(down_s, 3), "pending": left})

    def _write_failed(self, exc: Exception) -> None:
        error = describe(exc)
        with self._cond:
            if self._fault_error is None:
                self._fault_since = time.time()
            started = not self._announced
            self._announced = True
            changed = error != self._fault_error
            self._fault_error = error
            pending = len(self._items)
        if started:
            log.error("%s %s cannot be written: %s; %d item(s) kept in memory, in order, until it can",
                      self.store, self.path, error, pending)
            self._emit("storage_fault", {"store": self.store, "path": str(self.path), "error": error,
                                         "pending": pending})
        elif changed:
            log.error("%s %s still cannot be written, now: %s (%d waiting)", self.store, self.path, error, pending)

    def _report_notes(self) -> None:
        if self._notes is None:
            return
        try:
            notes = self._notes()
        except Exception:  # a note is a report, never a reason to stop writing
            log.exception("%s: reading the store's recovery notes failed", self.store)
            return
        for note in notes:
            self._emit("storage_repaired", {**note, "store": self.store})  # the same store key as storage_fault

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, detail)
        except Exception:
            log.exception("%s: reporting %s failed", self.store, kind)

    def _failed_thread(self, failure: Any) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._on_failure is not None:
            self._on_failure(failure)
