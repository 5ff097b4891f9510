"""TensorRT's Python bindings, imported on first use, and the two things every TensorRT call here needs:
a logger that forwards to `logging`, and this device as engine compatibility sees it.

The only place `import tensorrt` is written: a machine without TensorRT loads every module of the project
and gets JetPack's install hint at the first TensorRT call instead of an ImportError at import.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from bundle.errors import GpuUnavailableError
from engines.cuda_memory import device_identity, device_multiprocessors
from engines.manifest import DeviceInfo

log = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "TensorRT Python bindings not importable: on a Jetson they come with JetPack (python3-libnvinfer); "
    "the venv needs --system-site-packages"
)


def import_tensorrt() -> ModuleType:
    """`tensorrt`, imported on first use; GpuUnavailableError with the JetPack hint when missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise GpuUnavailableError(f"{TENSORRT_MISSING} ({exc})") from exc
    return trt


def device_info(device_index: int = 0) -> DeviceInfo:
    """This device as engine compatibility sees it: TensorRT version, GPU name and size, compute capability."""
    trt = import_tensorrt()
    name, capability = device_identity(device_index)
    return DeviceInfo(tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=capability,
                      gpu_multiprocessors=device_multiprocessors(device_index))


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and remembers the last error for exception messages.

    The class derives from trt.ILogger, so it can only be defined once TensorRT is imported.
    """
    severity = trt.ILogger.Severity
    errors = {severity.INTERNAL_ERROR, severity.ERROR}

    class _ForwardingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # TensorRT requires the explicit base-class init
            self.last_error = ""

        def log(self, sev: Any, msg: str) -> None:
            if sev in errors:
                self.last_error = msg
                log.error("TensorRT: %s", msg)
            elif sev == severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif sev == severity.INFO:
                log.debug("TensorRT: %s", msg)

    return _ForwardingLogger()
