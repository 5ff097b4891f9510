"""Assemble a model bundle from a training run directory (see bundle/format.py for the layout).

The bundle is built in a temporary sibling directory and renamed into place at the end, so a failed
or interrupted export never leaves a half-written bundle where stations would pick it up.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bundle.errors import BundleError
from bundle.format import (
    CLASS_NAMES,
    ROLE_FILES,
    BundleMetadata,
    DecisionDefaults,
    defect_map_spec,
    describe_file,
    load_bundle,
    logits_spec,
    write_metadata,
)
from bundle.onnx_runtime import OnnxRuntimeBackend
from bundle.preprocess import PreprocessSpec, preprocess_batch
from export.quantize import FLOAT_CONVS, quantize_int8
from training.datasets import Sample
from training.metrics import binary_metrics, choose_operating_point, roc_auc, softmax_defect_score

ORT_PRECISIONS = {"fp32": "onnx_fp32", "fp16": "onnx_fp16", "int8": "onnx_int8"}


def _pick(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """Up to n samples, both classes in proportion, deterministic."""
    rng = np.random.default_rng(seed)
    by_label = [[s for s in samples if s.label == lab] for lab in (0, 1)]
    total = sum(len(b) for b in by_label)
    chosen: list[Sample] = []
    for group in by_label:
        k = min(len(group), max(1, round(n * len(group) / max(total, 1))))
        chosen += [group[i] for i in sorted(rng.choice(len(group), size=k, replace=False))]
    return chosen[:n] if len(chosen) > n else chosen


def _scores(backend: OnnxRuntimeBackend, samples: Sequence[Sample], spec: PreprocessSpec,
            batch: int = 32) -> np.ndarray:
    logits = [backend.infer(preprocess_batch([s.image for s in samples[i : i + batch]], spec))
              for i in range(0, len(samples), batch)]
    return softmax_defect_score(np.concatenate(logits))


def build_bundle(
    run_dir: Path,
    out_dir: Path,
    name: str | None = None,
    calibration_images: int = 256,
    golden_images: int = 32,
    calibration_method: str = "percentile",
    float_convs: int = FLOAT_CONVS,
    int8: bool = True,
    fp16: bool = True,
) -> Path:
    """Export the run's final model to a verified bundle at out_dir; return its path."""
    from tqdm import tqdm

    from export.fp16 import convert_fp16
    from export.onnx_export import MAP_RELATIVE, check_map, export_onnx, map_parity, parity
    from training.model import build_model
    from training.trainer import TrainConfig, load_checkpoint, load_samples, split_samples

    started = time.time()
    final = load_checkpoint(run_dir / "final.pt")
    cfg = TrainConfig.model_validate(final["config"])
    spec = PreprocessSpec.model_validate(final["preprocess"])
    decision = DecisionDefaults.model_validate(final["decision"])
    model = build_model(cfg.backbone, spec.channels, cfg.input_size, pretrained=False, dropout=cfg.dropout)
    try:
        model.load_state_dict(final["model_state"])
    except RuntimeError as exc:
        raise BundleError(f"{run_dir / 'final.pt'} does not match backbone {cfg.backbone}: {exc}") from exc

    steps = ["load data", "fp32 onnx", "parity", "int8", "fp16", "operating points", "held-out scoring",
             "golden + metadata"]
    bar = tqdm(total=len(steps), desc="export", unit="step")

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    splits = split_samples(cfg, load_samples(cfg))
    step("data")

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp32 = export_onnx(model, spec.input_shape, tmp / ROLE_FILES["onnx_fp32"])
        step("fp32 onnx")
        golden = _pick(splits["test"], golden_images, seed=cfg.seed)
        golden_inputs = preprocess_batch([s.image for s in golden], spec)
        parity_diff = parity(model, fp32, golden_inputs)
        parity_map_diff = map_parity(model, fp32, golden_inputs)
        step("parity")
        export_info: dict[str, object] = {
            "opset": 17, "parity_max_abs_logit_diff": parity_diff, "parity_images": len(golden),
            "parity_max_map_diff": parity_map_diff,
        }
        if int8:
            calib = _pick(splits["train"], calibration_images, seed=cfg.seed + 7)
            export_info["int8"] = quantize_int8(
                fp32, tmp / ROLE_FILES["onnx_int8"], [s.image for s in calib], spec, method=calibration_method,
                float_convs=float_convs,
            )
        step("int8")
        if fp16:
            convert_fp16(fp32, tmp / ROLE_FILES["onnx_fp16"])
        step("fp16")

        # Each reduced precision gets its own operating point, chosen on the validation split from its own
        # ONNX scores by training's rule (never on the test split).
        roles = [p for p in ORT_PRECISIONS if (tmp / ROLE_FILES[ORT_PRECISIONS[p]]).exists()]
        backends = {p: OnnxRuntimeBackend(tmp / ROLE_FILES[ORT_PRECISIONS[p]]) for p in roles}
        val = splits["val"]
        val_labels = np.array([s.label for s in val])
        decision_by_precision: dict[str, DecisionDefaults] = {}
        for p, backend in backends.items():
            if p == "fp32":
                continue
            t, low, high = choose_operating_point(
                val_labels, _scores(backend, val, spec), decision.target_recall, cfg.max_manual_fraction
            )
            decision_by_precision[p] = DecisionDefaults(
                threshold=t, band_low=low, band_high=high, target_recall=decision.target_recall
            )
        step("operating points")

        # Held-out accuracy of every precision, in ONNX Runtime: at FP32's threshold (how far the precision
        # moves decisions) and at its own operating point (what its engines do on the line).
        test = splits["test"]
        labels = np.array([s.label for s in test])
        metrics: dict[str, dict[str, float]] = {}
        scores: dict[str, np.ndarray] = {}
        for p, backend in backends.items():
            scores[p] = _scores(backend, test, spec)
            m = binary_metrics(labels, scores[p], decision.threshold)
            metrics[p] = {k: float(v) for k, v in m.to_dict().items()}
            # Threshold-free: says whether a precision loses ranking or only shifts scores.
            metrics[p]["roc_auc"] = roc_auc(labels, scores[p])
            if p != "fp32":
                agree = np.mean((scores[p] >= decision.threshold) == (scores["fp32"] >= decision.threshold))
                metrics[p]["decision_agreement_vs_fp32"] = float(agree)
                metrics[p]["accuracy_delta_vs_fp32"] = metrics[p]["accuracy"] - metrics["fp32"]["accuracy"]
                metrics[p]["mean_abs_score_diff_vs_fp32"] = float(np.mean(np.abs(scores[p] - scores["fp32"])))
                own = binary_metrics(labels, scores[p], decision_by_precision[p].threshold)
                for key in ("threshold", "accuracy", "recall", "false_positive_rate", "f1"):
                    metrics[p][f"own_point_{key}"] = float(getattr(own, key))
        step("held-out scoring")

        golden_arrays = {
            "inputs": golden_inputs, "labels": np.array([s.label for s in golden]),
            "names": np.array([s.name for s in golden]),
        }
        # The reference outputs of every precision, logits and defect maps; the reduced precisions' maps are
        # checked against FP32's here (export/onnx_export.py, MAP_RELATIVE), their logits by the metrics above.
        for p, backend in backends.items():
            logits, defect_map = backend.infer_with_map(golden_inputs)
            if defect_map is None:
                raise BundleError(f"{p} ONNX model {backend.model_path} has no defect map output")
            if p != "fp32":
                what = f"{p} ONNX model {backend.model_path}"
                reference = golden_arrays["defect_map_fp32"]
                export_info[f"{p}_max_map_diff_vs_fp32"] = check_map(reference, defect_map, MAP_RELATIVE[p], what)
            golden_arrays[f"logits_{p}"], golden_arrays[f"defect_map_{p}"] = logits, defect_map
        np.savez_compressed(tmp / ROLE_FILES["golden"], **golden_arrays)
        map_height, map_width = golden_arrays["defect_map_fp32"].shape[1:]

        files = {role: describe_file(tmp, fname) for role, fname in ROLE_FILES.items() if (tmp / fname).exists()}
        export_info["duration_s"] = round(time.time() - started, 1)
        metadata = BundleMetadata(
            name=name or run_dir.name,
            created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            backbone=cfg.backbone, class_names=CLASS_NAMES, preprocess=spec, decision=decision,
            outputs=(logits_spec(len(CLASS_NAMES)), defect_map_spec(map_height, map_width)),
            decision_by_precision=decision_by_precision,
            training=dict(final["training"]), metrics=metrics, export=export_info, files=files,
        )
        write_metadata(tmp, metadata)
        load_bundle(tmp)  # verify what we wrote, before it replaces anything
        step("golden + metadata")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir
