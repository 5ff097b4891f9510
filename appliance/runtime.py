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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.camera import FrameSource, open_source
from appliance.inference.backend import BackendRequest
from appliance.inference.registry import BACKENDS, CPU_FALLBACK, primary_backend
from appliance.inference.supervisor import BackendSupervisor, EventSink
from appliance.reporting.commands import CommandHandler
from appliance.reporting.fanout import FanOut
from appliance.reporting.heartbeat import HeartbeatMonitor
from appliance.reporting.mqtt_link import LinkConfig, MqttLink
from appliance.reporting.mqtt_sink import MqttSink
from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import PART_ID_PATTERN, Topics
from appliance.reporting.presence import Presence, config_hash
from appliance.reporting.results_log import ResultsLog
from appliance.reporting.results_sink import ResultsLogSink
from appliance.reporting.storage_watch import StorageWatch
from appliance.review.sink import ReviewSink
from appliance.settings import StationSettings, mqtt_password
from appliance.station.modes import ModeControl
from appliance.station.pipeline import Pipeline, PipelineConfig
from appliance.station.sink import Sink
from appliance.station.watchdog import Watchdog, notify, watchdog_interval_s
from appliance.threads import EXIT_CUDA_FATAL, EXIT_THREAD_FAILED, FailureLatch, ThreadFailure
from bundle.decision import Mode, OperatingPoint
from bundle.errors import ConfigError
from bundle.format import Bundle, load_bundle

if TYPE_CHECKING:
    from appliance.http import HttpApi

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
    """Operating point by backend name (inference.registry): TensorRT at the engine's precision, ONNX Runtime at FP32.

    A station whose INT8 engine falls back to the CPU switches threshold with the backend, so each part
    is judged at the point chosen for the scores that judged it.
    """
    configured = settings.inference.precision
    return {name: operating_point(settings, bundle, entry.decision_precision(configured))
            for name, entry in BACKENDS.items()}


def backend_request(settings: StationSettings, bundle: Bundle) -> BackendRequest:
    inf = settings.inference
    return BackendRequest(bundle=bundle, engine_dir=settings.model.engine_dir, precision=inf.precision,
                          threads=inf.threads, slots=SLOTS, allow_other_gpu_model=inf.allow_other_gpu_model)


def supervisor_factory(settings: StationSettings, bundle: Bundle):
    """A function the inference thread calls to build its BackendSupervisor (on that thread)."""
    inf = settings.inference
    request = backend_request(settings, bundle)
    primary = primary_backend(inf.backend)
    cpu = BACKENDS[CPU_FALLBACK]
    with_fallback = primary.name != cpu.name and inf.cpu_fallback and bundle.has("onnx_fp32")

    def build(on_event: EventSink) -> BackendSupervisor:
        fallback = (lambda: cpu.open(request)) if with_fallback else None
        return BackendSupervisor(lambda: primary.open(request), primary.name, fallback, on_event,
                                 retry_max_s=inf.gpu_retry_max_s, primary_gpu=primary.gpu)

    return build


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


