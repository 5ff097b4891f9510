"""The single synchronisation helper of the tests: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """True as soon as `predicate()` is truthy; False if it is still falsy after `timeout` seconds.

    Use it as `assert wait_until(lambda: ..., timeout), <what was seen>`: the test goes on the moment the
    condition holds, and the deadline only bounds a failure. The predicate is asked once more at the deadline,
    so a condition that became true during the last interval is not reported as a timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
