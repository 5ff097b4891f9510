"""What the bench reports: machine facts, the target checks and the printed table (plain data in, text out)."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# The targets the appliance is held to on this 2-core CPU (MB = 10^6 bytes).
MIN_VS_BACKEND = 0.9
MIN_VS_NAIVE = 3.0
MAX_P99_OVER_P50 = 2.0
MAX_RSS_MB = 400.0

# Other processes busy on more than this many cores during a case make its numbers suspect.
OTHER_LOAD_WARN_CORES = 0.1

# Repeats of one case further apart than this (max / min throughput) are called out.
SPREAD_WARN = 1.2

# The latency each case's p50/p99 column shows.
HEADLINE_LATENCY = {"backend": "infer", "pipeline": "end_to_end_ms", "pipeline_review": "end_to_end_ms",
                    "naive": "frame", "inspect": "http_round_trip_ms"}
CASE_LABELS = {
    "backend": "(a) bare ORT backend, infer only",
    "pipeline": "(b) appliance pipeline, review off",
    "pipeline_review": "(g) (b) + review, audit_rate 1.0",
    "naive": "(c) naive PyTorch eager loop",
    "inspect": "(h) POST /inspect, 1 at a time",
}
# Distributions read under these names (not import names), so nothing heavy is imported to learn a version.
_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime",), "torch": ("torch",), "numpy": ("numpy",),
                  "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python")}
_ENV_KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _env_overrides() -> dict[str, str]:
    """Thread knobs and station overrides set in the environment: they change what is measured."""
    out = {k: os.environ[k] for k in _ENV_KNOBS if k in os.environ}
    for k, v in os.environ.items():
        if k.startswith("APPLIANCE_"):
            out[k] = "<hidden>" if any(s in k for s in ("PASSWORD", "SECRET", "TOKEN", "USERNAME")) else v
    return out


def machine_info() -> dict[str, Any]:
    """The machine the numbers come from, read now."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "cores_usable": usable,
        "platform": platform.platform(), "python": platform.python_version(),
        **{name: _version(dists) for name, dists in _DISTRIBUTIONS.items()},
        "env": _env_overrides(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def system_cpu_seconds() -> dict[str, float] | None:
    """CPU seconds the whole machine has spent busy, and stolen by the hypervisor, since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy_s": (user + nice + system + irq + softirq) / tick, "steal_s": steal / tick}


def _target(description: str, measured: float, op: str, limit: float, **extra: Any) -> dict[str, Any]:
    met = math.isfinite(measured) and (measured >= limit if op == ">=" else measured <= limit)
    return {"description": description, "measured": measured, "op": op, "limit": limit, "met": bool(met), **extra}


def check_targets(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target with its measured value (a ratio, or MB for memory) and whether it is met."""
    b, p, n = cases["backend"], cases["pipeline"], cases["naive"]
    e2e = p["latency_ms"]["end_to_end_ms"]
    rss = _target(f"pipeline peak RSS <= {MAX_RSS_MB:g} MB, torch not imported", p["process"]["peak_rss_mb"],
                  "<=", MAX_RSS_MB, unit="MB", torch_imported=p["process"]["torch_imported"])
    rss["met"] = rss["met"] and not rss["torch_imported"]
    return {
        "pipeline_vs_backend_throughput": _target(
            f"pipeline throughput >= {MIN_VS_BACKEND:g}x bare backend",
            p["throughput_per_s"] / b["throughput_per_s"], ">=", MIN_VS_BACKEND, unit="ratio"),
        "pipeline_vs_naive_throughput": _target(
            f"pipeline throughput >= {MIN_VS_NAIVE:g}x naive PyTorch",
            p["throughput_per_s"] / n["throughput_per_s"], ">=", MIN_VS_NAIVE, unit="ratio"),
        "pipeline_e2e_p99_over_p50": _target(
            f"pipeline end-to-end p99 <= {MAX_P99_OVER_P50:g}x p50", e2e["p99"] / e2e["p50"], "<=", MAX_P99_OVER_P50,
            unit="ratio"),
        "pipeline_peak_rss": rss,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (the lower middle of an even count), with every run's spread.

    One whole run rather than a median per field: its latencies, CPU time and memory belong together.
    """
    if not runs:
        raise ValueError("no runs to choose from")
    order = sorted(range(len(runs)), key=lambda i: runs[i]["throughput_per_s"])
    chosen = order[(len(runs) - 1) // 2]
    return {**runs[chosen], "repeats": {
        "chosen": chosen,
        "throughput_per_s": [r["throughput_per_s"] for r in runs],
        "peak_rss_mb": [r["process"]["peak_rss_mb"] for r in runs],
    }}


def score_agreement(cases: dict[str, dict[str, Any]], reference: str = "pipeline") -> dict[str, float | None]:
    """Largest |defect score difference| per frame against the pipeline: proof the cases run the same model."""
    ref = cases[reference].get("scores", {})
    out: dict[str, float | None] = {}
    for name, case in cases.items():
        if name == reference or "scores" not in case:
            continue  # a case without per-frame scores (h) is not compared
        scores = case.get("scores", {})
        common = [k for k in scores if k in ref and ref[k] is not None and scores[k] is not None]
        out[name] = max((abs(scores[k] - ref[k]) for k in common), default=None) if len(common) == len(ref) else None
    return out


def review_cost(cases: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """(g) against (b): parts/s and end-to-end p50/p99 ratios, review on over review off."""
    if "pipeline_review" not in cases or "pipeline" not in cases:
        return None
    off, on = cases["pipeline"], cases["pipeline_review"]
    e_off, e_on = off["latency_ms"]["end_to_end_ms"], on["latency_ms"]["end_to_end_ms"]
    return {"throughput_ratio": on["throughput_per_s"] / off["throughput_per_s"],
            "e2e_p50_ratio": e_on["p50"] / e_off["p50"], "e2e_p99_ratio": e_on["p99"] / e_off["p99"]}


def review_cost_lines(cases: dict[str, dict[str, Any]]) -> list[str]:
    ratios = review_cost(cases)
    if ratios is None:
        return []
    off, on = cases["pipeline"], cases["pipeline_review"]
    r = on.get("review", {})
    e_off, e_on = off["latency_ms"]["end_to_end_ms"], on["latency_ms"]["end_to_end_ms"]
    return [
        "",
        "(g) review queue's cost     parts/s   e2e p50 ms   e2e p99 ms",
        f"    (b) review off          {off['throughput_per_s']:8.1f} {e_off['p50']:12.1f} {e_off['p99']:12.1f}",
        f"    (g) audit_rate 1.0      {on['throughput_per_s']:8.1f} {e_on['p50']:12.1f} {e_on['p99']:12.1f}",
        f"    (g) / (b)               {ratios['throughput_ratio']:7.2f}x {ratios['e2e_p50_ratio']:11.2f}x "
        f"{ratios['e2e_p99_ratio']:11.2f}x",
        f"    (g) review items queued {r.get('queued')}, refused (backlog full) {r.get('refused')}, "
        f"{(r.get('bytes') or 0) / 1e6:.1f} MB of {r.get('image_format', 'png')}; writer still busy "
        f"{r.get('drain_after_join_s', float('nan')):.2f} s after join",
    ]


def inspect_lines(cases: dict[str, dict[str, Any]]) -> list[str]:
    if "inspect" not in cases:
        return []
    h = cases["inspect"]
    lat = h["latency_ms"]
    rows = [("HTTP round trip (httpx)", "http_round_trip_ms"), ("processing_time_ms (answer)", "processing_time_ms"),
            ("upload: record end_to_end_ms", "upload_end_to_end_ms"),
            ("folder, triggered: trigger -> decided", "trigger_to_decided_ms"),
            ("folder, triggered: record end_to_end", "trigger_end_to_end_ms")]
    out = ["", f"(h) {h['frames']} parts one at a time (after {h['warmup']} untimed)   p50 ms   p99 ms"]
    out += [f"    {label:40s} {lat[key]['p50']:8.1f} {lat[key]['p99']:8.1f}" for label, key in rows]
    out.append(f"    compare processing_time_ms with trigger -> decided (PNG decode + pipeline each); uploads "
               f"{h['throughput_per_s']:.1f}/s, triggers {h['trigger_parts_per_s']:.1f}/s sequentially")
    return out


def format_table(report: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    m, inputs, cases, targets = report["machine"], report["inputs"], report["cases"], report["targets"]
    lines = [
        f"inspection appliance bench, {m['date_utc']}: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}",
        f"{inputs['frames']} frames {inputs['frame_size']} BGR PNG ({inputs['frames_origin']}) -> model "
        f"{inputs['model_input']} ({inputs['bundle_origin']} bundle {inputs['bundle']})",
        "Speed depends on the architecture and input size, not on how well the model is trained"
        + (" (the bench model had one training step)." if inputs["bundle_origin"] != "given" else "."),
        "",
        f"{'case':38s} {'parts/s':>8s} {'(all runs)':>18s} {'p50 ms':>8s} {'p99 ms':>8s} {'cores busy':>11s} "
        f"{'peak RSS MB':>12s}  torch",
    ]
    for name in (n for n in CASE_LABELS if n in cases):
        c = cases[name]
        lat = c["latency_ms"][HEADLINE_LATENCY[name]]
        all_runs = "/".join(f"{t:.0f}" for t in c.get("repeats", {}).get("throughput_per_s", []))
        lines.append(
            f"{CASE_LABELS[name]:38s} {c['throughput_per_s']:8.1f} {all_runs:>18s} {lat['p50']:8.1f} {lat['p99']:8.1f} "
            f"{c['cpu']['cores_busy']:11.2f} {c['process']['peak_rss_mb']:12.1f}  "
            f"{'imported' if c['process']['torch_imported'] else 'no'}"
        )
    for name in (n for n in CASE_LABELS if n in cases):
        tput = cases[name].get("repeats", {}).get("throughput_per_s", [])
        if len(tput) > 1 and min(tput) > 0 and max(tput) / min(tput) > SPREAD_WARN:
            lines.append(f"  WARNING: {name} throughput varied {max(tput) / min(tput):.2f}x between rounds: the CPU "
                         "capacity this machine got changed during the bench; read the ratios with that in mind")
    for name in (n for n in CASE_LABELS if n in cases):
        cpu = cases[name]["cpu"]
        other, steal = cpu.get("other_cores", 0.0), cpu.get("steal_cores", 0.0)
        if other > OTHER_LOAD_WARN_CORES or steal > OTHER_LOAD_WARN_CORES:
            lines.append(f"  WARNING: while {name} was timed, other processes kept {other:.2f} cores busy and the "
                         f"hypervisor took {steal:.2f}: its numbers were measured on a shared machine")
    p = cases["pipeline"]
    lines += ["", f"(b) per stage ({p['ort_threads']} ORT threads)   p50 ms   p99 ms"]
    for key, lat in p["latency_ms"].items():
        lines.append(f"    {key:29s} {lat['p50']:8.1f} {lat['p99']:8.1f}")
    by_thread = ", ".join(f"{k} {v:.1f}" for k, v in p.get("cpu_s_by_thread", {}).items())
    lines += [f"(b) CPU seconds by thread over {p['cpu']['wall_s']:.1f} s: {by_thread}",
              f"(b) backend start (session creation, not timed above) {p['backend_start_s']:.2f} s"]
    lines += review_cost_lines(cases) + inspect_lines(cases) + ["", "targets"]
    for t in targets.values():
        shown = f"{t['measured']:.2f}x" if t["unit"] == "ratio" else f"{t['measured']:.1f} MB"
        lines.append(f"  {t['description']:52s} {shown:>10s}  {'met' if t['met'] else 'MISSED'}")
    missed = [t["description"] for t in targets.values() if not t["met"]]
    lines += ["", f"MISSED {len(missed)} of {len(targets)} targets: " + "; ".join(missed) if missed
              else f"all {len(targets)} targets met"]
    agreement = ", ".join(f"{k} {v:.1e}" if v is not None else f"{k} n/a" for k, v in report["score_agreement"].items())
    lines.append(f"max |defect score - pipeline's| per frame: {agreement}")
    return "\n".join(lines)
