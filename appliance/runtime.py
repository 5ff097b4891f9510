"""`appliance run`: wire settings, bundle, camera, backends, pipeline and reporters together.

Everything with a side effect is created here, at the edge; the pieces it connects know nothing of
settings files.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.inference.supervisor import BackendSupervisor, EventSink
from appliance.reporting.mqtt_link import LinkConfig
from appliance.reporting.mqtt_reporter import LogReporter, MqttReporter, config_hash
from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import PART_ID_PATTERN, Topics
from appliance.reporting.results_log import ResultsLog
from appliance.settings import StationSettings, mqtt_password
from appliance.station.pipeline import Pipeline, PipelineConfig
from appliance.station.watchdog import Watchdog, notify, watchdog_interval_s
from appliance.threads import EXIT_CUDA_FATAL, EXIT_THREAD_FAILED, ThreadFailure
from bundle.decision import Mode, OperatingPoint
from bundle.errors import ConfigError, GpuUnavailableError
from bundle.format import Bundle, load_bundle
from bundle.onnx_runtime import OnnxRuntimeBackend
from engines.manifest import DeviceInfo

log = logging.getLogger("appliance")
SLOTS = 3  # two for double buffering between preprocess and inference, one spare for the inference thread


def operating_point(settings: StationSettings, bundle: Bundle, precision: str = "fp32") -> OperatingPoint:
    """The bundle's operating point for `precision`, with the station's overrides applied (validated together)."""
    d, o = bundle.metadata.decision_for(precision), settings.decision
    threshold = o.threshold if o.threshold is not None else d.threshold
    low = o.band_low if o.band_low is not None else min(d.band_low, threshold)
    high = o.band_high if o.band_high is not None else max(d.band_high, threshold)
    try:
        return OperatingPoint(threshold, low, high)
    except ValueError as exc:
        raise ConfigError(f"decision: threshold {threshold} with band [{low}, {high}]: {exc}") from exc


def operating_points(settings: StationSettings, bundle: Bundle) -> dict[str, OperatingPoint]:
    """Operating point by backend name: the TensorRT engine's precision, and FP32 for the ONNX Runtime path.

    A station whose INT8 engine falls back to the CPU switches threshold with the backend, so each part
    is judged at the point chosen for the scores that judged it.
    """
    return {
        "tensorrt": operating_point(settings, bundle, settings.inference.precision),
        "onnxruntime": operating_point(settings, bundle, "fp32"),
    }


def find_engine(settings: StationSettings, bundle: Bundle, device: DeviceInfo | None = None) -> Path:
    """The engine built on this device for this bundle and precision (by its manifest).

    Several may match (an engine from before a JetPack upgrade stays until removed): the one that fits
    `device` wins, else the newest, which the backend then refuses with the reason.
    """
    from engines.manifest import incompatibilities, load_manifest, manifest_path

    folder = settings.model.engine_dir
    matching = []
    for engine in sorted(folder.glob("*.engine")) if folder.is_dir() else []:
        try:
            m = load_manifest(manifest_path(engine))
        except GpuUnavailableError:
            continue
        if m.bundle_model_id != bundle.model_id or m.precision != settings.inference.precision:
            continue
        if m.validation is not None and not m.validation.get("passed", False):
            continue
        fits = device is not None and not incompatibilities(m, device)
        matching.append((fits, m.built_utc, engine))
    if not matching:
        raise GpuUnavailableError(
            f"no {settings.inference.precision} engine for model {bundle.model_id} in {folder}",
            hint=f"build it on this device: make engine BUNDLE={settings.model.bundle} "
                 f"PRECISION={settings.inference.precision}",
        )
    return max(matching)[2]


def supervisor_factory(settings: StationSettings, bundle: Bundle):
    """A function the inference thread calls to build its BackendSupervisor (on that thread)."""
    inf = settings.inference

    def cpu() -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=inf.threads, slots=SLOTS,
                                  model_id=bundle.model_id, spin=False)

    def gpu():
        from engines.runner import TensorRTBackend
        from engines.tensorrt import device_info

        device = device_info()
        return TensorRTBackend(find_engine(settings, bundle, device), slots=SLOTS, device=device,
                               allow_other_gpu_model=inf.allow_other_gpu_model)

    def build(on_event: EventSink) -> BackendSupervisor:
        if inf.backend == "onnxruntime":
            return BackendSupervisor(cpu, "onnxruntime", None, on_event, retry_max_s=inf.gpu_retry_max_s)
        fallback = cpu if inf.cpu_fallback and bundle.has("onnx_fp32") else None
        return BackendSupervisor(gpu, "tensorrt", fallback, on_event, retry_max_s=inf.gpu_retry_max_s)

    return build


@dataclass
class Station:
    """What `appliance run` starts: the pipeline, its local results log, and the MQTT side when enabled."""

    pipeline: Pipeline
    results: ResultsLog
    mqtt: MqttReporter | None = None
    outbox: Outbox | None = None
    local: LogReporter | None = None  # the results log's writer and the storage watch

    def failure(self) -> ThreadFailure | None:
        """The first station thread that died (pipeline stage, MQTT link or monitor, store writer), if any."""
        for failure in (self.pipeline.failure, self.local.failures.failure if self.local else None):
            if failure is not None:
                return failure
        return None

    def close(self, timeout: float = 10.0) -> bool:
        """Write what the writers still hold (bounded), then close the files. True when nothing was left."""
        written = self.local.close(timeout) if self.local is not None else True
        if self.outbox is not None:
            self.outbox.close()
        self.results.close()
        return written


def mqtt_link_config(settings: StationSettings) -> LinkConfig:
    """The broker connection from the settings; ConfigError names a TLS file or password file at fault."""
    m, s = settings.mqtt, settings.station
    try:
        topics = Topics(m.topic_root, s.site, s.line, s.id)
    except ValueError as exc:
        raise ConfigError(f"mqtt.topic_root / station: {exc}") from exc
    if m.tls.enabled:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(m.tls, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt.tls.{key} = {str(path)!r}: no such file")
        if (m.tls.cert_file is None) != (m.tls.key_file is None):
            raise ConfigError("mqtt.tls.cert_file and mqtt.tls.key_file go together (a client certificate and its key)")
    return LinkConfig(
        host=m.host, port=m.port, client_id=s.id, topics=topics, username=m.username, password=mqtt_password(settings),
        tls=m.tls.enabled, ca_file=m.tls.ca_file, cert_file=m.tls.cert_file, key_file=m.tls.key_file,
        keepalive_s=m.keepalive_s, reconnect_max_s=m.reconnect_max_s,
    )


def build_station(settings: StationSettings, reporter=None, source=None, mqtt: bool | None = None) -> Station:
    """Everything `appliance run` starts, not yet started. `mqtt` defaults to `mqtt.enabled`."""
    from appliance.camera import open_source

    bundle = load_bundle(settings.model.bundle, verify=settings.model.verify_bundle)
    ops = operating_points(settings, bundle)
    link_config = mqtt_link_config(settings) if (settings.mqtt.enabled if mqtt is None else mqtt) else None
    data = settings.storage.data_dir
    pending_max = settings.storage.pending_max
    # Not open_now: a store that cannot be opened (read-only or full disk) is a storage fault the writers
    # ride out with the parts in memory, not a reason to refuse to start.
    results = ResultsLog(data / "results.sqlite3", open_now=False)
    mqtt_reporter = outbox = local = None
    if reporter is None:
        reporter = local = LogReporter(results, max_pending=pending_max)
    if link_config is not None and local is not None:
        m = settings.mqtt
        outbox = Outbox(data / "outbox.sqlite3", max_messages=m.outbox_max_messages, max_age_s=m.outbox_max_age_s,
                        open_now=False)
        reporter = mqtt_reporter = MqttReporter(
            link_config, outbox, local,
            config_fingerprint=config_hash(settings.model_dump_json()), configured_backend=settings.inference.backend,
            triggered=settings.trigger.mode == "triggered", model_id=bundle.model_id, heartbeat_s=m.heartbeat_s,
            data_dir=data, max_pending=pending_max, max_command_bytes=m.max_command_bytes,
        )
    config = PipelineConfig(
        station_id=settings.station.id, spec=bundle.metadata.preprocess,
        operating_point=ops["onnxruntime" if settings.inference.backend == "onnxruntime" else "tensorrt"],
        operating_point_by_backend=ops,
        mode=Mode(settings.decision.mode), triggered=settings.trigger.mode == "triggered",
        defect_index=bundle.metadata.defect_index,
        # At the end of the stream the decide thread waits only briefly: run() gives the writers their time.
        flush_timeout_s=min(2.0, settings.mqtt.drain_timeout_s),
        # Continuous part ids carry this start's number: unique across restarts (README, "Part ids").
        run_id=f"r{results.next_counter('run')}",
    )
    pipeline = Pipeline(config, source or open_source(settings.camera), supervisor_factory(settings, bundle), reporter)
    if mqtt_reporter is not None:
        mqtt_reporter.attach(pipeline)
    elif local is not None:
        local.attach(pipeline)
    return Station(pipeline, results, mqtt_reporter, outbox, local)


def build_pipeline(settings: StationSettings, reporter=None, source=None) -> tuple[Pipeline, ResultsLog]:
    """The pipeline and its results log alone (no MQTT): for tests and benchmarks."""
    station = build_station(settings, reporter=reporter, source=source, mqtt=False)
    return station.pipeline, station.results


def run(settings: StationSettings, max_seconds: float | None = None, trigger_stdin: bool = False) -> int:
    """Run until the source ends, SIGTERM/SIGINT, or `max_seconds`; drain, record, exit 0."""
    station = build_station(settings)
    pipeline = station.pipeline

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping capture, finishing the parts in flight", signal.Signals(signum).name)
        notify("STOPPING=1")
        pipeline.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if station.mqtt is not None:
        station.mqtt.start()  # connects in the background; until then everything waits in the outbox
    pipeline.start()
    if station.mqtt is not None:
        station.mqtt.pipeline_started()
    if trigger_stdin:
        threading.Thread(target=_stdin_triggers, args=(pipeline,), daemon=True, name="stdin-trigger").start()
    notify("READY=1")
    interval = watchdog_interval_s()
    watchdog = None
    if interval is not None:
        # Pings at half systemd's interval, so one late ping is not yet a restart.
        watchdog = Watchdog(lambda: pipeline.stall_reason(settings.watchdog.stall_s), interval / 2).start()
    started = last_status = time.monotonic()
    failure = reported = None
    while pipeline.alive:
        failure = station.failure()
        if failure is not None:
            # Half a station (inspecting without recording or reporting) is worse than a restart.
            _report_failure(station, failure)
            reported = failure
            pipeline.stop()
            break
        now = time.monotonic()
        if max_seconds is not None and now - started > max_seconds:
            pipeline.stop()
        if now - last_status >= 10.0:
            last_status = now
            snap = pipeline.stats.snapshot()
            notify(f"STATUS={snap['inspections']} inspected, {pipeline.mode.value}, backend {pipeline.backend_name}")
        time.sleep(0.1)
    # After a thread died the stages behind it may wait forever for it: do not wait long for them.
    join_s = 60.0 if failure is None else 10.0
    if not pipeline.join(join_s):
        log.error("the pipeline did not finish within %.0f s of the stop", join_s)
    if watchdog is not None:
        watchdog.stop()
    failure = failure or station.failure()
    if failure is not None and failure is not reported:  # a stage that died ended the loop by itself
        _report_failure(station, failure)
    snap = pipeline.stats.snapshot()
    log.info("stopped: %d inspections %s, %d live frames dropped, %.1f parts/s, end-to-end p50 %.1f ms p99 %.1f ms",
             snap["inspections"], snap["verdicts"], pipeline.dropped, snap["throughput_per_s"],
             snap["end_to_end_ms_p50"], snap["end_to_end_ms_p99"])
    # One budget for what is left (the writers' backlogs, then the broker): mqtt.drain_timeout_s, so that the
    # whole stop stays inside systemd's TimeoutStopSec (drain + 30 s, provisioning/) even during a storage fault.
    if station.mqtt is not None and not station.mqtt.stop(settings.mqtt.drain_timeout_s):
        log.warning("%d message(s) stay in the outbox %s for the next start", station.outbox.depth(),
                    station.outbox.path)
    if not station.close(1.0 if station.mqtt is not None else settings.mqtt.drain_timeout_s):
        log.error("some records could not be written before the stop (storage fault): see the UNRECORDED lines")
    if failure is not None:
        log.critical("exiting with %d so systemd restarts the station: %s", EXIT_THREAD_FAILED, failure.describe())
        return EXIT_THREAD_FAILED
    if pipeline.fatal is not None:  # reported as a cuda_fatal event by the supervisor
        log.critical("exiting with %d so systemd restarts the station: %s", EXIT_CUDA_FATAL, pipeline.fatal)
        return EXIT_CUDA_FATAL
    return 0


def _report_failure(station: Station, failure: ThreadFailure) -> None:
    """Log and report a dead thread once: an event (results log, outbox, and straight to the broker)."""
    log.critical("%s; stopping the station", failure.describe())
    detail = {"thread": failure.thread, "error": failure.error, "exit_code": EXIT_THREAD_FAILED}
    reporter = station.mqtt or station.local
    if reporter is not None:
        reporter.event("thread_failed", detail)  # also straight to the broker: see reporting._URGENT_EVENTS


def _stdin_triggers(pipeline: Pipeline) -> None:
    for line in sys.stdin:
        part_id = line.strip()
        if not part_id:
            continue
        # The same rule as cmd/trigger: a part id becomes a log field, a topic payload, maybe a file name.
        if re.fullmatch(PART_ID_PATTERN, part_id) is None:
            log.error("trigger from standard input refused: part id %r is not 1-128 characters of letters, digits "
                      "and _ . : - starting with a letter or digit", part_id[:80])
            continue
        pipeline.trigger(part_id)
