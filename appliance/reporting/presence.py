"""Who the station is, as its MQTT birth says: software, model, backend, configuration fingerprint, cameras,
boot id. Built from the pipeline's status whenever the link (re)connects or is asked for a rebirth."""

from __future__ import annotations

import hashlib
import threading
import uuid
from typing import Protocol

from appliance import __version__
from appliance.reporting.payloads import BirthPayload
from appliance.station.status import StationStatus

BOOT_ID = uuid.uuid4().hex  # one per process: a birth with a new boot id means the station restarted


def config_hash(settings_json: str) -> str:
    """A short, stable fingerprint of the effective configuration (secrets excluded by the caller)."""
    return hashlib.sha256(settings_json.encode()).hexdigest()[:16]


class StatusSource(Protocol):
    """What presence and heartbeats read: `appliance.station.Pipeline` is one."""

    def status(self) -> StationStatus: ...


class Presence:
    """Builds births; `birth` runs on the link thread, `backend_started` on the runtime's."""

    def __init__(self, status: StatusSource, station: str, *, config_fingerprint: str, model_id: str = "") -> None:
        self._status = status
        self._station = station
        self._config_fingerprint = config_fingerprint
        self._model_id = model_id  # the bundle's, until a backend names its own
        self._lock = threading.Lock()
        self._started = False
        self._last_backend: str | None = None  # what the last birth said

    def birth(self, bd_seq: int) -> BirthPayload:
        # Under the lock, status included: against backend_started() running between reading and deciding.
        with self._lock:
            status = self._status.status()
            # Before the backend is up the birth says `starting`; backend_started() then asks for another.
            backend = status.backend if self._started else "starting"
            self._last_backend = backend
        return BirthPayload(
            station=self._station, software_version=__version__, model_id=status.model_id or self._model_id,
            backend=backend, config_hash=self._config_fingerprint, cameras=[status.camera.source], boot_id=BOOT_ID,
            bd_seq=bd_seq,
        )

    def backend_started(self) -> bool:
        """The pipeline's backend is up; True when a birth already went out saying `starting` (send another)."""
        with self._lock:
            self._started = True
            return self._last_backend == "starting"
