"""Sink `review`: sets parts aside for a person, with their pictures, and records what people say about them.

What is queued (`queue_reason`): every part whose verdict is `manual_required` (the band, a station in
manual_fallback, no model), every part decided in `shadow` mode, and an audit sample of the confident
verdicts (`pass` / `fail` in production): `review.audit_rate` of them (default 1 %), chosen by a hash of the
inspection id and a seed (`audit_selected`), so the choice needs no state and a test with a fixed seed knows
which parts are chosen. A part with an `error` verdict has no picture to judge and is not queued. The
challenger model (issue #14, later) will queue its disagreements under the reserved reason
`challenger_disagreement`.

The decide thread only decides whether to queue and hands the record and the frame (a read-only view: no
copy) to the review writer (reporting/recorder.py `StoreWriter`, store name `review`), whose thread encodes
and writes the picture and the row (appliance/review/queue.py). Its backlog is bounded (`review.pending_max`,
each item holding its frame in memory): a full backlog refuses the item, counted (`refused`) and logged, and
the station goes on: the review queue is not the record of the part (the results log is), so the runtime
gives the writer to the storage watch as `best_effort` (its faults are reported, it never turns the station
fail-safe). Storage faults of the review folder follow the writer's rules (`storage_fault` /
`storage_recovered` with store `review`, the items kept in order until it writes again).

Labels (`record_label`: `cmd/label` over MQTT, `appliance review label`, the HTTP API) are stored in the review
store, and each is announced once through the station's fan-out as a `label_recorded` event: at once for a
label given to this process, and for one another process stored (the `appliance review label` command) at the
next heartbeat or review write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from appliance.reporting.recorder import EventSink, StoreWriter
from appliance.reporting.sqlite_store import describe
from appliance.review.queue import Label, ReviewItem, ReviewStore, describe_item
from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord
from appliance.threads import FailureSink

log = logging.getLogger("appliance.review")

ANNOUNCED = "labels_announced"  # meta key: the last label sequence number announced as label_recorded


def audit_selected(inspection_id: str, rate: float, seed: int) -> bool:
    """Whether the audit sample takes this inspection: a uniform draw from sha256(seed, id), below `rate`.
    The same id and seed always give the same answer; over many ids the share chosen is `rate`."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}:{inspection_id}".encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def queue_reason(record: InspectionRecord, audit_rate: float, seed: int) -> str | None:
    """Why this part goes to the review queue (appliance.review.queue.QUEUE_REASONS), or None."""
    if record.verdict == "error":
        return None
    if record.mode == "shadow":
        return "shadow"
    if record.verdict == "manual_required":
        return "manual_required"
    if record.verdict in ("pass", "fail") and audit_selected(record.inspection_id, audit_rate, seed):
        return "audit"
    return None


