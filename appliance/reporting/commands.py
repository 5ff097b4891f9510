"""Commands from the control room (`cmd/trigger`, `cmd/mode`, `cmd/rebirth`), as the MQTT link hands them over.

Each is validated (payloads.parse_command: bounded size, exact shape), de-duplicated on its message id (QoS 1
may deliver twice, and a trigger must not inspect two parts), and applied to the pipeline. A rejected command
changes nothing and is answered with exactly one `command_rejected` event naming the field and the reason.
A retained command is refused: it would be applied again on every reconnect.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from appliance.reporting.payloads import (
    DEFAULT_MAX_COMMAND_BYTES,
    CommandError,
    ModeCommand,
    RebirthCommand,
    TriggerCommand,
    parse_command,
)
from appliance.reporting.recorder import EventSink
from appliance.station.modes import ModeControl
from bundle.decision import Mode

log = logging.getLogger("appliance.reporting.commands")

SEEN_COMMANDS = 1024  # message ids remembered for de-duplication


class Triggerable(Protocol):
    """What commands need of the pipeline: `appliance.station.Pipeline` is one."""

    modes: ModeControl

    def trigger(self, part_id: str) -> None: ...


class CommandHandler:
    """`on_command(kind, payload, retained)`: the MQTT link's command callback (called on the link thread)."""

    def __init__(self, pipeline: Triggerable, *, triggered: bool, on_event: EventSink,
                 rebirth: Callable[[], None], max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES) -> None:
        self._pipeline = pipeline
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

    def _apply(self, kind: str, command: TriggerCommand | ModeCommand | RebirthCommand) -> None:
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

    def _already_seen(self, message_id: str) -> bool:
        with self._seen_lock:
            return message_id in self._seen

    def _remember(self, message_id: str) -> None:
        with self._seen_lock:
            self._seen[message_id] = None
            while len(self._seen) > SEEN_COMMANDS:
                self._seen.popitem(last=False)
