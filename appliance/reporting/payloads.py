"""What a station says over MQTT, and what it accepts: one pydantic model per message, plus topic names.

Pure data, no I/O except the JSON Schema export. Conventions taken from Sparkplug B and applied to plain
JSON: UTC epoch milliseconds (`ts_ms`), a per-connection `seq` so consumers can see gaps, a `bd_seq`
shared by the last will and the birth so a stale `offline` cannot overwrite a newer `online`, a
`replayed` flag on messages sent from the outbox after an outage, and a `message_id` consumers
de-duplicate on (QoS 1 delivers at least once; paho's `mid` restarts per connection and is no key).

Every model forbids unknown fields: a dashboard author's typo, or a command from a newer controller,
fails loudly instead of being half understood. Bump `SCHEMA_VERSION` on any incompatible change.

Topics: `<root>/<site>/<line>/<station>/<kind>`, kinds in `KINDS`. Export the schemas with
`python -m appliance.reporting.payloads --out docs/schemas`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.station.inspection import InspectionRecord

SCHEMA_VERSION = 3  # 2: health.storage; 3: health.review, cmd/label

# The same rule as the station ids in settings.py: they become topic levels, so no '/', '+' or '#'.
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Part ids come from a PLC or a barcode: a little wider than station ids, still safe in a log line or file name.
PART_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

VerdictName = Literal["pass", "fail", "manual_required", "error"]
ModeName = Literal["production", "shadow", "manual_fallback"]
LabelVerdict = Literal["pass", "fail"]
LabelSource = Literal["cli", "mqtt", "http"]
# A label's defect type ("crack", "missing_pin"): it may become a folder or file name in an export.
DEFECT_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Who labelled: a name or badge id as the plant writes it (printable, checked by parse_command), not blank.
LABELLER_PATTERN = r"\S"
LABELLER_MAX_CHARS = 64

PUBLISHED_KINDS: frozenset[str] = frozenset({"status", "birth", "health", "result", "alert", "event"})
COMMAND_KINDS: frozenset[str] = frozenset({"cmd/trigger", "cmd/mode", "cmd/rebirth", "cmd/label"})
KINDS: frozenset[str] = PUBLISHED_KINDS | COMMAND_KINDS


def now_ms() -> int:
    """The current UTC epoch time in integer milliseconds (the only timestamp unit on the wire)."""
    return time.time_ns() // 1_000_000


def to_ms(epoch_s: float) -> int:
    """Epoch seconds (as InspectionRecord stores them) to integer milliseconds."""
    return round(epoch_s * 1000)


def new_message_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION


class _Published(_Message):
    """Fields every message a station publishes carries."""

    message_id: str = Field(default_factory=new_message_id, pattern=r"^[0-9a-f]{32}$")
    station: str = Field(pattern=_ID_PATTERN)
    ts_ms: int = Field(default_factory=now_ms, ge=0)
    # Set at publish time by the reporter (see restamp), not when the message is built: a message
    # waiting in the outbox is sent in a later connection with that connection's numbering.
    seq: int = Field(0, ge=0)
    replayed: bool = False


class StatusPayload(_Published):
    """Retained availability: `online` on connect, `offline` as the last will, `stopped` on a clean stop."""

    state: Literal["online", "offline", "stopped"]
    bd_seq: int = Field(ge=0)


class BirthPayload(_Published):
    """Who the station is now; re-sent on every connect and on a rebirth command."""

    software_version: str
    model_id: str
    backend: str
    config_hash: str
    cameras: list[str]
    # Changes on every process start: tells a restart from a reconnect.
    boot_id: str
    bd_seq: int = Field(ge=0)


class HealthPayload(_Published):
    """The periodic heartbeat; the first thing shed when the outbox is full."""

    mode: ModeName
    backend: str
    uptime_s: float = Field(ge=0)
    inspections: int = Field(ge=0)
    defects: int = Field(ge=0)
    verdicts: dict[str, int] = Field(default_factory=dict)
    dropped: int = Field(0, ge=0)
    throughput_per_s: float = Field(0.0, ge=0)
    # None before any inspection (stats.percentile gives NaN, which JSON cannot carry).
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    camera: dict[str, Any] = Field(default_factory=dict)
    gpu: dict[str, Any] = Field(default_factory=dict)
    spool_depth: int = Field(0, ge=0)
    spool_oldest_age_s: float | None = None
    disk_free_mb: float | None = None
    # The broker link as the station saw it when the heartbeat was made (a replayed heartbeat shows the outage).
    mqtt: dict[str, Any] = Field(default_factory=dict)
    # The station's stores as the writers see them (reporting.storage_watch.StorageWatch.status): `ok`, `pending`
    # per store, `faults` (store, path, error, since_ms, pending), `failsafe`, `unrecorded`, `dead_letters`.
    storage: dict[str, Any] = Field(default_factory=dict)
    # Parts waiting before each pipeline stage ("preprocess", "infer", "decide").
    queues: dict[str, int] = Field(default_factory=dict)
    # Calls that raised, by sink name, since start (reporting.fanout): 0 for a healthy sink.
    sinks: dict[str, int] = Field(default_factory=dict)
    # The review queue and its labels (appliance.review: queued, unlabelled, labelled, bytes, pending, refused,
    # evicted_unreviewed, the confusion matrix, detection and false-positive rate with Wilson intervals);
    # None on a station without a review queue (review.enabled = false).
    review: dict[str, Any] | None = None
    last_error: str | None = None

    @field_validator("latency_p50_ms", "latency_p99_ms", "spool_oldest_age_s", "disk_free_mb", mode="before")
    @classmethod
    def _nan_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value


class ResultPayload(_Published):
    """One finished inspection: InspectionRecord's fields, its two times as UTC epoch milliseconds."""

    inspection_id: str
    part_id: str
    station_id: str
    source_name: str
    frame_index: int
    captured_at_ms: int = Field(ge=0)
    decided_at_ms: int = Field(ge=0)
    verdict: VerdictName
    ai_verdict: VerdictName | None
    score: float | None
    mode: ModeName
    backend: str
    model_id: str
    reason: str
    latency_ms: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_record(cls, record: InspectionRecord, station: str) -> ResultPayload:
        """The result message for a logged inspection; ts_ms is the decision time, so a replay keeps it."""
        return cls(
            station=station,
            ts_ms=to_ms(record.decided_at),
            inspection_id=record.inspection_id,
            part_id=record.part_id,
            station_id=record.station_id,
            source_name=record.source_name,
            frame_index=record.frame_index,
            captured_at_ms=to_ms(record.captured_at),
            decided_at_ms=to_ms(record.decided_at),
            verdict=record.verdict,  # type: ignore[arg-type]  # validated against VerdictName here
            ai_verdict=record.ai_verdict,  # type: ignore[arg-type]
            score=record.score,
            mode=record.mode,  # type: ignore[arg-type]
            backend=record.backend,
            model_id=record.model_id,
            reason=record.reason,
            latency_ms=dict(record.latency_ms),
        )


