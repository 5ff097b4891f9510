"""The bench's one error: a step that could not run (a child process failed, an input is unusable)."""

from __future__ import annotations

from bundle.errors import ApplianceError


class BenchError(ApplianceError):
    """The benchmark could not produce its numbers; the message names the step and what to do."""

    exit_code = 1