@dataclass
class Station:
    """What `appliance run` starts: the pipeline, its sinks, and the MQTT side (link, heartbeat, commands)."""

    pipeline: Pipeline
    results: ResultsLog
    sinks: FanOut  # what the pipeline reports to: results log, MQTT, storage watch
    storage: StorageWatch
    failures: FailureLatch  # the reporting side's threads (store writers, MQTT link and monitor)
    outbox: Outbox | None = None
    link: MqttLink | None = None
    heartbeat: HeartbeatMonitor | None = None
    commands: CommandHandler | None = None
    presence: Presence | None = None
    http: HttpApi | None = None  # the HTTP API (http.enabled)
    extra_sinks: list[Sink] = field(default_factory=list)
    review: ReviewSink | None = None  # the review queue (review.enabled)

    def start(self) -> None:
        """Connect (in the background: until then everything waits in the outbox), then start inspecting."""
        if self.http is not None:
            self.http.server.bind()  # a taken port is a ConfigError before anything starts
        self.start_reporting()
        self.pipeline.start()
        self.backend_started()
        if self.http is not None:
            self.http.server.start()

    def start_reporting(self) -> None:
        if self.link is not None and self.heartbeat is not None:
            self.link.start()
            self.heartbeat.start()

    def backend_started(self) -> None:
        """The pipeline's backend is up: a birth that went out saying `starting` is sent again naming it."""
        if self.presence is not None and self.link is not None and self.presence.backend_started():
            self.link.request_rebirth()

    def stop_http(self) -> None:
        """Stop serving HTTP: after the pipeline finished (the last uploads have their verdicts), before the
        stores close."""
        if self.http is not None:
            self.http.server.stop()

    def failure(self) -> ThreadFailure | None:
        """The first station thread that died (pipeline stage, MQTT link or monitor, store writer), if any."""
        return self.pipeline.failure or self.failures.failure

    def stop_reporting(self, drain_timeout_s: float = 10.0) -> bool:
        """A last heartbeat, the writers' backlogs into the stores, then the outbox to the broker, all within
        `drain_timeout_s`. True when nothing is left behind."""
        if self.link is None or self.heartbeat is None:
            return True
        deadline = time.monotonic() + drain_timeout_s
        self.heartbeat.stop()
        self.storage.flush_writers(drain_timeout_s)  # into the outbox first, then to the broker
        drained = self.link.stop(max(0.0, deadline - time.monotonic()))
        return drained and all(w.pending == 0 for w in self.storage.writers if w.store == "outbox")

    def close(self, timeout: float = 10.0) -> bool:
        """Write what the writers still hold (bounded), then close the files. True when nothing was left."""
        self.stop_http()
        written = self.storage.close(timeout)
        if self.outbox is not None:
            self.outbox.close()
        self.results.close()
        if self.review is not None:
            self.review.close()
        return written


def build_station(settings: StationSettings, source: FrameSource | None = None, mqtt: bool | None = None,
                  sinks: list[Sink] | None = None, echo: bool = True) -> Station:
    """Everything `appliance run` starts, not yet started. `mqtt` defaults to `mqtt.enabled`; `sinks` are
    added to the fan-out after the results log and MQTT (tests, benchmarks, future sinks)."""
    bundle = load_bundle(settings.model.bundle, verify=settings.model.verify_bundle)
    ops = operating_points(settings, bundle)
    link_config = mqtt_link_config(settings) if (settings.mqtt.enabled if mqtt is None else mqtt) else None
    data = settings.storage.data_dir
    pending_max = settings.storage.pending_max
    triggered = settings.trigger.mode == "triggered"
    primary = primary_backend(settings.inference.backend)
    # Not open_now: a store that cannot be opened (read-only or full disk) is a storage fault the writers
    # ride out with the parts in memory, not a reason to refuse to start.
    results = ResultsLog(data / "results.sqlite3", open_now=False)
    fanout = FanOut()
    failures = FailureLatch()
    modes = ModeControl(Mode(settings.decision.mode), fanout.event)
    config = PipelineConfig(
        station_id=settings.station.id, spec=bundle.metadata.preprocess,
        operating_point=ops[primary.name], operating_point_by_backend=ops,
        mode=Mode(settings.decision.mode), triggered=triggered,
        defect_index=bundle.metadata.defect_index,
        # At the end of the stream the decide thread waits only briefly: run() gives the writers their time.
        flush_timeout_s=min(2.0, settings.mqtt.drain_timeout_s),
        # Continuous part ids carry this start's number: unique across restarts (README, "Part ids").
        run_id=f"r{results.next_counter('run')}",
    )
    pipeline = Pipeline(config, source or open_source(settings.camera), supervisor_factory(settings, bundle), fanout,
                        modes)
    results_sink = ResultsLogSink(results, echo=echo, max_pending=pending_max, on_storage_event=fanout.event,
                                  on_failure=failures)
    fanout.add(results_sink)
    writers = [results_sink.writer]
    station = Station(pipeline, results, fanout, StorageWatch(writers, modes), failures)
    review = None
    if settings.review.enabled:
        # Not the record of the part (the results log is): its writer is watched but best-effort, so a full
        # review backlog never turns the station fail-safe (appliance/review/sink.py).
        review = ReviewSink.open(data / "review", settings.review, on_event=fanout.event, on_failure=failures)
        station.review = review
        station.storage.best_effort.add(review.writer)
    if link_config is not None:
        m = settings.mqtt
        outbox = Outbox(data / "outbox.sqlite3", max_messages=m.outbox_max_messages, max_age_s=m.outbox_max_age_s,
                        open_now=False)
        presence = Presence(pipeline, link_config.client_id, config_fingerprint=config_hash(settings.model_dump_json()),
                            model_id=bundle.model_id)
        link = MqttLink(link_config, outbox, presence.birth, on_failure=failures)
        mqtt_sink = MqttSink(link, outbox, max_pending=pending_max, on_storage_event=fanout.event, on_failure=failures)
        fanout.add(mqtt_sink)
        writers.append(mqtt_sink.writer)
        commands = CommandHandler(pipeline, triggered=triggered, on_event=fanout.event, rebirth=link.request_rebirth,
                                  max_command_bytes=m.max_command_bytes, labels=review)
        link.handle_commands(commands.on_command)
        heartbeat = HeartbeatMonitor(pipeline, mqtt_sink, station.storage, on_event=fanout.event, failures=failures,
                                     sink_errors=fanout.errors, configured_backend=settings.inference.backend,
                                     heartbeat_s=m.heartbeat_s, data_dir=data,
                                     review=review.summary if review is not None else None)
        station.outbox, station.link, station.heartbeat = outbox, link, heartbeat
        station.commands, station.presence = commands, presence
    if review is not None:
        fanout.add(review)
        writers.append(review.writer)
    if settings.http.enabled:
        from appliance.http import build_http  # FastAPI is loaded only by a station that serves HTTP

        link = station.link
        routers = []
        if review is not None:  # GET /review, /review/{id}/image, POST /labels, GET /stats, the inspector page
            from appliance.http.review_routes import review_router
            from appliance.review.stats import PromotionCriteria

            p = settings.review.promotion
            routers.append(review_router(review, config.spec, PromotionCriteria(
                p.min_labelled, p.min_detection_rate, p.max_false_positive_rate, p.confidence)))
        station.http = build_http(settings, pipeline, results.path, on_event=fanout.event, on_failure=failures,
                                  link_state=link.state if link is not None else None, sink_errors=fanout.errors,
                                  routers=routers)
        fanout.add(station.http.waiters)
    station.storage.writers = writers
    for sink in sinks or []:
        fanout.add(sink)
        station.extra_sinks.append(sink)
    # Last: it looks at every writer after each part and event has been handed to them.
    fanout.add(station.storage)
    return station


