"""The measured code: one fresh process per case, `python -m tools.bench.cases CASE ... --result FILE`.

A fresh process per case keeps one case's threads, allocator state and imports (torch above all) out of
another's numbers, and gives each case a peak RSS of its own. Heavy imports happen inside the case
functions: the pipeline case must end without torch in `sys.modules`.

What each case times (time.perf_counter, after the model is loaded):

- backend: N `infer` calls on inputs preprocessed beforehand, after `--warmup` untimed calls.
- pipeline: from the moment `Pipeline.start()` returns (the inference thread has created its ONNX
  Runtime session; capture starts) until `join()` returns with every part recorded in SQLite. There is
  no warm-up: the first part pays the session's first-run cost, as it does at a station.
- naive: N frames, each read, preprocessed, inferred and soft-maxed one at a time, after `--warmup`
  untimed frames.
- pipeline runs with the review queue off (`review.enabled = false`); pipeline_review is the same with the
  review queue on and `review.audit_rate = 1.0` (every part queued, its frame written as a PNG by the review
  writer thread). The timed window ends at `join()`, as for pipeline; how long the review writer still took
  after that to write its backlog is reported beside it (`review.drain_after_join_s`), not hidden in it.
- inspect: one station with camera source "none" and the HTTP API on a free loopback port (no tokens), and
  `--uploads` of the frames POSTed to /inspect one at a time with httpx, after `--warmup` untimed uploads;
  then a second station over the same frames from the folder in trigger mode, one trigger at a time, each
  waited for until its part is decided. Both with the review queue off. Compared: the upload's
  `processing_time_ms` (upload received -> decided: PNG decode + pipeline) with the trigger's trigger ->
  decided (PNG read and decode by the folder source + pipeline); the HTTP round trip adds transport,
  multipart parsing and the JSON answer. Not comparable with the pipeline case's end to end, which runs
  flat out with parts waiting in queues.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench.errors import BenchError
from tools.bench.report import system_cpu_seconds

CASES = ("backend", "pipeline", "pipeline_review", "naive", "inspect")
# The review settings of the two pipeline cases (README, "Runtime benchmark").
REVIEW_SETTINGS = {"pipeline": {"enabled": False},
                   "pipeline_review": {"enabled": True, "audit_rate": 1.0, "audit_seed": 0}}
# record.latency_ms keys, in the order a part meets them.
STAGE_KEYS = (
    "queue_ms", "slot_wait_ms", "preprocess_ms", "infer_wait_ms", "infer_ms", "decide_wait_ms", "end_to_end_ms",
)


def summarize(values_ms: list[float]) -> dict[str, float]:
    """p50, p99, mean and max of latencies in ms (the percentile of appliance.station.stats, as heartbeats use)."""
    from appliance.station.stats import percentile

    if not values_ms:
        raise BenchError("no latencies were measured")
    return {"p50": percentile(values_ms, 50), "p99": percentile(values_ms, 99),
            "mean": sum(values_ms) / len(values_ms), "max": max(values_ms), "n": len(values_ms)}


def _vm_hwm_mb() -> float | None:
    """This process's own peak resident memory (VmHWM), in MB; None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def process_usage() -> dict[str, Any]:
    """Peak memory of this process (MB = 10^6 bytes) and whether torch was imported.

    `peak_rss_mb` is getrusage's ru_maxrss (KiB on Linux). Linux carries the parent's peak over into a
    child's ru_maxrss at exec, which is why the orchestrating process stays small; `vm_hwm_mb` (the
    high-water mark of this process's own memory map) is the cross-check that cannot be inherited.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": ru.ru_maxrss * 1024 / 1e6, "vm_hwm_mb": _vm_hwm_mb(),
            "torch_imported": "torch" in sys.modules}


class CpuWindow:
    """Wall time and CPU time over the timed window: this process's, and the rest of the machine's.

    `other_cores`: cores kept busy by other processes meanwhile (a job running beside the bench makes the
    numbers suspect); `steal_cores`: CPU the hypervisor gave to other virtual machines.
    """

    def __init__(self) -> None:
        self._wall0 = time.perf_counter()
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._machine0 = system_cpu_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        machine = system_cpu_seconds()
        user, system = ru.ru_utime - self._ru0.ru_utime, ru.ru_stime - self._ru0.ru_stime
        out = {
            "wall_s": wall, "cpu_user_s": user, "cpu_system_s": system,
            "cores_busy": (user + system) / wall if wall > 0 else float("nan"),
            # Involuntary switches: a runnable thread was preempted because another wanted its core.
            "involuntary_ctx_switches": ru.ru_nivcsw - self._ru0.ru_nivcsw,
            "voluntary_ctx_switches": ru.ru_nvcsw - self._ru0.ru_nvcsw,
        }
        if machine is not None and self._machine0 is not None and wall > 0:
            # /proc/stat counts in clock ticks: over a very short window this is coarse, never negative.
            others = machine["busy_s"] - self._machine0["busy_s"] - user - system
            out["other_cores"] = max(0.0, others) / wall
            out["steal_cores"] = (machine["steal_s"] - self._machine0["steal_s"]) / wall
        return out


class ThreadCpuSampler:
    """CPU seconds per thread of this process while the pipeline runs, read from /proc/self/task.

    Sampled every `interval` s because stage threads and ONNX Runtime's pool vanish from /proc when they
    end; a thread's last `interval` before it ended can be missed (the figures are approximate). Python
    threads are named by their `threading` name, the others (ONNX Runtime's and OpenCV's native pools)
    are summed as "native".
    """

    def __init__(self, interval: float = 0.2) -> None:
        self._interval = interval
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._seen: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._start_cpu: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)

    def start(self) -> None:
        self._start_cpu = self._sample()  # threads alive now count from here, new ones from zero
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        totals: dict[str, float] = {}
        for tid, cpu in self._seen.items():
            name = self._names.get(tid, "native")
            totals[name] = totals.get(name, 0.0) + cpu - self._start_cpu.get(tid, 0.0)
        return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> dict[int, float]:
        python_threads = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        now: dict[int, float] = {}
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return now
        for entry in tids:
            try:
                stat = Path(f"/proc/self/task/{entry}/stat").read_text()
            except OSError:
                continue  # the thread ended between listdir and read
            fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
            tid = int(entry)
            now[tid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime (stat fields 14, 15)
            self._seen[tid] = now[tid]
            if tid in python_threads:
                self._names[tid] = python_threads[tid]
        return now


def _frame_files(frames: Path) -> list[Path]:
    from bundle.images import list_images

    files = list_images(frames)
    if not files:
        raise BenchError(f"no frames in {frames}")
    return files


# --- (a) the bare backend ---------------------------------------------------------------------------------


def bare_backend(bundle_dir: Path, frames: Path, threads: int, warmup: int) -> dict[str, Any]:
    """OnnxRuntimeBackend.infer on the bundle's FP32 ONNX, one preprocessed frame per call."""
    import numpy as np

    from bundle.decision import defect_score
    from bundle.format import load_bundle
    from bundle.images import read_image
    from bundle.onnx_runtime import OnnxRuntimeBackend
    from bundle.preprocess import preprocess

    bundle = load_bundle(bundle_dir)
    spec = bundle.metadata.preprocess
    files = _frame_files(frames)
    inputs = np.empty((len(files), 1, *spec.input_shape), np.float32)
    for i, path in enumerate(files):
        preprocess(read_image(path), spec, out=inputs[i, 0])
    backend = OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=threads, slots=1, model_id=bundle.model_id)
    latencies: list[float] = []
    logits: list[np.ndarray] = []
    try:
        for i in range(warmup):
            backend.infer(inputs[i % len(inputs)])
        window = CpuWindow()
        for x in inputs:
            t0 = time.perf_counter()
            out = backend.infer(x)
            latencies.append((time.perf_counter() - t0) * 1000)
            logits.append(out)
        cpu = window.stop()
    finally:
        backend.close()
    return {
        "frames": len(files), "warmup_calls": warmup, "ort_threads": threads,
        "throughput_per_s": len(files) / cpu["wall_s"], "latency_ms": {"infer": summarize(latencies)}, "cpu": cpu,
        "scores": {p.name: defect_score(z, bundle.metadata.defect_index) for p, z in zip(files, logits, strict=True)},
    }


