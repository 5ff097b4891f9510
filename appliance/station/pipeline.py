"""The inspection pipeline: capture -> preprocess -> infer -> decide -> sinks, one thread per stage.

Stages are joined by bounded queues, so a slow stage pushes back instead of piling frames up in memory.
Back-pressure is explicit:

- a file, folder or synthetic source is never dropped from: capture waits for room;
- a live camera is: when the preprocess queue is full the frame is dropped and counted (its newer
  successor is worth more than a stale frame), and the camera itself keeps only its newest frame.

Preprocessing writes straight into a backend input slot (pinned memory for TensorRT) taken from a small
pool; with two slots, frame N+1 is preprocessed while frame N is inferred. The inference thread creates,
uses and closes the backend (it owns the CUDA context). `stop()` ends capture, lets every queued part
finish and be recorded, then joins the threads: nothing the pipeline promised to inspect is lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from appliance.camera import CameraState, Frame
from appliance.inference.backend import InferenceBackend, run_slot
from appliance.inference.supervisor import BackendSupervisor
from appliance.station.inspection import Evidence, InspectionRecord
from appliance.station.modes import ModeControl
from appliance.station.sink import Sink
from appliance.station.stats import RollingStats
from appliance.station.status import StationStatus
from appliance.threads import ThreadFailure
from bundle.decision import Mode, OperatingPoint, decide_part, defect_score
from bundle.errors import ApplianceError, FrameError
from bundle.preprocess import PreprocessSpec, preprocess

log = logging.getLogger("appliance.station.pipeline")

_STOP = object()  # end-of-stream marker passed down the stages


class SubmitRefused(ApplianceError):
    """`Pipeline.submit` could not take the frame: the station is busy (`busy`) or stopping; nothing was queued."""

    def __init__(self, message: str, busy: bool) -> None:
        super().__init__(message)
        self.busy = busy


class FrameReader(Protocol):
    """What the pipeline needs of a frame source (appliance.camera.FrameSource implements it)."""

    @property
    def live(self) -> bool: ...

    @property
    def exhausted(self) -> bool: ...

    def read(self, timeout: float | None = None) -> Frame | None: ...

    def state(self) -> CameraState: ...


class _HeldEvents:
    """Events kept back until the state they describe is published; touched by one thread only."""

    def __init__(self) -> None:
        self._held: list[tuple[str, dict[str, Any]]] = []

    def append_event(self, kind: str, detail: dict[str, Any]) -> None:
        self._held.append((kind, detail))

    def flush(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        held, self._held = self._held, []
        for kind, detail in held:
            sink(kind, detail)


@dataclass
class Inspection:
    """One part moving through the stages; timestamps (monotonic seconds) are filled in as it goes."""

    inspection_id: str
    part_id: str
    frame: Frame
    t: dict[str, float] = field(default_factory=dict)
    slot: tuple[int, int] | None = None  # (backend generation, slot index) holding the preprocessed input
    error: str | None = None
    score: float | None = None
    backend: str = "none"
    model_id: str = ""
    why_no_model: str = ""
    # (h, w) float32 where the model looked: a view into the backend's own fresh output, not a copy; None while
    # the backend or the model gives none.
    defect_map: np.ndarray | None = None


class SlotPool:
    """Free input slots of the current backend. A backend change starts a new generation of slots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = -1
        self._free: queue.Queue[int] = queue.Queue()
        self._buffers: list[np.ndarray] = []

    def reset(self, generation: int, buffers: list[np.ndarray]) -> None:
        with self._lock:
            self._generation = generation
            self._buffers = buffers
            self._free = queue.Queue()
            for i in range(len(buffers)):
                self._free.put(i)

    def acquire(self, timeout: float) -> tuple[int, int, np.ndarray] | None:
        """(generation, slot, buffer) of a free slot, or None when none is free within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                gen, free, buffers = self._generation, self._free, self._buffers
            if not buffers:
                return None
            try:
                slot = free.get(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
                continue
            with self._lock:
                if gen == self._generation:
                    return gen, slot, buffers[slot]
            # the backend changed while we waited: that slot belongs to a closed backend; try again

    def release(self, generation: int, slot: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._free.put(slot)

    @property
    def has_slots(self) -> bool:
        with self._lock:
            return bool(self._buffers)


@dataclass(frozen=True)
class PipelineConfig:
    station_id: str
    spec: PreprocessSpec
    operating_point: OperatingPoint  # for a backend not in operating_point_by_backend
    # By backend name ("tensorrt", "onnxruntime"): an INT8 engine and its FP32 CPU fallback need different
    # thresholds, and the backend can change between two parts.
    operating_point_by_backend: Mapping[str, OperatingPoint] = field(default_factory=dict)
    mode: Mode = Mode.PRODUCTION
    triggered: bool = False
    defect_index: int = 1
    # Small queues: a folder source runs flat out, and parts waiting in queues only add latency.
    queue_size: int = 2
    # Names this start of the station in continuous part ids (`<station>-<run_id>-<seq>`), so part ids stay
    # unique across restarts; the runtime sets it from a counter persisted in the results log.
    run_id: str = ""
    # At the end of the stream the decide thread waits this long for the sinks to write what they hold.
    flush_timeout_s: float = 10.0


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        source: FrameReader,
        supervisor_factory: Callable[[Callable[[str, dict[str, Any]], None]], BackendSupervisor],
        sink: Sink,
        modes: ModeControl | None = None,
    ) -> None:
        """`sink` gets every finished inspection and event (the runtime's fan-out); `modes` is shared with
        whoever else may change the mode or hold a fallback (commands, storage watch), else made here."""
        self.config = config
        self.source = source
        self.sink = sink
        self._supervisor_factory = supervisor_factory
        self.modes = modes if modes is not None else ModeControl(config.mode, self._event)
        self._q_pre: queue.Queue[Any] = queue.Queue(config.queue_size)
        self._q_infer: queue.Queue[Any] = queue.Queue(config.queue_size)
        self._q_decide: queue.Queue[Any] = queue.Queue(config.queue_size)
        self._triggers: queue.Queue[str] = queue.Queue()
        # submit() and the end of capture: once capture has put its end marker nothing may follow it.
        self._submit_lock = threading.Lock()
        self._submissions_closed = False
        self._submitted = 0
        self._slots = SlotPool()
        self._stop = threading.Event()
        self._backend_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.stats = RollingStats()
        self.dropped = 0
        self.started_at = time.time()
        self.backend_name = "none"
        self.model_id = ""
        self.last_error = ""
        self.failure: ThreadFailure | None = None  # the stage that died, if one did
        # The supervisor's events, held until _publish_backend has updated backend_name (inference thread only).
        self._backend_events = _HeldEvents()
        # Why the process must restart (a fatal CUDA error): capture stops, the parts in flight finish on the
        # fallback, and the runtime exits with EXIT_CUDA_FATAL.
        self.fatal: str | None = None
        self._busy_since: float | None = None  # monotonic start of the inference in progress, for stall_reason

    # --- control -----------------------------------------------------------------------------------
    def start(self) -> None:
        stages = [("infer", self._infer_loop, self._q_decide), ("capture", self._capture_loop, self._q_pre),
                  ("preprocess", self._preprocess_loop, self._q_infer), ("decide", self._decide_loop, None)]
        for name, target, downstream in stages:
            t = threading.Thread(target=self._guard(name, target, downstream), name=f"stage-{name}", daemon=True)
            self._threads.append(t)
            t.start()
            if name == "infer":
                # Preprocessing needs the backend's input slots, which the inference thread creates.
                self._backend_ready.wait(timeout=120)

    def stop(self) -> None:
        """Stop capturing; every part already captured is still inspected and recorded."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stages to finish; True when all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def trigger(self, part_id: str) -> None:
        """Triggered mode: inspect the next frame as part `part_id` (from a PLC, MQTT or an operator)."""
        self._triggers.put(part_id)

    def submit(self, image: np.ndarray, part_id: str, source_name: str = "upload", timeout: float = 5.0) -> str:
        """Inspect `image` (uint8, (H, W) or (H, W, 3) BGR, as a camera gives it) as part `part_id`, through the
        same stages, backend, decision and sinks as a camera frame: an HTTP upload, a frame a PLC pushed.

        Returns the inspection id its record will carry. Raises SubmitRefused when the first queue has no room
        within `timeout` s (busy: the caller may retry) or once the pipeline is stopping (nothing is queued then).
        """
        now = time.monotonic()
        with self._submit_lock:
            if self._submissions_closed or self._stop.is_set():
                raise SubmitRefused("the station is stopping and takes no more parts", busy=False)
            self._submitted += 1
            frame = Frame(image=image, index=self._submitted, captured_at=time.time(), monotonic=now,
                          source_name=source_name)
            insp = Inspection(inspection_id=uuid.uuid4().hex, part_id=part_id, frame=frame,
                              t={"captured": now, "queued": now})
            try:
                # Held under the lock while it waits: capture's end marker must not overtake a part taken here.
                self._q_pre.put(insp, timeout=timeout)
            except queue.Full:
                raise SubmitRefused(f"the station is busy: no room for part {part_id} within {timeout:g} s",
                                    busy=True) from None
        return insp.inspection_id

    @property
    def mode(self) -> Mode:
        """The mode parts are decided in now: manual_fallback while any fallback cause holds, else the configured."""
        return self.modes.current()[0]

    def status(self) -> StationStatus:
        """The station's state now (see station/status.py): for heartbeats, the birth, doctor, systemd."""
        mode, reason = self.modes.current()
        snap = self.stats.snapshot()
        failure = self.failure
        return StationStatus(
            station_id=self.config.station_id, mode=mode.value, configured_mode=self.modes.configured.value,
            fallback_reason=reason, backend=self.backend_name, model_id=self.model_id,
            backend_ready=self._backend_ready.is_set(), inspections=snap["inspections"], verdicts=snap["verdicts"],
            throughput_per_s=snap["throughput_per_s"], latency_p50_ms=snap["end_to_end_ms_p50"],
            latency_p99_ms=snap["end_to_end_ms_p99"], dropped=self.dropped, camera=self.source.state(),
            camera_live=self.source.live,
            queues={"preprocess": self._q_pre.qsize(), "infer": self._q_infer.qsize(),
                    "decide": self._q_decide.qsize()},
            last_error=self.last_error or None, failure=failure.describe() if failure else None, fatal=self.fatal,
            started_at=self.started_at, stats=snap,
        )

    @property
    def crashed(self) -> bool:
        """A stage died (see `failure`)."""
        return self.failure is not None

    def stall_reason(self, stall_s: float) -> str | None:
        """Why the station is stuck, or None: an inference running longer than `stall_s`, or a connected live
        camera that delivered no frame for `stall_s` while the station inspects continuously. (A camera that
        is disconnected is not stuck: its reader is reconnecting.) For the systemd watchdog."""
        busy = self._busy_since
        now = time.monotonic()
        if busy is not None and now - busy > stall_s:
            return f"inference has been running for {now - busy:.0f} s ({self.backend_name})"
        if self.source.live and not self.config.triggered:
            state = self.source.state()
            age = state.last_frame_age_s
            if state.connected and age is not None and age > stall_s:
                return f"camera {state.source} is connected but delivered no frame for {age:.0f} s"
        return None

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # --- stages --------------------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        seq = 0
        while not self._stop.is_set():
            part_id = None
            if self.config.triggered:
                try:
                    part_id = self._triggers.get(timeout=0.1)
                except queue.Empty:
                    continue
            frame = self.source.read(timeout=0.5)
            if frame is None:
                if self.source.exhausted:
                    break
                if part_id is not None:  # a trigger must not vanish with a missing frame
                    self._triggers.put(part_id)
                continue
            seq += 1
            insp = Inspection(inspection_id=uuid.uuid4().hex, part_id=part_id or self._part_id(seq),
                              frame=frame, t={"captured": frame.monotonic, "queued": time.monotonic()})
            if self.source.live:
                try:
                    self._q_pre.put_nowait(insp)
                except queue.Full:
                    self.dropped += 1  # live camera: a newer frame is worth more than this one
            else:
                self._q_pre.put(insp)
        with self._submit_lock:
            self._submissions_closed = True
        self._q_pre.put(_STOP)

    def _part_id(self, seq: int) -> str:
        run = f"-{self.config.run_id}" if self.config.run_id else ""
        return f"{self.config.station_id}{run}-{seq:08d}"

    def _preprocess_loop(self) -> None:
        while (insp := self._q_pre.get()) is not _STOP:
            insp.t["pre_start"] = time.monotonic()
            if insp.frame.error is None:
                self._fill_slot(insp)  # sets t["slot"] once it holds a free input slot
            else:
                insp.error = insp.frame.error
            insp.t["pre_end"] = time.monotonic()
            self._q_infer.put(insp)
        self._q_infer.put(_STOP)

    def _fill_slot(self, insp: Inspection) -> None:
        while True:
            got = self._slots.acquire(timeout=0.2)
            if got is None:
                if not self._slots.has_slots:
                    return  # no backend (manual fallback): the part goes on without a model input
                continue
            gen, slot, buf = got
            insp.t["slot"] = time.monotonic()
            try:
                preprocess(insp.frame.image, self.config.spec, out=buf[0])
            except ApplianceError as exc:
                self._slots.release(gen, slot)
                insp.error = exc.message
                return
            insp.slot = (gen, slot)
            return

    def _infer_loop(self) -> None:
        sup = self._supervisor_factory(self._backend_events.append_event)
        try:
            sup.start()
            self._publish_backend(sup)
            self._note_fatal(sup)
            self._backend_ready.set()
            while (insp := self._q_infer.get()) is not _STOP:
                if sup.maybe_retry():
                    self._publish_backend(sup)
                self._note_fatal(sup)
                insp.t["infer_start"] = self._busy_since = time.monotonic()
                self._infer_one(sup, insp)
                self._note_fatal(sup)
                insp.t["infer_end"] = time.monotonic()
                self._busy_since = None
                self._q_decide.put(insp)
        finally:
            self._backend_events.flush(self._event)
            self._backend_ready.set()
            sup.close()
            self._q_decide.put(_STOP)

    def _infer_one(self, sup: BackendSupervisor, insp: Inspection) -> None:
        try:
            if insp.error is not None:
                return
            backend = sup.backend
            if backend is None:
                insp.why_no_model = sup.why_no_model
                return
            try:
                if insp.slot is not None and insp.slot[0] == sup.generation:
                    logits, defect_map = run_slot(backend, insp.slot[1])
                else:
                    # Preprocessed for a backend that is gone, or not at all (fallback): redo it here.
                    logits, defect_map = self._run_spare(backend, insp)
                insp.score = defect_score(logits, self.config.defect_index)
                insp.defect_map = None if defect_map is None else defect_map[0]
                insp.backend, insp.model_id = backend.name, backend.model_id
                return
            except ApplianceError as exc:
                if isinstance(exc, FrameError):
                    insp.error = exc.message
                    return
                failure: Exception = exc
            except Exception as exc:
                failure = exc
            log.error("inference failed on %s for part %s: %s", backend.name, insp.part_id, failure)
            self.last_error = f"{type(failure).__name__}: {failure}"
            sup.failed(failure)
            self._publish_backend(sup)
            # This part still gets a verdict within the same step: from the fallback, or from a human.
            if sup.backend is None:
                insp.why_no_model = sup.why_no_model
                return
            try:
                logits, defect_map = self._run_spare(sup.backend, insp)
                insp.score = defect_score(logits, self.config.defect_index)
                insp.defect_map = None if defect_map is None else defect_map[0]
                insp.backend, insp.model_id = sup.backend.name, sup.backend.model_id
            except Exception as exc2:
                insp.why_no_model = f"CPU fallback failed too: {exc2}"
        finally:
            if insp.slot is not None:
                self._slots.release(*insp.slot)
                insp.slot = None

    def _note_fatal(self, sup: BackendSupervisor) -> None:
        """Once the supervisor saw a fatal CUDA error: record why and stop capturing (the runtime restarts us)."""
        if sup.fatal is not None and self.fatal is None:
            self.fatal = self.last_error = sup.fatal
            self._stop.set()

    def _run_spare(self, backend: InferenceBackend, insp: Inspection) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocess into the backend's spare slot (reserved for this thread) and run it: logits, defect map."""
        spare = backend.slots - 1
        preprocess(insp.frame.image, self.config.spec, out=backend.input_buffer(spare)[0])
        return run_slot(backend, spare)

    def _publish_backend(self, sup: BackendSupervisor) -> None:
        backend = sup.backend
        if backend is None:
            self._slots.reset(sup.generation, [])
            self.backend_name, self.model_id = "none", ""
        else:
            # The last slot stays with the inference thread (re-preprocessing after a backend change).
            self._slots.reset(sup.generation, [backend.input_buffer(i) for i in range(backend.slots - 1)])
            self.backend_name, self.model_id = backend.name, backend.model_id
        self.modes.set_fallback("backend", (sup.why_no_model or "no model can run") if backend is None else None)
        # Only now that backend_name says what runs: a birth requested by these events must name it.
        self._backend_events.flush(self._event)

    def _decide_loop(self) -> None:
        while (insp := self._q_decide.get()) is not _STOP:
            self._decide_one(insp)
        # Everything decided is handed over; wait (bounded) until it is written, so join() means recorded.
        if not self.sink.flush(self.config.flush_timeout_s):
            log.error("not every decided part could be written within %.0f s (storage fault); see the log",
                      self.config.flush_timeout_s)

    def _decide_one(self, insp: Inspection) -> None:
        now = time.monotonic()
        mode, fallback_reason = self.modes.current()
        if insp.error is not None:
            verdict, ai_verdict, reason = "error", None, f"frame error: {insp.error}"
        else:
            op = self.config.operating_point_by_backend.get(insp.backend, self.config.operating_point)
            d = decide_part(insp.score, op, mode, insp.why_no_model or fallback_reason)
            verdict, ai_verdict, reason = d.verdict.value, d.ai_verdict.value if d.ai_verdict else None, d.reason
        t = insp.t
        latency = {
            "queue_ms": (t.get("pre_start", now) - t["queued"]) * 1000,
            # waiting for a free input slot (the backend is busy with earlier parts), then the work itself
            "slot_wait_ms": (t.get("slot", t.get("pre_start", now)) - t.get("pre_start", now)) * 1000,
            "preprocess_ms": (t.get("pre_end", now) - t.get("slot", t.get("pre_start", now))) * 1000,
            "infer_wait_ms": (t.get("infer_start", now) - t.get("pre_end", now)) * 1000,
            "infer_ms": (t.get("infer_end", now) - t.get("infer_start", now)) * 1000,
            "decide_wait_ms": (now - t.get("infer_end", now)) * 1000,
            "end_to_end_ms": (now - t["captured"]) * 1000,
        }
        record = InspectionRecord(
            inspection_id=insp.inspection_id, part_id=insp.part_id, station_id=self.config.station_id,
            source_name=insp.frame.source_name, frame_index=insp.frame.index, captured_at=insp.frame.captured_at,
            decided_at=time.time(), verdict=verdict, ai_verdict=ai_verdict, score=insp.score,
            mode=mode.value, backend=insp.backend, model_id=insp.model_id, reason=reason,
            latency_ms={k: round(v, 3) for k, v in latency.items()},
        )
        self.stats.add(record)
        try:
            self.sink.inspection(record, Evidence.of(insp.frame.image if insp.frame.error is None else None,
                                                     insp.defect_map))
        except Exception:  # a sink must never stop inspection (the fan-out isolates each; this is the last guard)
            log.exception("sink failed for part %s", insp.part_id)

    # --- helpers ---------------------------------------------------------------------------------------
    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        log.warning("event %s: %s", kind, detail)
        try:
            self.sink.event(kind, detail)
        except Exception:
            log.exception("sink failed for event %s", kind)

    def _guard(self, name: str, target: Callable[[], None], downstream: queue.Queue[Any] | None) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:
                # A stage that dies would silently stall the line: log loudly, stop capturing, and let the
                # stages after it finish what they hold so it is still recorded; the runtime then exits
                # with EXIT_THREAD_FAILED so systemd restarts a whole station.
                log.exception("stage %s crashed; stopping the pipeline", name)
                self.failure = ThreadFailure(f"stage-{name}", f"{type(exc).__name__}: {exc}", time.time())
                self.last_error = self.failure.describe()
                self._stop.set()
                self._backend_ready.set()
                if downstream is not None:
                    downstream.put(_STOP)

        return run
