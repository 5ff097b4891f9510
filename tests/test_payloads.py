"""MQTT payloads: the wire contract with dashboards, controllers and the plant's historian."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from appliance.reporting.payloads import (
    COMMAND_ERROR_FIELD_MAX_CHARS,
    COMMAND_ERROR_OTHER_PROBLEMS_SHOWN,
    COMMAND_ERROR_REASON_MAX_CHARS,
    COMMAND_ERROR_VALUE_MAX_CHARS,
    COMMAND_KINDS,
    DEFAULT_MAX_COMMAND_BYTES,
    KINDS,
    PAYLOAD_MODELS,
    SCHEMA_VERSION,
    AlertPayload,
    BirthPayload,
    CommandError,
    EventPayload,
    HealthPayload,
    LabelCommand,
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
from appliance.station.inspection import InspectionRecord

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
                      review={"queued": 3, "unlabelled": 1}, last_error="camera timeout"),
        ResultPayload.from_record(RECORD, "station-01"),
        AlertPayload(station="station-01", part_id="P-42", inspection_id="insp-0001", score=0.93, verdict="fail"),
        EventPayload(station="station-01", kind="outbox_overflow", detail={"shed": {"health": 3}}),
        TriggerCommand(part_id="P-42", message_id="abc"),
        ModeCommand(mode="shadow"),
        RebirthCommand(),
        LabelCommand(inspection_id="insp-0001", verdict="fail", defect_type="crack", labeller="A. Inspector",
                     message_id="l1"),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: BaseModel) -> None:
    # given a message, when it is serialised and read back, then it is equal and still the current version
    again = type(message).model_validate_json(message.model_dump_json())
    assert again == message
    assert again.schema_version == SCHEMA_VERSION == 3  # type: ignore[attr-defined]


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
    label = parse_command("cmd/label", b'{"inspection_id": "abc123", "verdict": "pass", "labeller": "jo"}')
    assert isinstance(label, LabelCommand) and label.verdict == "pass" and label.defect_type is None


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
        ("cmd/label", b'{"inspection_id": "i1", "verdict": "ok", "labeller": "jo"}', "verdict", "'pass' or 'fail'"),
        ("cmd/label", b'{"inspection_id": "i1", "verdict": "fail"}', "labeller", "required field missing"),
        ("cmd/label", b'{"inspection_id": "i1", "verdict": "fail", "labeller": "  "}', "labeller", "pattern"),
        ("cmd/label", b'{"inspection_id": "i/1", "verdict": "fail", "labeller": "jo"}', "inspection_id", "pattern"),
        ("cmd/label", b'{"inspection_id": "i1", "verdict": "fail", "labeller": "jo", "defect_type": "a/b"}',
         "defect_type", "pattern"),
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


# --- hostile commands: one bounded CommandError, never anything else ------------------------------------------

# What a rejection may add to the station's event, log line and results row, however big the command was.
REJECTION_JSON_MAX = 600
BIG = 10**8  # a max_bytes that lets an oversized payload through to the parser


def assert_bounded(err: CommandError) -> None:
    """The rejection is small, printable and encodes to JSON and UTF-8 whatever the sender sent."""
    assert type(err) is CommandError
    assert len(json.dumps({"field": err.field, "reason": err.reason})) < REJECTION_JSON_MAX
    assert len(json.dumps(err.field)) - 2 <= COMMAND_ERROR_FIELD_MAX_CHARS
    assert len(json.dumps(err.reason)) - 2 <= COMMAND_ERROR_REASON_MAX_CHARS
    for text in (err.kind, err.field, err.reason, str(err)):
        assert text.isprintable(), text  # no control characters, newlines or lone surrogates
        text.encode("utf-8")  # strict: raises on a lone surrogate
    json.dumps({"field": err.field, "reason": err.reason}, ensure_ascii=False).encode("utf-8")


def many_unknown_fields(count: int) -> bytes:
    return json.dumps({"part_id": "P-1", **{f"field_{i}": i for i in range(count)}}).encode()


def nested(depth: int) -> bytes:
    return b'{"part_id": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE_COMMANDS = [
    # not JSON
    ("cmd/mode", b"{not json", None),
    ("cmd/mode", b"shadow", None),
    ("cmd/trigger", b'{"part_id": "P-1"', None),
    ("cmd/trigger", b'{"part_id": "P-1"} {"part_id": "P-2"}', None),
    ("cmd/trigger", b"{'part_id': 'P-1'}", None),
    # invalid UTF-8, a byte order mark, null bytes
    ("cmd/mode", b"\xff\xfe", None),
    ("cmd/trigger", b'{"part_id": "P-\xc3\x28"}', None),
    ("cmd/trigger", b'{"part_id": "\xed\xa0\x80"}', None),  # a UTF-8-encoded surrogate
    ("cmd/trigger", b'\xef\xbb\xbf{"part_id": "P-1"}', None),
    ("cmd/trigger", b'{"part_id": "P-1"}\x00', None),
    ("cmd/trigger", b'{"part_id": "P-1\x00"}', None),
    ("cmd/trigger", b'{"part_id": "P-1\\u0000"}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "message_id": "m\\u0000\\nforged log line"}', None),
    # lone surrogates, control and bidi characters in names and values
    ("cmd/trigger", b'{"part_id": "P-1", "\\ud800\\u0007\\u202e": 1}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "message_id": "\\udc00"}', None),
    ("cmd/trigger", b'{"part_id": "\\ud83d"}', None),
    # NaN and infinities
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": NaN}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": Infinity}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": -Infinity}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": 1e999}', None),
    ("cmd/rebirth", b"NaN", None),
    # not an object
    ("cmd/mode", b'["production"]', None),
    ("cmd/mode", b'"production"', None),
    ("cmd/mode", b"42", None),
    ("cmd/mode", b"null", None),
    ("cmd/mode", b"true", None),
    # duplicate keys, at the top and nested
    ("cmd/mode", b'{"mode": "shadow", "mode": "production"}', None),
    ("cmd/trigger", b'{"part_id": {"a": 1, "a": 2}}', None),
    # wrong types
    ("cmd/trigger", b'{"part_id": 42}', None),
    ("cmd/trigger", b'{"part_id": null}', None),
    ("cmd/trigger", b'{"part_id": ["P-1", {"a": [1]}, [2], null, true, 1.5]}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": "soon"}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": -1}', None),
    ("cmd/mode", b'{"mode": true}', None),
    ("cmd/mode", b'{"mode": "shadow", "message_id": "' + b"m" * 65 + b'"}', None),
    ("cmd/rebirth", b'{"schema_version": "one"}', None),
    # huge strings
    ("cmd/trigger", b'{"part_id": "' + b"A" * 4000 + b'"}', None),
    ("cmd/trigger", b'{"part_id": "P-1", "' + b"k" * 4000 + b'": 1}', None),
    ("cmd/trigger", json.dumps({"part_id": "\U0001f600" * 600}).encode(), None),
    ("cmd/trigger", json.dumps({"x" * 2_000_000: 1}).encode(), BIG),
    ("cmd/trigger", json.dumps({"part_id": "P-1", "\x00\u202e" * 1_000_000: 1}).encode(), BIG),
    ("cmd/trigger", json.dumps({"\U0001f600" * 1000 + str(i): i for i in range(50)}).encode(), BIG),
    # huge numbers
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": ' + b"1" * 4000 + b"}", None),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": ' + b"1" * 5000 + b"}", BIG),
    ("cmd/trigger", b'{"part_id": "P-1", "ts_ms": 1.' + b"5" * 4000 + b"}", None),
    # absurd nesting, huge and small
    ("cmd/trigger", b"[" * 100_000, BIG),
    ("cmd/trigger", b'{"a": ' * 100_000, BIG),
    ("cmd/trigger", nested(2000), None),
    ("cmd/trigger", nested(900), None),
    # many problems
    ("cmd/trigger", many_unknown_fields(9000), BIG),
    ("cmd/trigger", many_unknown_fields(9000), None),
    ("cmd/mode", json.dumps({f"\x00{i}": [i] * 50 for i in range(300)}).encode(), BIG),
    # too big, whatever is inside
    ("cmd/trigger", b" " * (DEFAULT_MAX_COMMAND_BYTES + 1), None),
    ("cmd/trigger", b"\xff" * 10_000_000, None),
    # not a command topic
    ("cmd/" + "x\x00\ud800" * 1_000_000, b"{}", None),
]


@pytest.mark.parametrize(("kind", "payload", "max_bytes"), HOSTILE_COMMANDS,
                         ids=[f"{i}-{p[:24]!r}" for i, (_, p, _) in enumerate(HOSTILE_COMMANDS)])
def test_a_malformed_command_gives_one_bounded_command_error(kind: str, payload: bytes, max_bytes: int | None) -> None:
    # given any malformed command, when it is parsed, then the only exception is a small, printable CommandError
    options = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(CommandError) as caught:
        parse_command(kind, payload, **options)
    assert_bounded(caught.value)


def test_field_report_9000_unknown_fields_give_one_short_rejection_naming_a_few() -> None:
    # given the field report's trigger with 9,000 unknown fields (about 89 kB), parsed despite its size
    payload = many_unknown_fields(9000)
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", payload, max_bytes=len(payload))
    err = caught.value
    # then the first is named, a few more listed, the rest counted, and the whole stays small
    assert err.field == "field_0" and err.reason.startswith("unknown field; also field_1: unknown field")
    assert err.reason.count("unknown field") == 1 + COMMAND_ERROR_OTHER_PROBLEMS_SHOWN
    assert err.reason.endswith(f" and {9000 - 1 - COMMAND_ERROR_OTHER_PROBLEMS_SHOWN} more problems")
    assert "field_8999" not in err.reason
    assert_bounded(err)


def test_field_report_a_2_mb_field_name_is_cut_with_a_marker() -> None:
    payload = json.dumps({"part_id": "P-1", "x" * 2_000_000: 1}).encode()
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", payload, max_bytes=len(payload))
    err = caught.value
    assert err.field == "x" * (COMMAND_ERROR_FIELD_MAX_CHARS - 3) + "..."
    assert err.reason == "unknown field"
    assert_bounded(err)


def test_a_payload_over_the_limit_is_refused_before_it_is_decoded() -> None:
    # given payloads one byte over the limit: valid JSON, invalid UTF-8, and nesting deep enough to blow the stack
    over = DEFAULT_MAX_COMMAND_BYTES + 1
    for payload in (b'{"part_id": "P-1"}'.ljust(over), b"\xff" * over, b"[" * over):
        with pytest.raises(CommandError) as caught:
            parse_command("cmd/trigger", payload)
        # then each is refused for its size alone: nothing decoded or parsed it
        assert caught.value.field == "(payload)"
        assert caught.value.reason == (f"payload of {DEFAULT_MAX_COMMAND_BYTES + 1} bytes is over the limit of "
                                       f"{DEFAULT_MAX_COMMAND_BYTES} bytes (mqtt.max_command_bytes)")


def test_max_bytes_is_the_largest_payload_parsed() -> None:
    padded = b'{"mode": "shadow"}'.ljust(DEFAULT_MAX_COMMAND_BYTES)  # trailing whitespace is valid JSON
    assert parse_command("cmd/mode", padded).mode == "shadow"
    with pytest.raises(CommandError, match="over the limit of 4096 bytes"):
        parse_command("cmd/mode", padded + b" ")
    with pytest.raises(CommandError, match="payload of 18 bytes is over the limit of 17 bytes"):
        parse_command("cmd/mode", b'{"mode": "shadow"}', max_bytes=17)
    assert parse_command("cmd/mode", b'{"mode": "shadow"}', max_bytes=18).mode == "shadow"


def test_a_real_command_is_far_under_the_default_limit() -> None:
    # the largest valid trigger: a 128-character part id, a 64-character message id, a timestamp, pretty-printed
    biggest = json.dumps({"part_id": "P" * 128, "message_id": "m" * 64, "ts_ms": 1_700_000_000_000,
                          "schema_version": 1}, indent=4).encode()
    assert isinstance(parse_command("cmd/trigger", biggest), TriggerCommand)
    assert len(biggest) * 10 < DEFAULT_MAX_COMMAND_BYTES


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        (b'{"mode": "shadow", "colour": "red"}', "colour", "unknown field"),
        (b'{"mode": "shadow", "mode": "production"}', "mode", "given more than once; name each field once"),
        (b'{"mode": "shadow", "ts_ms": NaN}', "(payload)", "not valid JSON: NaN is not a JSON number"),
        (b'{"mode": "shadow", "ts_ms": Infinity}', "(payload)", "not valid JSON: Infinity is not a JSON number"),
        (b'{"mode": "shadow", "ts_ms": 1e999}', "(payload)", "the number 1e999 is out of range"),
        (b'{"mode": "shadow", "ts_ms": ' + b"9" * 40 + b"}", "(payload)",
         "a number of 40 characters; commands carry none over 32"),
        (b'\xef\xbb\xbf{"mode": "shadow"}', "(payload)",
         "not valid JSON: starts with a byte order mark; send UTF-8 without one"),
        (nested(2000), "(payload)", "nested too deeply to read; a command is one flat JSON object"),
        (b'{"mode": "shadow\x00"}', "(payload)", "not valid JSON: Invalid control character at line 1 column 17"),
        (b'{"mode": "shadow", "message_id": "m1\\nforged"}', "message_id",
         "must be printable text (got 'm1\\nforged')"),
    ],
)
def test_refused_json_names_what_was_wrong(payload: bytes, field: str, reason: str) -> None:
    assert len(payload) <= DEFAULT_MAX_COMMAND_BYTES  # these reach the parser
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/mode", payload)
    assert (caught.value.field, caught.value.reason) == (field, reason)


def test_a_long_value_is_quoted_cut_short() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"part_id": "' + b"A" * 4000 + b'"}')
    err = caught.value
    assert err.field == "part_id" and "String should match pattern" in err.reason
    quoted = err.reason.split("(got ", 1)[1].removesuffix(")")
    assert quoted == "'" + "A" * (COMMAND_ERROR_VALUE_MAX_CHARS - 4) + "..."


def test_a_nested_value_is_quoted_one_level_deep() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"part_id": [1, "a", {"b": [2]}, [3]]}')
    assert caught.value.reason == "Input should be a valid string (got [1, 'a', {...}, [...]])"


def test_unprintable_sender_text_is_escaped_not_passed_on() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"part_id": "P-1", "a\\u0000b\\nc\\u202ed\\ud800": 1}')
    assert caught.value.field == "a\\x00b\\nc\\u202ed\\ud800"
    assert caught.value.reason == "unknown field (its name has unprintable characters)"
    assert_bounded(caught.value)


def test_other_problems_are_listed_then_counted() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}')
    assert caught.value.field == "part_id"
    assert caught.value.reason == ("required field missing; also a: unknown field; b: unknown field; "
                                   "c: unknown field and 2 more problems")
    with pytest.raises(CommandError) as caught:
        parse_command("cmd/trigger", b'{"a": 1, "b": 2, "c": 3, "d": 4}')
    assert caught.value.reason.endswith("c: unknown field and 1 more problem")


def test_command_error_bounds_itself_whoever_raises_it() -> None:
    # given a CommandError raised elsewhere (the reporter raises its own) with enormous, unprintable text
    err = CommandError("cmd/" + "k" * 10**6, "\x00" * 10**6, "\ud800" * 10**6)
    # then it is as small and printable as one from parse_command
    assert_bounded(err)
    assert err.field.endswith("...") and err.reason.endswith("...")
    # and ordinary text passes unchanged
    ok = CommandError("cmd/mode", "(station)", "the station is still starting")
    assert (ok.field, ok.reason, str(ok)) == ("(station)", "the station is still starting",
                                              "cmd/mode: (station): the station is still starting")


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
    """docs/schemas is what dashboard authors read: regenerate it on any change.

    python -m appliance.reporting.payloads --out docs/schemas
    """
    docs = Path(__file__).resolve().parents[1] / "docs" / "schemas"
    for path in write_json_schemas(tmp_path):
        shipped = docs / path.name
        assert shipped.is_file(), f"{shipped} missing: run python -m appliance.reporting.payloads --out docs/schemas"
        assert shipped.read_text() == path.read_text(), f"{shipped} is stale: regenerate it (see above)"