class ReviewSink:
    """Sink `review` (see the module's docstring). The runtime adds it to the fan-out, gives `writer` to the
    storage watch as best-effort, `record_label` to the command handler and `summary` to the heartbeat."""

    name = "review"

    def __init__(self, store: ReviewStore, *, audit_rate: float = 0.01, audit_seed: int | None = None,
                 max_pending: int = 64, on_event: EventSink | None = None,
                 on_failure: FailureSink | None = None) -> None:
        """`audit_seed` None: a random one per start. `on_event`: the fan-out's `event` (label_recorded, and the
        writer's storage events)."""
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError(f"audit_rate must be between 0 and 1, got {audit_rate!r}")
        self.store = store
        self.audit_rate = audit_rate
        self.audit_seed = int.from_bytes(os.urandom(8), "big") if audit_seed is None else audit_seed
        self._on_event = on_event
        self._announce_lock = threading.Lock()
        self._announced: int | None = None  # the last label announced, as this process knows it
        self.writer: StoreWriter[ReviewItem] = StoreWriter(
            "review", store.path, self._write, max_pending=max_pending, on_event=on_event, notes=store.take_notes,
            on_failure=on_failure, initial_error=store.open_error, dump=describe_item,
            limit_setting="review.pending_max", refusal=("NOT QUEUED FOR REVIEW", logging.WARNING, 60.0))

    @classmethod
    def open(cls, folder: Path, section: Any, *, on_event: EventSink | None = None,
             on_failure: FailureSink | None = None) -> ReviewSink:
        """The station's review sink from its `[review]` settings (appliance.settings.ReviewSection); the store
        is opened as the station opens its stores (a folder that cannot be opened now is a storage fault)."""
        store = ReviewStore(folder, image_format=section.image_format, jpeg_quality=section.jpeg_quality,
                            max_bytes=section.max_bytes, max_age_days=section.max_age_days, open_now=False)
        return cls(store, audit_rate=section.audit_rate, audit_seed=section.audit_seed,
                   max_pending=section.pending_max, on_event=on_event, on_failure=on_failure)

    # --- the Sink interface (decide thread: no disk) ---------------------------------------------------------
    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        reason = queue_reason(record, self.audit_rate, self.audit_seed)
        if reason is None:
            return
        # A refusal (full backlog) is counted in writer.refused and logged by the writer with describe_item.
        self.writer.submit(ReviewItem(record, evidence.image, evidence.defect_map, reason, record.decided_at))

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """Events are not the review queue's business (label_recorded is its own)."""

    def flush(self, timeout: float) -> bool:
        return self.writer.flush(timeout)

    # --- the writer thread -----------------------------------------------------------------------------------
    def _write(self, items: list[ReviewItem]) -> None:
        self.store.write_many(items)
        self.announce_labels()

    # --- labels ----------------------------------------------------------------------------------------------
    def record_label(self, inspection_id: str, verdict: str, *, labeller: str, defect_type: str | None = None,
                     source: str, message_id: str | None = None) -> Label:
        """Store a label (see ReviewStore.record_label for what it raises) and announce it (label_recorded)."""
        label = self.store.record_label(inspection_id, verdict, labeller=labeller, defect_type=defect_type,
                                        source=source, message_id=message_id)
        self.announce_labels()
        return label

    def announce_labels(self) -> int:
        """One `label_recorded` event per label not yet announced (whichever process stored it); how many.
        Never raises: a store that cannot be read now is tried again next time."""
        if self._on_event is None:
            return 0
        with self._announce_lock:
            try:
                if self._announced is None:
                    self._announced = self.store.counter(ANNOUNCED)
                labels = self.store.labels(after_seq=self._announced)
                if not labels:
                    return 0
                items = {i: self.store.item(i) for i in {label.inspection_id for label in labels}}
            except (sqlite3.Error, OSError) as exc:
                log.debug("review: labels not announced now: %s", describe(exc))
                return 0
            for label in labels:
                item = items.get(label.inspection_id)
                self._emit({"inspection_id": label.inspection_id, "part_id": item.part_id if item else None,
                            "verdict": label.verdict, "ai_verdict": item.ai_verdict if item else None,
                            "model_id": item.model_id if item else None, "defect_type": label.defect_type,
                            "labeller": label.labeller, "source": label.source, "message_id": label.message_id,
                            "labelled_at_ms": round(label.labelled_at * 1000), "label_seq": label.seq})
            self._announced = labels[-1].seq
            try:
                self.store.set_meta(ANNOUNCED, self._announced)
            except (sqlite3.Error, OSError) as exc:  # announced again after a restart at worst
                log.warning("review: could not note the labels announced (%s)", describe(exc))
            return len(labels)

    def _emit(self, detail: dict[str, Any]) -> None:
        assert self._on_event is not None
        try:
            self._on_event("label_recorded", detail)
        except Exception:
            log.exception("review: reporting label_recorded failed")

    # --- health ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The heartbeat's `review`: the writer's `pending` and `refused`, and the store's counts, bytes,
        evictions and label statistics (ReviewStore.summary); `error` instead of the latter when the store
        cannot be read now. Announces labels other processes stored."""
        out: dict[str, Any] = {"pending": self.writer.pending, "refused": self.writer.refused,
                               "audit_rate": self.audit_rate}
        self.announce_labels()
        try:
            out.update(self.store.summary())
        except (sqlite3.Error, OSError) as exc:
            out["error"] = describe(exc)
        return out

    def close(self) -> None:
        """Close the store (after the storage watch closed the writer)."""
        self.store.close()