# --- (b) the appliance pipeline ---------------------------------------------------------------------------


def appliance_pipeline(bundle_dir: Path, frames: Path, threads: int, scratch: Path | None,
                       review: dict[str, Any]) -> dict[str, Any]:
    """The station runtime over the folder, as `appliance run` builds it, minus MQTT and console lines.

    `review`: the `[review]` settings (REVIEW_SETTINGS), reported with the numbers."""
    from appliance.runtime import build_station
    from appliance.settings import StationSettings

    n = len(_frame_files(frames))
    review_out: dict[str, Any] = dict(review)
    with tempfile.TemporaryDirectory(prefix="bench-var-", dir=scratch) as var:
        settings = StationSettings(
            station={"id": "bench"}, model={"bundle": str(bundle_dir)}, camera={"source": str(frames)},
            inference={"backend": "onnxruntime", "threads": threads}, mqtt={"enabled": False},
            storage={"data_dir": var}, review=review,
        )
        # Every result goes to the SQLite log as at a station; the per-part console line is left out, its
        # cost depends on where stderr goes, not on the appliance.
        station = build_station(settings, mqtt=False, echo=False)
        pipeline, results = station.pipeline, station.results
        sampler = ThreadCpuSampler()
        sampler.start()
        t0 = time.perf_counter()
        pipeline.start()  # returns once the inference thread has its backend
        backend_start_s = time.perf_counter() - t0
        window = CpuWindow()
        finished = pipeline.join(timeout=max(120.0, 2.0 * n))
        cpu = window.stop()
        try:
            if station.review is not None:
                t1 = time.perf_counter()
                review_out["flushed"] = station.review.flush(max(60.0, 0.5 * n))
                review_out["drain_after_join_s"] = time.perf_counter() - t1
                summary = station.review.summary()
                review_out.update({k: summary.get(k) for k in ("queued", "refused", "bytes")})
            per_thread = sampler.stop()
            if not finished:
                raise BenchError(f"the pipeline did not finish {n} frames within {max(120.0, 2.0 * n):.0f} s")
            if pipeline.crashed:
                raise BenchError(f"the pipeline crashed: {pipeline.last_error}")
            records = list(results.inspections())
        finally:
            station.close()
    unscored = [r for r in records if r.score is None or r.backend != "onnxruntime"]
    if len(records) != n or unscored:
        raise BenchError(f"the pipeline recorded {len(records)} of {n} frames, {len(unscored)} without a model score",
                         hint="its timings would not measure the model; see the log lines above")
    verdicts: dict[str, int] = {}
    for r in records:
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    return {
        "frames": n, "ort_threads": threads, "backend_start_s": backend_start_s, "review": review_out,
        "throughput_per_s": n / cpu["wall_s"],
        "latency_ms": {k: summarize([r.latency_ms[k] for r in records]) for k in STAGE_KEYS},
        "cpu": cpu, "cpu_s_by_thread": per_thread, "dropped": pipeline.dropped, "verdicts": verdicts,
        "results_log_dir": str(scratch or tempfile.gettempdir()),  # a temporary directory in there, deleted
        "scores": {r.source_name: r.score for r in records},
    }


