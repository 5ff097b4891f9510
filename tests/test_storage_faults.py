"""Storage faults under a running station: nothing decided is lost, nothing stalls, the real error is reported.

Real faults where the machine can make them: a second process holding SQLite's write lock, a small tmpfs
filled to the last byte, a read-only mount (both need root to mount; skipped with the reason otherwise),
files deleted or overwritten under the station. An I/O error cannot be made on demand here, so that one is
injected into the store's write.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.reporting.outbox import NewMessage, Outbox
from appliance.reporting.recorder import StoreWriter
from appliance.reporting.results_log import LoggedEvent, ResultsLog
from appliance.station.inspection import InspectionRecord
from bundle.decision import Mode
from tests.support.disks import fill, needs_mount, tmpfs_at
from tests.support.mqtt import Subscriber, needs_mosquitto, start_station, stop_station, trigger_parts
from tests.support.settings import station_settings
from tests.support.waiting import wait_until
from tools.broker import MosquittoBroker


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs of our own (a disk that can be filled to the last byte, or made read-only). Not smaller:
    SQLite's WAL files grow to about 4 MB each before a checkpoint, and stay that size."""
    with tmpfs_at(tmp_path / "disk", "32m") as mount_point:
        yield mount_point


class Locker:
    """A second process holding SQLite's write lock on a database (what a backup or a careless reader does)."""

    def __init__(self, db: Path, seconds: float) -> None:
        code = ("import sqlite3, sys, time\n"
                f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('locked', flush=True)\n"
                f"time.sleep({seconds})\n"
                "db.execute('COMMIT')\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    @property
    def holding(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> None:
        self.proc.wait(30)


def _logged_parts(db: Path) -> list[str] | None:
    """The part ids in a results log, in order; None while it cannot be read (locked, corrupt, missing)."""
    try:
        log = ResultsLog(db)
    except sqlite3.Error:
        return None
    try:
        return [r.part_id for r in log.inspections()]
    finally:
        log.close()


def _logged_events(db: Path) -> list[tuple[str, dict]]:
    log = ResultsLog(db)
    try:
        return [(kind, detail) for _, kind, detail in log.events()]
    finally:
        log.close()


def _parts_received(sub: Subscriber) -> list[str]:
    return [m.payload["part_id"] for m in sub.of("result")]


def _events(sub: Subscriber, kind: str) -> list[dict]:
    return [m.payload["detail"] for m in sub.of("event") if m.payload["kind"] == kind]


# --- a locked results log -----------------------------------------------------------------------------------------


@needs_mosquitto
def test_a_locked_results_log_loses_no_part_stalls_nothing_and_is_reported(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port)
    db = settings.storage.data_dir / "results.sqlite3"
    station = start_station(settings)
    try:
        trigger_parts(station, ["A-0", "A-1", "A-2"])
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 3)
        locker = Locker(db, seconds=8)
        b_parts = [f"B-{i}" for i in range(10)]
        trigger_parts(station, b_parts, pause=0.05)
        # The outbox is another file: every result reaches the control room while the log is still locked.
        # (Before the fix the decide thread waited 5 s per part on the lock, and the parts were lost.)
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 13, 6)
        assert locker.holding, "the results had to arrive while the lock was held"
        # The fault is an event, and every heartbeat names it with the real error while it lasts.
        assert control_room.wait_for(lambda: _events(control_room, "storage_fault"), 10)
        fault = _events(control_room, "storage_fault")[0]
        assert fault["store"] == "results_log" and "database is locked" in fault["error"]

        def faulted_beat() -> dict | None:
            for m in reversed(control_room.of("health")):
                if not m.payload["storage"]["ok"]:
                    return m.payload
            return None

        assert control_room.wait_for(lambda: faulted_beat() is not None, 10)
        beat = faulted_beat()
        assert beat is not None
        assert beat["storage"]["faults"][0]["store"] == "results_log"
        assert "database is locked" in beat["storage"]["faults"][0]["error"]
        assert beat["storage"]["pending"]["results_log"] > 0 and beat["storage"]["faults"][0]["since_ms"] > 0
        assert "database is locked" in beat["last_error"]
        assert station.pipeline.mode is Mode.PRODUCTION  # far below storage.pending_max: no fail-safe
        locker.wait()
        # After the lock: every part in the log, in decision order, and the recovery reported.
        assert wait_until(lambda: _logged_parts(db) == ["A-0", "A-1", "A-2", *b_parts], 20), _logged_parts(db)
        assert control_room.wait_for(lambda: _events(control_room, "storage_recovered"), 10)
        assert control_room.wait_for(lambda: control_room.of("health")[-1].payload["storage"]["ok"], 10)
    finally:
        stop_station(station)
    kinds = [kind for kind, _ in _logged_events(db)]
    assert "storage_fault" in kinds and "storage_recovered" in kinds  # recorded once the log took writes