class AlertPayload(_Published):
    """A defect was found: small and separate from results so a line light or pager needs no filtering."""

    part_id: str
    inspection_id: str
    score: float | None
    verdict: VerdictName


class EventPayload(_Published):
    """Something an operator should know: mode change, camera lost, outbox overflow, rejected command."""

    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    detail: dict[str, Any] = Field(default_factory=dict)


class _Command(_Message):
    """Commands come from a controller or an operator's tool; a message id is optional but lets the
    station ignore a QoS 1 duplicate and name the command in its reply event."""

    message_id: str | None = Field(None, max_length=64)
    ts_ms: int | None = Field(None, ge=0)


class TriggerCommand(_Command):
    """Inspect the next frame as this part (trigger.mode = triggered)."""

    part_id: str = Field(pattern=PART_ID_PATTERN)


class ModeCommand(_Command):
    """Switch between production and shadow; manual_fallback is the station's own decision, not a command."""

    mode: Literal["production", "shadow"]


class RebirthCommand(_Command):
    """Re-send the birth message (a dashboard that started after the station asks for it)."""


class LabelCommand(_Command):
    """An inspector's label for a part in the station's review queue: `pass` (good) or `fail` (defective).

    The label is the truth the model is measured against (appliance.review); a later label for the same
    inspection wins, the earlier ones are kept. An inspection id that is not in the review queue is rejected.
    """

    inspection_id: str = Field(pattern=PART_ID_PATTERN)
    verdict: LabelVerdict
    defect_type: str | None = Field(None, pattern=DEFECT_TYPE_PATTERN)
    labeller: str = Field(min_length=1, max_length=LABELLER_MAX_CHARS, pattern=LABELLER_PATTERN)


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "status": StatusPayload,
    "birth": BirthPayload,
    "health": HealthPayload,
    "result": ResultPayload,
    "alert": AlertPayload,
    "event": EventPayload,
    "cmd/trigger": TriggerCommand,
    "cmd/mode": ModeCommand,
    "cmd/rebirth": RebirthCommand,
    "cmd/label": LabelCommand,
}
COMMAND_MODELS: dict[str, type[_Command]] = {
    "cmd/trigger": TriggerCommand,
    "cmd/mode": ModeCommand,
    "cmd/rebirth": RebirthCommand,
    "cmd/label": LabelCommand,
}


