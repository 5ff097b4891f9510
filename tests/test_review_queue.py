"""The review queue (appliance/review/): what a station sets aside for a person, its pictures, its bounds, its
labels, and what a storage fault of the review folder does (nothing decided is lost, production goes on).

Real SQLite files and picture files throughout; a running station where the wiring is the point (build_station
with a folder source, the session's small model on ONNX Runtime); a real read-only or full tmpfs where the
machine allows mounting one.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.reporting.commands import UnknownInspection
from appliance.reporting.recorder import StoreWriter
from appliance.reporting.results_log import ResultsLog
from appliance.reporting.storage_watch import StorageWatch
from appliance.review.queue import DB_NAME, ReviewItem, ReviewStore
from appliance.review.sink import ReviewSink, audit_selected, queue_reason
from appliance.runtime import build_station
from appliance.station.inspection import Evidence, InspectionRecord
from appliance.station.modes import ModeControl
from bundle.decision import Mode
from tests.support.disks import fill, needs_mount, tmpfs_at
from tests.support.frames import part_image, write_frames
from tests.support.settings import station_settings
from tests.support.waiting import wait_until

T0 = float(int(time.time())) - 3600.0  # an hour ago: inside every age bound of these tests


def record(i: int, verdict: str = "pass", *, mode: str = "production", ai: str | None = "same",
           decided_at: float | None = None, model: str = "m-1") -> InspectionRecord:
    at = T0 + i if decided_at is None else decided_at
    return InspectionRecord(
        inspection_id=f"insp-{i:04d}", part_id=f"P-{i}", station_id="st-rev", source_name=f"part_{i:03d}.png",
        frame_index=i, captured_at=at - 0.01, decided_at=at, verdict=verdict,
        ai_verdict=(verdict if ai == "same" else ai), score=0.25, mode=mode, backend="onnxruntime", model_id=model,
        reason="test", latency_ms={"end_to_end_ms": 5.0})


def item(i: int, reason: str = "manual_required", image: np.ndarray | None = None, **kw) -> ReviewItem:
    rec = record(i, kw.pop("verdict", "manual_required"), **kw)
    return ReviewItem(rec, part_image(i) if image is None else image, None, reason, rec.decided_at)


def events_of(kind: str, events: list[tuple[str, dict]]) -> list[dict]:
    return [d for k, d in events if k == kind]


# --- what is queued ---------------------------------------------------------------------------------------------


def test_manual_required_shadow_and_the_audit_sample_are_queued_errors_never():
    assert queue_reason(record(1, "manual_required"), 0.0, 1) == "manual_required"
    assert queue_reason(record(2, "manual_required", mode="shadow"), 0.0, 1) == "shadow"
    assert queue_reason(record(3, "manual_required", mode="manual_fallback", ai=None), 0.0, 1) == "manual_required"
    assert queue_reason(record(4, "pass"), 0.0, 1) is None
    assert queue_reason(record(5, "fail"), 1.0, 1) == "audit"
    assert queue_reason(record(6, "error", ai=None), 1.0, 1) is None


def test_the_audit_sample_is_deterministic_for_a_seed_and_takes_about_the_rate():
    ids = [f"{i:032x}" for i in range(20_000)]
    chosen = [i for i in ids if audit_selected(i, 0.01, seed=42)]
    assert chosen == [i for i in ids if audit_selected(i, 0.01, seed=42)]  # same seed, same parts
    assert 140 <= len(chosen) <= 260  # 1 % of 20 000 = 200, binomial sd 14
    other = {i for i in ids if audit_selected(i, 0.01, seed=43)}
    assert len(other & set(chosen)) < 20  # another seed, another sample
    assert not any(audit_selected(i, 0.0, 1) for i in ids[:100])
    assert all(audit_selected(i, 1.0, 1) for i in ids[:100])


# --- the sink and the store alone ---------------------------------------------------------------------------------


def test_a_queued_part_is_stored_with_its_picture_defect_map_and_every_field(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    sink = ReviewSink(store, audit_rate=0.0, audit_seed=1)
    image = part_image(7, "crack")
    defect_map = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rec = record(7, "manual_required")
    sink.inspection(rec, Evidence.of(image, defect_map))
    sink.inspection(record(8, "pass"), Evidence.of(part_image(8)))  # confident, audit rate 0: not queued
    assert sink.flush(10)
    [queued] = store.items()
    assert (queued.inspection_id, queued.part_id, queued.station_id, queued.verdict, queued.ai_verdict, queued.score,
            queued.mode, queued.backend, queued.model_id, queued.decision_reason) == (
        rec.inspection_id, rec.part_id, rec.station_id, rec.verdict, rec.ai_verdict, rec.score, rec.mode, rec.backend,
        rec.model_id, rec.reason)
    assert queued.queue_reason == "manual_required" and queued.label is None
    assert queued.captured_at == rec.captured_at and queued.decided_at == queued.queued_at == rec.decided_at
    assert (queued.width, queued.height) == (image.shape[1], image.shape[0])
    # the picture is the frame, bit for bit (PNG), and the defect map is kept exactly, for a later overlay
    assert queued.image_file is not None and queued.image_file.endswith(".png")
    assert np.array_equal(cv2.imread(str(store.folder / queued.image_file), cv2.IMREAD_UNCHANGED), image)
    assert queued.defect_map_file is not None
    assert np.array_equal(np.load(store.folder / queued.defect_map_file), defect_map)
    assert queued.bytes == sum((store.folder / f).stat().st_size for f in (queued.image_file, queued.defect_map_file))
    assert store.bytes == queued.bytes
    store.close()


def test_jpeg_pictures_use_the_configured_quality(tmp_path: Path):
    image = part_image(3)
    sizes = {}
    for quality in (30, 95):
        store = ReviewStore(tmp_path / f"q{quality}", image_format="jpeg", jpeg_quality=quality, open_now=False)
        store.write_many([item(3, image=image)])
        [queued] = store.items()
        assert queued.image_file is not None and queued.image_file.endswith(".jpg") and queued.defect_map_file is None
        back = cv2.imread(str(store.folder / queued.image_file))
        assert back.shape == image.shape
        sizes[quality] = queued.bytes
        store.close()
    assert sizes[30] < sizes[95]


def test_a_full_backlog_refuses_and_counts_without_blocking_and_keeps_order(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="appliance.reporting.recorder")
    store = ReviewStore(tmp_path / "review", open_now=False)
    sink = ReviewSink(store, audit_rate=0.0, max_pending=3)
    # Another process holds the review store's write lock: the writer cannot write.
    other = sqlite3.connect(str(store.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        for i in range(8):
            sink.inspection(record(i, "manual_required"), Evidence.of(part_image(i)))
        assert time.monotonic() - started < 0.5  # the decide thread never waits on the review store
        assert wait_until(lambda: sink.writer.faulted, 10)
        assert sink.writer.refused == 5 and sink.writer.pending == 3
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert sink.flush(20)
    assert [i.inspection_id for i in store.items()] == [f"insp-{i:04d}" for i in range(3)]
    assert sink.summary()["refused"] == 5
    # five refusals, one line (at most one a minute): not UNRECORDED, the parts are in the results log
    lines = [r.getMessage() for r in caplog.records if "backlog is full" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("NOT QUEUED FOR REVIEW (the review backlog is full, "
                                                   "review.pending_max)") and "in the results log" in lines[0]
    store.close()


def test_a_frame_the_encoder_refuses_is_queued_without_its_picture_not_retried_forever(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    sink = ReviewSink(store, audit_rate=0.0)
    sink.inspection(record(1, "manual_required"), Evidence.of(np.zeros((4, 4, 5), np.uint8),  # 5 channels
                                                              np.array([["not a number"]], dtype=object)))
    sink.inspection(record(2, "manual_required"), Evidence.of(part_image(2)))
    assert sink.flush(10) and not sink.writer.faulted
    first, second = store.items()
    assert first.image_file is None and first.defect_map_file is None and first.bytes == 0
    assert second.image_file is not None
    store.close()


def test_a_full_review_backlog_is_watched_but_never_makes_the_station_fail_safe(tmp_path: Path):
    events: list[tuple[str, dict]] = []
    modes = ModeControl(Mode.PRODUCTION, lambda kind, detail: events.append((kind, detail)))
    store = ReviewStore(tmp_path / "review", open_now=False)
    sink = ReviewSink(store, audit_rate=0.0, max_pending=1)
    records: StoreWriter[int] = StoreWriter("results_log", tmp_path / "results", lambda items: None, max_pending=1)
    watch = StorageWatch([records, sink.writer], modes, best_effort=[sink.writer])
    other = sqlite3.connect(str(store.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the review store cannot be written
    try:
        for i in range(3):
            sink.inspection(record(i, "manual_required"), Evidence.of(part_image(i)))
            watch.update()
        assert wait_until(lambda: sink.writer.faulted, 10)
        assert sink.writer.saturated and sink.writer.refused == 2
        status = watch.status()
        assert status["failsafe"] is False and status["unrecorded"] == 0 and status["pending"]["review"] == 1
        assert [f["store"] for f in status["faults"]] == ["review"] and "review" in str(watch.error())
        assert modes.current()[0] is Mode.PRODUCTION and not events
        assert watch.flush_writers(0.5)  # the stop does not wait for the pictures before the outbox ...
        assert watch.close(0.5)  # ... and what they leave behind is no lost record
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.close()


def test_the_bytes_bound_evicts_labelled_items_first_then_unlabelled_ones_counted(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    picture = part_image(0)  # one picture for all: every item has the same size
    store.write_many([item(i, image=picture) for i in range(6)])
    sizes = {i.inspection_id: i.bytes for i in store.items()}
    assert len(set(sizes.values())) == 1
    files = {i.inspection_id: store.folder / str(i.image_file) for i in store.items()}
    for i in (2, 4):  # two recent items get labels
        store.record_label(f"insp-{i:04d}", "pass", labeller="ana", source="cli")
    # Room for all six but one picture less, then one more item: the two labelled ones go first ...
    store.max_bytes = sum(sizes.values())
    store.write_many([item(6, image=picture)])
    kept = {i.inspection_id for i in store.items()}
    assert "insp-0002" not in kept and "insp-0004" in kept  # the oldest labelled one, no more than needed
    assert not files["insp-0002"].exists() and files["insp-0004"].exists()
    assert store.counter("evicted_unreviewed") == 0 and store.counter("evicted_reviewed") == 1
    # ... and its row stays (its label is evidence), marked evicted
    [evicted] = [i for i in store.items(include_evicted=True) if i.inspection_id == "insp-0002"]
    assert evicted.evicted_at is not None and evicted.label is not None
    # A much smaller bound: every labelled item goes before the oldest unlabelled ones, which are counted
    store.max_bytes = 3 * sizes["insp-0000"]
    store.keep_bounds()
    left = [i.inspection_id for i in store.items()]
    assert left == ["insp-0003", "insp-0005", "insp-0006"]
    assert store.counter("evicted_unreviewed") == 2 and store.counter("evicted_reviewed") == 2
    assert not files["insp-0000"].exists() and not files["insp-0001"].exists()
    assert store.item("insp-0000") is None  # an unlabelled evicted item is gone entirely: it cannot be labelled
    with pytest.raises(UnknownInspection):
        store.record_label("insp-0000", "fail", labeller="ana", source="cli")
    summary = store.summary()
    assert summary["evicted_unreviewed"] == 2 and summary["queued"] == 3 and summary["bytes"] == store.bytes
    assert store.bytes == sum(i.bytes for i in store.items()) <= store.max_bytes
    store.close()


def test_the_age_bound_evicts_old_items_and_counts_the_unlabelled_ones(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", max_age_days=1.0, open_now=False)
    store.write_many([item(i) for i in range(4)])
    store.record_label("insp-0001", "fail", labeller="bo", defect_type="crack", source="mqtt")
    assert store.keep_bounds(now=T0 + 3600) == (0, 0)  # an hour after: nothing is a day old
    assert store.keep_bounds(now=T0 + 2 * 86400) == (1, 3)
    assert store.items() == []
    assert [i.inspection_id for i in store.items(include_evicted=True)] == ["insp-0001"]
    assert store.summary()["evicted_unreviewed"] == 3 and store.bytes == 0
    assert not any(p.is_file() for p in (store.folder / "images").rglob("*"))
    store.close()


def test_labels_keep_their_history_the_latest_wins_and_a_message_id_counts_once(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    store.write_many([item(i) for i in range(3)])
    first = store.record_label("insp-0000", "pass", labeller="ana", source="cli", at=T0 + 10)
    store.record_label("insp-0000", "fail", labeller="bo", defect_type="scratch", source="mqtt", message_id="m-1",
                       at=T0 + 20)
    again = store.record_label("insp-0000", "fail", labeller="bo", defect_type="scratch", source="mqtt",
                               message_id="m-1", at=T0 + 30)
    assert [(lb.verdict, lb.labeller) for lb in store.labels("insp-0000")] == [("pass", "ana"), ("fail", "bo")]
    assert again == store.labels("insp-0000")[-1] and again.labelled_at == T0 + 20 and first.seq < again.seq
    # list: unlabelled first, each with its latest label
    listed = store.items()
    assert [i.inspection_id for i in listed] == ["insp-0001", "insp-0002", "insp-0000"]
    assert listed[-1].label is not None and listed[-1].label.verdict == "fail" and listed[-1].label_count == 2
    with pytest.raises(UnknownInspection):
        store.record_label("nope", "pass", labeller="ana", source="cli")
    for bad, match in [({"verdict": "ok"}, "verdict"), ({"labeller": " "}, "labeller"),
                       ({"defect_type": "a/b"}, "defect_type"), ({"source": "plc"}, "source"),
                       ({"verdict": "pass", "defect_type": "crack"}, "goes with a 'fail'")]:
        args = {"verdict": "fail", "labeller": "ana", "defect_type": None, "source": "cli", **bad}
        with pytest.raises(ValueError, match=match):
            store.record_label("insp-0001", args.pop("verdict"), **args)
    assert len(store.labels()) == 2
    store.close()


def test_labels_become_stats_with_the_ai_verdict_of_their_item(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    store.write_many([
        item(0, "audit", verdict="fail"), item(1, "audit", verdict="pass"), item(2, "audit", verdict="pass"),
        item(3, verdict="manual_required"),  # an AI manual_required: no AI verdict in the rates
        item(4, "shadow", verdict="manual_required", mode="shadow", ai="fail"),
    ])
    for i, human in [(0, "fail"), (1, "fail"), (2, "pass"), (3, "fail"), (4, "fail")]:
        store.record_label(f"insp-{i:04d}", human, labeller="ana", source="cli")
    stats = store.stats()
    assert stats.labelled == 5 and stats.without_ai_verdict == 1
    assert stats.confusion.as_dict() == {"tp": 2, "fn": 1, "fp": 0, "tn": 1}
    assert stats.detection_rate is not None and (stats.detection_rate.successes, stats.detection_rate.n) == (2, 3)
    assert stats.shadow_agreement is not None and stats.shadow_agreement.value == 1.0
    summary = store.summary()
    assert summary["labelled"] == 5 and summary["confusion"]["fn"] == 1
    assert summary["detection_rate"]["n"] == 3 and summary["false_positive_rate"]["n"] == 1
    store.close()


def test_a_label_stored_by_another_process_is_announced_once_by_the_station(tmp_path: Path):
    events: list[tuple[str, dict]] = []
    store = ReviewStore(tmp_path / "review", open_now=False)
    sink = ReviewSink(store, audit_rate=0.0, on_event=lambda kind, detail: events.append((kind, detail)))
    sink.inspection(record(1, "manual_required"), Evidence.of(part_image(1)))
    assert sink.flush(10)
    # the CLI is another process with its own connection
    cli = ReviewStore(tmp_path / "review")
    cli.record_label("insp-0001", "fail", labeller="ana", defect_type="crack", source="cli")
    cli.close()
    assert events_of("label_recorded", events) == []
    sink.summary()  # a heartbeat
    sink.summary()
    [announced] = events_of("label_recorded", events)
    assert announced["inspection_id"] == "insp-0001" and announced["part_id"] == "P-1"
    assert announced["verdict"] == "fail" and announced["ai_verdict"] == "manual_required"
    assert announced["source"] == "cli" and announced["labeller"] == "ana" and announced["defect_type"] == "crack"
    # a label given to the station itself is announced at once; a restarted station does not repeat any
    sink.record_label("insp-0001", "pass", labeller="bo", source="http")
    assert [d["verdict"] for d in events_of("label_recorded", events)] == ["fail", "pass"]
    store.close()
    later: list[tuple[str, dict]] = []
    again = ReviewSink(ReviewStore(tmp_path / "review", open_now=False), on_event=lambda k, d: later.append((k, d)))
    again.summary()
    assert later == []
    again.close()


def test_pictures_no_row_names_are_removed_at_the_first_write(tmp_path: Path):
    store = ReviewStore(tmp_path / "review", open_now=False)
    store.write_many([item(1)])
    day = (store.folder / str(store.items()[0].image_file)).parent
    (day / "orphan.png").write_bytes(b"left by a crash")
    (day / "insp-0009.png.tmp").write_bytes(b"half written")
    store.close()
    again = ReviewStore(tmp_path / "review", open_now=False)
    again.write_many([item(2)])
    assert sorted(p.name for p in day.iterdir()) == ["insp-0001.png", "insp-0002.png"]
    again.close()


def test_a_review_folder_that_cannot_be_opened_is_a_storage_fault_and_recovers(tmp_path: Path):
    data = tmp_path / "var"
    data.mkdir()
    (data / "review").write_text("a file where the review folder should be")
    events: list[tuple[str, dict]] = []
    store = ReviewStore(data / "review", open_now=False)
    assert store.open_error is not None
    sink = ReviewSink(store, audit_rate=0.0, max_pending=2, on_event=lambda k, d: events.append((k, d)))
    assert sink.writer.faulted  # from the start, before any write
    for i in range(4):
        sink.inspection(record(i, "manual_required"), Evidence.of(part_image(i)))
    assert wait_until(lambda: events_of("storage_fault", events), 10)
    assert events_of("storage_fault", events)[0]["store"] == "review" and sink.writer.refused == 2
    summary = sink.summary()
    assert summary["refused"] == 2 and summary["pending"] == 2 and "error" in summary
    (data / "review").unlink()
    assert wait_until(lambda: events_of("storage_recovered", events), 20)
    assert sink.flush(10)
    assert [i.inspection_id for i in store.items()] == ["insp-0000", "insp-0001"]
    store.close()


# --- a running station ------------------------------------------------------------------------------------------


def _run_folder_station(tmp_path: Path, bundle_dir: Path, frames: Path, name: str, **sections) -> tuple:
    settings = station_settings(tmp_path, bundle_dir, source=frames, station_id=name, **sections)
    station = build_station(settings, echo=False)
    station.start()
    assert station.pipeline.join(120)
    mode = station.pipeline.mode
    status = station.storage.status()
    assert station.close(20)
    results = ResultsLog(settings.storage.data_dir / "results.sqlite3")
    records = list(results.inspections())
    results.close()
    store = ReviewStore(settings.storage.data_dir / "review")
    queued = store.items()
    store.close()
    return records, queued, store.folder, mode, status


def test_a_running_station_queues_exactly_the_manual_shadow_and_sampled_parts(tmp_path: Path, bundle_dir: Path):
    frames = write_frames(tmp_path / "frames", 24, bad=5)
    # In shadow mode every part is queued (the undecodable frame has no picture: it is not) ...
    records, queued, folder, mode, _ = _run_folder_station(tmp_path, bundle_dir, frames, "st-shadow",
                                                           decision={"mode": "shadow"})
    assert mode is Mode.SHADOW and len(records) == 24
    assert {q.inspection_id for q in queued} == {r.inspection_id for r in records if r.verdict != "error"}
    assert {q.queue_reason for q in queued} == {"shadow"}
    for q in queued:  # each picture is the frame the part was decided on, bit for bit
        assert np.array_equal(cv2.imread(str(folder / str(q.image_file))), cv2.imread(str(frames / q.source_name)))
    # ... and the scores the model gave tell where to put a band with parts on both sides and inside it.
    scores = sorted({r.score for r in records if r.score is not None})
    assert len(scores) >= 10, scores
    low, threshold, high = ((scores[3] + scores[4]) / 2, (scores[5] + scores[6]) / 2, (scores[7] + scores[8]) / 2)
    records, queued, _, mode, status = _run_folder_station(
        tmp_path, bundle_dir, frames, "st-prod", decision={"threshold": threshold, "band_low": low, "band_high": high},
        review={"audit_rate": 0.5, "audit_seed": 11})
    assert mode is Mode.PRODUCTION and status["failsafe"] is False
    manual = {r.inspection_id for r in records if r.verdict == "manual_required"}
    confident = [r for r in records if r.verdict in ("pass", "fail")]
    audited = {r.inspection_id for r in confident if audit_selected(r.inspection_id, 0.5, 11)}
    assert len(manual) == 4 and audited and len(audited) < len(confident)
    assert {q.inspection_id: q.queue_reason for q in queued} == {
        **{i: "manual_required" for i in manual}, **{i: "audit" for i in audited}}


# --- storage faults of the review folder under a running station -------------------------------------------------


@pytest.fixture
def review_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs mounted where the station's review folder goes (data dir tmp_path/var)."""
    with tmpfs_at(tmp_path / "var" / "review", "4m") as mount_point:
        yield mount_point


