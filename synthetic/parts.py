"""Synthetic machined parts on a conveyor belt: deterministic images for demos, tests and sample footage.

A part is either a turned flange (disc with a bore and a bolt circle, concentric turning marks and the
radial "bow-tie" reflection of a turned face) or a brushed plate with holes. The station's light comes
from the upper left, so chamfers and hole walls are bright on one side and dark on the other, and the
part casts a soft shadow on the belt.

Determinism: the part, belt, lighting and sensor noise come from `default_rng(seed)` alone, the defect
from a second generator seeded by (seed, kind). So an OK part and the defective part of the same seed
differ only where the defect is, which the tests rely on and which makes a useful teaching pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("scratch", "pit", "crack", "dent")


# BGR multipliers: cold-rolled steel reads slightly blue, belts are black rubber or green PVC.
_STEEL_TINT = np.array([1.04, 1.0, 0.95], dtype=np.float32)
_BELT_TINTS = (np.array([1.0, 1.0, 1.0], np.float32), np.array([0.86, 1.0, 0.82], np.float32))


@dataclass(frozen=True)
class _Scene:
    belt: np.ndarray  # HxW float32 luminance of the belt (with the part's shadow)
    metal: np.ndarray  # HxW float32 luminance of the part where it is metal
    coverage: np.ndarray  # HxW float32 0..1: how much of each pixel is metal (anti-aliased edges)
    depth: np.ndarray  # HxW float32: distance inside the metal to the nearest edge, px (<= 0 outside)
    normal: tuple[np.ndarray, np.ndarray]  # outward unit normal of the nearest edge (x, y)
    light: tuple[float, float]  # unit vector in the image plane pointing towards the light
    belt_tint: np.ndarray  # BGR multiplier of the belt


def render_part(
    seed: int, defect: str | None, size: int = 256, color: bool = False, severity: float = 1.0
) -> np.ndarray:
    """Render one part (OK when `defect` is None) as gray HxW or BGR HxWx3 uint8; same inputs, same bits.

    `severity` scales the defect's extent (1.0: realistic and subtle; 2-3: obvious, for a demo model that
    must learn in a minute on a CPU).
    """
    if severity <= 0:
        raise ValueError(f"severity must be positive, got {severity}")
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {defect!r}; expected None or one of {DEFECT_KINDS}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px to show a part, got {size}")
    rng = np.random.default_rng(seed)
    scene = _draw_scene(rng, size)
    # Drawn now, whatever the defect, so that OK and defective renders of a seed share every pixel's noise.
    noise = rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(1.2, 2.5))
    metal = scene.metal
    if defect is not None:
        defect_rng = np.random.default_rng([seed, 1 + DEFECT_KINDS.index(defect)])
        metal = metal + _DEFECT_PAINTERS[defect](defect_rng, scene, size / 256.0 * severity)
    cov = scene.coverage
    lum = scene.belt * (1.0 - cov) + metal * cov + noise
    if not color:
        return np.clip(lum + 0.5, 0, 255).astype(np.uint8)
    tint = (
        scene.belt_tint[None, None, :] * (1.0 - cov[..., None]) + _STEEL_TINT[None, None, :] * cov[..., None]
    )
    return np.clip(lum[..., None] * tint + 0.5, 0, 255).astype(np.uint8)


def render_stream(
    seed: int, n: int, defect_rate: float = 0.2, size: int = 256, color: bool = True, severity: float = 1.0
) -> Iterator[tuple[np.ndarray, str | None]]:
    """Yield `n` frames as a line camera would see them, each with its defect kind (None for OK)."""
    # Checked here rather than in the generator, so a bad rate fails at the call, not at the first frame.
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be between 0 and 1, got {defect_rate}")
    return _stream(seed, n, defect_rate, size, color, severity)


def _stream(
    seed: int, n: int, defect_rate: float, size: int, color: bool, severity: float
) -> Iterator[tuple[np.ndarray, str | None]]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        part_seed = int(rng.integers(0, 2**63 - 1))
        is_defect = rng.random() < defect_rate
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))] if is_defect else None
        yield render_part(part_seed, kind, size, color, severity), kind


def item_seed(seed: int, label: int, index: int) -> int:
    # Hashing (seed, class, index) keeps datasets of different seeds and sizes from sharing parts.
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1, np.uint64)[0])


# --- the scene ------------------------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, size: int) -> _Scene:
    k = size / 256.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    # The station's ring light sits upper left; a few degrees of spread between parts.
    light_angle = np.deg2rad(-135.0 + rng.uniform(-20.0, 20.0))
    light = (float(np.cos(light_angle)), float(np.sin(light_angle)))
    cx, cy = size * (0.5 + rng.uniform(-0.06, 0.06, size=2))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)

    if rng.random() < 0.5:
        sdf, face = _flange(rng, u, v, theta, light_angle, size)
    else:
        sdf, face = _plate(rng, u, v, theta, light, size)

    coverage = np.clip(0.5 - sdf, 0.0, 1.0)
    gy, gx = np.gradient(sdf)
    norm = np.sqrt(gx * gx + gy * gy) + np.float32(1e-6)
    nx, ny = gx / norm, gy / norm
    depth = np.maximum(-sdf, 0.0)
    # Chamfers and hole walls: lit where the edge faces the light, dark where it faces away.
    facing = nx * light[0] + ny * light[1]
    rim = np.exp(-depth / np.float32(1.6 * k)) * facing * np.float32(55.0)
    metal = face + rim

    belt, belt_tint = _belt(rng, size, k)
    # Soft shadow of the part, cast away from the light.
    shift = np.float32([[1, 0, -light[0] * 5.0 * k], [0, 1, -light[1] * 5.0 * k]])
    shadow = cv2.warpAffine(coverage, shift, (size, size), borderMode=cv2.BORDER_CONSTANT)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 3.0 * k)
    belt = belt * (1.0 - np.float32(0.55) * shadow)

    # Per-part exposure and a little vignetting of the lens.
    gain = np.float32(rng.uniform(0.88, 1.12))
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / np.float32((size / 2) ** 2)
    vignette = 1.0 - np.float32(0.08) * r2
    return _Scene(
        belt=(belt * gain * vignette).astype(np.float32),
        metal=(metal * gain * vignette).astype(np.float32),
        coverage=coverage.astype(np.float32),
        depth=depth.astype(np.float32),
        normal=(nx.astype(np.float32), ny.astype(np.float32)),
        light=light,
        belt_tint=belt_tint,
    )


def _streaks(
    rng: np.random.Generator, along: np.ndarray, across: np.ndarray, n_along: int, n_across: int, wrap: bool
) -> np.ndarray:
    """Machining marks: noise that is fine across the tool path and long along it (coords in grid cells)."""
    grid = rng.standard_normal((n_across, n_along)).astype(np.float32)
    border = cv2.BORDER_WRAP if wrap else cv2.BORDER_REFLECT
    return cv2.remap(
        grid, along.astype(np.float32), across.astype(np.float32), cv2.INTER_LINEAR, borderMode=border
    )


def _flange(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, theta: float, light_angle: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Turned flange: signed distance (px, negative in metal) and face luminance."""
    outer = size * rng.uniform(0.33, 0.39)
    bore = outer * rng.uniform(0.28, 0.38)
    n_bolts = int(rng.choice([4, 6, 8]))
    bolt_r = outer * rng.uniform(0.07, 0.09)
    pitch = outer * rng.uniform(0.66, 0.72)
    r = np.sqrt(u * u + v * v)
    sdf = np.maximum(r - outer, bore - r)
    for i in range(n_bolts):
        a = 2.0 * np.pi * i / n_bolts
        d = np.sqrt((u - pitch * np.cos(a)) ** 2 + (v - pitch * np.sin(a)) ** 2)
        sdf = np.maximum(sdf, bolt_r - d)

    phi = np.arctan2(v, u) + theta  # angle in the image frame, for the reflection
    base = rng.uniform(135.0, 165.0)
    # A turned face mirrors the light along the radius through it: a bright bow-tie on the light axis.
    bowtie = np.exp(-(np.sin(phi - light_angle) ** 2) / 0.06) * rng.uniform(35.0, 55.0)
    n_rings = max(8, int(outer))
    marks = _streaks(
        rng, (np.arctan2(v, u) + np.pi) / (2 * np.pi) * 24.0, r / outer * n_rings, 24, n_rings + 2, wrap=True
    )
    face = base + bowtie + marks * np.float32(6.0) - np.float32(10.0) * (r / outer) ** 2
    return sdf.astype(np.float32), face.astype(np.float32)


