"""Commands from the control room (`cmd/trigger`, `cmd/mode`, `cmd/rebirth`, `cmd/label`), as the MQTT link hands
them over.

Each is validated (payloads.parse_command: bounded size, exact shape), de-duplicated on its message id (QoS 1
may deliver twice, and a trigger must not inspect two parts), and applied to the pipeline. A rejected command
changes nothing and is answered with exactly one `command_rejected` event naming the field and the reason.
A retained command is refused: it would be applied again on every reconnect.

`cmd/label` records an inspector's label through a `LabelRecorder` the runtime passes in (the review queue,
appliance.review, implements it; reporting never imports review). The recorder announces the label itself
(`label_recorded`); an inspection id it does not know, or a store that cannot write now, is a rejection.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from appliance.reporting.payloads import (
    DEFAULT_MAX_COMMAND_BYTES,
    CommandError,
    LabelCommand,
    ModeCommand,
    RebirthCommand,
    TriggerCommand,
    parse_command,
)
from appliance.reporting.recorder import EventSink
from appliance.reporting.sqlite_store import describe
from appliance.station.modes import ModeControl
from bundle.decision import Mode

log = logging.getLogger("appliance.reporting.commands")

SEEN_COMMANDS = 1024  # message ids remembered for de-duplication


class Triggerable(Protocol):
    """What commands need of the pipeline: `appliance.station.Pipeline` is one."""

    modes: ModeControl

    def trigger(self, part_id: str) -> None: ...


class UnknownInspection(LookupError):
    """A label for an inspection the review queue does not hold (raised by a LabelRecorder)."""


class LabelRecorder(Protocol):
    """What `cmd/label` needs: record one label (appliance.review.sink.ReviewSink is one).

    Raises UnknownInspection for an inspection id the review queue does not hold, ValueError for a value it refuses,
    sqlite3.Error or OSError when its store cannot write now; it reports the recorded label (`label_recorded`)
    itself. `source` is where the label came from: "cli", "mqtt" or "http".
    """

    def record_label(self, inspection_id: str, verdict: str, *, labeller: str, defect_type: str | None = None,
                     source: str, message_id: str | None = None) -> object: ...


class CommandHandler:
    """`on_command(kind, payload, retained)`: the MQTT link's command callback (called on the link thread)."""

    def __init__(self, pipeline: Triggerable, *, triggered: bool, on_event: EventSink,
                 rebirth: Callable[[], None], max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES,
                 labels: LabelRecorder | None = None) -> None:
        """`labels`: where `cmd/label` records (None: a station without a review queue rejects every label)."""
        self._pipeline = pipeline
        self._labels = labels
        self._triggered = triggered
        self._on_event = on_event
        self._rebirth = rebirth
        self._max_command_bytes = max_command_bytes
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_lock = threading.Lock()

    def on_command(self, kind: str, payload: bytes, retained: bool) -> None:
        message_id = None
        if not payload.strip() and retained:
            # An empty retained message is how MQTT clears a retained one (it arrives retained: the subscription
            # is Retain As Published); it carries no command to refuse. An empty live message is a command like
            # any other: a rebirth, or a trigger or mode missing its field (rejected below).
            log.info("empty retained %r message ignored (a retained command being cleared)", kind[:64])
            return
        try:
            if retained:
                raise CommandError(kind, "(message)", "retained commands are refused; publish without the "
                                   "retain flag (and clear it: mosquitto_pub -r -n -t <topic>)")
            command = parse_command(kind, payload, max_bytes=self._max_command_bytes)
            message_id = command.message_id
            if message_id is not None and self._already_seen(message_id):
                log.info("command %s %s already applied; duplicate ignored", kind, message_id)
                return
            self._apply(kind, command)
            if message_id is not None:
                # Remembered once applied: a rejected command was never applied, so its redelivery is answered
                # again rather than called a duplicate.
                self._remember(message_id)
        except CommandError as exc:
            log.warning("command rejected: %s", exc)
            # exc.kind, not kind: the topic level is the sender's text, cut to the bound there.
            self._on_event("command_rejected", {"command": exc.kind, "field": exc.field, "reason": exc.reason,
                                                "command_message_id": message_id})

    def _apply(self, kind: str, command: TriggerCommand | ModeCommand | RebirthCommand | LabelCommand) -> None:
        if isinstance(command, RebirthCommand):
            self._rebirth()
        elif isinstance(command, TriggerCommand):
            if not self._triggered:
                raise CommandError(kind, "part_id", "this station inspects continuously (trigger.mode = "
                                   "\"continuous\"); triggers are accepted only with trigger.mode = \"triggered\"")
            self._pipeline.trigger(command.part_id)
            log.info("trigger for part %s", command.part_id)
        elif isinstance(command, ModeCommand):
            self._pipeline.modes.set_mode(Mode(command.mode))  # mode_changed is reported by the mode control
        elif isinstance(command, LabelCommand):
            self._label(kind, command)

    def _label(self, kind: str, command: LabelCommand) -> None:
        if self._labels is None:
            raise CommandError(kind, "(command)", "this station keeps no review queue (review.enabled = false): "
                               "there is nothing to label")
        try:
            self._labels.record_label(command.inspection_id, command.verdict, labeller=command.labeller,
                                      defect_type=command.defect_type, source="mqtt",
                                      message_id=command.message_id)
        except UnknownInspection as exc:
            raise CommandError(kind, "inspection_id", f"unknown inspection id {command.inspection_id!r}: not in "
                               "this station's review queue (only queued parts can be labelled)") from exc
        except ValueError as exc:
            raise CommandError(kind, "(label)", str(exc)) from exc
        except (sqlite3.Error, OSError) as exc:
            # Not remembered as applied: the same message sent again is tried again.
            raise CommandError(kind, "(store)", f"the review store cannot record the label now ({describe(exc)}); "
                               "send it again later") from exc
        log.info("label %s for inspection %s by %s", command.verdict, command.inspection_id, command.labeller)

    def _already_seen(self, message_id: str) -> bool:
        with self._seen_lock:
            return message_id in self._seen

    def _remember(self, message_id: str) -> None:
        with self._seen_lock:
            self._seen[message_id] = None
            while len(self._seen) > SEEN_COMMANDS:
                self._seen.popitem(last=False)
