"""Production-condition augmentation: what the line does to a frame that the training set did not show.

Applied to OpenCV uint8 frames (gray HxW or BGR HxWx3) before the one preprocessing function, so the
network learns to ignore flicker, dirty belts, camera shake, part rotation and sensor noise. Every
random choice comes from the caller's `np.random.Generator`: the trainer seeds it per (seed, epoch,
sample), which makes an epoch reproducible.

Sizes (stain diameters, blur lengths, shifts) are fractions of the frame's short side, so one
configuration means the same thing for a 256 px demo image and a 1280x1024 camera frame.

Preview what a configuration does with `python -m training.augment --out artifacts/augment_preview.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from bundle.errors import ApplianceError, ConfigError, DatasetError
from bundle.images import (
    DEFAULT_BIT_DEPTH,
    DEFAULT_MAX_PIXELS,
    BitDepth,
    bit_depth_option,
    list_images,
    max_pixels_option,
    read_image,
)

# In application order, which follows the physics: the part lies on the belt (flip, rotation), the belt
# is dirty, the hall lights it, the camera shakes during the exposure, the sensor adds noise.
TRANSFORMS: tuple[str, ...] = ("flip", "rotation", "background", "lighting", "shake", "noise")

# Oil darkens blue most, so a stain reads brown on a colour camera (BGR multipliers of the darkening).
_OIL_TINT = (1.0, 0.85, 0.65)
# Shadows and oil stains vary slowly: draw them on a grid this many times coarser, blur there, upsample
# (a large gaussian blur at full resolution alone would cost more than the whole augmentation budget).
_SHADOW_COARSE, _OIL_COARSE = 8, 4


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"range must be (low, high) with low <= high, got {value}")
    return value


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
FractionRange = Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)]
PositiveRange = Annotated[tuple[Positive, Positive], AfterValidator(_ordered)]
NonNegativeRange = Annotated[tuple[NonNegative, NonNegative], AfterValidator(_ordered)]


class _Section(BaseModel):
    """One transform: `enabled` switches it off entirely, `p` is the chance it runs on a given image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    p: Probability = 0.5


class FlipConfig(_Section):
    """Mirror the frame; machined parts here have no preferred orientation. `p` is per axis."""

    horizontal: bool = True
    vertical: bool = True


class RotationConfig(_Section):
    """Rotate about the frame centre by up to ±max_rotation_deg, replicating the border."""

    p: Probability = 0.8
    # Feeders hold parts within about ±15°; past 30° the replicated border smears over a large part of
    # the frame, and 45° is the hard limit.
    max_rotation_deg: float = Field(15.0, ge=0.0, le=45.0)


class BackgroundConfig(_Section):
    """Oil stains, fine scratches and dirt specks drawn over the whole frame (belt and part alike)."""

    oil_p: Probability = 0.5
    oil_max_count: int = Field(2, ge=1, le=20)
    oil_size: FractionRange = (0.08, 0.25)  # stain diameter
    oil_strength: FractionRange = (0.12, 0.35)  # darkening at the stain's centre
    scratch_p: Probability = 0.5
    scratch_max_count: int = Field(5, ge=1, le=50)
    scratch_length: FractionRange = (0.1, 0.5)
    scratch_contrast: NonNegativeRange = (5.0, 16.0)  # grey levels
    dirt_p: Probability = 0.7
    dirt_max_count: int = Field(30, ge=1, le=500)
    dirt_contrast: NonNegativeRange = (10.0, 40.0)  # grey levels


class LightingConfig(_Section):
    """Fluorescent flicker (global gain), gamma, a linear illumination gradient and soft shadows."""

    p: Probability = 0.8
    gain: PositiveRange = (0.75, 1.25)
    gamma: PositiveRange = (0.8, 1.25)
    gradient_p: Probability = 0.5
    gradient_strength: FractionRange = (0.05, 0.3)  # brightness change from frame centre to edge
    shadow_p: Probability = 0.3
    shadow_strength: FractionRange = (0.15, 0.45)  # darkening inside the shadow


class ShakeConfig(_Section):
    """Camera shake during the exposure: motion blur in a random direction and a small translation."""

    p: Probability = 0.3
    blur_length: FractionRange = (0.005, 0.03)  # blur kernel length; 0.03 is 7.7 px at 256 px
    max_shift: Fraction = 0.03


