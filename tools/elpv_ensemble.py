"""Score ELPV runs alone, with test-time flips, and averaged together: does an ensemble reach issue #2's targets?

    python -m tools.elpv_ensemble RUN [RUN ...] [--flips] [--target-recall 0.9] [--input-size N]

Each run's final.pt scores the validation and test splits of its split.json (all runs must share it);
logits are cached beside the run (`logits_<split>[_flip].npy`). For every single run and every
combination, the defect probability is the mean over models (and flips); the operating threshold is
chosen on validation for the target recall, exactly as training does, and the test split is scored
at 0.5 and at that threshold. CPU is fine: no training, one forward pass per image per model.
`--input-size N` scores at another input size than the run was trained at (test-time resolution: the
cells are resized bilinearly; cached as `logits_<split>[_flip]_<N>px.npy`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np


def _logits(run: Path, split: str, flip: str | None, size: int | None = None) -> np.ndarray:
    import torch

    from training.model import build_model
    from training.trainer import TrainConfig, load_checkpoint, load_samples, predict_logits, split_samples, torch_device

    final = load_checkpoint(run / "final.pt")
    cfg = TrainConfig.model_validate(dict(final["config"], out_dir=str(run), device="auto", data_dir=None))
    spec = cfg.preprocess_spec()
    resized = size is not None and size != cfg.input_size
    cache = run / f"logits_{split}{'_' + flip if flip else ''}{f'_{size}px' if resized else ''}.npy"
    if cache.is_file():
        return np.load(cache)
    if resized:
        spec = spec.model_copy(update={"input_height": size, "input_width": size, "interpolation": "linear"})
    model = build_model(cfg.backbone, spec.channels, cfg.input_size, pretrained=False, dropout=cfg.dropout)
    model.load_state_dict(final["model_state"])
    device = torch_device(cfg)
    model.to(device).eval()
    samples = split_samples(cfg, load_samples(cfg))[split]
    if flip:
        from dataclasses import replace

        axis = 1 if flip == "h" else 0
        samples = [replace(s, image=np.ascontiguousarray(np.flip(s.image, axis=axis))) for s in samples]
    with torch.no_grad():
        logits = predict_logits(model, samples, spec, device)
    np.save(cache, logits)
    return logits


def _labels(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from training.trainer import TrainConfig, load_checkpoint, load_samples, split_samples

    final = load_checkpoint(run / "final.pt")
    cfg = TrainConfig.model_validate(dict(final["config"], out_dir=str(run), device="cpu", data_dir=None))
    samples = split_samples(cfg, load_samples(cfg))[split]
    return np.array([s.label for s in samples]), np.array([s.fine_label for s in samples])


def score(val_p: np.ndarray, val_y: np.ndarray, test_p: np.ndarray, test_y: np.ndarray, recall: float) -> dict:
    from training.metrics import binary_metrics, roc_auc, threshold_for_recall

    t = threshold_for_recall(val_y, val_p, recall)
    at_half = binary_metrics(test_y, test_p, 0.5)
    at_op = binary_metrics(test_y, test_p, t)
    best = max((binary_metrics(test_y, test_p, x).accuracy, x) for x in np.linspace(0.05, 0.95, 91))
    return {"acc@0.5": at_half.accuracy, "f1@0.5": at_half.f1, "threshold": t, "acc@op": at_op.accuracy,
            "recall@op": at_op.recall, "f1@op": at_op.f1, "auc": roc_auc(test_y, test_p),
            "oracle_acc": best[0], "oracle_threshold": best[1]}


def main(argv: list[str] | None = None) -> int:
    from training.metrics import softmax_defect_score

    parser = argparse.ArgumentParser(prog="python -m tools.elpv_ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--flips", action="store_true", help="also average horizontal and vertical flips")
    parser.add_argument("--target-recall", type=float, default=0.9)
    parser.add_argument("--input-size", type=int, help="score at this input size (default: each run's own)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args(argv)
    splits = {json.dumps(json.loads((r / "split.json").read_text()), sort_keys=True) for r in args.runs}
    if len(splits) != 1:
        print("error: the runs do not share one split.json", file=sys.stderr)
        return 2
    val_y, _ = _labels(args.runs[0], "val")
    test_y, _ = _labels(args.runs[0], "test")
    flips: list[str | None] = [None, "h", "v"] if args.flips else [None]
    probs = {}
    for run in args.runs:
        for f in flips:
            print(f"scoring {run.name} {f or ''}", file=sys.stderr, flush=True)
            probs[(run, f, "val")] = softmax_defect_score(_logits(run, "val", f, args.input_size))
            probs[(run, f, "test")] = softmax_defect_score(_logits(run, "test", f, args.input_size))
    rows = []
    for k in range(1, len(args.runs) + 1):
        for combo in itertools.combinations(args.runs, k):
            for use_flips in ([False, True] if args.flips else [False]):
                fs = flips if use_flips else [None]
                val_p = np.mean([probs[(r, f, "val")] for r in combo for f in fs], axis=0)
                test_p = np.mean([probs[(r, f, "test")] for r in combo for f in fs], axis=0)
                row = {"models": [r.parent.parent.name + "/" + r.name for r in combo], "flips": use_flips,
                       **score(val_p, val_y, test_p, test_y, args.target_recall)}
                rows.append(row)
                print(f"{' + '.join(row['models']):70s} flips={use_flips!s:5s} acc@0.5 {row['acc@0.5']:.4f} "
                      f"F1@0.5 {row['f1@0.5']:.3f} | op {row['threshold']:.3f}: acc {row['acc@op']:.4f} "
                      f"recall {row['recall@op']:.3f} F1 {row['f1@op']:.3f} | AUC {row['auc']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
