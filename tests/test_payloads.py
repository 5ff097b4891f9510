"""MQTT payloads: the wire contract with dashboards, controllers and the plant's historian."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from appliance.payloads import (
    COMMAND_KINDS,
    KINDS,
    PAYLOAD_MODELS,
    AlertPayload,
    BirthPayload,
    CommandError,
    EventPayload,
    HealthPayload,
    ModeCommand,
    RebirthCommand,
    ResultPayload,
    StatusPayload,
    TriggerCommand,
    main,
    parse_command,
    restamp,
    topic,
    write_json_schemas,
)
from appliance.results_log import InspectionRecord

RECORD = InspectionRecord(
    inspection_id="insp-0001", part_id="P-42", station_id="station-01", source_name="synthetic", frame_index=7,
    captured_at=1_700_000_000.1234, decided_at=1_700_000_000.1567, verdict="fail", ai_verdict="fail",
    score=0.93, mode="production", backend="tensorrt", model_id="m-abc", reason="score above threshold",
    latency_ms={"end_to_end_ms": 12.5, "infer_ms": 4.0},
)


def sample_messages() -> list[BaseModel]:
    """One valid instance of every model, with every field given a non-default value where possible."""
    return [
        StatusPayload(station="station-01", state="online", bd_seq=3),
        BirthPayload(station="station-01", software_version="0.1.0", model_id="m-abc", backend="tensorrt",
                     config_hash="ab12", cameras=["cam0"], boot_id="b00t", bd_seq=3),
        HealthPayload(station="station-01", mode="shadow", backend="onnxruntime", uptime_s=12.5, inspections=10,
                      defects=2, verdicts={"pass": 8, "fail": 2}, dropped=1, throughput_per_s=3.2,
                      latency_p50_ms=10.0, latency_p99_ms=30.0, camera={"connected": True, "fps": 25.0},
                      gpu={"name": "Orin"}, spool_depth=4, spool_oldest_age_s=1.5, disk_free_mb=2048.0,
                      last_error="camera timeout"),
        ResultPayload.from_record(RECORD, "station-01"),
        AlertPayload(station="station-01", part_id="P-42", inspection_id="insp-0001", score=0.93, verdict="fail"),
        EventPayload(station="station-01", kind="outbox_overflow", detail={"shed": {"health": 3}}),
        TriggerCommand(part_id="P-42", message_id="abc"),
        ModeCommand(mode="shadow"),
        RebirthCommand(),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: BaseModel) -> None:
    # given a message, when it is serialised and read back, then it is equal and still version 1
    again = type(message).model_validate_json(message.model_dump_json())
    assert again == message
    assert again.schema_version == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_unknown_field_is_rejected(message: BaseModel) -> None:
    data = json.loads(message.model_dump_json())
    data["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        type(message).model_validate(data)


def test_every_kind_has_a_model_and_every_model_a_kind() -> None:
    assert set(PAYLOAD_MODELS) == KINDS
    assert COMMAND_KINDS <= KINDS


def test_published_messages_carry_ms_timestamps_and_unique_ids() -> None:
    before = time.time_ns() // 1_000_000
    a = StatusPayload(station="s1", state="online", bd_seq=0)
    b = StatusPayload(station="s1", state="online", bd_seq=0)
    after = time.time_ns() // 1_000_000
    assert type(a.ts_ms) is int and before <= a.ts_ms <= after
    assert a.message_id != b.message_id and len(a.message_id) == 32
    assert a.seq == 0 and a.replayed is False


def test_result_from_record_keeps_every_record_field_with_times_in_ms() -> None:
    result = ResultPayload.from_record(RECORD, "station-01")
    assert result.ts_ms == result.decided_at_ms == 1_700_000_000_157  # the decision time, kept through a replay
    assert result.captured_at_ms == 1_700_000_000_123
    for key, value in RECORD.to_dict().items():
        if key not in ("captured_at", "decided_at"):
            assert getattr(result, key) == value, key
    assert type(json.loads(result.model_dump_json())["captured_at_ms"]) is int


def test_health_turns_nan_percentiles_into_null() -> None:
    # given the stats of a station that has not inspected anything yet (percentile of nothing is NaN)
    health = HealthPayload(station="s1", mode="production", backend="tensorrt", uptime_s=1.0, inspections=0,
                           defects=0, latency_p50_ms=float("nan"), latency_p99_ms=float("nan"))
    # then the JSON carries null, which every consumer can parse
    data = json.loads(health.model_dump_json())
    assert data["latency_p50_ms"] is None and data["latency_p99_ms"] is None


def test_status_rejects_an_unknown_state() -> None:
    with pytest.raises(ValidationError, match="state"):
        StatusPayload(station="s1", state="sleeping", bd_seq=0)  # type: ignore[arg-type]


def test_topic_is_root_site_line_station_kind() -> None:
    assert topic("inspection", "plant1", "line2", "station-01", "result") == "inspection/plant1/line2/station-01/result"
    assert topic("acme/qa", "p", "l", "s", "cmd/trigger") == "acme/qa/p/l/s/cmd/trigger"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("inspection", "p", "l", "s", "results"), "unknown message kind"),
        (("inspection", "p", "l", "s/x", "result"), "station"),
        (("inspection", "p", "+", "s", "result"), "line"),
        (("inspection", "", "l", "s", "result"), "site"),
        (("insp/#", "p", "l", "s", "result"), "topic root"),
        (("insp/", "p", "l", "s", "result"), "topic root"),
    ],
)
def test_topic_rejects_levels_mqtt_would_misread(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        topic(*args)


def test_parse_command_accepts_valid_commands() -> None:
    trigger = parse_command("cmd/trigger", b'{"part_id": "P-42", "message_id": "c1"}')
    assert isinstance(trigger, TriggerCommand) and trigger.part_id == "P-42"
    mode = parse_command("cmd/mode", b'{"mode": "production"}')
    assert isinstance(mode, ModeCommand) and mode.mode == "production"
    # an empty payload (mosquitto_pub -n) is enough to ask for a rebirth
    assert isinstance(parse_command("cmd/rebirth", b""), RebirthCommand)


@pytest.mark.parametrize(
    ("kind", "payload", "field", "reason"),
    [
        ("cmd/trigger", b"{}", "part_id", "required field missing"),
        ("cmd/trigger", b'{"part_id": "bad id with spaces"}', "part_id", "pattern"),
        ("cmd/trigger", b'{"part_id": "P-1", "priority": 1}', "priority", "unknown field"),
        ("cmd/mode", b'{"mode": "manual_fallback"}', "mode", "manual_fallback"),
        ("cmd/mode", b'{"mode": ', "(payload)", "not valid JSON"),
        ("cmd/mode", b"\xff\xfe", "(payload)", "not UTF-8"),
        ("cmd/mode", b'["production"]', "(payload)", "JSON object"),
        ("cmd/reboot", b"{}", "(topic)", "not a command kind"),
    ],
)
def test_parse_command_error_names_field_and_reason(kind: str, payload: bytes, field: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_command(kind, payload)
    err = caught.value
    assert isinstance(err, CommandError)
    assert err.field == field and reason in err.reason
    assert str(err).startswith(f"{kind}: {field}: ")


def test_parse_command_reports_every_problem_in_one_error() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"part_id": "", "x": 1}')
    assert caught.value.field == "part_id"
    assert "x: unknown field" in caught.value.reason


def test_restamp_sets_seq_and_replayed_without_touching_the_rest() -> None:
    result = ResultPayload.from_record(RECORD, "station-01")
    again = ResultPayload.model_validate_json(restamp(result.model_dump_json(), seq=17, replayed=True))
    assert again.seq == 17 and again.replayed is True
    assert again.model_copy(update={"seq": 0, "replayed": False}) == result


def test_json_schemas_are_written_for_every_model(tmp_path: Path) -> None:
    paths = write_json_schemas(tmp_path / "schemas")
    assert len(paths) == len(PAYLOAD_MODELS)
    assert {p.name for p in paths} >= {"result.schema.json", "cmd-trigger.schema.json"}
    for path in paths:
        schema = json.loads(path.read_text())
        assert "properties" in schema and "schema_version" in schema["properties"]
        assert schema.get("additionalProperties") is False  # extra="forbid" shows in the schema
    result = json.loads((tmp_path / "schemas" / "result.schema.json").read_text())
    assert result["properties"]["ts_ms"]["type"] == "integer"


def test_schema_export_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(PAYLOAD_MODELS)


def test_checked_in_schemas_match_the_models(tmp_path: Path) -> None:
    """docs/schemas is what dashboard authors read: regenerate it (python -m appliance.payloads) on any change."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "schemas"
    for path in write_json_schemas(tmp_path):
        shipped = docs / path.name
        assert shipped.is_file(), f"{shipped} missing: run python -m appliance.payloads --out docs/schemas"
        assert shipped.read_text() == path.read_text(), f"{shipped} is stale: run python -m appliance.payloads"
