"""Copy ELPV into a folder small enough for a GPU machine's 64 MiB transfer limit (JPEG, same names).

Used only to move the benchmark data to a lent GPU for training; evaluation and export run here on the
original PNGs (`python -m training --evaluate-only`, `python -m export`), so the re-encoding never
touches a reported figure. Usage: python tools/pack_elpv.py OUT_DIR [--quality 95]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from bundle.images import read_image
from training.datasets import elpv_package_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args(argv)
    src = elpv_package_dir()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (src / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, kind = line.split()
        new_rel = str(Path(rel).with_suffix(".jpg"))
        cv2.imwrite(str(args.out / new_rel), read_image(src / rel), [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        lines.append(f"{new_rel} {prob} {kind}")
    (args.out / "labels.csv").write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
