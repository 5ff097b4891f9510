"""Sinks and the fan-out: every finished inspection and event reaches every sink, a failing sink is isolated,
counted and reported; the station's typed status; the backend registry from which settings and operating
points derive."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from appliance.inference.registry import AUTO, BACKENDS, CHOICES, BackendEntry, primary_backend, runs_on_gpu
from appliance.reporting.fanout import FanOut
from appliance.runtime import build_station, operating_points, supervisor_factory
from appliance.settings import InferenceSection
from appliance.station.inspection import Evidence, InspectionRecord
from appliance.station.sink import Sink
from bundle.format import load_bundle
from tests.support.frames import write_frames
from tests.support.settings import station_settings


def record(n: int, verdict: str = "pass") -> InspectionRecord:
    return InspectionRecord(
        inspection_id=f"i{n}", part_id=f"p{n}", station_id="st", source_name="", frame_index=n, captured_at=0.0,
        decided_at=0.0, verdict=verdict, ai_verdict=verdict, score=0.1, mode="production", backend="onnxruntime",
        model_id="m", reason="")


class Collecting:
    """A sink that keeps what it gets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parts: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.evidence: list[Evidence] = []

    def inspection(self, record: InspectionRecord, evidence: Evidence) -> None:
        self.parts.append(record.part_id)
        self.evidence.append(evidence)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.events.append((kind, detail))

    def flush(self, timeout: float) -> bool:
        return True


class Broken(Collecting):
    """A sink whose every call raises (a review queue on a dead disk, a PLC gone)."""

    def inspection(self, record: InspectionRecord, evidence: Evidence) -> None:
        raise OSError(f"cannot store part {record.part_id}")

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        raise OSError("cannot store event")

    def flush(self, timeout: float) -> bool:
        raise OSError("cannot flush")


def test_every_sink_gets_every_record_in_order_and_a_broken_one_is_isolated(caplog: pytest.LogCaptureFixture):
    first, broken, last = Collecting("first"), Broken("broken"), Collecting("last")
    fanout = FanOut([first, broken, last], report_every_s=3600)
    assert isinstance(fanout, Sink) and all(isinstance(s, Sink) for s in fanout.sinks)
    with caplog.at_level(logging.ERROR, logger="appliance.reporting.fanout"):
        for n in range(5):
            fanout.inspection(record(n))
    # the sinks before and after the broken one got everything, in order
    assert first.parts == last.parts == [f"p{n}" for n in range(5)]
    # five errors counted, but reported (log and event) only once within report_every_s
    assert fanout.errors() == {"first": 0, "broken": 5, "last": 0}
    assert len([r for r in caplog.records if "sink broken failed" in r.getMessage()]) == 1
    failed = [d for k, d in last.events if k == "sink_failed"]
    assert failed == [d for k, d in first.events if k == "sink_failed"]
    assert len(failed) == 1 and failed[0]["sink"] == "broken" and failed[0]["call"] == "inspection"
    assert "cannot store part p0" in failed[0]["error"] and failed[0]["errors"] == 1


def test_a_sink_failing_again_after_the_interval_is_reported_with_the_count_since():
    other, broken = Collecting("other"), Broken("broken")
    fanout = FanOut([broken, other], report_every_s=0.0)  # every failure is due
    fanout.inspection(record(1))
    fanout.inspection(record(2))
    reports = [d for k, d in other.events if k == "sink_failed"]
    assert [(d["errors"], d["errors_since_last_report"]) for d in reports] == [(1, 1), (2, 1)]


def test_two_broken_sinks_do_not_report_each_other_forever():
    a, b, ok = Broken("a"), Broken("b"), Collecting("ok")
    fanout = FanOut([a, b, ok], report_every_s=0.0)
    fanout.event("mode_changed", {"from": "production", "to": "shadow"})
    # each failed on the event; each report reached `ok`; a report failing in the other sink is only counted
    assert ok.events[0][0] == "mode_changed"
    assert {d["sink"] for k, d in ok.events if k == "sink_failed"} == {"a", "b"}
    assert fanout.errors()["a"] >= 1 and fanout.errors()["b"] >= 1


def test_flush_is_false_when_a_sink_cannot_flush_and_the_others_still_flush():
    ok = Collecting("ok")
    assert FanOut([ok]).flush(1.0) is True
    assert FanOut([Broken("broken"), ok]).flush(1.0) is False


def test_two_sinks_of_one_name_are_refused():
    with pytest.raises(ValueError, match="already in the fan-out"):
        FanOut([Collecting("mqtt"), Collecting("mqtt")])


