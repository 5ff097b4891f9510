"""What a station says over MQTT, and what it accepts: one pydantic model per message, plus topic names.

Pure data, no I/O except the JSON Schema export. Conventions taken from Sparkplug B and applied to plain
JSON: UTC epoch milliseconds (`ts_ms`), a per-connection `seq` so consumers can see gaps, a `bd_seq`
shared by the last will and the birth so a stale `offline` cannot overwrite a newer `online`, a
`replayed` flag on messages sent from the outbox after an outage, and a `message_id` consumers
de-duplicate on (QoS 1 delivers at least once; paho's `mid` restarts per connection and is no key).

Every model forbids unknown fields: a dashboard author's typo, or a command from a newer controller,
fails loudly instead of being half understood. Bump `SCHEMA_VERSION` on any incompatible change.

Topics: `<root>/<site>/<line>/<station>/<kind>`, kinds in `KINDS`. Export the schemas with
`python -m appliance.payloads --out docs/schemas`.
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

from appliance.results_log import InspectionRecord

SCHEMA_VERSION = 1

# The same rule as the station ids in settings.py: they become topic levels, so no '/', '+' or '#'.
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Part ids come from a PLC or a barcode: a little wider than station ids, still safe in a log line or file name.
PART_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

VerdictName = Literal["pass", "fail", "manual_required", "error"]
ModeName = Literal["production", "shadow", "manual_fallback"]

PUBLISHED_KINDS: frozenset[str] = frozenset({"status", "birth", "health", "result", "alert", "event"})
COMMAND_KINDS: frozenset[str] = frozenset({"cmd/trigger", "cmd/mode", "cmd/rebirth"})
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
}
COMMAND_MODELS: dict[str, type[_Command]] = {
    "cmd/trigger": TriggerCommand,
    "cmd/mode": ModeCommand,
    "cmd/rebirth": RebirthCommand,
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


class CommandError(ValueError):
    """A command payload the station rejects; `field` and `reason` go into the station's reply event."""

    def __init__(self, kind: str, field: str, reason: str) -> None:
        super().__init__(f"{kind}: {field}: {reason}")
        self.kind = kind
        self.field = field
        self.reason = reason


def parse_command(kind: str, payload: bytes) -> TriggerCommand | ModeCommand | RebirthCommand:
    """Validate a received command; CommandError (a ValueError) names the field and the reason."""
    model = COMMAND_MODELS.get(kind)
    if model is None:
        raise CommandError(kind, "(topic)", f"not a command kind; expected one of {sorted(COMMAND_MODELS)}")
    # An empty payload (`mosquitto_pub -n`) is an empty object: enough for a rebirth.
    if not payload.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CommandError(kind, "(payload)", f"not UTF-8 text (byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise CommandError(kind, "(payload)", f"not valid JSON: {exc.msg} at line {exc.lineno} "
                                                  f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise CommandError(kind, "(payload)", f"must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(payload)"
            if err["type"] == "extra_forbidden":
                reason = "unknown field"
            elif err["type"] == "missing":
                reason = "required field missing"
            else:
                shown = repr(err.get("input"))
                reason = f"{err['msg']} (got {shown[:77] + '...' if len(shown) > 80 else shown})"
            problems.append((field, reason))
        field, reason = problems[0]
        if len(problems) > 1:
            # One event per command: the other problems ride along in the reason rather than being lost.
            reason += "; also " + "; ".join(f"{f}: {r}" for f, r in problems[1:])
        raise CommandError(kind, field, reason) from exc


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
    parser = argparse.ArgumentParser(prog="python -m appliance.payloads", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/schemas"), help="folder for the *.schema.json files")
    args = parser.parse_args(argv)
    for path in write_json_schemas(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