def _plate(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    theta: float,
    light: tuple[float, float],
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Brushed rectangular plate with four holes and sometimes a centre bore."""
    a, b = size * rng.uniform(0.30, 0.37), size * rng.uniform(0.19, 0.26)
    corner = 0.18 * b
    qx, qy = np.abs(u) - (a - corner), np.abs(v) - (b - corner)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    sdf = outside + np.minimum(np.maximum(qx, qy), 0) - corner
    hole_r = b * rng.uniform(0.14, 0.18)
    for sx in (-1, 1):
        for sy in (-1, 1):
            d = np.sqrt((u - sx * (a - 2.2 * hole_r)) ** 2 + (v - sy * (b - 2.2 * hole_r)) ** 2)
            sdf = np.maximum(sdf, hole_r - d)
    centre_r = b * rng.uniform(0.25, 0.4)
    if rng.random() < 0.5:
        sdf = np.maximum(sdf, centre_r - np.sqrt(u * u + v * v))

    base = rng.uniform(130.0, 160.0)
    # Brushing runs along u; its highlight is a band across the grooves, on the side nearest the light.
    light_u = light[0] * np.cos(theta) + light[1] * np.sin(theta)
    band_u = a * (0.45 * light_u + rng.uniform(-0.2, 0.2))
    band = np.exp(-((u - band_u) ** 2) / (2 * (0.22 * a) ** 2)) * rng.uniform(30.0, 50.0)
    marks = _streaks(rng, (u + a) / (2 * a) * 12.0, (v + b) * 1.5, 12, int(3 * b) + 4, wrap=False)
    face = base + band + marks * np.float32(5.0)
    return sdf.astype(np.float32), face.astype(np.float32)


def _belt(rng: np.random.Generator, size: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Conveyor belt running top to bottom: fabric texture, wear streaks along the run, a splice."""
    level = rng.uniform(50.0, 72.0)
    tint = _BELT_TINTS[int(rng.integers(len(_BELT_TINTS)))]
    fabric = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8 * k) * 6.0
    wear = cv2.GaussianBlur(rng.standard_normal((1, size)).astype(np.float32), (0, 0), 2.0 * k) * 8.0
    belt = level + fabric + wear  # wear broadcasts down the rows: streaks in the belt's direction
    splice_y = int(rng.integers(0, size))
    half = max(1, round(1.5 * k))
    belt[max(0, splice_y - half) : splice_y + half, :] -= 12.0
    return belt.astype(np.float32), tint


