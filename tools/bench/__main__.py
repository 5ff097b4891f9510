"""`python -m tools.bench` (`make bench`): prepare the inputs, run the cases, print and save the report.

Exit 0 whenever the numbers were produced, targets met or not (a missed target is printed as MISSED and
recorded in bench.json); exit 1 when a step failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.cases import CASES
from tools.bench.errors import BenchError
from tools.bench.inputs import FRAME_HEIGHT, FRAME_WIDTH, Prepared, ensure_frames, ensure_model, repo_root
from tools.bench.report import check_targets, format_table, machine_info, median_run, review_cost, score_agreement

REPORT_SCHEMA_VERSION = 1
NOTES = [
    "throughput: parts per second of wall time; backend and naive over the timed loop after warm-up, the "
    "pipeline from Pipeline.start() returning (ONNX Runtime session created) until every part is recorded",
    "latency: time.perf_counter per infer call (a), per frame (c); (b) from the pipeline's own record.latency_ms",
    "peak RSS: getrusage(RUSAGE_SELF).ru_maxrss of each case's own process, in MB (10^6 bytes); vm_hwm_mb is "
    "the same from /proc/self/status VmHWM",
    "each case runs in a fresh process, one after another, in --repeats rounds; a case's numbers are those of "
    "its run with the median throughput (all runs' throughputs are under repeats)",
    "the pipeline's process never imports torch",
    "the model was trained for one step: speed depends on architecture and input size, not on the weights",
    "review queue: (b) runs with review.enabled = false; (g) is (b) with review.enabled = true and "
    "review.audit_rate = 1.0 (every part's frame written as a PNG by the review writer thread); (g)'s timed window "
    "ends at join() like (b)'s, the review writer's remaining backlog after that is review.drain_after_join_s",
    "(h): --uploads frames, one at a time after --warmup untimed ones, POSTed to /inspect (camera source none, "
    "HTTP on loopback, no tokens) with httpx, against the same frames from the folder in trigger mode, one trigger "
    "at a time; processing_time_ms (upload received -> decided) compares with trigger -> decided, the round trip "
    "adds HTTP; parts/s of (h) is sequential uploads, one in flight, not a throughput. Review off in both",
]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="CPU benchmark of the station runtime: (a) bare ONNX Runtime backend, (b) the whole appliance "
        "pipeline from a folder of frames, (c) a naive per-frame PyTorch loop, (g) (b) with every part queued for "
        "review, (h) POST /inspect against the folder in trigger mode. Inputs are cached in --out-dir.",
    )
    p.add_argument("--frames", type=_positive, default=300, help="camera frames to inspect per case (default 300)")
    p.add_argument("--threads", type=_positive, default=2, help="ONNX Runtime intra-op threads, (a) and (b)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before (a) and (c) (default 10)")
    p.add_argument("--repeats", type=_positive, default=3,
                   help="rounds of the cases; each case reports its median-throughput run (default 3)")
    p.add_argument("--uploads", type=_positive, default=100,
                   help="(h): uploads to POST /inspect and triggers of the folder station, one at a time (default "
                   "100; at most --frames minus --warmup)")
    p.add_argument("--out-dir", type=Path, default=Path("artifacts/bench"), help="cache and report folder")
    p.add_argument("--json", type=Path, help="report file (default OUT_DIR/bench.json)")
    p.add_argument("--bundle", type=Path, help="use this model bundle instead of training one (needs --run)")
    p.add_argument("--run", type=Path, help="the training run the bundle was exported from (final.pt, for (c))")
    return p


def run_case(case: str, frames: Path, result: Path, extra: list[str], label: str) -> dict[str, Any]:
    """One case in a fresh child process; its numbers come back through the JSON file `result`."""
    args = ["-m", "tools.bench.cases", case, "--frames", str(frames), "--result", str(result), *extra]
    print(f"bench: case {label} ...", flush=True)
    rc = subprocess.run([sys.executable, *args], cwd=repo_root(), check=False).returncode
    if rc != 0 or not result.is_file():
        raise BenchError(f"case {case} failed (exit {rc}); its output is above",
                         hint=f"run it alone from {repo_root()}: python {' '.join(args)}")
    return json.loads(result.read_text())


def _model_inputs(args: argparse.Namespace, bench_dir: Path) -> tuple[Prepared, Prepared]:
    if (args.bundle is None) != (args.run is None):
        raise BenchError("--bundle and --run go together: the naive case loads the weights the bundle was "
                         "exported from")
    if args.bundle is None:
        return ensure_model(bench_dir)
    run, bundle = args.run.resolve(), args.bundle.resolve()
    if not (run / "final.pt").is_file():
        raise BenchError(f"--run {run} holds no final.pt", hint="pass the training run directory the bundle came from")
    if not (bundle / "metadata.json").is_file():
        raise BenchError(f"--bundle {bundle} holds no metadata.json", hint="pass a bundle written by python -m export")
    return Prepared(run, "given"), Prepared(bundle, "given")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `make bench` does up to the report (a dict, also written as JSON)."""
    bench_dir = args.out_dir.resolve()
    bench_dir.mkdir(parents=True, exist_ok=True)
    run, bundle = _model_inputs(args, bench_dir)
    frames = ensure_frames(bench_dir, args.frames)
    meta = json.loads((bundle.path / "metadata.json").read_text())
    pre = meta["preprocess"]
    ort = ["--bundle", str(bundle.path), "--threads", str(args.threads)]
    uploads = min(args.uploads, args.frames - args.warmup)
    if uploads < 1:
        raise BenchError(f"--frames {args.frames} leaves no frame for (h) after --warmup {args.warmup}")
    pipeline_args = [*ort, "--scratch", str(bench_dir)]
    case_args = {"backend": [*ort, "--warmup", str(args.warmup)], "pipeline": pipeline_args,
                 "pipeline_review": pipeline_args, "naive": ["--run", str(run.path), "--warmup", str(args.warmup)],
                 "inspect": [*pipeline_args, "--warmup", str(args.warmup), "--uploads", str(uploads)]}
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-results-") as work:
        # Round after round of all the cases rather than one case R times: a slow spell of the host hits
        # different cases in different rounds instead of skewing one case's every run.
        for r in range(args.repeats):
            for case in CASES:
                runs[case].append(run_case(case, frames.path, Path(work) / f"{case}-{r}.json", case_args[case],
                                           f"{case} (round {r + 1} of {args.repeats})"))
    cases = {case: median_run(case_runs) for case, case_runs in runs.items()}
    agreement = score_agreement(cases)
    for numbers in cases.values():
        numbers.pop("scores", None)  # N per-frame scores: for the agreement check, too long for the report
    targets = check_targets(cases)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "machine": machine_info(),
        "inputs": {
            "frames": args.frames, "frame_size": f"{FRAME_WIDTH}x{FRAME_HEIGHT}", "frames_dir": str(frames.path),
            "frames_origin": frames.origin, "bundle": str(bundle.path), "bundle_origin": bundle.origin,
            "run": str(run.path), "run_origin": run.origin, "backbone": meta.get("backbone"),
            "model_input": f"{pre['input_width']}x{pre['input_height']} {pre['color']}",
            "ort_threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "uploads": uploads,
        },
        "cases": cases,
        "score_agreement": agreement,
        "review_cost": review_cost(cases),
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "notes": NOTES,
    }


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run_bench(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = args.json or args.out_dir / "bench.json"
    _write_json(out, report)
    print()
    print(format_table(report))
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
