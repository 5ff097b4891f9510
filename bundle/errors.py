"""Errors a plant engineer can act on: what went wrong, where, and what to do.

Each class maps to a process exit code at the CLI edge, so scripts and systemd can tell them apart.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class: a message naming the file, key or value at fault, and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(ApplianceError):
    """The station configuration is missing, unreadable or invalid."""

    exit_code = 2


class DatasetError(ApplianceError):
    """A training or evaluation dataset has the wrong layout or unreadable content."""

    exit_code = 3


class ImageReadError(DatasetError):
    """One image file could not be read or decoded."""


class BundleError(ApplianceError):
    """A model bundle is incomplete, modified since export, or inconsistent."""

    exit_code = 4


class CheckpointError(ApplianceError):
    """A training checkpoint is missing, corrupt or from another model."""

    exit_code = 5


class FrameError(ApplianceError):
    """A frame cannot be inspected (empty, wrong shape or dtype): that part gets an `error` verdict."""

    exit_code = 6


class GpuUnavailableError(ApplianceError):
    """No usable GPU path: TensorRT or pycuda missing, no CUDA device, engine incompatible, or a CUDA
    error at run time. The station switches to manual_fallback (or the CPU fallback) and retries."""

    exit_code = 7


class CameraError(ApplianceError):
    """The camera source cannot be opened or stopped delivering frames."""

    exit_code = 8


class EngineBuildError(ApplianceError):
    """A TensorRT engine could not be built or failed its validation: nothing was installed."""

    exit_code = 9
