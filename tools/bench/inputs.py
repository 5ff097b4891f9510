"""The bench's inputs: a model bundle at the production input size and a folder of camera frames.

Both are cached under the bench directory (artifacts/bench/ by default) and reused when present; delete
the folder to rebuild them. Building runs in child processes (`python -m training`, `python -m export`,
`python -m tools.bench.inputs frames`), so the orchestrating process never holds torch or frame arrays
(its peak RSS would be inherited by every case process it starts; see `cases.process_usage`).

Frames: `synthetic.parts.render_stream` renders square parts; a 640x480 camera over a conveyor sees
the part filling the 480-px height with belt to the left and right. So each part is rendered at 480x480
and widened to 640 with belt: the median colour of the render's corners plus noise of the same strength
and faint streaks along the belt's run. Mirroring the render instead would paint copies of the part's
edges into the margins. The content matters to the timings only through PNG decode cost, which the
noise keeps realistic (a flat fill would compress, and decode, far better than a real sensor image).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tools.bench.errors import BenchError

if TYPE_CHECKING:  # numpy is imported where frames are rendered, not by the orchestrating process
    import numpy as np

FRAME_WIDTH, FRAME_HEIGHT = 640, 480
INPUT_SIZE = 224  # the production network input (gray)
FRAME_SEED = 2024
DEFECT_RATE = 0.2  # share of defective parts in the stream; speed does not depend on it
_MARKER = ".complete.json"  # written last; list_images skips hidden files, so it is never a "frame"

# The training and export commands of the bench bundle. One step of one epoch: the bench measures
# speed, which depends on the architecture and input size, not on how well the weights are trained.
TRAIN_ARGS = ("--dataset", "synthetic", "--synthetic-ok", "40", "--synthetic-defect", "20",
              "--input-size", str(INPUT_SIZE), "--epochs", "1", "--max-steps-per-epoch", "1", "--quiet")
EXPORT_ARGS = ("--calibration-images", "16", "--golden-images", "8")


@dataclass(frozen=True)
class Prepared:
    """Where an input came from: built now or reused from the cache, or given on the command line."""

    path: Path
    origin: str  # built | cached | given


def run_command(args: list[str], what: str) -> None:
    """Run a child Python module with our interpreter from the repository root; BenchError if it fails."""
    cmd = [sys.executable, *args]
    print(f"bench: {what}: {' '.join(['python', *args])}", flush=True)
    rc = subprocess.run(cmd, cwd=repo_root(), check=False).returncode
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}); its output is above",
                         hint=f"run it by hand from {repo_root()}: python {' '.join(args)}")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def ensure_model(bench_dir: Path) -> tuple[Prepared, Prepared]:
    """(run, bundle) under bench_dir, trained and exported unless both are already there."""
    run, bundle = bench_dir / "run", bench_dir / "bundle"
    trained = False
    if not (run / "final.pt").is_file():
        run_command(["-m", "training", *TRAIN_ARGS, "--out", str(run)], "training the bench model")
        trained = True
    # A bundle from an earlier run would not hold the weights the naive case loads from this run.
    if trained or not (bundle / "metadata.json").is_file():
        run_command(["-m", "export", "--run", str(run), "--out", str(bundle), *EXPORT_ARGS],
                    "exporting the bench bundle")
        return Prepared(run, "built" if trained else "cached"), Prepared(bundle, "built")
    return Prepared(run, "cached"), Prepared(bundle, "cached")


def frames_folder(bench_dir: Path, n: int) -> Path:
    return bench_dir / f"frames-{FRAME_WIDTH}x{FRAME_HEIGHT}-n{n}"


def _wanted_marker(n: int) -> dict[str, object]:
    return {"frames": n, "width": FRAME_WIDTH, "height": FRAME_HEIGHT, "seed": FRAME_SEED, "defect_rate": DEFECT_RATE,
            "method": "render_stream at 480x480, widened to 640 with belt-coloured noise"}


def ensure_frames(bench_dir: Path, n: int) -> Prepared:
    """The folder of n frames, rendered (in a child process) unless a complete one is already there."""
    folder = frames_folder(bench_dir, n)
    marker = folder / _MARKER
    try:
        if json.loads(marker.read_text()) == _wanted_marker(n):
            return Prepared(folder, "cached")
    except (OSError, ValueError):
        pass  # absent, half-written or from another version: render again
    run_command(["-m", "tools.bench.inputs", "frames", "--out", str(folder), "--n", str(n)],
                f"rendering {n} camera frames")
    return Prepared(folder, "built")


def widen_to_frame(square: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """A square HxHx3 render widened to HxW with belt on both sides (see the module docstring)."""
    import numpy as np

    h, w = square.shape[:2]
    if width < w:
        raise ValueError(f"cannot widen a {w}-px render to {width} px")
    k = max(4, h // 16)
    corners = np.concatenate([square[:k, :k], square[:k, -k:], square[-k:, :k], square[-k:, -k:]]).reshape(-1, 3)
    level = np.median(corners, axis=0).astype(np.float32)
    # The corners hold texture and the odd splice line too; cap the noise at a sensor's strength.
    sigma = np.minimum(corners.astype(np.float32).std(axis=0), 6.0)

    def belt(cols: int) -> np.ndarray:
        streaks = rng.standard_normal((1, cols, 1)).astype(np.float32) * 2.0  # the belt runs top to bottom
        noise = rng.standard_normal((h, cols, 3)).astype(np.float32) * sigma
        return np.clip(level + streaks + noise + 0.5, 0, 255).astype(np.uint8)

    left = (width - w) // 2
    return np.concatenate([belt(left), square, belt(width - w - left)], axis=1)


def render_frames(folder: Path, n: int) -> None:
    """Write n frames `frame_NNNN_<kind>.png` (640x480 BGR) and then the completion marker."""
    import cv2
    import numpy as np

    from synthetic.parts import render_stream

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("frame_*.png"):
        old.unlink()  # a stale frame from an interrupted render would be inspected too
    rng = np.random.default_rng(FRAME_SEED + 1)
    stream = render_stream(FRAME_SEED, n, DEFECT_RATE, size=FRAME_HEIGHT, color=True)
    for i, (part, kind) in enumerate(stream):
        path = folder / f"frame_{i:04d}_{kind or 'ok'}.png"
        if not cv2.imwrite(str(path), widen_to_frame(part, FRAME_WIDTH, rng)):
            raise BenchError(f"cannot write {path}", hint="check free disk space and permissions")
    (folder / _MARKER).write_text(json.dumps(_wanted_marker(n)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.inputs", description="Render the bench's camera frames.")
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("frames", help=f"n frames {FRAME_WIDTH}x{FRAME_HEIGHT} BGR PNG into a folder")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--n", type=int, required=True)
    args = p.parse_args(argv)
    render_frames(args.out, args.n)
    print(f"bench: {args.n} frames -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