def test_a_station_with_a_broken_extra_sink_still_records_every_part(tmp_path: Path, bundle_dir: Path):
    # Given a station with one more sink that fails on every call (as a review queue on a dead disk would)
    frames = write_frames(tmp_path / "frames", 6)
    broken, watcher = Broken("review"), Collecting("watcher")
    # (the station's own review queue off: the broken sink stands in for it, under its name)
    station = build_station(station_settings(tmp_path, bundle_dir, source=frames, review={"enabled": False}),
                            sinks=[broken, watcher], echo=False)
    # When it inspects the folder
    station.start()
    assert station.pipeline.join(60)
    status = station.pipeline.status()
    assert station.close(5)
    # Then every part is in the results log and reached the sink after the broken one
    assert sum(station.results.counts().values()) == 6 == status.inspections
    assert len(watcher.parts) == 6
    # each sink got the frame the part was decided on, read-only (a sink cannot change what others see)
    assert all(e.image is not None and e.image.ndim in (2, 3) and not e.image.flags.writeable
               for e in watcher.evidence)
    # and the failure is counted per sink and reported once, as an event in the results log too
    errors = station.sinks.errors()
    assert errors["review"] >= 6 and errors["results_log"] == errors["watcher"] == errors["storage_watch"] == 0
    logged = [d for _, kind, d in station.results.events() if kind == "sink_failed"]
    assert len(logged) == 1 and logged[0]["sink"] == "review"


def test_the_status_snapshot_says_what_the_station_is_doing(tmp_path: Path, bundle_dir: Path):
    frames = write_frames(tmp_path / "frames", 4, bad=2)
    station = build_station(station_settings(tmp_path, bundle_dir, source=frames, decision={"mode": "shadow"}),
                            echo=False)
    before = station.pipeline.status()
    assert before.inspections == 0 and before.backend == "none" and not before.backend_ready
    station.start()
    assert station.pipeline.join(60)
    status = station.pipeline.status()
    station.close(5)
    assert (status.mode, status.configured_mode, status.fallback_reason) == ("shadow", "shadow", "")
    assert status.backend == "onnxruntime" and status.model_id == load_bundle(bundle_dir).model_id
    assert status.backend_ready and status.inspections == 4 and status.verdicts.get("error") == 1
    assert status.camera.kind == "images" and status.camera.frames_delivered == 4 and not status.camera_live
    assert status.queues == {"preprocess": 0, "infer": 0, "decide": 0}
    assert status.latency_p50_ms > 0 and status.failure is None and status.fatal is None


# --- the backend registry ------------------------------------------------------------------------------------------


def test_settings_choices_and_operating_points_derive_from_the_registry(bundle_dir: Path, tmp_path: Path):
    annotation = InferenceSection.model_fields["backend"].annotation
    assert tuple(annotation.__args__) == CHOICES == (AUTO, *BACKENDS)
    settings = station_settings(tmp_path, bundle_dir, inference={"precision": "int8"})
    bundle = load_bundle(bundle_dir)
    ops = operating_points(settings, bundle)
    assert set(ops) == set(BACKENDS)
    for name, entry in BACKENDS.items():  # each backend judged at its own precision's point
        expected = bundle.metadata.decision_for(entry.decision_precision("int8"))
        assert ops[name].threshold == expected.threshold
    assert primary_backend(AUTO).name == "tensorrt" and primary_backend("onnxruntime").name == "onnxruntime"
    assert runs_on_gpu("tensorrt") and not runs_on_gpu("onnxruntime") and not runs_on_gpu("none")


def test_a_registered_backend_is_opened_by_the_supervisor_and_gets_its_operating_point(
        bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Given one more backend registered under the CPU backend's name (settings' choices are fixed at import)
    opened: list[str] = []
    real = BACKENDS["onnxruntime"]

    def open_counting(request):
        opened.append(request.bundle.model_id)
        return real.open(request)

    monkeypatch.setitem(BACKENDS, "onnxruntime", BackendEntry("onnxruntime", open_counting, lambda p: "fp32",
                                                              False, "counting"))
    settings = station_settings(tmp_path, bundle_dir)
    bundle = load_bundle(bundle_dir)
    events: list[str] = []
    supervisor = supervisor_factory(settings, bundle)(lambda kind, detail: events.append(kind))
    supervisor.start()
    try:
        assert opened == [bundle.model_id] and supervisor.backend is not None
        assert supervisor.backend.name == "onnxruntime" and events == [] and not supervisor.primary_gpu
    finally:
        supervisor.close()


def test_a_submitted_image_is_inspected_like_a_camera_frame_and_refused_once_stopping(tmp_path: Path, bundle_dir: Path):
    from appliance.station.pipeline import SubmitRefused
    from tests.support.frames import part_image

    # Given a triggered station (its camera waits for triggers) with one more sink watching
    watcher = Collecting("watcher")
    station = build_station(station_settings(tmp_path, bundle_dir), sinks=[watcher], echo=False)
    station.start()
    try:
        # When two images arrive from outside the camera (uploads)
        ids = [station.pipeline.submit(part_image(n), f"UP-{n}", source_name=f"upload-{n}.png") for n in (0, 1)]
    finally:
        station.pipeline.stop()
        assert station.pipeline.join(30)
    # Then each went through the same stages and sinks, under its own id
    assert watcher.parts == ["UP-0", "UP-1"]
    records = {r.part_id: r for r in station.results.inspections()}
    assert [records[p].inspection_id for p in ("UP-0", "UP-1")] == ids
    assert all(records[p].backend == "onnxruntime" and records[p].score is not None for p in records)
    assert records["UP-1"].source_name == "upload-1.png"
    # and a stopped station takes nothing more, saying why
    with pytest.raises(SubmitRefused, match="stopping") as refused:
        station.pipeline.submit(part_image(2), "UP-2")
    assert refused.value.busy is False
    station.close(5)
