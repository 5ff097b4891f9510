"""The station's state in one typed snapshot: what heartbeats, the birth, `doctor`, systemd's STATUS line, and
later the HTTP API and the control room read. Taken by `Pipeline.status()`; plain data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.camera import CameraState


@dataclass(frozen=True)
class StationStatus:
    """A snapshot of one running pipeline (times: epoch seconds; latencies: milliseconds, NaN before any part)."""

    station_id: str
    mode: str  # the mode parts are decided in now ("manual_fallback" while a fallback cause holds)
    configured_mode: str  # what the station returns to after a fallback
    fallback_reason: str  # why it is in manual_fallback by itself; "" when it is not
    backend: str  # "tensorrt", "onnxruntime", or "none" (no model can run: every part goes to a person)
    model_id: str  # bundle model id or engine id of the running backend; "" with none
    backend_ready: bool  # the inference thread has started its backend (or found none can run)
    inspections: int
    verdicts: dict[str, int]  # verdict -> count since start
    throughput_per_s: float  # over the latest inspections (RollingStats window)
    latency_p50_ms: float
    latency_p99_ms: float
    dropped: int  # live frames dropped because the pipeline was busy
    camera: CameraState
    camera_live: bool  # a camera on its own clock (it can disconnect and drop frames), not files or synthetic
    queues: dict[str, int]  # parts waiting before each stage ("preprocess", "infer", "decide")
    last_error: str | None  # the last inference error or the stage that died
    failure: str | None  # a stage thread that died (the runtime exits with EXIT_THREAD_FAILED)
    fatal: str | None  # a fatal CUDA error (the runtime exits with EXIT_CUDA_FATAL)
    started_at: float
    stats: dict[str, Any] = field(default_factory=dict)  # RollingStats.snapshot(): every percentile it keeps

    @property
    def defects(self) -> int:
        return self.verdicts.get("fail", 0)
