"""`make bench` on tiny inputs: the report has every field, its numbers are sane, its verdicts follow its ratios.

No timing is asserted (a busy machine is slow, not wrong): the real figures come from `make bench`. The
bench runs as the command does, in a child process, on the session's tiny 64x64 bundle and 8 frames.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest

from tests.support.mqtt import needs_mosquitto
from tools.bench.__main__ import main
from tools.bench.report import check_targets, median_run

REPO = Path(__file__).resolve().parents[1]
FRAMES = 8
CASES = ("backend", "pipeline", "pipeline_review", "naive", "inspect")
WARMUP = 2
STAGES = ("queue_ms", "slot_wait_ms", "preprocess_ms", "infer_wait_ms", "infer_ms", "decide_wait_ms", "end_to_end_ms")
TARGETS = ("pipeline_vs_backend_throughput", "pipeline_vs_naive_throughput", "pipeline_e2e_p99_over_p50",
           "pipeline_peak_rss")


@pytest.fixture(scope="module")
def bench(bundle_dir: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--frames", str(FRAMES), "--warmup", str(WARMUP), "--repeats", "1",
         "--bundle", str(bundle_dir), "--run", str(trained_run), "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"report": json.loads((out / "bench.json").read_text()), "stdout": proc.stdout, "out": out}


def _finite_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_report_names_the_machine_and_the_inputs(bench: dict[str, Any]):
    report = bench["report"]
    machine = report["machine"]
    for key in ("cpu_model", "cores", "python", "onnxruntime", "torch", "date_utc"):
        assert machine[key], key
    inputs = report["inputs"]
    assert inputs["frames"] == FRAMES and inputs["frame_size"] == "640x480"
    assert inputs["model_input"] == "64x64 gray" and inputs["bundle_origin"] == "given"


def test_frames_are_640x480_bgr_camera_images(bench: dict[str, Any]):
    files = sorted(Path(bench["report"]["inputs"]["frames_dir"]).glob("frame_*.png"))
    assert len(files) == FRAMES
    assert cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED).shape == (480, 640, 3)


def test_every_case_reports_positive_finite_numbers(bench: dict[str, Any]):
    cases = bench["report"]["cases"]
    assert set(cases) == set(CASES)
    for name, case in cases.items():
        frames = FRAMES - WARMUP if name == "inspect" else FRAMES  # (h): --uploads clipped to what warm-up leaves
        assert case["frames"] == frames, name
        assert _finite_positive(case["throughput_per_s"]), name
        assert _finite_positive(case["cpu"]["wall_s"]), name
        assert _finite_positive(case["process"]["peak_rss_mb"]), name
        assert case["repeats"]["throughput_per_s"] == [case["throughput_per_s"]], name
        assert "scores" not in case, name  # per-frame scores feed score_agreement, not the report
        for stat in case["latency_ms"].values():
            assert stat["n"] == frames, name
            for q in ("p50", "p99", "mean", "max"):
                assert math.isfinite(stat[q]) and stat[q] >= 0, (name, q)
            assert stat["p50"] <= stat["p99"] <= stat["max"], name
    assert set(cases["pipeline"]["latency_ms"]) == set(STAGES)
    assert all(_finite_positive(cases["pipeline"]["latency_ms"][k]["p50"]) for k in ("infer_ms", "end_to_end_ms"))


def test_review_cost_and_inspect_cases_are_reported_with_positive_numbers(bench: dict[str, Any]):
    report = bench["report"]
    cases = report["cases"]
    assert cases["pipeline"]["review"] == {"enabled": False}
    review = cases["pipeline_review"]["review"]
    assert review["enabled"] is True and review["audit_rate"] == 1.0 and review["flushed"] is True
    assert review["queued"] == FRAMES and review["refused"] == 0 and _finite_positive(review["bytes"])
    assert all(_finite_positive(v) for v in report["review_cost"].values()), report["review_cost"]
    inspect = cases["inspect"]
    assert report["inputs"]["uploads"] == FRAMES - WARMUP
    assert _finite_positive(inspect["trigger_parts_per_s"])
    for key in ("http_round_trip_ms", "processing_time_ms", "upload_end_to_end_ms", "trigger_to_decided_ms",
                "trigger_end_to_end_ms"):
        assert all(_finite_positive(inspect["latency_ms"][key][q]) for q in ("p50", "p99")), key
    assert inspect["process"]["torch_imported"] is False
    lines = bench["stdout"].splitlines()
    for label in ("(g) (b) + review, audit_rate 1.0", "(h) POST /inspect, 1 at a time", "(b) appliance pipeline, "
                  "review off", "    (g) / (b)", "    processing_time_ms (answer)"):
        assert any(x.startswith(label) for x in lines), label


def test_pipeline_inspects_every_frame_without_torch(bench: dict[str, Any]):
    cases = bench["report"]["cases"]
    pipeline = cases["pipeline"]
    assert sum(pipeline["verdicts"].values()) == FRAMES and "error" not in pipeline["verdicts"]
    assert pipeline["dropped"] == 0
    assert pipeline["process"]["torch_imported"] is False
    assert cases["naive"]["process"]["torch_imported"] is True


def test_all_cases_score_the_same_model(bench: dict[str, Any]):
    agreement = bench["report"]["score_agreement"]
    assert set(agreement) == {"backend", "pipeline_review", "naive"}  # (h) holds no per-frame scores
    assert all(v is not None and v < 1e-3 for v in agreement.values()), agreement


def test_target_verdicts_follow_the_measured_ratios(bench: dict[str, Any]):
    report = bench["report"]
    cases, targets = report["cases"], report["targets"]
    assert set(targets) == set(TARGETS)
    p = cases["pipeline"]
    expected = {
        "pipeline_vs_backend_throughput": p["throughput_per_s"] / cases["backend"]["throughput_per_s"],
        "pipeline_vs_naive_throughput": p["throughput_per_s"] / cases["naive"]["throughput_per_s"],
        "pipeline_e2e_p99_over_p50": p["latency_ms"]["end_to_end_ms"]["p99"] / p["latency_ms"]["end_to_end_ms"]["p50"],
        "pipeline_peak_rss": p["process"]["peak_rss_mb"],
    }
    for key, target in targets.items():
        assert target["measured"] == pytest.approx(expected[key]), key
        measured, limit = target["measured"], target["limit"]
        within = measured >= limit if target["op"] == ">=" else measured <= limit
        assert target["met"] is (within and not target.get("torch_imported", False)), key
    assert report["all_targets_met"] is all(t["met"] for t in targets.values())


def test_printed_table_marks_each_target_met_or_missed(bench: dict[str, Any]):
    lines = bench["stdout"].splitlines()
    for target in bench["report"]["targets"].values():
        line = next(x for x in lines if x.strip().startswith(target["description"]))
        assert line.rstrip().endswith("met" if target["met"] else "MISSED")


def test_a_missed_target_is_reported_not_raised():
    def case(throughput: float, p50: float = 10.0, p99: float = 11.0, rss: float = 100.0, torch: bool = False):
        return {"throughput_per_s": throughput, "latency_ms": {"end_to_end_ms": {"p50": p50, "p99": p99}},
                "process": {"peak_rss_mb": rss, "torch_imported": torch}}

    targets = check_targets({"backend": case(100.0), "pipeline": case(50.0, p99=30.0, torch=True),
                             "naive": case(10.0)})
    assert targets["pipeline_vs_backend_throughput"]["met"] is False
    assert targets["pipeline_vs_backend_throughput"]["measured"] == pytest.approx(0.5)
    assert targets["pipeline_vs_naive_throughput"]["met"] is True
    assert targets["pipeline_e2e_p99_over_p50"]["met"] is False
    assert targets["pipeline_peak_rss"]["met"] is False  # small, but torch was imported


def test_each_case_reports_its_median_run_whole():
    runs = [{"throughput_per_s": t, "latency_ms": {"run": i}, "process": {"peak_rss_mb": 100.0 + i}}
            for i, t in enumerate((30.0, 10.0, 20.0, 40.0))]
    chosen = median_run(runs)
    assert chosen["throughput_per_s"] == 20.0 and chosen["latency_ms"] == {"run": 2}  # lower middle, one run's numbers
    assert chosen["repeats"] == {"chosen": 2, "throughput_per_s": [30.0, 10.0, 20.0, 40.0],
                                 "peak_rss_mb": [100.0, 101.0, 102.0, 103.0]}


def test_bundle_without_its_training_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--bundle", str(tmp_path), "--out-dir", str(tmp_path)]) == 1
    assert "--bundle and --run go together" in capsys.readouterr().err


@needs_mosquitto
def test_mqtt_bench_delivers_every_result_and_reports_both_measurements(tmp_path: Path):
    out = tmp_path / "mqtt.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench.mqtt", "--results", "40", "--drain", "120",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    s, d = report["sustained"], report["drain"]
    assert s["results"] == s["received"] == 40 and s["all_delivered"] is True
    assert d["results"] == d["received"] == 120 and d["all_delivered"] is True
    assert _finite_positive(s["results_per_s"]) and _finite_positive(d["results_per_s"])
    assert 0 < s["reporter_call_ms"]["p50"] <= s["reporter_call_ms"]["p99"] <= s["reporter_call_ms"]["max"]
    assert "sustained:" in proc.stdout and "drain:" in proc.stdout