@needs_mosquitto
def test_a_full_backlog_turns_the_station_fail_safe_until_storage_recovers(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port, storage={"pending_max": 10})
    db = settings.storage.data_dir / "results.sqlite3"
    station = start_station(settings)
    try:
        trigger_parts(station, ["W-0"])
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 1)
        locker = Locker(db, seconds=12)
        trigger_parts(station, [f"L-{i}" for i in range(16)], pause=0.05)
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 17, 10)
        assert locker.holding
        results = {m.payload["part_id"]: m.payload for m in control_room.of("result")}
        # Ten records fill the backlog (storage.pending_max), then every part goes to a person, saying why.
        manual = [p for p in (f"L-{i}" for i in range(16)) if results[p]["mode"] == "manual_fallback"]
        assert manual and "storage.pending_max" in results[manual[0]]["reason"]
        assert all(results[p]["verdict"] == "manual_required" for p in manual)
        assert station.pipeline.mode is Mode.MANUAL_FALLBACK
        assert control_room.wait_for(lambda: _events(control_room, "manual_fallback"), 5)
        entered = _events(control_room, "manual_fallback")
        assert entered[0]["cause"] == "storage" and "results_log" in entered[0]["reason"]
        assert control_room.wait_for(
            lambda: control_room.of("health")[-1].payload["storage"]["unrecorded"] >= 1, 5)
        locker.wait()
        # Back to its configured mode by itself once the log takes writes again.
        assert wait_until(lambda: station.pipeline.mode is Mode.PRODUCTION, 20)
        assert control_room.wait_for(lambda: _events(control_room, "fallback_ended"), 10)
        trigger_parts(station, ["AFTER-0"])
        assert control_room.wait_for(lambda: "AFTER-0" in results_of(control_room), 10)
        assert results_of(control_room)["AFTER-0"]["mode"] == "production"
    finally:
        stop_station(station)
    logged = _logged_parts(db)
    # What the backlog held is in the log, in decision order; what it could not hold went to a person and is
    # named in the process log (and reached the control room through the outbox).
    order = ["W-0", *(f"L-{i}" for i in range(16)), "AFTER-0"]
    assert logged == [p for p in order if p in set(logged)]
    assert logged[:2] == ["W-0", "L-0"] and logged[-1] == "AFTER-0" and len(logged) < len(order)


def results_of(sub: Subscriber) -> dict[str, dict]:
    return {m.payload["part_id"]: m.payload for m in sub.of("result")}


# --- a full disk ------------------------------------------------------------------------------------------------------