# --- defects: each returns a luminance change (HxW float32) confined to the metal --------------------------


def _pick_point(rng: np.random.Generator, scene: _Scene, lo: float, hi: float) -> tuple[float, float]:
    """A random pixel whose distance inside the metal lies in [lo, hi] px."""
    candidates = np.flatnonzero((scene.depth >= lo) & (scene.depth <= hi))
    if candidates.size == 0:  # a tiny render: fall back to the deepest metal there is
        candidates = np.flatnonzero(scene.depth >= scene.depth.max() * 0.5)
    idx = int(candidates[rng.integers(candidates.size)])
    size = scene.depth.shape[1]
    return float(idx % size) + 0.5, float(idx // size) + 0.5


def _polyline_layer(
    shape: tuple[int, int], points: np.ndarray, weights: np.ndarray, thickness: int
) -> np.ndarray:
    """Anti-aliased polyline with a per-segment weight, at 1/16 px precision."""
    layer = np.zeros(shape, np.float32)
    pts = np.round(points * 16).astype(np.int32)
    for p, q, w in zip(pts[:-1], pts[1:], weights, strict=False):
        cv2.line(
            layer,
            tuple(int(c) for c in p),
            tuple(int(c) for c in q),
            float(w),
            thickness,
            cv2.LINE_AA,
            shift=4,
        )
    return layer


def _scratch(rng: np.random.Generator, scene: _Scene, k: float) -> np.ndarray:
    x0, y0 = _pick_point(rng, scene, 12 * k, 1e9)
    length = rng.uniform(35.0, 70.0) * k
    bend = rng.uniform(-0.25, 0.25)  # radians of turn over the scratch: tool slips are slightly curved
    t = np.linspace(-0.5, 0.5, 16)
    step = length / (len(t) - 1)
    h, w = scene.depth.shape
    # Of a few directions, keep the one that stays on the metal longest: a scratch mostly cut off at the
    # part's edge would be a label without a visible defect.
    best, best_inside = np.zeros((len(t), 2)), -1.0
    for angle in rng.uniform(0, 2 * np.pi, 8):
        heading = angle + bend * t
        dx, dy = np.cos(heading) * step, np.sin(heading) * step
        xs = x0 + np.cumsum(dx) - np.sum(dx) / 2
        ys = y0 + np.cumsum(dy) - np.sum(dy) / 2
        ix, iy = np.clip(xs.astype(int), 0, w - 1), np.clip(ys.astype(int), 0, h - 1)
        inside = float(np.mean(scene.depth[iy, ix] > 2 * k))
        if inside > best_inside:
            best, best_inside = np.stack([xs, ys], axis=1), inside
    # Shallow at both ends, deepest in the middle, as a dragged burr leaves it.
    mid = (t[:-1] + t[1:]) / 2 + 0.5
    weights = np.sin(np.pi * mid) ** 0.5
    line = _polyline_layer(scene.depth.shape, best, weights, 1)
    # A scratch groove catches the light (bright) or shades (dark) depending on its direction.
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return line * np.float32(sign * rng.uniform(38.0, 55.0)) * (scene.depth > 0)


def _pit(rng: np.random.Generator, scene: _Scene, k: float) -> np.ndarray:
    x0, y0 = _pick_point(rng, scene, 6 * k, 1e9)
    h, w = scene.depth.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    out = np.zeros((h, w), np.float32)
    lx, ly = scene.light
    for _ in range(int(rng.integers(1, 5))):  # pits come in small clusters (porosity, corrosion)
        px, py = x0 + rng.uniform(-6, 6) * k, y0 + rng.uniform(-6, 6) * k
        radius = rng.uniform(1.8, 3.0) * k
        dx, dy = xx - px, yy - py
        d = np.sqrt(dx * dx + dy * dy)
        core = np.clip(radius - d + 0.5, 0.0, 1.0) * np.float32(-rng.uniform(55.0, 80.0))
        # The far wall of the pit faces the light and shows as a bright crescent.
        facing = np.clip(-(dx * lx + dy * ly) / (d + 1e-3), 0.0, 1.0)
        crescent = np.exp(-(((d - radius) / (0.7 * k)) ** 2)) * facing * np.float32(35.0)
        out += core + crescent
    return out * (scene.depth > 0)


def _crack(rng: np.random.Generator, scene: _Scene, k: float) -> np.ndarray:
    # Fatigue cracks start at an edge (a hole or the rim) and run inwards.
    x0, y0 = _pick_point(rng, scene, 0.5 * k, 2.5 * k)
    ix, iy = min(int(x0), scene.depth.shape[1] - 1), min(int(y0), scene.depth.shape[0] - 1)
    inward = np.arctan2(-scene.normal[1][iy, ix], -scene.normal[0][iy, ix])
    layer = np.zeros(scene.depth.shape, np.float32)
    for branch in range(1 + int(rng.random() < 0.5)):
        n = int(rng.integers(12, 20)) if branch == 0 else int(rng.integers(4, 8))
        heading = inward + rng.uniform(-0.5, 0.5) + (rng.choice([-0.7, 0.7]) if branch else 0.0)
        turns = np.cumsum(rng.uniform(-0.55, 0.55, n))
        steps = rng.uniform(1.8, 3.0, n) * k
        xs = np.concatenate([[x0], x0 + np.cumsum(np.cos(heading + turns) * steps)])
        ys = np.concatenate([[y0], y0 + np.cumsum(np.sin(heading + turns) * steps)])
        weights = np.linspace(1.0, 0.45, n)  # the crack narrows towards its tip
        layer = np.maximum(layer, _polyline_layer(scene.depth.shape, np.stack([xs, ys], axis=1), weights, 1))
        if branch == 0:  # a branch leaves from somewhere along the main crack
            j = int(rng.integers(n // 3, n))
            x0, y0 = xs[j], ys[j]
    halo = cv2.GaussianBlur(layer, (0, 0), 1.2 * k)
    amp = rng.uniform(60.0, 80.0)
    return -(layer + 0.35 * halo) * np.float32(amp) * (scene.depth > 0)


def _dent(rng: np.random.Generator, scene: _Scene, k: float) -> np.ndarray:
    sigma = rng.uniform(4.5, 7.5) * k
    x0, y0 = _pick_point(rng, scene, 3 * sigma, 1e9)
    h, w = scene.depth.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    dx, dy = (xx - x0) / sigma, (yy - y0) / sigma
    r2 = dx * dx + dy * dy
    bump = np.exp(-r2 / 2) * (r2 < 9.0)
    # A depression's wall nearest the light is shaded, the far wall is lit: the bump's slope along the light.
    slope = (dx * scene.light[0] + dy * scene.light[1]) * bump
    amp = rng.uniform(34.0, 46.0)
    return (slope * np.float32(amp) - bump * np.float32(6.0)) * (scene.depth > 0)


_DEFECT_PAINTERS = {"scratch": _scratch, "pit": _pit, "crack": _crack, "dent": _dent}
