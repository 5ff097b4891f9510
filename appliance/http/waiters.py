"""Sink `http_waiters`: hands the record of an uploaded part to the HTTP request waiting for it.

`POST /inspect` submits the image (`Pipeline.submit`, which returns the inspection id) and then waits, bounded,
for the record with that id. The record comes through the fan-out like every other one, on the decide thread,
after the results log and MQTT sinks took it. It may arrive before the request has started waiting (a fast
backend): a record of an upload nobody waits for yet is kept (the newest `keep` of them), so that the wait
finds it. Neither sink call blocks: a short lock, and `call_soon_threadsafe` into the waiter's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from typing import Any

from appliance.station.inspection import NO_EVIDENCE, Evidence, InspectionRecord

# Pipeline.submit's source_name of every upload starts with this (the results log keeps it as the source name).
UPLOAD_SOURCE = "upload"


class ResultWaiters:
    """The records of uploaded parts, by inspection id, to the coroutines waiting for them."""

    name = "http_waiters"

    def __init__(self, source_prefix: str = UPLOAD_SOURCE, keep: int = 256) -> None:
        self._prefix = source_prefix
        self._keep = keep
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[InspectionRecord]]] = {}
        self._early: OrderedDict[str, InspectionRecord] = OrderedDict()  # records nobody waited for yet

    # --- Sink ------------------------------------------------------------------------------------------------
    def inspection(self, record: InspectionRecord, evidence: Evidence = NO_EVIDENCE) -> None:
        if not record.source_name.startswith(self._prefix):
            return  # a camera part: nobody waits for it here
        with self._lock:
            waiter = self._waiting.pop(record.inspection_id, None)
            if waiter is None:
                self._early[record.inspection_id] = record
                while len(self._early) > self._keep:
                    self._early.popitem(last=False)
                return
        loop, future = waiter
        # RuntimeError: the server's loop is closed; the request is gone, and the record is logged anyway.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, future, record)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True  # nothing to write

    # --- the HTTP side ---------------------------------------------------------------------------------------
    async def wait(self, inspection_id: str, timeout: float) -> InspectionRecord | None:
        """The record of `inspection_id` once it is decided, or None after `timeout` s."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InspectionRecord] = loop.create_future()
        with self._lock:
            early = self._early.pop(inspection_id, None)
            if early is not None:
                return early
            self._waiting[inspection_id] = (loop, future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            with self._lock:
                self._waiting.pop(inspection_id, None)

    @property
    def waiting(self) -> int:
        """Requests waiting for a record now."""
        with self._lock:
            return len(self._waiting)


def _resolve(future: asyncio.Future[InspectionRecord], record: InspectionRecord) -> None:
    if not future.done():
        future.set_result(record)
