"""The station's storage watch: every store writer's health in one place, and the fail-safe rule.

While any writer's backlog is full (`storage.pending_max`) the station holds manual_fallback with cause
`storage` (parts go to a person rather than pass unrecorded) and releases it once the store takes writes
again. It is a sink so that it looks after every part and event (the moment a backlog can have filled or
drained); in the common case (nothing full, nothing held) that look costs a few attribute reads.

A writer in `best_effort` keeps a store that is NOT the record of any part: the review queue's pictures (the
part itself is in the results log). Its faults and backlog are watched and reported like every other store's
(`pending`, `faults`, `last_error`), and it is closed at the stop, but its full backlog never turns the station
fail-safe (production must not stop because a picture for a person cannot be kept), what it refuses is not
`unrecorded` (its owner counts it), and `flush_writers` (the stop, before the outbox goes to the broker) does not
wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from appliance.reporting.recorder import StoreWriter
from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord
from appliance.station.modes import ModeControl


class StorageWatch:
    """Sink `storage_watch`: holds the `storage` fallback in `modes` while a writer's backlog is full."""

    name = "storage_watch"

    def __init__(self, writers: Sequence[StoreWriter[Any]], modes: ModeControl, *,
                 best_effort: Sequence[StoreWriter[Any]] = ()) -> None:
        """`best_effort`: writers (also in `writers`) whose full backlog must not turn the station fail-safe."""
        self.writers = list(writers)
        self.best_effort: set[StoreWriter[Any]] = set(best_effort)
        self._modes = modes
        self._lock = threading.Lock()
        self._held = False  # whether this watch holds the station in manual_fallback

    # --- the Sink interface: each call is a moment to look -------------------------------------------------------
    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        self.update()

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.update()

    def flush(self, timeout: float) -> bool:
        return True  # holds nothing itself

    # --- health ----------------------------------------------------------------------------------------------------
    @property
    def unrecorded(self) -> int:
        """Records a full backlog refused: written to the process log only (UNRECORDED lines)."""
        return sum(w.refused for w in self._records())

    def status(self) -> dict[str, Any]:
        """For heartbeats: `ok`, backlog per store, the faults (store, path, error, since_ms, pending),
        `failsafe` (a backlog full: manual_fallback), `unrecorded` (taken by no store: process log only)."""
        faults = [f.as_dict() for w in self.writers if (f := w.fault()) is not None]
        return {"ok": not faults, "pending": {w.store: w.pending for w in self.writers}, "faults": faults,
                "failsafe": any(w.saturated for w in self._records()), "unrecorded": self.unrecorded}

    def error(self) -> str | None:
        """The first storage fault in words, for `last_error`."""
        for w in self.writers:
            f = w.fault()
            if f is not None:
                return f"{f.store} {f.path} cannot be written: {f.error} ({f.pending} waiting in memory)"
        return None

    def flush_writers(self, timeout: float) -> bool:
        """Wait until every writer of records wrote what it holds (True) or `timeout` s passed (False); the
        best-effort ones are left to `close`."""
        return _within(timeout, [w.flush for w in self._records()])

    def close(self, timeout: float = 10.0) -> bool:
        """Flush (bounded) and stop the writers, the best-effort ones last; True when no record was left unwritten
        (what a best-effort writer leaves is logged by it, never called a lost record)."""
        deadline = time.monotonic() + timeout
        closed = [(w, w.close(max(0.0, deadline - time.monotonic())))
                  for w in [*self._records(), *(w for w in self.writers if w in self.best_effort)]]
        return all(done for w, done in closed if w not in self.best_effort)

    def update(self) -> None:
        """Hold or release the storage fallback as the writers' backlogs fill and drain."""
        full = next((w for w in self._records() if w.saturated), None)
        with self._lock:
            if full is None and not self._held:
                return
            reason = None
            if full is not None:
                fault = full.fault()
                reason = (f"storage: {full.store} {full.path} cannot be written"
                          f"{f' ({fault.error})' if fault else ''} and {full.max_pending} records wait in memory, "
                          "the limit (storage.pending_max)")
            self._held = full is not None
        # Outside the lock: entering the fallback is an event, and reporting it comes back here.
        self._modes.set_fallback("storage", reason)

    def _records(self) -> list[StoreWriter[Any]]:
        """The writers whose stores hold the station's records (all but the best-effort ones)."""
        return [w for w in self.writers if w not in self.best_effort]


def _within(timeout: float, calls: list[Any]) -> bool:
    deadline = time.monotonic() + timeout
    return all([call(max(0.0, deadline - time.monotonic())) for call in calls])