def topic(root: str, site: str, line: str, station: str, kind: str) -> str:
    """`<root>/<site>/<line>/<station>/<kind>`; ValueError for an unknown kind or a level MQTT would misread."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; expected one of {sorted(KINDS)}")
    if not root or root.startswith("/") or root.endswith("/") or "//" in root or any(c in root for c in "+#"):
        raise ValueError(f"topic root {root!r} is not a valid MQTT topic prefix (no wildcards, empty levels)")
    for name, level in (("site", site), ("line", line), ("station", station)):
        if not level or any(c in level for c in "/+#"):
            raise ValueError(f"{name} {level!r} cannot be one MQTT topic level (empty, or has '/', '+' or '#')")
    return f"{root}/{site}/{line}/{station}/{kind}"


@dataclass(frozen=True)
class Topics:
    """The topic names of one station; the levels are checked once, here."""

    root: str
    site: str
    line: str
    station: str

    def __post_init__(self) -> None:
        topic(self.root, self.site, self.line, self.station, "status")  # raises ValueError for a bad level

    @property
    def prefix(self) -> str:
        return f"{self.root}/{self.site}/{self.line}/{self.station}"

    def of(self, kind: str) -> str:
        return topic(self.root, self.site, self.line, self.station, kind)

    @property
    def command_filter(self) -> str:
        """What the station subscribes to: its own command topics only."""
        return f"{self.prefix}/cmd/+"

    def kind_of(self, name: str) -> str | None:
        """The message kind of a topic under this station's prefix, None for anything else."""
        if not name.startswith(self.prefix + "/"):
            return None
        kind = name[len(self.prefix) + 1:]
        return kind if kind in KINDS else None


# What a rejected command can make the station say is bounded: a rejection's `field` and `reason` go into a
# `command_rejected` event, the results log and a log line, and quote what a sender sent. The bounds count
# characters of the ASCII JSON form (json.dumps' default, where "é" is 6 and a control character an escape),
# never fewer than the UTF-8 bytes, so they bound the bytes on the wire and on disk whatever the encoder.
COMMAND_ERROR_FIELD_MAX_CHARS = 64
COMMAND_ERROR_REASON_MAX_CHARS = 300
# One offending value as quoted inside a reason (a shortened repr).
COMMAND_ERROR_VALUE_MAX_CHARS = 60
# Problems named in a reason besides the first; the rest are only counted ("... and 8996 more problems").
COMMAND_ERROR_OTHER_PROBLEMS_SHOWN = 3
# The largest command payload that is parsed at all (mqtt.max_command_bytes). A real command is under 250
# bytes ({"part_id": ...} with a 128-character part id, a 64-character message id, ts_ms): 4 KiB leaves room for
# pretty-printing and a future field, and refuses anything bigger before it costs memory or CPU to decode.
DEFAULT_MAX_COMMAND_BYTES = 4096

# A command's numbers are epoch milliseconds and a schema version: a longer digit string is refused before
# Python converts it (quadratic time; a ValueError over 4300 digits).
_MAX_NUMBER_CHARS = 32
# Containers are quoted one level deep and this many items wide; the value bound cuts the rest anyway.
_ITEMS_SHOWN = COMMAND_ERROR_VALUE_MAX_CHARS // 3
_CUT = "..."