@needs_mount
@pytest.mark.parametrize("fault", ["read_only", "full"])
def test_a_read_only_or_full_review_folder_loses_no_record_and_never_stops_production(
        tmp_path: Path, bundle_dir: Path, review_tmpfs: Path, fault: str):
    settings = station_settings(tmp_path, bundle_dir, data_dir=tmp_path / "var", decision={"mode": "shadow"},
                                review={"pending_max": 3})
    filler = None
    if fault == "read_only":
        subprocess.run(["mount", "-o", "remount,ro", str(review_tmpfs)], check=True)
    else:
        filler = fill(review_tmpfs)
    station = build_station(settings, echo=False)
    station.start()
    try:
        assert station.review is not None
        for i in range(10):
            station.pipeline.trigger(f"F-{i}")
        assert wait_until(lambda: station.pipeline.status().inspections == 10, 60)
        assert wait_until(lambda: station.review.writer.refused == 7, 10), station.review.writer.refused
        # Faulted and reported, but not fail-safe: the parts are in the results log; the station stays in its mode
        status = station.storage.status()
        assert [f["store"] for f in status["faults"]] == ["review"]
        assert status["failsafe"] is False and status["unrecorded"] == 0 and station.pipeline.mode is Mode.SHADOW
        assert station.storage.error() is not None and "review" in station.storage.error()
        # The folder takes writes again: what the backlog held is written, in order
        if fault == "read_only":
            subprocess.run(["mount", "-o", "remount,rw", str(review_tmpfs)], check=True)
        else:
            assert filler is not None
            filler.unlink()
        assert wait_until(lambda: station.review.writer.pending == 0 and not station.review.writer.faulted, 30)
        station.pipeline.trigger("AFTER")
        assert wait_until(lambda: station.pipeline.status().inspections == 11, 30)
        assert station.review.flush(10)
    finally:
        station.pipeline.stop()
        assert station.pipeline.join(30)
        assert station.close(10)
    results = ResultsLog(settings.storage.data_dir / "results.sqlite3")
    logged = [r.part_id for r in results.inspections()]
    kinds = [(kind, d.get("store")) for _, kind, d in results.events()]
    results.close()
    assert logged == [f"F-{i}" for i in range(10)] + ["AFTER"]
    assert ("storage_fault", "review") in kinds and ("storage_recovered", "review") in kinds
    assert ("manual_fallback", None) not in kinds
    store = ReviewStore(review_tmpfs)
    assert [i.part_id for i in store.items()] == ["F-0", "F-1", "F-2", "AFTER"]
    store.close()
    assert (review_tmpfs / DB_NAME).is_file()
