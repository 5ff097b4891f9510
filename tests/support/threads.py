"""Running a call on another thread, as the station's threads would (CUDA ownership tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_on_thread(target: Callable[[], Any], name: str, timeout: float = 120.0) -> Any:
    """Run `target` on a new thread named `name`; its result, or its exception re-raised here."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=body, name=name)
    worker.start()
    worker.join(timeout=timeout)
    assert not worker.is_alive(), f"thread {name} did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
