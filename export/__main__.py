"""`python -m export`: turn a training run into a model bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bundle.errors import ApplianceError
from export.quantize import FLOAT_CONVS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training run (RUN/final.pt) to a model bundle: FP32 ONNX, INT8 Q/DQ ONNX, "
        "FP16 ONNX, metadata.json and golden inputs/outputs for engine validation.",
    )
    p.add_argument("--run", type=Path, required=True, help="training run directory (holds final.pt)")
    p.add_argument("--out", type=Path, default=Path("artifacts/bundle"), help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the run directory's name)")
    p.add_argument("--calibration-images", type=int, default=256, help="INT8 calibration images (default 256)")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="percentile",
                   help="activation range: percentile (99.999 %%, default: kept INT8 decisions closest to "
                   "FP32 on ELPV), minmax or entropy")
    p.add_argument("--int8-float-convs", type=int, default=FLOAT_CONVS, metavar="N",
                   help="convolutions kept float at the start of the INT8 model (default "
                   f"{FLOAT_CONVS}: the stem and first blocks, where INT8 cost ELPV 1.5 points of ROC-AUC)")
    p.add_argument("--golden-images", type=int, default=32, help="golden inputs saved for engine validation")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--no-fp16", action="store_true")
    args = p.parse_args(argv)
    from export.writer import build_bundle

    try:
        out = build_bundle(
            args.run, args.out, name=args.name, calibration_images=args.calibration_images,
            golden_images=args.golden_images, calibration_method=args.calibration_method,
            float_convs=args.int8_float_convs,
            int8=not args.no_int8, fp16=not args.no_fp16,
        )
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    meta = json.loads((out / "metadata.json").read_text())
    print(f"bundle written to {out}")
    for precision, m in meta["metrics"].items():
        agreement = m.get("decision_agreement_vs_fp32")
        extra = f"  agreement vs fp32 {agreement:.4f}" if agreement is not None else ""
        print(f"  {precision:5s} held-out accuracy {m['accuracy']:.4f}  recall {m['recall']:.4f}  "
              f"F1 {m['f1']:.4f}{extra}")
        if "own_point_threshold" in m:
            print(f"        at its own threshold {m['own_point_threshold']:.4f}: accuracy {m['own_point_accuracy']:.4f}"
                  f"  recall {m['own_point_recall']:.4f}  F1 {m['own_point_f1']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