@needs_mosquitto
@needs_mount
def test_a_full_disk_loses_no_part_keeps_the_link_alive_and_heartbeats_going(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber, tmpfs: Path):
    settings = station_settings(tmp_path, bundle_dir, broker.port, data_dir=tmpfs / "var")
    station = start_station(settings)
    try:
        trigger_parts(station, [f"P-{i}" for i in range(5)])
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 5)
        filler = fill(tmpfs)
        full_since = time.monotonic()
        trigger_parts(station, [f"Q-{i}" for i in range(30)], pause=0.05)
        assert control_room.wait_for(lambda: _events(control_room, "storage_fault"), 15)
        # Heartbeats keep coming while nothing can be written, and say why, with SQLite's own words.
        assert control_room.wait_for(lambda: sum(
            1 for m in control_room.of("health")
            if m.at > full_since and not m.payload["storage"]["ok"]) >= 3, 15)
        beat = [m.payload for m in control_room.of("health") if not m.payload["storage"]["ok"]][-1]
        assert "full" in beat["last_error"] and "rollback" not in beat["last_error"]
        # (the review queue's pictures, on the same disk, fail in the OS's words: "No space left on device")
        assert all("full" in f["error"] for f in beat["storage"]["faults"] if f["store"] != "review")
        # Not a wait for the station: the disk stays full a while longer (as in the field report) while parts keep
        # coming; the heartbeats above already proved the station noticed.
        time.sleep(1.0)
        filler.unlink()
        expected = [f"P-{i}" for i in range(5)] + [f"Q-{i}" for i in range(30)]
        assert control_room.wait_for(lambda: set(_parts_received(control_room)) == set(expected), 30), (
            sorted(set(expected) - set(_parts_received(control_room))))
        assert wait_until(lambda: station.outbox.depth() == 0, 20)
        assert station.link.failure is None and station.failures.failure is None
        assert station.link.state().connected
        assert control_room.wait_for(lambda: control_room.of("health")[-1].payload["storage"]["ok"], 10)
        heartbeats = [m.payload for m in control_room.of("health")]
        assert not any("cannot rollback" in (h["last_error"] or "") for h in heartbeats)
    finally:
        stop_station(station)
    assert _logged_parts(tmpfs / "var" / "results.sqlite3") == expected


# --- a read-only file system ----------------------------------------------------------------------------------------