class CommandError(ValueError):
    """A command payload the station rejects; `field` and `reason` go into the station's reply event.

    `kind`, `field` and `reason` are made printable and cut to the COMMAND_ERROR_* bounds here, whoever raises
    it, so a sender's field names and values cannot make the event, the log line or the results row grow.
    """

    def __init__(self, kind: str, field: str, reason: str) -> None:
        kind = _clip(kind, COMMAND_ERROR_FIELD_MAX_CHARS)
        field = _clip(field, COMMAND_ERROR_FIELD_MAX_CHARS)
        reason = _clip(reason, COMMAND_ERROR_REASON_MAX_CHARS)
        super().__init__(f"{kind}: {field}: {reason}")
        self.kind = kind
        self.field = field
        self.reason = reason


class _Unreadable(ValueError):
    """Raised from inside json.loads for JSON the station refuses to read; becomes a CommandError."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _clip(text: str, limit: int) -> str:
    """`text` printable and at most `limit` characters of ASCII JSON, ending in '...' where it was cut.

    Control characters, lone surrogates and other unprintables become backslash escapes: the result is one
    line that encodes to UTF-8 and JSON. Reads at most `limit` characters of `text`, however long it is.
    """
    kept: list[str] = []
    width = 0
    fits_with_cut = 0  # how many pieces fit with room left for the '...'
    for char in text:
        piece = char if char.isprintable() else ascii(char)[1:-1]
        width += len(json.dumps(piece)) - 2
        if width > limit:
            return "".join(kept[:fits_with_cut]) + _CUT
        kept.append(piece)
        if width <= limit - len(_CUT):
            fits_with_cut = len(kept)
    return "".join(kept)


def _shown(value: Any, nested: bool = False) -> str:
    """A sender's value as a short repr: strings sliced before repr, containers one level deep and few items."""
    if isinstance(value, dict):
        if nested:
            return "{...}"
        items = [f"{_shown(k, True)}: {_shown(v, True)}" for k, v in list(value.items())[:_ITEMS_SHOWN]]
        return "{" + ", ".join(items + [_CUT] * (len(value) > _ITEMS_SHOWN)) + "}"
    if isinstance(value, list | tuple):
        if nested:
            return "[...]"
        items = [_shown(v, True) for v in value[:_ITEMS_SHOWN]]
        return "[" + ", ".join(items + [_CUT] * (len(value) > _ITEMS_SHOWN)) + "]"
    if isinstance(value, str):
        return repr(value[:COMMAND_ERROR_VALUE_MAX_CHARS + 1])
    return repr(value)


def _problem(error: Any) -> str:
    """One pydantic error (an ErrorDetails) as a reason, its input quoted within the value bound."""
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field missing"
    return f"{error['msg']} (got {_clip(_shown(error.get('input')), COMMAND_ERROR_VALUE_MAX_CHARS)})"


def _location(error: Any) -> str:
    return ".".join(str(p) for p in error["loc"]) or "(payload)"


def _rejection(kind: str, exc: ValidationError) -> CommandError:
    """All of a ValidationError in one bounded CommandError: the first problem, a few more, a count of the rest."""
    errors = exc.errors(include_url=False)
    total_tail = len(f" and {len(errors)} more problems")
    reason = _clip(_problem(errors[0]), COMMAND_ERROR_REASON_MAX_CHARS - len("; also") - total_tail)
    named = 0
    for error in errors[1:1 + COMMAND_ERROR_OTHER_PROBLEMS_SHOWN]:
        item = ("; also " if named == 0 else "; ") + (
            f"{_clip(_location(error), COMMAND_ERROR_FIELD_MAX_CHARS)}: {_problem(error)}")
        if len(json.dumps(reason + item)) - 2 + total_tail > COMMAND_ERROR_REASON_MAX_CHARS:
            break
        reason += item
        named += 1
    rest = len(errors) - 1 - named
    if rest:
        # One event per command: the other problems are at least counted rather than silently lost.
        reason += (" and" if named else "; also") + f" {rest} more problem{'s' if rest > 1 else ''}"
    return CommandError(kind, _location(errors[0]), reason)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, another parser the first: a command that means two things is refused.
    data = dict(pairs)
    for key in data:
        if not key.isprintable():
            # No command has such a field; refused here because pydantic cannot name a key with a lone surrogate.
            raise _Unreadable(key, "unknown field (its name has unprintable characters)")
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Unreadable(key, "given more than once; name each field once")
            seen.add(key)
    return data


