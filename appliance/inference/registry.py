"""Backend name -> how to open it, and at which of the bundle's operating points its scores are judged.

`inference.backend`'s choices, the per-backend operating points and the supervisor's primary and fallback
all derive from `BACKENDS`. Adding a backend: one module beside onnxruntime.py with `open_backend(request)`
and `decision_precision(configured)`, one entry below, its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.inference import onnxruntime, tensorrt
from appliance.inference.backend import BackendRequest, InferenceBackend


@dataclass(frozen=True)
class BackendEntry:
    name: str  # as in inference.backend, every inspection record, heartbeats and the birth
    open: Callable[[BackendRequest], InferenceBackend]  # called on the inference thread, which then owns it
    # The configured engine precision -> the precision whose operating point (bundle metadata) judges its scores.
    decision_precision: Callable[[str], str]
    gpu: bool  # runs on the GPU: its loss is `gpu_lost` / `gpu_back`, and health's `gpu.state` follows it
    summary: str  # for documentation and `--help`


BACKENDS: dict[str, BackendEntry] = {
    entry.name: entry
    for entry in (
        BackendEntry("tensorrt", tensorrt.open_backend, tensorrt.decision_precision, True,
                     "the TensorRT engine built on this device (make engine)"),
        BackendEntry("onnxruntime", onnxruntime.open_backend, onnxruntime.decision_precision, False,
                     "the bundle's FP32 ONNX model on the CPU"),
    )
}
AUTO = "auto"  # the GPU backend, falling back as configured: what a Jetson station runs
AUTO_PRIMARY = "tensorrt"
CPU_FALLBACK = "onnxruntime"  # what inference.cpu_fallback runs while the GPU is unusable
CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)


def primary_backend(configured: str) -> BackendEntry:
    """The backend a station configured with `inference.backend = configured` starts on."""
    return BACKENDS[AUTO_PRIMARY if configured == AUTO else configured]


def runs_on_gpu(name: str) -> bool:
    """Whether the backend named `name` (as a record or heartbeat names it) is a GPU one; "none" is not."""
    entry = BACKENDS.get(name)
    return entry is not None and entry.gpu