# --- (h) POST /inspect against the camera path, one part at a time ----------------------------------------


class _Decided:
    """A sink that notes when each part is decided (decide thread), for the triggered folder station."""

    name = "bench-decided"

    def __init__(self) -> None:
        self.done = threading.Semaphore(0)
        self.records: list[tuple[float, Any]] = []

    def inspection(self, record: Any, evidence: Any) -> None:
        self.records.append((time.perf_counter(), record))
        self.done.release()

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True


def http_inspect(bundle_dir: Path, frames: Path, threads: int, scratch: Path | None, uploads: int,
                 warmup: int) -> dict[str, Any]:
    """`uploads` frames POSTed to /inspect one at a time, then the same frames through the folder, triggered."""
    import httpx

    from appliance.runtime import build_station
    from appliance.settings import StationSettings

    files = _frame_files(frames)
    if warmup + uploads > len(files):
        raise BenchError(f"--warmup {warmup} + --uploads {uploads} is more than the {len(files)} frames")
    data = [p.read_bytes() for p in files[:warmup + uploads]]
    common = {"model": {"bundle": str(bundle_dir)}, "inference": {"backend": "onnxruntime", "threads": threads},
              "mqtt": {"enabled": False}, "review": {"enabled": False}}

    round_trip: list[float] = []
    processing: list[float] = []
    e2e_upload: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-var-", dir=scratch) as var:
        settings = StationSettings(station={"id": "bench-http"}, camera={"source": "none"},
                                   storage={"data_dir": var}, http={"enabled": True, "port": 0}, **common)
        station = build_station(settings, mqtt=False, echo=False)
        station.start()
        try:
            assert station.http is not None
            with httpx.Client(base_url=f"http://127.0.0.1:{station.http.server.port}", timeout=30) as client:
                window = None
                for i, body in enumerate(data):
                    if i == warmup:
                        window = CpuWindow()
                    t0 = time.perf_counter()
                    r = client.post("/inspect", files={"image": (files[i].name, body, "image/png")})
                    elapsed = (time.perf_counter() - t0) * 1000
                    if r.status_code != 200:
                        raise BenchError(f"POST /inspect answered {r.status_code}: {r.text[:300]}")
                    if i >= warmup:
                        answer = r.json()
                        round_trip.append(elapsed)
                        processing.append(answer["processing_time_ms"])
                        e2e_upload.append(answer["latency_ms"]["end_to_end_ms"])
                assert window is not None
                cpu = window.stop()
        finally:
            station.pipeline.stop()
            station.pipeline.join(30)
            station.close()

    trigger_to_decided: list[float] = []
    e2e_trigger: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-var-", dir=scratch) as var:
        settings = StationSettings(station={"id": "bench-trigger"}, camera={"source": str(frames)},
                                   trigger={"mode": "triggered"}, storage={"data_dir": var}, **common)
        decided = _Decided()
        station = build_station(settings, mqtt=False, sinks=[decided], echo=False)
        station.start()
        try:
            t_start = time.perf_counter()
            for i in range(warmup + uploads):
                t0 = time.perf_counter()
                station.pipeline.trigger(f"bench-{i}")
                if not decided.done.acquire(timeout=30):
                    raise BenchError(f"trigger {i} was not decided within 30 s")
                t_done, record = decided.records[-1]
                if i >= warmup:
                    trigger_to_decided.append((t_done - t0) * 1000)
                    e2e_trigger.append(record.latency_ms["end_to_end_ms"])
                if i == warmup - 1:
                    t_start = time.perf_counter()
            trigger_wall_s = time.perf_counter() - t_start
        finally:
            station.pipeline.stop()
            station.pipeline.join(30)
            station.close()
    return {
        "frames": uploads, "warmup": warmup, "ort_threads": threads, "review": {"enabled": False},
        "throughput_per_s": uploads / cpu["wall_s"],  # sequential uploads per second, one in flight
        "trigger_parts_per_s": uploads / trigger_wall_s,
        "latency_ms": {
            "http_round_trip_ms": summarize(round_trip), "processing_time_ms": summarize(processing),
            "upload_end_to_end_ms": summarize(e2e_upload),
            "trigger_to_decided_ms": summarize(trigger_to_decided), "trigger_end_to_end_ms": summarize(e2e_trigger),
        },
        "cpu": cpu,
    }