class NoiseConfig(_Section):
    """Sensor noise: gaussian read noise and a few stuck (salt and pepper) pixels."""

    p: Probability = 0.7
    sigma: NonNegativeRange = (1.0, 6.0)  # grey levels
    salt_pepper: FractionRange = (0.0, 0.0003)  # fraction of pixels


class AugmentConfig(BaseModel):
    """Production-condition augmentation for training; one section per transform in TRANSFORMS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip: FlipConfig = FlipConfig()
    rotation: RotationConfig = RotationConfig()
    background: BackgroundConfig = BackgroundConfig()
    lighting: LightingConfig = LightingConfig()
    shake: ShakeConfig = ShakeConfig()
    noise: NoiseConfig = NoiseConfig()


def mild_profile(max_rotation_deg: float = 5.0) -> AugmentConfig:
    """Flips, small rotations, gain/gamma and sensor noise only.

    For imagery where dark blotches *are* the defect (electroluminescence, X-ray), oil stains, dirt and
    shadows drawn by the production profile would paint defects onto good parts and teach the model
    label noise.
    """
    return AugmentConfig(
        rotation=RotationConfig(max_rotation_deg=max_rotation_deg),
        background=BackgroundConfig(enabled=False),
        lighting=LightingConfig(gradient_p=0.0, shadow_p=0.0),
        shake=ShakeConfig(enabled=False),
    )


PROFILES = ("production", "mild")


def augment(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Apply each enabled transform with its probability, in TRANSFORMS order; same shape and dtype out."""
    return _run(img, rng, cfg, force=False)


