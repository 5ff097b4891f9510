"""`appliance run`: wire settings, bundle, camera, backends, pipeline and reporters together.

Everything with a side effect is created here, at the edge; the pieces it connects know nothing of
settings files.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.bundle import Bundle, load_bundle
from appliance.decision import Mode, OperatingPoint
from appliance.errors import ConfigError, GpuUnavailableError
from appliance.ort_backend import OnnxRuntimeBackend
from appliance.pipeline import Pipeline, PipelineConfig
from appliance.results_log import InspectionRecord, ResultsLog
from appliance.settings import StationSettings
from appliance.supervisor import BackendSupervisor, EventSink

log = logging.getLogger("appliance")
SLOTS = 3  # two for double buffering between preprocess and inference, one spare for the inference thread


def operating_point(settings: StationSettings, bundle: Bundle) -> OperatingPoint:
    """The bundle's operating point with the station's overrides applied (validated together)."""
    d, o = bundle.metadata.decision, settings.decision
    threshold = o.threshold if o.threshold is not None else d.threshold
    low = o.band_low if o.band_low is not None else min(d.band_low, threshold)
    high = o.band_high if o.band_high is not None else max(d.band_high, threshold)
    try:
        return OperatingPoint(threshold, low, high)
    except ValueError as exc:
        raise ConfigError(f"decision: threshold {threshold} with band [{low}, {high}]: {exc}") from exc


def find_engine(settings: StationSettings, bundle: Bundle) -> Path:
    """The engine built on this device for this bundle and precision (by its manifest)."""
    from engines.manifest import load_manifest, manifest_path

    folder = settings.model.engine_dir
    candidates = sorted(folder.glob("*.engine")) if folder.is_dir() else []
    for engine in candidates:
        try:
            m = load_manifest(manifest_path(engine))
        except GpuUnavailableError:
            continue
        if m.bundle_model_id == bundle.model_id and m.precision == settings.inference.precision:
            return engine
    raise GpuUnavailableError(
        f"no {settings.inference.precision} engine for model {bundle.model_id} in {folder}",
        hint="build it on this device: make engine BUNDLE=... PRECISION=...",
    )


def supervisor_factory(settings: StationSettings, bundle: Bundle):
    """A function the inference thread calls to build its BackendSupervisor (on that thread)."""
    inf = settings.inference

    def cpu() -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=inf.threads, slots=SLOTS,
                                  model_id=bundle.model_id, spin=False)

    def gpu():
        from appliance.trt_backend import TensorRTBackend

        return TensorRTBackend(find_engine(settings, bundle), slots=SLOTS)

    def build(on_event: EventSink) -> BackendSupervisor:
        if inf.backend == "onnxruntime":
            return BackendSupervisor(cpu, "onnxruntime", None, on_event, retry_max_s=inf.gpu_retry_max_s)
        fallback = cpu if inf.cpu_fallback and bundle.has("onnx_fp32") else None
        return BackendSupervisor(gpu, "tensorrt", fallback, on_event, retry_max_s=inf.gpu_retry_max_s)

    return build


class LogReporter:
    """Results log on disk plus one log line per part: the reporter that works without any network."""

    def __init__(self, results: ResultsLog, echo: bool = True) -> None:
        self.results = results
        self.echo = echo

    def inspection(self, record: InspectionRecord) -> None:
        self.results.add(record)
        if self.echo:
            score = "-" if record.score is None else f"{record.score:.4f}"
            name = f" {record.source_name}" if record.source_name else ""
            log.info("station=%s part=%s%s verdict=%s score=%s mode=%s backend=%s e2e=%.1fms reason=%s",
                     record.station_id, record.part_id, name, record.verdict, score, record.mode, record.backend,
                     record.latency_ms.get("end_to_end_ms", float("nan")), record.reason)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        self.results.event(kind, detail)


def build_pipeline(settings: StationSettings, reporter=None, source=None) -> tuple[Pipeline, ResultsLog]:
    """Everything `appliance run` starts, not yet started."""
    from appliance.camera import open_source

    bundle = load_bundle(settings.model.bundle, verify=settings.model.verify_bundle)
    op = operating_point(settings, bundle)
    data = settings.storage.data_dir
    results = ResultsLog(data / "results.sqlite3")
    config = PipelineConfig(
        station_id=settings.station.id, spec=bundle.metadata.preprocess, operating_point=op,
        mode=Mode(settings.decision.mode), triggered=settings.trigger.mode == "triggered",
        defect_index=bundle.metadata.defect_index,
    )
    pipeline = Pipeline(config, source or open_source(settings.camera), supervisor_factory(settings, bundle),
                        reporter or LogReporter(results))
    return pipeline, results


def run(settings: StationSettings, max_seconds: float | None = None, trigger_stdin: bool = False) -> int:
    """Run until the source ends, SIGTERM/SIGINT, or `max_seconds`; drain, record, exit 0."""
    pipeline, results = build_pipeline(settings)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping capture, finishing the parts in flight", signal.Signals(signum).name)
        stop_requested.set()
        pipeline.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pipeline.start()
    if trigger_stdin:
        threading.Thread(target=_stdin_triggers, args=(pipeline,), daemon=True, name="stdin-trigger").start()
    started = time.monotonic()
    while pipeline.alive:
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            pipeline.stop()
        time.sleep(0.1)
    pipeline.join()
    counts = results.counts()
    snap = pipeline.stats.snapshot()
    log.info("stopped: %d inspections %s, %d live frames dropped, %.1f parts/s, end-to-end p50 %.1f ms p99 %.1f ms",
             snap["inspections"], counts, pipeline.dropped, snap["throughput_per_s"], snap["end_to_end_ms_p50"],
             snap["end_to_end_ms_p99"])
    results.close()
    return 1 if pipeline.crashed else 0


def _stdin_triggers(pipeline: Pipeline) -> None:
    for line in sys.stdin:
        part_id = line.strip()
        if part_id:
            pipeline.trigger(part_id)
