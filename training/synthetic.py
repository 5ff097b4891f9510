"""`python -m training.synthetic`: synthetic machined parts written as a training dataset or as line frames.

The renderer itself is `synthetic.parts` (shared with the station's `synthetic` camera source and the bench);
this module lays its images out as a customer would deliver them (ok/, defect/).
"""

from __future__ import annotations

from pathlib import Path

import cv2

from bundle.errors import DatasetError
from synthetic.parts import DEFECT_KINDS, item_seed, render_part, render_stream

OK_DIR, DEFECT_DIR = "ok", "defect"


def write_dataset(
    root: Path, n_ok: int, n_defect: int, seed: int = 0, size: int = 256, color: bool = False
) -> Path:
    """Write `root/ok/ok_NNNNN.png` and `root/defect/defect_NNNNN_<kind>.png` (kinds cycled); return root.

    Rewriting the same dataset is idempotent. A folder holding other images is refused rather than
    mixed in: stale files from a bigger run would silently change the class balance.
    """
    if n_ok < 0 or n_defect < 0:
        raise ValueError(f"image counts must be >= 0, got n_ok={n_ok}, n_defect={n_defect}")
    root = Path(root)
    plan: dict[str, list[tuple[str, int, str | None]]] = {
        OK_DIR: [(f"ok_{i:05d}.png", item_seed(seed, 0, i), None) for i in range(n_ok)],
        DEFECT_DIR: [],
    }
    for i in range(n_defect):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        plan[DEFECT_DIR].append((f"defect_{i:05d}_{kind}.png", item_seed(seed, 1, i), kind))
    for sub, items in plan.items():
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {name for name, _, _ in items}
        stale = sorted(
            p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.name not in wanted
        )
        if stale:
            raise DatasetError(
                f"{folder} already holds {len(stale)} image(s) this dataset would not write, e.g. {stale[0]}",
                hint="choose an empty folder or delete the old dataset first",
            )
        for name, part_seed, kind in items:
            path = folder / name
            if not cv2.imwrite(str(path), render_part(part_seed, kind, size, color)):
                raise DatasetError(
                    f"cannot write {path}", hint="check free disk space and folder permissions"
                )
    return root



def main(argv: list[str] | None = None) -> int:
    """`python -m training.synthetic`: write a synthetic dataset (ok/, defect/) or a folder of line frames."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Render synthetic machined parts: a training dataset in the customer layout "
        "(OUT/ok, OUT/defect) or, with --frames N, N camera frames in one folder (sample footage).",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ok", type=int, default=100, help="OK parts (dataset mode)")
    p.add_argument("--defect", type=int, default=50, help="defective parts (dataset mode)")
    p.add_argument("--frames", type=int, help="write N line frames named frame_NNNN_<kind>.png instead")
    p.add_argument("--defect-rate", type=float, default=0.3, help="share of defective frames (--frames)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--color", action="store_true", help="BGR images (default gray; frames are always BGR)")
    p.add_argument("--severity", type=float, default=1.0, help="defect size multiplier (frames)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.frames is None:
        write_dataset(args.out, args.ok, args.defect, seed=args.seed, size=args.size, color=args.color)
        print(f"{args.ok} ok + {args.defect} defect images -> {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    frames = render_stream(args.seed, args.frames, args.defect_rate, args.size, severity=args.severity)
    for i, (frame, kind) in enumerate(frames):
        cv2.imwrite(str(args.out / f"frame_{i:04d}_{kind or 'ok'}.png"), frame)
    print(f"{args.frames} frames -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