def apply_transform(name: str, img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Apply one transform with all its effects, ignoring `enabled` and the probabilities (for previews)."""
    if name not in _APPLY:
        raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")
    frame, restore = _as_frame(img)
    return restore(_APPLY[name](frame, rng, getattr(cfg, name), True))


def _run(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, force: bool) -> np.ndarray:
    frame, restore = _as_frame(img)
    out = frame
    for name in TRANSFORMS:
        section = getattr(cfg, name)
        # Flip's p is per axis and drawn inside it; the others' p gates the whole transform here.
        if section.enabled and (force or name == "flip" or rng.random() < section.p):
            out = _APPLY[name](out, rng, section, force)
    # Never hand back the caller's array: datasets keep decoded images in memory across epochs.
    return restore(out.copy() if out is frame else out)


def _as_frame(img: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Check the frame and squeeze HxWx1 to HxW (OpenCV drops the axis anyway); return the inverse."""
    if img.dtype != np.uint8:
        raise ValueError(f"augment expects a uint8 image, got {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3):
        return np.ascontiguousarray(img), lambda out: out
    if img.ndim == 3 and img.shape[2] == 1:
        return np.ascontiguousarray(img[:, :, 0]), lambda out: out[:, :, None]
    raise ValueError(f"augment expects gray HxW or BGR HxWx3, got shape {img.shape}")


def _like(frame: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """An HxW float32 plane with the frame's channel count.

    The pixel arithmetic goes through cv2.multiply / cv2.add with dtype=CV_8U: they take uint8 and float32
    inputs and round and saturate in one pass, several times faster than the numpy equivalent, but they
    do not broadcast a plane over channels.
    """
    return cv2.merge([plane, plane, plane]) if frame.ndim == 3 else plane


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _count(rng: np.random.Generator, p: float, max_count: int, force: bool) -> int:
    """How many of a sub-effect to draw: 0 unless it fires with probability p; at least 1 when forced."""
    if not force and rng.random() >= p:
        return 0
    return int(rng.integers(1, max_count + 1))


def _upsample(coarse: np.ndarray, shape: tuple[int, int], blur: float) -> np.ndarray:
    coarse = cv2.GaussianBlur(coarse, (0, 0), blur)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


# --- the transforms: (frame, rng, section, force) -> frame ---------------------------------------------


def _flip(frame: np.ndarray, rng: np.random.Generator, c: FlipConfig, force: bool) -> np.ndarray:
    h = c.horizontal and (force or rng.random() < c.p)
    v = c.vertical and (force or rng.random() < c.p)
    if h and v:
        return cv2.flip(frame, -1)
    if h or v:
        return cv2.flip(frame, 1 if h else 0)
    return frame


def _rotation(frame: np.ndarray, rng: np.random.Generator, c: RotationConfig, force: bool) -> np.ndarray:
    h, w = frame.shape[:2]
    angle = rng.uniform(-c.max_rotation_deg, c.max_rotation_deg)
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)
    return cv2.warpAffine(frame, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _background(frame: np.ndarray, rng: np.random.Generator, c: BackgroundConfig, force: bool) -> np.ndarray:
    h, w = frame.shape[:2]
    short = min(h, w)
    darken = None
    n_oil = _count(rng, c.oil_p, c.oil_max_count, force)
    if n_oil:
        coarse = np.zeros((-(-h // _OIL_COARSE), -(-w // _OIL_COARSE)), np.float32)
        for _ in range(n_oil):
            # A stain is a few overlapping blobs: irregular, not a clean ellipse.
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            radius = _uniform(rng, c.oil_size) * short / 2
            strength = _uniform(rng, c.oil_strength)
            for _ in range(int(rng.integers(2, 5))):
                ox, oy = rng.uniform(-0.6, 0.6, 2) * radius
                axes = rng.uniform(0.4, 0.8, 2) * radius / _OIL_COARSE
                cv2.ellipse(
                    coarse,
                    (
                        (float(cx + ox) / _OIL_COARSE, float(cy + oy) / _OIL_COARSE),
                        (float(2 * axes[0]), float(2 * axes[1])),
                        float(rng.uniform(0, 180)),
                    ),
                    strength,
                    -1,
                    cv2.LINE_AA,
                )
        stain = np.minimum(_upsample(coarse, (h, w), 0.8), np.float32(0.9))
        darken = cv2.merge([1.0 - stain * t for t in _OIL_TINT]) if frame.ndim == 3 else 1.0 - stain

    marks = None
    n_scratch = _count(rng, c.scratch_p, c.scratch_max_count, force)
    n_dirt = _count(rng, c.dirt_p, c.dirt_max_count, force)
    if n_scratch or n_dirt:
        marks = np.zeros((h, w), np.float32)
        for _ in range(n_scratch):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            length = _uniform(rng, c.scratch_length) * short
            a = rng.uniform(0, np.pi)
            p0 = (round(x0 * 16), round(y0 * 16))
            p1 = (round((x0 + np.cos(a) * length) * 16), round((y0 + np.sin(a) * length) * 16))
            # Belt scratches are scuffed, so lighter than the belt, mostly.
            sign = 1.0 if rng.random() < 0.75 else -1.0
            cv2.line(marks, p0, p1, sign * _uniform(rng, c.scratch_contrast), 1, cv2.LINE_AA, shift=4)
        dot = max(1.0, short / 256)
        for _ in range(n_dirt):
            centre = (round(rng.uniform(0, w) * 16), round(rng.uniform(0, h) * 16))
            radius = round(rng.uniform(0.5, 1.8) * dot * 16)
            sign = -1.0 if rng.random() < 0.7 else 1.0  # grit is dark, swarf and dust bright
            cv2.circle(marks, centre, radius, sign * _uniform(rng, c.dirt_contrast), -1, cv2.LINE_AA, shift=4)

    out = frame
    if darken is not None:
        out = cv2.multiply(out, darken, dtype=cv2.CV_8U if marks is None else cv2.CV_32F)
    if marks is not None:
        out = cv2.add(out, _like(frame, marks), dtype=cv2.CV_8U)
    return out


def _lighting(frame: np.ndarray, rng: np.random.Generator, c: LightingConfig, force: bool) -> np.ndarray:
    h, w = frame.shape[:2]
    gain = _uniform(rng, c.gain)
    gamma = _uniform(rng, c.gamma)
    field = None
    if force or rng.random() < c.gradient_p:
        # Light falls off across the field of view from a lamp off to one side.
        a = rng.uniform(0, 2 * np.pi)
        strength = _uniform(rng, c.gradient_strength)
        gx = (np.arange(w, dtype=np.float32) - w / 2) * np.float32(np.cos(a) * 2 * strength / max(h, w))
        gy = (np.arange(h, dtype=np.float32) - h / 2) * np.float32(np.sin(a) * 2 * strength / max(h, w))
        field = 1.0 + gx[None, :] + gy[:, None]
    if force or rng.random() < c.shadow_p:
        # An operator's arm or a guard rail between lamp and belt: a soft-edged polygon from a frame edge.
        gh, gw = -(-h // _SHADOW_COARSE), -(-w // _SHADOW_COARSE)
        edge = int(rng.integers(4))
        depth = rng.uniform(0.25, 0.6)
        lo, hi = sorted(rng.uniform(0, 1, 2))
        span = [
            (lo, 0.0),
            (hi, 0.0),
            (hi + rng.uniform(-0.2, 0.2), depth),
            (lo + rng.uniform(-0.2, 0.2), depth),
        ]
        pts = []
        for along, into in span:
            x, y = [(along, into), (1 - into, along), (along, 1 - into), (into, along)][edge]
            pts.append((round(x * gw * 16), round(y * gh * 16)))
        coarse = np.zeros((gh, gw), np.float32)
        cv2.fillPoly(coarse, [np.array(pts, np.int32)], 1.0, cv2.LINE_AA, shift=4)
        shadow = 1.0 - _uniform(rng, c.shadow_strength) * _upsample(coarse, (h, w), rng.uniform(0.8, 2.0))
        field = shadow if field is None else field * shadow
    out = frame if field is None else cv2.multiply(frame, _like(frame, field), dtype=cv2.CV_8U)
    # Gain then gamma in one table: the camera's exposure saturates before its response curve.
    levels = np.clip(np.arange(256, dtype=np.float32) * np.float32(gain / 255.0), 0.0, 1.0)
    lut = np.clip(255.0 * levels**gamma + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(out, lut)


def _shake(frame: np.ndarray, rng: np.random.Generator, c: ShakeConfig, force: bool) -> np.ndarray:
    h, w = frame.shape[:2]
    short = min(h, w)
    length = max(1.5, _uniform(rng, c.blur_length) * short)
    a = rng.uniform(0, np.pi)
    n = int(np.ceil(length)) | 1
    kernel = np.zeros((n, n), np.float32)
    half = (length - 1) / 2
    centre = (n - 1) / 2
    p0 = (round((centre - np.cos(a) * half) * 16), round((centre - np.sin(a) * half) * 16))
    p1 = (round((centre + np.cos(a) * half) * 16), round((centre + np.sin(a) * half) * 16))
    cv2.line(kernel, p0, p1, 1.0, 1, cv2.LINE_AA, shift=4)
    kernel /= kernel.sum()
    blurred = cv2.filter2D(frame, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    dx, dy = rng.uniform(-c.max_shift, c.max_shift, 2) * short
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(blurred, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _noise(frame: np.ndarray, rng: np.random.Generator, c: NoiseConfig, force: bool) -> np.ndarray:
    h, w = frame.shape[:2]
    sigma = _uniform(rng, c.sigma)
    # One noise plane for all channels: demosaiced colour noise is mostly luminance, and per-channel
    # gaussian draws would triple the cost of the most expensive step.
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= np.float32(sigma)
    out = cv2.add(frame, _like(frame, noise), dtype=cv2.CV_8U)
    n_stuck = int(_uniform(rng, c.salt_pepper) * h * w)
    if force:
        n_stuck = max(n_stuck, 1 + h * w // 20000)
    if n_stuck:
        flat = out.reshape(h * w, -1)
        flat[rng.integers(0, h * w, n_stuck)] = rng.choice(np.array([0, 255], np.uint8), (n_stuck, 1))
    return out


_APPLY: dict[str, Callable[..., np.ndarray]] = {
    "flip": _flip,
    "rotation": _rotation,
    "background": _background,
    "lighting": _lighting,
    "shake": _shake,
    "noise": _noise,
}


# --- preview --------------------------------------------------------------------------------------------

_CELL_INCHES, _DPI = 2.0, 100


def preview_grid(images: list[np.ndarray], cfg: AugmentConfig, path: Path, seed: int = 0) -> Path:
    """Write a PNG grid: a row per image; columns original, each transform alone, all combined."""
    # Imported here: the appliance runtime imports nothing from matplotlib, and neither should training
    # code that only augments. The Agg canvas renders without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not images:
        raise ValueError("preview_grid needs at least one image")
    rng = np.random.default_rng(seed)
    titles = ["original"] + [n if getattr(cfg, n).enabled else f"{n} (disabled)" for n in TRANSFORMS]
    titles.append("all combined")
    rows = []
    for img in images:
        frame, _ = _as_frame(img)
        cells = [frame]
        for name in TRANSFORMS:
            on = getattr(cfg, name).enabled
            cells.append(apply_transform(name, frame, rng, cfg) if on else frame)
        cells.append(_run(frame, rng, cfg, force=True))
        rows.append(cells)

    n_rows, n_cols = len(rows), len(titles)
    title_inches = 0.3
    fig = Figure(figsize=(n_cols * _CELL_INCHES, n_rows * _CELL_INCHES + title_inches), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(
        left=0.005,
        right=0.995,
        bottom=0.005,
        wspace=0.02,
        hspace=0.02,
        top=1.0 - title_inches / (n_rows * _CELL_INCHES + title_inches),
    )
    for r, cells in enumerate(rows):
        for col, cell in enumerate(cells):
            ax = axes[r][col]
            if cell.ndim == 2:
                ax.imshow(cell, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(cv2.cvtColor(cell, cv2.COLOR_BGR2RGB), interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[col], fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _preview_images(folder: Path | None, count: int, seed: int, bit_depth: BitDepth = DEFAULT_BIT_DEPTH,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    if folder is None:
        from synthetic.parts import DEFECT_KINDS, render_part

        # Alternate BGR and gray rows: both code paths, and the colour effects (oil tint) show.
        return [
            render_part(seed + i, DEFECT_KINDS[i % len(DEFECT_KINDS)], 256, color=i % 2 == 0)
            for i in range(count)
        ]
    if not folder.is_dir():
        raise DatasetError(
            f"image folder {folder} does not exist", hint="pass --images with a folder of images"
        )
    files = list_images(folder)[:count]
    if not files:
        raise DatasetError(f"image folder {folder} holds no images (.png, .jpg, .bmp, .tif, .webp)")
    images = []
    for f in files:
        img = read_image(f, bit_depth, max_pixels)
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        images.append(img)
    return images


def _format_validation(exc: ValidationError) -> str:
    lines = [
        f"  {'.'.join(str(p) for p in err['loc'])} = {err.get('input')!r}: {err['msg']}"
        for err in exc.errors()
    ]
    return "invalid augmentation setting:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write a preview grid of the augmentation to a PNG; exit code 0, or the error's code."""
    parser = argparse.ArgumentParser(
        prog="python -m training.augment",
        description="Preview production-condition augmentation: each transform alone and all combined.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/augment_preview.png"), help="PNG to write"
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of sample images (default: synthetic parts with defects)",
    )
    parser.add_argument("--count", type=int, default=4, help="how many images (grid rows), default 4")
    parser.add_argument("--bit-depth", type=bit_depth_option, default="auto", metavar="{auto,8,10,12,14,16}",
                        help="bits per pixel of the --images files, as the station's camera.bit_depth and "
                        "python -m training --bit-depth: 12 for a Mono12 camera's frames saved as 16-bit "
                        "PNG/TIFF (values 0..4095); auto (default) takes 16-bit files as full 16-bit data")
    parser.add_argument("--max-pixels", type=max_pixels_option, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="largest --images file accepted, width x height from its header, as the "
                        f"station's camera.max_pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument(
        "--max-rotation",
        type=float,
        default=None,
        metavar="DEG",
        help="rotation limit in degrees (0..45, default 15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the preview")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    try:
        cfg = AugmentConfig()
        if args.max_rotation is not None:
            cfg = AugmentConfig(rotation={"max_rotation_deg": args.max_rotation})
        images = _preview_images(args.images, args.count, args.seed, args.bit_depth, args.max_pixels)
        path = preview_grid(images, cfg, args.out, args.seed)
    except ValidationError as exc:
        print(_format_validation(exc), file=sys.stderr)
        return ConfigError.exit_code
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
