"""Labels over MQTT (`cmd/label`) on a running station with a real Mosquitto: recorded once per message id,
announced as `label_recorded`, an unknown inspection or a malformed label rejected naming the field, the label
summary in every heartbeat; a label given with the command line announced by the station too."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.reporting.results_log import ResultsLog
from appliance.review.queue import ReviewStore
from tests.support.mqtt import Subscriber, prefix, rejections, start_station, stop_station, trigger_parts
from tests.support.settings import station_settings
from tests.support.waiting import wait_until
from tools.broker import MosquittoBroker


def _labels_announced(sub: Subscriber) -> list[dict]:
    return [m.payload["detail"] for m in sub.of("event") if m.payload["kind"] == "label_recorded"]


def test_labels_over_mqtt_are_recorded_once_announced_and_summed_up_in_the_heartbeat(
        tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker, control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port, station_id="st-label",
                                decision={"mode": "shadow"})
    topic = f"{prefix('st-label')}/cmd/label"
    station = start_station(settings)
    try:
        assert station.review is not None
        trigger_parts(station, ["L-0", "L-1", "L-2"])
        assert control_room.wait_for(lambda: len(control_room.of("result")) == 3)
        ids = [m.payload["inspection_id"] for m in control_room.of("result")]
        assert wait_until(lambda: len(station.review.store.items()) == 3, 20)

        def label(inspection_id: str, verdict: str, message_id: str, **extra: str) -> None:
            control_room.publish(topic, json.dumps({"inspection_id": inspection_id, "verdict": verdict,
                                                    "labeller": "ana", "message_id": message_id, **extra}))

        # A label, delivered twice (QoS 1 may): one label, one event
        label(ids[0], "fail", "lab-1", defect_type="crack")
        label(ids[0], "fail", "lab-1", defect_type="crack")
        label(ids[1], "pass", "lab-2")
        assert control_room.wait_for(lambda: len(_labels_announced(control_room)) >= 2)
        first, second = _labels_announced(control_room)[:2]
        assert first["inspection_id"] == ids[0] and first["part_id"] == "L-0" and first["verdict"] == "fail"
        assert first["defect_type"] == "crack" and first["labeller"] == "ana" and first["source"] == "mqtt"
        assert first["message_id"] == "lab-1" and first["ai_verdict"] in ("pass", "fail", "manual_required")
        assert second["inspection_id"] == ids[1] and second["verdict"] == "pass"
        labels = station.review.store.labels()
        assert [(lb.inspection_id, lb.verdict, lb.source) for lb in labels] == [(ids[0], "fail", "mqtt"),
                                                                               (ids[1], "pass", "mqtt")]

        # An inspection the queue does not hold, and a malformed label: rejected, naming the field
        label("insp-not-queued", "fail", "lab-3")
        label(ids[2], "defective", "lab-4")
        assert control_room.wait_for(lambda: len(rejections(control_room)) == 2)
        unknown, malformed = rejections(control_room)
        assert unknown.detail["command"] == "cmd/label" and unknown.detail["field"] == "inspection_id"
        assert "'insp-not-queued'" in unknown.detail["reason"] and unknown.detail["command_message_id"] == "lab-3"
        assert malformed.detail["field"] == "verdict" and "'pass' or 'fail'" in malformed.detail["reason"]
        assert len(station.review.store.labels()) == 2

        # A label given with `appliance review label` (another process) is announced by the station as well
        cli = ReviewStore(settings.storage.data_dir / "review")
        cli.record_label(ids[2], "fail", labeller="bo", source="cli")
        cli.close()
        assert control_room.wait_for(lambda: len(_labels_announced(control_room)) == 3)
        assert _labels_announced(control_room)[2]["source"] == "cli"

        # Every heartbeat carries the label summary
        def summary() -> dict | None:
            beats = control_room.of("health")
            return beats[-1].payload.get("review") if beats else None

        assert control_room.wait_for(lambda: (summary() or {}).get("labelled") == 3, 10), summary()
        review = summary()
        assert review is not None
        assert review["queued"] == 3 and review["unlabelled"] == 0 and review["refused"] == 0
        assert review["evicted_unreviewed"] == 0 and review["bytes"] > 0
        assert sum(review["confusion"].values()) <= 3  # the parts with an AI pass / fail (shadow mode: the AI's)
        assert set(review) >= {"detection_rate", "false_positive_rate", "confusion", "pending"}
    finally:
        stop_station(station)
    # and the labels are events of the station's own record too
    log = ResultsLog(settings.storage.data_dir / "results.sqlite3")
    logged = [d for _, kind, d in log.events() if kind == "label_recorded"]
    log.close()
    assert [(d["inspection_id"], d["source"]) for d in logged] == [(ids[0], "mqtt"), (ids[1], "mqtt"), (ids[2], "cli")]


def test_a_station_without_a_review_queue_rejects_labels(tmp_path: Path, bundle_dir: Path, broker: MosquittoBroker,
                                                         control_room: Subscriber):
    settings = station_settings(tmp_path, bundle_dir, broker.port, station_id="st-nolabel", review={"enabled": False})
    station = start_station(settings)
    try:
        assert station.review is None
        control_room.publish(f"{prefix('st-nolabel')}/cmd/label", json.dumps(
            {"inspection_id": "abc", "verdict": "pass", "labeller": "ana", "message_id": "x-1"}))
        assert control_room.wait_for(lambda: rejections(control_room))
        [rejected] = rejections(control_room)
        assert rejected.detail["command"] == "cmd/label" and "review.enabled = false" in rejected.detail["reason"]
        assert control_room.wait_for(lambda: control_room.of("health"))
        assert control_room.of("health")[-1].payload["review"] is None
    finally:
        stop_station(station)