@needs_mosquitto
@needs_mount
def test_a_read_only_file_system_at_start_holds_parts_until_it_is_writable(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber, tmpfs: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    settings = station_settings(tmp_path, bundle_dir, broker.port, data_dir=tmpfs / "var")
    station = start_station(settings)  # starts: the stores are faults to ride out, not a reason to refuse
    try:
        trigger_parts(station, [f"R-{i}" for i in range(5)])
        assert control_room.wait_for(lambda: len(_events(control_room, "storage_fault")) >= 2, 15)
        stores = {e["store"] for e in _events(control_room, "storage_fault")}
        # (the review queue's store says so too once it has a part to keep: one the sample chose)
        assert {"results_log", "outbox"} <= stores <= {"results_log", "outbox", "review"}
        assert all("Read-only file system" in e["error"] for e in _events(control_room, "storage_fault"))
        assert not _parts_received(control_room)  # a result is published only from the outbox
        # From the very first heartbeat: the stores could not even be opened, and it says so.
        assert control_room.wait_for(lambda: control_room.of("health"), 10), [m.kind for m in control_room.messages]
        first = control_room.of("health")[0].payload["storage"]
        assert not first["ok"] and {f["store"] for f in first["faults"]} == {"results_log", "outbox", "review"}
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
        assert control_room.wait_for(lambda: _parts_received(control_room) == [f"R-{i}" for i in range(5)], 30)
    finally:
        stop_station(station)
    assert _logged_parts(tmpfs / "var" / "results.sqlite3") == [f"R-{i}" for i in range(5)]


# --- files deleted or overwritten under the station -----------------------------------------------------------------


@needs_mosquitto
def test_store_files_deleted_under_the_running_station_are_rebuilt_with_everything(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port)
    data = settings.storage.data_dir
    station = start_station(settings)
    try:
        trigger_parts(station, [f"D-{i}" for i in range(4)])
        assert control_room.wait_for(lambda: len(_parts_received(control_room)) == 4)
        broker.stop()  # so the outbox holds unsent messages when it is deleted
        trigger_parts(station, [f"E-{i}" for i in range(3)])
        assert wait_until(lambda: len(_logged_parts(data / "results.sqlite3")) == 7, 10)
        for f in data.iterdir():  # `rm var/*`: the database files and their -wal / -shm (not the review/ folder)
            if f.is_file():
                f.unlink()
        trigger_parts(station, [f"F-{i}" for i in range(3)])
        broker.start()
        expected = [f"D-{i}" for i in range(4)] + [f"E-{i}" for i in range(3)] + [f"F-{i}" for i in range(3)]
        assert control_room.wait_for(lambda: set(_parts_received(control_room)) == set(expected), 30)
        assert wait_until(lambda: _logged_parts(data / "results.sqlite3") == expected, 10)
        repaired = _events(control_room, "storage_repaired")
        assert {r["store"] for r in repaired} == {"results_log", "outbox"}
        assert all("deleted" in r["message"] for r in repaired)
    finally:
        stop_station(station)


@needs_mosquitto
def test_a_store_overwritten_under_the_station_is_moved_aside_and_recording_goes_on(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port)
    db = settings.storage.data_dir / "results.sqlite3"
    station = start_station(settings)
    kept: list[int] = []
    try:
        trigger_parts(station, ["C-0", "C-1"])
        assert wait_until(lambda: len(_logged_parts(db) or []) == 2, 10)
        # The same files, their content destroyed (descriptors kept open until the end: closing one would drop
        # the station's own SQLite locks on them, a different fault).
        for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            fd = os.open(name, os.O_RDWR)
            kept.append(fd)
            os.pwrite(fd, os.urandom(max(os.fstat(fd).st_size, 4096)), 0)
        trigger_parts(station, ["C-2", "C-3"])
        assert control_room.wait_for(lambda: _events(control_room, "storage_repaired"), 15)
        note = _events(control_room, "storage_repaired")[0]
        assert note["kind"] == "corrupt_file_moved_aside" and Path(note["moved_to"]).exists()
        assert wait_until(lambda: _logged_parts(db) == ["C-2", "C-3"], 10)
        assert control_room.wait_for(lambda: set(_parts_received(control_room)) == {"C-0", "C-1", "C-2", "C-3"})
    finally:
        stop_station(station)
        for fd in kept:
            os.close(fd)


def test_a_corrupt_results_log_at_start_is_moved_aside_and_the_station_starts(tmp_path: Path, bundle_dir: Path):
    from appliance.runtime import build_pipeline

    settings = station_settings(tmp_path, bundle_dir)  # MQTT off
    data = settings.storage.data_dir
    data.mkdir(parents=True)
    (data / "results.sqlite3").write_bytes(b"this is not a database" * 100)
    pipeline, results = build_pipeline(settings)
    try:
        pipeline.start()
        pipeline.trigger("S-1")
        assert wait_until(lambda: [r.part_id for r in results.inspections()] == ["S-1"], 20)
    finally:
        pipeline.stop()
        pipeline.join(30)
    aside = [p for p in data.iterdir() if ".corrupt-" in p.name]
    assert aside and aside[0].read_bytes().startswith(b"this is not a database")
    assert any(kind == "storage_repaired" for _, kind, _ in results.events())


# --- an I/O error (injected: the one fault the machine cannot make on demand) ------------------------------------


def _record(i: int) -> InspectionRecord:
    return InspectionRecord(inspection_id=f"insp-{i}", part_id=f"IO-{i}", station_id="st", source_name="",
                            frame_index=i, captured_at=1.0, decided_at=2.0, verdict="pass", ai_verdict="pass",
                            score=0.1, mode="production", backend="onnxruntime", model_id="m", reason="ok")


def test_an_io_error_keeps_records_in_order_and_reports_the_original_error(tmp_path: Path):
    log = ResultsLog(tmp_path / "results.sqlite3")
    failures = {"left": 3}
    real_write = log.write_many

    def flaky(items: list) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real_write(items)

    events: list[tuple[str, dict]] = []
    writer: StoreWriter[InspectionRecord | LoggedEvent] = StoreWriter(
        "results_log", log.path, flaky, on_event=lambda k, d: events.append((k, d)), retry_initial_s=0.05)
    for i in range(20):
        assert writer.submit(_record(i))
    assert writer.close(10)
    assert [r.part_id for r in log.inspections()] == [f"IO-{i}" for i in range(20)]
    assert [k for k, _ in events] == ["storage_fault", "storage_recovered"]
    assert events[0][1]["error"] == "OperationalError: disk I/O error"  # the store's own words, not a later error
    log.close()


def test_a_full_writer_refuses_and_counts_without_blocking(tmp_path: Path):
    blocked = {"on": True}

    def never(items: list) -> None:
        if blocked["on"]:
            raise sqlite3.OperationalError("database is locked")

    writer: StoreWriter[int] = StoreWriter("results_log", tmp_path / "x", never, max_pending=10, retry_initial_s=0.05)
    t0 = time.monotonic()
    accepted = [writer.submit(i) for i in range(15)]
    assert time.monotonic() - t0 < 0.5  # submit never waits on the store
    assert accepted == [True] * 10 + [False] * 5 and writer.refused == 5 and writer.saturated
    blocked["on"] = False
    assert wait_until(lambda: writer.pending == 0 and not writer.saturated, 5)
    assert writer.close(1)


# --- the outbox's own bookkeeping under faults ----------------------------------------------------------------------


@needs_mount
def test_outbox_on_a_full_disk_raises_the_real_error_and_keeps_its_counts(tmpfs: Path):
    outbox = Outbox(tmpfs / "outbox.sqlite3")
    ids = outbox.put_many([NewMessage("t/result", json.dumps({"n": i}), 1, "result") for i in range(5)])
    outbox.mark_in_flight(ids[:3])
    filler = fill(tmpfs)
    with pytest.raises(sqlite3.OperationalError) as err:
        for i in range(200):  # until a write needs a page the disk does not have
            outbox.put("t/result", json.dumps({"blob": "x" * 4000, "i": i}), 1, "result")
    assert "full" in str(err.value) and "rollback" not in str(err.value)
    depth = outbox.depth()
    # An acknowledgement whose DELETE fails is remembered: not pending, not counted, deleted later.
    try:
        outbox.ack_many(ids[:3])
    except sqlite3.OperationalError as exc:
        assert "full" in str(exc)
    assert outbox.depth() == depth - 3 and outbox.depth() >= 0
    assert not {m.id for m in outbox.pending(1000)} & set(ids[:3])
    filler.unlink()
    outbox.ack_many([])  # the next call retries the remembered DELETE
    assert outbox.depth() == depth - 3
    stored = {m.id for m in outbox.pending(1000)}
    assert not stored & set(ids[:3]) and set(ids[3:]) <= stored
    outbox.close()
    again = Outbox(tmpfs / "outbox.sqlite3")
    assert again.depth() == depth - 3  # the table agrees with the count kept in memory
    again.close()


def test_next_counter_never_goes_backwards_when_the_file_cannot_be_written(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert [outbox.next_counter("bd_seq") for _ in range(3)] == [0, 1, 2]
    outbox.close()
    locker = Locker(tmp_path / "outbox.sqlite3", seconds=6)
    reopened = Outbox(tmp_path / "outbox.sqlite3", open_now=False)
    try:
        first = reopened.next_counter("bd_seq")  # locked: from memory or the clock, never a reused number
        assert first > 2
        locker.wait()
        assert reopened.next_counter("bd_seq") == first + 1  # stored again, above what was handed out
    finally:
        reopened.close()


# --- found by trying the station as a plant engineer would -----------------------------------------------------------


@needs_mosquitto
def test_a_store_overwritten_in_place_by_another_database_is_moved_aside_and_recording_goes_on(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    # `cp backup.sqlite3 results.sqlite3` keeps the inode: the station's handle sees its tables vanish.
    other = tmp_path / "other.sqlite3"
    db_other = sqlite3.connect(other)
    db_other.execute("CREATE TABLE x (y)")
    db_other.commit()
    db_other.close()
    settings = station_settings(tmp_path, bundle_dir, broker.port)
    db = settings.storage.data_dir / "results.sqlite3"
    station = start_station(settings)
    try:
        trigger_parts(station, ["K-0", "K-1"])
        assert wait_until(lambda: _logged_parts(db) == ["K-0", "K-1"], 10)
        # another process checkpoints (as a backup tool does), then copies a different database over the file
        subprocess.run([sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(db)!r}).execute("
                        "'PRAGMA wal_checkpoint(TRUNCATE)')"], check=True)
        subprocess.run(["cp", str(other), str(db)], check=True)
        trigger_parts(station, ["K-2", "K-3"])
        assert control_room.wait_for(lambda: any(
            e["kind"] == "replaced_file_moved_aside" for e in _events(control_room, "storage_repaired")), 20)
        note = next(e for e in _events(control_room, "storage_repaired") if e["kind"] == "replaced_file_moved_aside")
        assert note["store"] == "results_log" and Path(note["moved_to"]).exists()
        assert wait_until(lambda: _logged_parts(db) == ["K-2", "K-3"], 10)  # K-0, K-1 went with the overwrite
        assert control_room.wait_for(lambda: set(_parts_received(control_room)) >= {"K-0", "K-1", "K-2", "K-3"})
        assert wait_until(lambda: station.storage.status()["ok"], 10)
    finally:
        stop_station(station)


def test_another_database_at_the_store_path_at_start_is_moved_aside_not_written_into(tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    foreign = sqlite3.connect(path)
    foreign.execute("CREATE TABLE parts (serial TEXT)")
    foreign.execute("INSERT INTO parts VALUES ('SN-1')")
    foreign.commit()
    foreign.close()
    with pytest.raises(sqlite3.DatabaseError, match="not a MQTT outbox"):
        Outbox(path)  # a tool reading it is told, and changes nothing
    outbox = Outbox(path, open_now=False)  # the station moves it aside and starts its own
    try:
        assert outbox.put("t/result", "{}", 1, "result") >= 1
        note = outbox.take_notes()[0]
        assert note["kind"] == "replaced_file_moved_aside"
        kept = sqlite3.connect(note["moved_to"])
        assert kept.execute("SELECT serial FROM parts").fetchall() == [("SN-1",)]
        kept.close()
    finally:
        outbox.close()


def test_a_counter_handed_out_while_the_store_was_closed_is_stored_once_it_opens(tmp_path: Path):
    blocker = tmp_path / "var"
    blocker.write_text("a file where the data folder should be")  # the store cannot be created
    outbox = Outbox(blocker / "outbox.sqlite3", open_now=False)
    assert outbox.open_error is not None
    first = outbox.next_counter("bd_seq")  # from the clock: larger than any stored count
    assert first > 1_000_000
    blocker.unlink()  # the folder can be made now
    outbox.put("t/result", "{}", 1, "result")  # the next write opens the store ...
    outbox.close()
    again = Outbox(blocker / "outbox.sqlite3")
    try:
        assert again.next_counter("bd_seq") == first + 1  # ... and stored the counter: it never goes back
    finally:
        again.close()


@needs_mosquitto
def test_a_stop_during_a_storage_fault_ends_within_the_drain_budget_and_names_every_unwritten_part(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture):
    import logging
    import signal
    import threading

    from appliance.runtime import run

    settings = station_settings(tmp_path, bundle_dir, broker.port, mqtt={"drain_timeout_s": 3},
                                trigger={"mode": "continuous"}, camera={"source": "synthetic", "loop": True})
    data = settings.storage.data_dir
    data.mkdir(parents=True)
    ResultsLog(data / "results.sqlite3").close()
    Outbox(data / "outbox.sqlite3").close()
    # Both stores locked by another process for longer than the test: nothing can be written.
    lockers = [Locker(data / "results.sqlite3", 120), Locker(data / "outbox.sqlite3", 120)]
    stopped_at: list[float] = []

    before = signal.getsignal(signal.SIGTERM)

    def stop_soon() -> None:
        # Opening the locked stores takes a few busy timeouts: wait until run() listens for SIGTERM.
        assert wait_until(lambda: signal.getsignal(signal.SIGTERM) is not before, 60)
        # Not a wait for a condition: the station runs 3 s with both stores locked, deciding parts it can only
        # hold in memory (no handle on them from here); the test then checks that the stop names every one.
        time.sleep(3.0)
        stopped_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # what systemd sends

    try:
        with caplog.at_level(logging.ERROR, logger="appliance"):
            threading.Thread(target=stop_soon, daemon=True).start()
            code = run(settings, max_seconds=120)
        ended = time.monotonic()
        assert code == 0 and stopped_at
        # The whole stop stays inside mqtt.drain_timeout_s plus a few seconds, far inside systemd's
        # TimeoutStopSec (drain + 30 s), although nothing can be written.
        assert ended - stopped_at[0] < 3 + 10, ended - stopped_at[0]
        # Every part that no store took is in the process log, in full: its last record.
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("UNRECORDED at stop")]
        logged = [json.loads(m.split(": ", 1)[1]) for m in lines if "(results_log)" in m]
        parts = [item["inspection"]["part_id"] for item in logged if "inspection" in item]
        assert parts and all(p.startswith("st-mqtt-r") for p in parts)
    finally:
        signal.signal(signal.SIGTERM, before)
        for locker in lockers:
            locker.proc.kill()
            locker.wait()


def test_a_store_file_renamed_over_is_rebuilt_from_the_open_file_and_the_other_is_kept(
        tmp_path: Path, bundle_dir: Path):
    from appliance.runtime import build_pipeline

    settings = station_settings(tmp_path, bundle_dir)  # MQTT off
    db = settings.storage.data_dir / "results.sqlite3"
    pipeline, results = build_pipeline(settings)
    other = tmp_path / "other.sqlite3"
    made = sqlite3.connect(other)
    made.execute("CREATE TABLE x (y)")
    made.commit()
    made.close()
    try:
        pipeline.start()
        pipeline.trigger("N-0")
        assert wait_until(lambda: [r.part_id for r in results.inspections()] == ["N-0"], 20)
        os.replace(other, db)  # `mv other.sqlite3 results.sqlite3`: a new inode at the station's path
        pipeline.trigger("N-1")
        assert wait_until(lambda: [r.part_id for r in results.inspections()] == ["N-0", "N-1"], 20)
    finally:
        pipeline.stop()
        pipeline.join(30)
    assert _logged_parts(db) == ["N-0", "N-1"]  # rebuilt from the open file: nothing committed was lost
    kept = [p for p in db.parent.iterdir() if ".replaced-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1
    check = sqlite3.connect(kept[0])
    assert check.execute("SELECT name FROM sqlite_master").fetchall() == [("x",)]
    check.close()
    assert any(kind == "storage_repaired" and "replaced by another file" in detail["message"]
               for _, kind, detail in results.events())


def test_deleting_only_the_main_file_does_not_let_its_old_wal_into_the_rebuilt_one(tmp_path: Path):
    log = ResultsLog(tmp_path / "results.sqlite3", open_now=False)
    try:
        log.write_many([_record(0)])
        (tmp_path / "results.sqlite3").unlink()  # `rm results.sqlite3`: the -wal and -shm stay
        log.write_many([_record(1)])
        assert [r.part_id for r in log.inspections()] == ["IO-0", "IO-1"]
    finally:
        log.close()
    again = ResultsLog(tmp_path / "results.sqlite3")
    try:
        assert [r.part_id for r in again.inspections()] == ["IO-0", "IO-1"]
    finally:
        again.close()
