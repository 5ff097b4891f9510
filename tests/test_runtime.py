"""The station runtime end to end: real OpenCV sources, real ONNX Runtime on an exported bundle, SQLite.

Faults the real components cannot produce on demand (a GPU that dies on the Nth part) are injected with a
thin wrapper around the real backend; everything else is the real thing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.camera import open_source
from appliance.inference.supervisor import BackendSupervisor
from appliance.reporting.results_log import ResultsLog
from appliance.reporting.results_sink import ResultsLogSink
from appliance.runtime import build_pipeline, operating_point, operating_points
from appliance.settings import CameraSection
from appliance.station.pipeline import Pipeline, PipelineConfig
from bundle.decision import Mode, OperatingPoint
from bundle.errors import GpuUnavailableError
from bundle.onnx_runtime import OnnxRuntimeBackend
from tests.support.frames import write_frames
from tests.support.settings import station_settings
from tests.support.waiting import wait_until


def _run(pipeline: Pipeline, timeout: float = 60) -> None:
    pipeline.start()
    assert pipeline.join(timeout), "pipeline did not finish"


def test_every_frame_of_a_folder_is_inspected_and_recorded(tmp_path: Path, bundle_dir: Path):
    folder = write_frames(tmp_path / "frames", 7, bad=4)
    pipeline, results = build_pipeline(station_settings(tmp_path, bundle_dir, source=folder))
    _run(pipeline)
    records = list(results.inspections())
    assert [r.source_name for r in records] == [f"part_{i:03d}.png" for i in range(7)]
    assert records[4].verdict == "error" and "cannot be decoded" in records[4].reason
    for r in records[:4] + records[5:]:
        assert r.verdict in ("pass", "fail", "manual_required")
        assert r.backend == "onnxruntime" and 0.0 <= r.score <= 1.0 and r.model_id
        assert set(r.latency_ms) >= {"preprocess_ms", "infer_ms", "end_to_end_ms"}
        assert r.latency_ms["end_to_end_ms"] >= r.latency_ms["infer_ms"] >= 0
    assert pipeline.dropped == 0
    assert len({r.part_id for r in records}) == 7


def test_scores_equal_the_bundle_run_directly(tmp_path: Path, bundle_dir: Path):
    from bundle.decision import defect_score
    from bundle.format import load_bundle
    from bundle.images import read_image
    from bundle.preprocess import preprocess

    folder = write_frames(tmp_path / "frames", 3)
    pipeline, results = build_pipeline(station_settings(tmp_path, bundle_dir, source=folder))
    _run(pipeline)
    bundle = load_bundle(bundle_dir)
    backend = OnnxRuntimeBackend(bundle.path("onnx_fp32"))
    for r in results.inspections():
        x = preprocess(read_image(folder / r.source_name), bundle.metadata.preprocess)[None]
        assert r.score == pytest.approx(defect_score(backend.infer(x)), abs=1e-6)


def test_shadow_mode_records_the_ai_and_sends_every_part_to_a_human(tmp_path: Path, bundle_dir: Path):
    folder = write_frames(tmp_path / "frames", 3)
    pipeline, results = build_pipeline(station_settings(tmp_path, bundle_dir, source=folder,
                                                        decision={"mode": "shadow"}))
    _run(pipeline)
    for r in results.inspections():
        assert r.verdict == "manual_required" and r.ai_verdict in ("pass", "fail", "manual_required")
        assert r.mode == "shadow"


RECOVERABLE = "CUDA device-to-host copy failed: MemoryError: cuMemcpyDtoHAsync failed: out of memory (injected)"
FATAL = ("TensorRT execution failed: IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (an illegal memory "
         "access was encountered) (injected)")


class DiesOnCall:
    """Wraps the real backend; raises the way a lost GPU does from call `fail_at` on (fault injection)."""

    def __init__(self, backend: OnnxRuntimeBackend, fail_at: int, name: str = "tensorrt",
                 error: str = RECOVERABLE) -> None:
        self._inner, self._fail_at, self._calls = backend, fail_at, 0
        self.name, self.model_id, self.slots = name, backend.model_id, backend.slots
        self._error = error

    def input_buffer(self, slot: int):
        return self._inner.input_buffer(slot)

    def run(self, slot: int):
        self._calls += 1
        if self._calls >= self._fail_at:
            raise GpuUnavailableError(self._error)
        return self._inner.run(slot)

    def close(self) -> None:
        self._inner.close()


def _pipeline_with(tmp_path: Path, bundle_dir: Path, n: int, primary_factory, fallback, results: ResultsLog,
                   retry_s: float = 0.0) -> Pipeline:
    settings = station_settings(tmp_path, bundle_dir, source=write_frames(tmp_path / "frames", n))
    from bundle.format import load_bundle

    bundle = load_bundle(bundle_dir)
    config = PipelineConfig(station_id="st-test", spec=bundle.metadata.preprocess,
                            operating_point=operating_point(settings, bundle), mode=Mode.PRODUCTION)

    def sup(on_event):
        return BackendSupervisor(primary_factory, "tensorrt", fallback, on_event, retry_initial_s=retry_s,
                                 retry_max_s=max(retry_s, 0.001))

    return Pipeline(config, open_source(CameraSection(source=str(tmp_path / "frames"))), sup,
                    ResultsLogSink(results, echo=False))


def test_gpu_lost_mid_run_goes_to_manual_within_one_part_and_comes_back(tmp_path: Path, bundle_dir: Path):
    from bundle.format import load_bundle

    onnx = load_bundle(bundle_dir).path("onnx_fp32")
    calls = {"n": 0}

    def primary():
        calls["n"] += 1
        if calls["n"] == 1:
            return DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=3)
        if calls["n"] <= 3:  # the GPU stays away for two retries
            raise GpuUnavailableError("cuInit failed: no CUDA-capable device is detected (injected)")
        return DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=10**9)

    results = ResultsLog(tmp_path / "r.sqlite3")
    _run(_pipeline_with(tmp_path, bundle_dir, 12, primary, None, results))
    records = list(results.inspections())
    assert len(records) == 12
    # parts 1-2 by the "GPU", part 3 fails on it and still gets a verdict: manual, with the reason
    assert [r.backend for r in records[:2]] == ["tensorrt", "tensorrt"]
    assert records[2].verdict == "manual_required" and records[2].mode == "manual_fallback"
    assert "out of memory" in records[2].reason
    # ... and the station returns to production by itself once the GPU works again
    assert records[-1].mode == "production" and records[-1].backend == "tensorrt"
    kinds = [k for _, k, _ in results.events()]
    assert kinds[:2] == ["gpu_lost", "manual_fallback"] and "gpu_back" in kinds


def test_a_fatal_cuda_error_gives_the_part_to_the_fallback_then_stops_for_a_restart(tmp_path: Path,
                                                                                     bundle_dir: Path):
    from bundle.format import load_bundle

    onnx = load_bundle(bundle_dir).path("onnx_fp32")
    opened = []

    def primary():
        opened.append(1)
        return DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=3, error=FATAL)

    results = ResultsLog(tmp_path / "r.sqlite3")
    # retries would come at once (retry_s=0): after a fatal error there must be none
    pipeline = _pipeline_with(tmp_path, bundle_dir, 40, primary, lambda: OnnxRuntimeBackend(onnx, slots=3,
                                                                                            model_id="cpu"), results)
    _run(pipeline)
    records = list(results.inspections())
    # parts 1-2 on the GPU; part 3 hits the illegal address and still gets its verdict, from the CPU fallback
    assert [r.backend for r in records[:3]] == ["tensorrt", "tensorrt", "onnxruntime"]
    assert records[2].verdict in ("pass", "fail", "manual_required") and records[2].score is not None
    # then capture stopped (the parts already captured finished on the CPU) and the GPU was never retried
    assert 3 <= len(records) < 40 and {r.backend for r in records[2:]} == {"onnxruntime"}
    assert len(opened) == 1
    assert pipeline.fatal is not None and "cudaErrorIllegalAddress (700)" in pipeline.fatal
    assert pipeline.last_error == pipeline.fatal  # what the heartbeat shows
    events = [(kind, detail) for _, kind, detail in results.events()]
    assert [kind for kind, _ in events][:3] == ["gpu_lost", "cpu_fallback", "cuda_fatal"]
    fatal = events[2][1]
    assert fatal["exit_code"] == 11 and fatal["error"] == "cudaErrorIllegalAddress (700)"
    assert "illegal memory access" in fatal["reason"] and "gpu_back" not in [kind for kind, _ in events]


def test_a_fatal_cuda_error_without_a_fallback_sends_the_part_to_a_human_then_stops(tmp_path: Path,
                                                                                    bundle_dir: Path):
    from bundle.format import load_bundle

    onnx = load_bundle(bundle_dir).path("onnx_fp32")
    results = ResultsLog(tmp_path / "r.sqlite3")
    pipeline = _pipeline_with(tmp_path, bundle_dir, 40, lambda: DiesOnCall(
        OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=2, error=FATAL), None, results)
    _run(pipeline)
    records = list(results.inspections())
    assert records[0].backend == "tensorrt"
    assert records[1].verdict == "manual_required" and "illegal memory access" in records[1].reason
    assert len(records) < 40 and pipeline.fatal is not None
    assert [k for _, k, _ in results.events()][:3] == ["gpu_lost", "manual_fallback", "cuda_fatal"]


def test_run_exits_11_after_a_fatal_cuda_error_with_the_reason_in_the_last_heartbeat_and_event(
        tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from appliance import runtime
    from appliance.threads import EXIT_CUDA_FATAL, EXIT_THREAD_FAILED
    from tests.support.mqtt import Subscriber
    from tools.broker import MOSQUITTO_HINT, MosquittoBroker, find_mosquitto

    assert EXIT_CUDA_FATAL == 11 and EXIT_CUDA_FATAL != EXIT_THREAD_FAILED
    if find_mosquitto() is None:
        pytest.skip(f"mosquitto not installed: {MOSQUITTO_HINT}")

    def supervisor_factory(settings, bundle):
        onnx = bundle.path("onnx_fp32")

        def build(on_event):
            return BackendSupervisor(
                lambda: DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=5, error=FATAL),
                "tensorrt", lambda: OnnxRuntimeBackend(onnx, slots=3, model_id="cpu"), on_event)

        return build

    monkeypatch.setattr(runtime, "supervisor_factory", supervisor_factory)
    broker = MosquittoBroker(tmp_path / "broker").start()
    control_room = Subscriber(broker.port)
    try:
        settings = station_settings(tmp_path, bundle_dir, broker.port, trigger={"mode": "continuous"},
                                    inference={"backend": "tensorrt", "cpu_fallback": True})
        # a healthy station would run the whole 60 s
        assert runtime.run(settings, max_seconds=60) == EXIT_CUDA_FATAL
        assert control_room.wait_for(lambda: any(m.payload.get("kind") == "cuda_fatal"
                                                 for m in control_room.of("event")), 10)
        fatal = next(m.payload["detail"] for m in control_room.of("event") if m.payload["kind"] == "cuda_fatal")
        assert fatal["exit_code"] == 11 and fatal["error"] == "cudaErrorIllegalAddress (700)"
        # the last heartbeat, sent on the way out, names the reason
        assert control_room.wait_for(lambda: bool(control_room.of("health")), 10)
        last = control_room.of("health")[-1].payload
        assert "fatal CUDA error cudaErrorIllegalAddress (700)" in last["last_error"]
        log = ResultsLog(settings.storage.data_dir / "results.sqlite3")
        try:
            assert any(kind == "cuda_fatal" for _, kind, _ in log.events())
        finally:
            log.close()
    finally:
        control_room.close()
        broker.stop()


def test_the_systemd_unit_restarts_on_the_fatal_cuda_exit_code():
    from appliance.threads import EXIT_CUDA_FATAL

    unit = (Path(__file__).resolve().parents[1] / "provisioning" / "templates" / "appliance.service.in").read_text()
    # on-failure restarts on any non-zero exit code; a RestartPreventExitStatus naming 11 would defeat it
    assert "Restart=on-failure" in unit and f"RestartPreventExitStatus={EXIT_CUDA_FATAL}" not in unit
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "11 a fatal CUDA error (restart needed)" in readme


def test_engines_of_each_precision_get_their_operating_point_and_station_overrides_win(tmp_path: Path,
                                                                                        bundle_dir: Path):
    from bundle.format import load_bundle

    bundle = load_bundle(bundle_dir)
    meta = bundle.metadata
    int8 = station_settings(tmp_path, bundle_dir, source="x", inference={"backend": "tensorrt", "precision": "int8"})
    ops = operating_points(int8, bundle)
    assert ops["tensorrt"].threshold == meta.decision_for("int8").threshold
    assert ops["onnxruntime"].threshold == meta.decision.threshold  # the CPU fallback runs the FP32 ONNX
    fp16 = station_settings(tmp_path, bundle_dir, source="x", inference={"backend": "tensorrt", "precision": "fp16"})
    assert operating_points(fp16, bundle)["tensorrt"].band_high == meta.decision_for("fp16").band_high
    fixed = station_settings(tmp_path, bundle_dir, source="x", inference={"precision": "int8"},
                             decision={"threshold": 0.42, "band_low": 0.4, "band_high": 0.45})
    assert set(operating_points(fixed, bundle).values()) == {OperatingPoint(0.42, 0.4, 0.45)}


def test_a_part_is_judged_at_the_operating_point_of_the_backend_that_scored_it(tmp_path: Path, bundle_dir: Path):
    # "tensorrt" fails every part (threshold 0), the ONNX Runtime fallback passes every part (threshold 1):
    # the verdicts show which operating point judged each part across the switch.
    from bundle.format import load_bundle

    onnx = load_bundle(bundle_dir).path("onnx_fp32")
    folder = write_frames(tmp_path / "frames", 6)
    config = PipelineConfig(
        station_id="st-test", spec=load_bundle(bundle_dir).metadata.preprocess,
        operating_point=OperatingPoint(0.5, 0.5, 0.5),
        operating_point_by_backend={"tensorrt": OperatingPoint(0.0, 0.0, 0.0),
                                    "onnxruntime": OperatingPoint(1.0, 1.0, 1.0)},
    )

    def sup(on_event):
        return BackendSupervisor(lambda: DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=3),
                                 "tensorrt", lambda: OnnxRuntimeBackend(onnx, slots=3, model_id="m"), on_event,
                                 retry_initial_s=3600, retry_max_s=3600)

    results = ResultsLog(tmp_path / "r.sqlite3")
    _run(Pipeline(config, open_source(CameraSection(source=str(folder))), sup, ResultsLogSink(results, echo=False)))
    records = list(results.inspections())
    assert [(r.backend, r.verdict) for r in records[:2]] == [("tensorrt", "fail")] * 2
    after = [r for r in records[2:] if r.backend == "onnxruntime"]
    assert len(after) >= 3 and {r.verdict for r in after} == {"pass"}


def test_cpu_fallback_when_tensorrt_is_missing(tmp_path: Path, bundle_dir: Path):
    # Real condition on this machine: no TensorRT, no CUDA. With cpu_fallback the bundle's FP32 ONNX runs.
    folder = write_frames(tmp_path / "frames", 4)
    settings = station_settings(tmp_path, bundle_dir, source=folder,
                                inference={"backend": "tensorrt", "cpu_fallback": True})
    pipeline, results = build_pipeline(settings)
    _run(pipeline)
    records = list(results.inspections())
    assert len(records) == 4 and {r.backend for r in records} == {"onnxruntime"}
    assert {r.mode for r in records} == {"production"}
    kinds = [k for _, k, _ in results.events()]
    assert kinds[:2] == ["gpu_lost", "cpu_fallback"]


def test_no_gpu_and_no_fallback_means_manual_inspection_with_the_reason(tmp_path: Path, bundle_dir: Path):
    folder = write_frames(tmp_path / "frames", 3)
    pipeline, results = build_pipeline(station_settings(tmp_path, bundle_dir, source=folder,
                                                        inference={"backend": "auto"}))
    _run(pipeline)
    for r in results.inspections():
        assert r.verdict == "manual_required" and r.mode == "manual_fallback" and r.score is None
        assert r.reason.startswith("GPU unavailable")


def test_triggered_mode_inspects_one_frame_per_trigger_with_its_part_id(tmp_path: Path, bundle_dir: Path):
    settings = station_settings(tmp_path, bundle_dir, source="synthetic", trigger={"mode": "triggered"})
    pipeline, results = build_pipeline(settings)
    pipeline.start()
    for pid in ("SN-1001", "SN-1002", "SN-1003"):
        pipeline.trigger(pid)
    wait_until(lambda: pipeline.stats.total >= 3, 30)  # the assertion below says what was missing
    pipeline.stop()
    assert pipeline.join(30)
    assert [r.part_id for r in results.inspections()] == ["SN-1001", "SN-1002", "SN-1003"]


def test_sigterm_drains_the_queues_and_exits_0(tmp_path: Path, bundle_dir: Path):
    config = tmp_path / "station.toml"
    config.write_text(
        f'[station]\nid = "st-sig"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "synthetic"\nloop = true\n'
        f'[inference]\nbackend = "onnxruntime"\nthreads = 1\n[mqtt]\nenabled = false\n'
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = tmp_path / "var" / "results.sqlite3"
    # SIGTERM after at least 5 parts (or after the deadline: the assertions below then say what happened)
    wait_until(lambda: db.exists() and sum(ResultsLog(db).counts().values()) >= 5, 60)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out and "stopped:" in out
    ids = [r.part_id for r in ResultsLog(db).inspections()]
    seqs = [int(p.rsplit("-", 1)[1]) for p in ids]
    # every part captured got a record: sequence numbers 1..N without a gap
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 5


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_run_help_explains_the_stop_behaviour(capsys: pytest.CaptureFixture[str]):
    from appliance.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "SIGTERM" in capsys.readouterr().out


def test_mode_command_during_gpu_fallback_takes_effect_when_the_gpu_is_back(tmp_path: Path, bundle_dir: Path):
    from bundle.format import load_bundle

    onnx = load_bundle(bundle_dir).path("onnx_fp32")
    calls = {"n": 0}

    def primary():
        calls["n"] += 1
        if calls["n"] <= 8:  # the GPU stays away for the first parts
            raise GpuUnavailableError("cuInit failed (injected)")
        return DiesOnCall(OnnxRuntimeBackend(onnx, slots=3, model_id="m"), fail_at=10**9)

    results = ResultsLog(tmp_path / "r.sqlite3")
    pipeline = _pipeline_with(tmp_path, bundle_dir, 14, primary, None, results)

    class CommandDuringFallback(ResultsLogSink):
        sent = False

        def inspection(self, record, evidence):
            super().inspection(record, evidence)
            if record.mode == "manual_fallback" and not self.sent:
                self.sent = True  # the control room switches to shadow while the GPU is away
                pipeline.modes.set_mode(Mode.SHADOW)

    pipeline.sink = CommandDuringFallback(results, echo=False)
    _run(pipeline)
    records = list(results.inspections())
    assert len(records) == 14 and records[0].mode == "manual_fallback"
    # back from the fallback into the mode asked for meanwhile, not the one from before the GPU went
    assert records[-1].mode == "shadow" and records[-1].verdict == "manual_required" and records[-1].ai_verdict
    kinds = [k for _, k, _ in results.events()]
    assert "mode_changed" in kinds and "gpu_back" in kinds


def test_trigger_stdin_inspects_one_part_per_line(tmp_path: Path, bundle_dir: Path):
    config = tmp_path / "station.toml"
    config.write_text(
        f'[station]\nid = "st-trg"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "synthetic"\nloop = true\n'
        f'[trigger]\nmode = "triggered"\n[inference]\nbackend = "onnxruntime"\nthreads = 1\n[mqtt]\nenabled = false\n'
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config), "--trigger-stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.stdin.write("SN-A\n\nSN-B\n")
    proc.stdin.flush()
    db = tmp_path / "var" / "results.sqlite3"
    wait_until(lambda: db.exists() and sum(ResultsLog(db).counts().values()) >= 2, 60)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert [r.part_id for r in ResultsLog(db).inspections()] == ["SN-A", "SN-B"]