def _refuse_constant(name: str) -> Any:
    raise _Unreadable("(payload)", f"not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _Unreadable("(payload)", f"a number of {len(text)} characters; commands carry none over "
                                       f"{_MAX_NUMBER_CHARS}")
    value = float(text)
    if not math.isfinite(value):
        raise _Unreadable("(payload)", f"the number {text} is out of range")
    return value


def _short_int(text: str) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _Unreadable("(payload)", f"a number of {len(text)} characters; commands carry none over "
                                       f"{_MAX_NUMBER_CHARS}")
    return int(text)


def parse_command(kind: str, payload: bytes, *, max_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
                  ) -> TriggerCommand | ModeCommand | RebirthCommand | LabelCommand:
    """Validate a received command; CommandError (a ValueError) names the field and the reason.

    Whatever the payload (too big, not UTF-8, not JSON, nested past the recursion limit, a field given twice,
    NaN, wrong types), the only exception is one CommandError within the COMMAND_ERROR_* bounds. A payload over
    `max_bytes` is refused before it is decoded.
    """
    model = COMMAND_MODELS.get(kind)
    if model is None:
        raise CommandError(kind, "(topic)", f"not a command kind; expected one of {sorted(COMMAND_MODELS)}")
    if len(payload) > max_bytes:
        raise CommandError(kind, "(payload)", f"payload of {len(payload)} bytes is over the limit of {max_bytes} "
                                              "bytes (mqtt.max_command_bytes)")
    # An empty payload (`mosquitto_pub -n`) is an empty object: enough for a rebirth.
    if not payload.strip():
        data: Any = {}
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(kind, "(payload)", f"not UTF-8 text (byte {exc.start})") from exc
        if text.startswith("\ufeff"):
            raise CommandError(kind, "(payload)", "not valid JSON: starts with a byte order mark; send UTF-8 "
                                                  "without one")
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant,
                              parse_float=_finite_float, parse_int=_short_int)
        except _Unreadable as exc:
            raise CommandError(kind, exc.field, exc.reason) from exc
        except json.JSONDecodeError as exc:
            # Some of json's messages end in " at" ("Invalid control character at"): the position follows.
            raise CommandError(kind, "(payload)", f"not valid JSON: {exc.msg.removesuffix(' at')} at line "
                                                  f"{exc.lineno} column {exc.colno}") from exc
        except RecursionError as exc:
            raise CommandError(kind, "(payload)", "nested too deeply to read; a command is one flat JSON "
                                                  "object") from exc
    if not isinstance(data, dict):
        raise CommandError(kind, "(payload)", f"must be a JSON object, got {type(data).__name__}")
    try:
        command = model.model_validate(data)
    except ValidationError as exc:
        raise _rejection(kind, exc) from exc
    # A message id is echoed in log lines and events: a newline or control character in it could forge either.
    for name, value in command:
        if isinstance(value, str) and not value.isprintable():
            shown = _clip(_shown(value), COMMAND_ERROR_VALUE_MAX_CHARS)
            raise CommandError(kind, name, f"must be printable text (got {shown})")
    return command  # type: ignore[return-value]


def restamp(payload_json: str, seq: int, replayed: bool) -> str:
    """The stored JSON with this connection's `seq` and the `replayed` flag, without re-validating."""
    data = json.loads(payload_json)
    data["seq"] = seq
    data["replayed"] = replayed
    return json.dumps(data, separators=(",", ":"))


def schema_file_name(kind: str) -> str:
    return kind.replace("/", "-") + ".schema.json"


def write_json_schemas(folder: Path) -> list[Path]:
    """Write one `<kind>.schema.json` per message model (cmd/trigger -> cmd-trigger) for dashboard authors."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, model in PAYLOAD_MODELS.items():
        path = folder / schema_file_name(kind)
        schema = model.model_json_schema()
        schema["$comment"] = f"MQTT topic <root>/<site>/<line>/<station>/{kind}; schema_version {SCHEMA_VERSION}"
        # Sorted keys and a final newline: regenerating unchanged schemas gives an empty diff.
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.reporting.payloads", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/schemas"), help="folder for the *.schema.json files")
    args = parser.parse_args(argv)
    for path in write_json_schemas(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