def build_pipeline(settings: StationSettings, source: FrameSource | None = None,
                   sinks: list[Sink] | None = None, echo: bool = True) -> tuple[Pipeline, ResultsLog]:
    """The pipeline and its results log alone (no MQTT): for tests and benchmarks."""
    station = build_station(settings, source=source, mqtt=False, sinks=sinks, echo=echo)
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
    station.start()  # MQTT connects in the background; until then everything waits in the outbox
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
            status = pipeline.status()
            notify(f"STATUS={status.inspections} inspected, {status.mode}, backend {status.backend}")
        time.sleep(0.1)
    # After a thread died the stages behind it may wait forever for it: do not wait long for them.
    join_s = 60.0 if failure is None else 10.0
    if not pipeline.join(join_s):
        log.error("the pipeline did not finish within %.0f s of the stop", join_s)
    station.stop_http()
    if watchdog is not None:
        watchdog.stop()
    failure = failure or station.failure()
    if failure is not None and failure is not reported:  # a stage that died ended the loop by itself
        _report_failure(station, failure)
    status = pipeline.status()
    log.info("stopped: %d inspections %s, %d live frames dropped, %.1f parts/s, end-to-end p50 %.1f ms p99 %.1f ms",
             status.inspections, status.verdicts, status.dropped, status.throughput_per_s, status.latency_p50_ms,
             status.latency_p99_ms)
    # One budget for what is left (the writers' backlogs, then the broker): mqtt.drain_timeout_s, so that the
    # whole stop stays inside systemd's TimeoutStopSec (drain + 30 s, provisioning/) even during a storage fault.
    if station.outbox is not None and not station.stop_reporting(settings.mqtt.drain_timeout_s):
        log.warning("%d message(s) stay in the outbox %s for the next start", station.outbox.depth(),
                    station.outbox.path)
    if not station.close(1.0 if station.link is not None else settings.mqtt.drain_timeout_s):
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
    station.sinks.event("thread_failed", detail)  # also straight to the broker: see mqtt_sink.URGENT_EVENTS


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