# --- (c) the naive PyTorch prototype ----------------------------------------------------------------------


def naive_torch(run_dir: Path, frames: Path, warmup: int) -> dict[str, Any]:
    """The first prototype: per frame imread -> gray -> resize -> tensor -> normalise -> model -> softmax."""
    import cv2
    import torch

    from bundle.preprocess import PreprocessSpec
    from training.model import build_model
    from training.trainer import TrainConfig, load_checkpoint

    final = load_checkpoint(run_dir / "final.pt")
    cfg = TrainConfig.model_validate(final["config"])
    spec = PreprocessSpec.model_validate(final["preprocess"])
    if spec.resize != "stretch":
        raise BenchError(f"the naive baseline only stretches frames; {run_dir} was trained with resize={spec.resize}")
    model = build_model(cfg.backbone, spec.channels, cfg.input_size, pretrained=False, dropout=cfg.dropout)
    model.load_state_dict(final["model_state"])
    model.eval()
    size = (spec.input_width, spec.input_height)
    interpolation = cv2.INTER_AREA if spec.interpolation == "area" else cv2.INTER_LINEAR  # as the bundle says
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    defect_index = 1  # training.model: Linear(1280, 2) over ("no_defect", "defect")

    def classify(path: Path) -> float:
        frame = cv2.imread(str(path))
        if frame is None:
            raise BenchError(f"cv2.imread cannot read {path}")
        if spec.color == "gray":
            img = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), size, interpolation=interpolation)
            x = torch.from_numpy(img).float().div(255.0).unsqueeze(0)
        else:
            img = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size, interpolation=interpolation)
            x = torch.from_numpy(img).float().div(255.0).permute(2, 0, 1)
        x = ((x - mean) / std).unsqueeze(0)
        with torch.no_grad():
            logits = model(x)
        return float(torch.softmax(logits, dim=1)[0, defect_index])

    files = _frame_files(frames)
    for i in range(warmup):
        classify(files[i % len(files)])
    latencies: list[float] = []
    scores: dict[str, float] = {}
    window = CpuWindow()
    for path in files:
        t0 = time.perf_counter()
        scores[path.name] = classify(path)
        latencies.append((time.perf_counter() - t0) * 1000)
    cpu = window.stop()
    return {
        "frames": len(files), "warmup_frames": warmup, "torch_threads": torch.get_num_threads(),
        "throughput_per_s": len(files) / cpu["wall_s"], "latency_ms": {"frame": summarize(latencies)}, "cpu": cpu,
        "scores": scores,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.cases", description="Run one bench case in this process.")
    p.add_argument("case", choices=CASES)
    p.add_argument("--frames", type=Path, required=True, help="folder of frames")
    p.add_argument("--result", type=Path, required=True, help="JSON file to write the case's numbers to")
    p.add_argument("--bundle", type=Path, help="model bundle (all but naive)")
    p.add_argument("--run", type=Path, help="training run holding final.pt (naive)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (backend, pipeline)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls or frames first (backend, naive)")
    p.add_argument("--scratch", type=Path, help="where the pipeline's temporary data directory goes")
    p.add_argument("--uploads", type=int, default=100, help="timed uploads and triggers (inspect)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.case == "naive":
        if args.run is None:
            p.error("naive needs --run")
        result = naive_torch(args.run, args.frames, args.warmup)
    else:
        if args.bundle is None:
            p.error(f"{args.case} needs --bundle")
        if args.case == "backend":
            result = bare_backend(args.bundle, args.frames, args.threads, args.warmup)
        elif args.case == "inspect":
            result = http_inspect(args.bundle, args.frames, args.threads, args.scratch, args.uploads, args.warmup)
        else:
            result = appliance_pipeline(args.bundle, args.frames, args.threads, args.scratch,
                                        REVIEW_SETTINGS[args.case])
    result["process"] = process_usage()
    args.result.write_text(json.dumps(result))
    if args.case in ("pipeline", "pipeline_review", "inspect"):
        # The station runtime must run without torch (a Jetson image does not carry it); checked last, after
        # everything the pipeline imports on its way, and written above so the report shows it too.
        assert not result["process"]["torch_imported"], f"the appliance {args.case} case imported torch"
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"bench case: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
