"""Is a freshly built engine the bundle's model? Compare it with ONNX Runtime on the golden set.

At export, the bundle stored golden inputs (held-out images through the runtime preprocessing) and
ONNX Runtime's logits for each precision (`golden.npz`). After a build the same inputs go through the
engine and the two are compared (the Polygraphy idea):

- fp32: every logit within atol = rtol = 5e-3 of the reference (numpy.allclose semantics); the engine
  really computes in FP32 (engines/plan.py clears TF32), so this only allows for kernel order;
- fp16: every logit within FP16_RELATIVE of the image's logit magnitude, max(1, max |reference logit|),
  and the decisions agree as for int8. The tolerance comes from FP16 itself: IEEE 754 binary16 keeps 11
  significant bits, so each rounding errs by at most u = 2^-11 relatively (numpy.finfo(float16).eps / 2),
  and rounding errors through a chain of n operations add up to at most about n·u (Higham, "Accuracy and
  Stability of Numerical Algorithms", 2nd ed., ch. 3). A forward pass rounds every layer's output to FP16
  once; allowing 64 such roundings, 64u = 2^-5 ≈ 3 % of the logit magnitude, covers the bundle's networks
  (EfficientNet-B0/Lite0 are ~50-80 layers deep) without passing an engine that is wrong: FP32's 5e-3 would
  reject sound FP16 engines whose logits reach a few units;
- int8: the pass/fail decision at the bundle's operating threshold agrees on >= 99 % of the golden
  images; the logit RMSE is reported (INT8 kernels legitimately round differently from ORT's).

The defect map (bundles from schema version 3 store ORT's maps beside the logits) is compared too, when the
engine gives one (`infer_one` returning (logits, map)): every map cell within MAP_RELATIVE[precision] of the
golden maps' magnitude, max(1, max |reference map|) over the set. Relative to the set, not to the cell: a cell
is a 1280-term sum whose terms cancel, so its rounding error follows the scale of the features, the same for
every image, not its own value, which may be near zero. fp32 TOLERANCE and fp16 FP16_RELATIVE of it, as for
the logits and for the same reasons; int8 half of it: INT8's map moves far more than its logits (nothing
averages it), by 16 to 31 % between ORT's INT8 and FP32 runs of the demo model, so the bound stops only a map
that is not the model's (all zeros, another image's: about the whole magnitude), and the figure is reported.
A model with a map whose engine gives none fails; a bundle without golden maps (before schema version 3)
checks the logits alone.

A failed validation stops the install (engines/__main__.py). Pure numpy: tested with ONNX Runtime on
both sides and with perturbed outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from bundle.errors import BundleError
from bundle.format import Bundle

TOLERANCE = 5e-3  # fp32: atol = rtol
FP16_UNIT_ROUNDOFF = 2.0**-11  # binary16: 11 significant bits
FP16_ROUNDINGS = 64  # layer outputs rounded to FP16 on the way to the logits, at most
FP16_RELATIVE = FP16_ROUNDINGS * FP16_UNIT_ROUNDOFF  # 2^-5 of the image's logit magnitude
MIN_AGREEMENT = 0.99
# Defect map cells: the largest |difference| allowed, as a share of the golden maps' magnitude (module docstring).
MAP_RELATIVE = {"fp32": TOLERANCE, "fp16": FP16_RELATIVE, "int8": 0.5}


@dataclass(frozen=True)
class Validation:
    precision: str
    reference: str  # which golden logits were compared against, e.g. "logits_fp16 (ONNX Runtime)"
    images: int
    max_abs_diff: float
    rmse: float
    decision_agreement: float
    threshold: float
    passed: bool
    problems: tuple[str, ...]
    # The defect map, when compared: max |difference| and RMSE as shares of the golden maps' magnitude.
    map_max_diff: float | None = None
    map_rmse: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = list(self.problems)
        return d

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        maps = ("" if self.map_max_diff is None else
                f", defect map max |diff| {self.map_max_diff:.2e} (RMSE {self.map_rmse:.2e}) of its magnitude")
        return (f"validation {verdict} on {self.images} golden images vs {self.reference}: max |logit diff| "
                f"{self.max_abs_diff:.2e}, RMSE {self.rmse:.2e}, decision agreement {self.decision_agreement:.1%} "
                f"at threshold {self.threshold:.4f}" + maps + ("" if self.passed else "; " + "; ".join(self.problems)))


def defect_probability(logits: np.ndarray, defect_index: int) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, defect_index] / e.sum(axis=1)


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str, threshold: float, defect_index: int,
            reference_name: str = "reference", reference_map: np.ndarray | None = None,
            candidate_map: np.ndarray | None = None) -> Validation:
    """The verdict on `candidate` logits (and defect maps, when both maps are given) against the reference for
    the same golden inputs."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    problems: list[str] = []
    if reference.shape != candidate.shape:
        problems.append(f"output shape {candidate.shape} differs from the reference {reference.shape}")
        return Validation(precision, reference_name, len(reference), float("inf"), float("inf"), 0.0, threshold,
                          False, tuple(problems))
    if not np.isfinite(candidate).all():
        problems.append(f"{int((~np.isfinite(candidate)).sum())} logits are NaN or infinite")
    diff = np.abs(candidate - reference)  # NaN where the engine gave NaN: counted as a problem above
    finite = diff[np.isfinite(diff)]
    max_abs = float(finite.max()) if finite.size == diff.size and diff.size else float("inf")
    rmse = float(np.sqrt(np.mean(finite**2))) if finite.size == diff.size and diff.size else float("inf")
    agree = float(np.mean((defect_probability(candidate, defect_index) >= threshold)
                          == (defect_probability(reference, defect_index) >= threshold)))
    if precision == "fp32":
        close = np.isclose(candidate, reference, atol=TOLERANCE, rtol=TOLERANCE)
        rule = f"atol=rtol={TOLERANCE}"
    elif precision == "fp16":
        close = diff <= fp16_tolerance(reference)
        rule = f"FP16's {FP16_RELATIVE:.3g} of the image's logit magnitude"
    else:
        close = None
    if close is not None and not close.all():
        worst = np.unravel_index(int(np.argmax(np.where(np.isfinite(diff), diff, np.inf))), diff.shape)
        problems.append(f"{int((~close).sum())} of {close.size} logits differ by more than {rule} "
                        f"(worst: image {worst[0]}, {candidate[worst]:.5f} vs {reference[worst]:.5f})")
    if precision in ("fp16", "int8") and agree < MIN_AGREEMENT:
        problems.append(f"decisions agree on {agree:.1%} of the golden images, below {MIN_AGREEMENT:.0%}")
    map_max = map_rmse = None
    if reference_map is not None and candidate_map is not None:
        map_max, map_rmse = compare_maps(reference_map, candidate_map, precision, problems)
    return Validation(precision, reference_name, len(reference), max_abs, rmse, agree, threshold, not problems,
                      tuple(problems), map_max, map_rmse)


def compare_maps(reference: np.ndarray, candidate: np.ndarray, precision: str,
                 problems: list[str]) -> tuple[float, float]:
    """(max |difference|, RMSE) of `candidate` defect maps as shares of the reference maps' magnitude; appends
    to `problems` what fails MAP_RELATIVE[precision]."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        problems.append(f"defect map shape {candidate.shape} differs from the reference {reference.shape}")
        return float("inf"), float("inf")
    if not np.isfinite(candidate).all():
        problems.append(f"{int((~np.isfinite(candidate)).sum())} defect map cells are NaN or infinite")
        return float("inf"), float("inf")
    magnitude = max(1.0, float(np.abs(reference).max()))
    diff = np.abs(candidate - reference) / magnitude
    largest, rmse = float(diff.max()), float(np.sqrt(np.mean(diff**2)))
    bound = MAP_RELATIVE.get(precision, MAP_RELATIVE["int8"])
    if largest > bound:
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        problems.append(f"{int((diff > bound).sum())} of {diff.size} defect map cells differ by more than "
                        f"{bound:.3g} of the maps' magnitude {magnitude:.3g} (worst: image {worst[0]}, cell "
                        f"{tuple(int(i) for i in worst[1:])}, {candidate[worst]:.4f} vs {reference[worst]:.4f})")
    return largest, rmse


def fp16_tolerance(reference: np.ndarray) -> np.ndarray:
    """Per image (as a column), the largest |logit difference| an FP16 engine may show: FP16_RELATIVE of the
    image's logit magnitude, taken as at least 1 so that near-zero logits are not held to less than 2^-5."""
    magnitude = np.maximum(1.0, np.abs(np.asarray(reference, dtype=np.float64)).max(axis=1, keepdims=True))
    return FP16_RELATIVE * magnitude


def golden_reference(bundle: Bundle, precision: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(inputs, reference logits, their name). fp32 and fp16 engines are held to ORT's FP32 logits (what the
    model computes; ORT's own FP16 run is just another approximation), int8 to ORT's run of the same Q/DQ
    model (the quantization is the bundle's, so the decisions must agree with it)."""
    if not bundle.has("golden"):
        raise BundleError(f"bundle {bundle.root} has no golden set (golden.npz): re-export it with `make export`")
    with np.load(bundle.path("golden"), allow_pickle=False) as golden:
        inputs = golden["inputs"]
        for name in (("logits_int8", "logits_fp32") if precision == "int8" else ("logits_fp32",)):
            if name in golden.files:
                return inputs, golden[name], f"{name} (ONNX Runtime)"
    raise BundleError(f"golden set {bundle.path('golden')} holds no reference logits for {precision} or fp32")


def golden_maps(bundle: Bundle, precision: str) -> np.ndarray | None:
    """The reference defect maps for engines of `precision` (held to the same ORT run as the logits, see
    golden_reference), or None for a bundle from before schema version 3, which has none."""
    if not bundle.has("golden"):
        return None
    with np.load(bundle.path("golden"), allow_pickle=False) as golden:
        for name in (("defect_map_int8", "defect_map_fp32") if precision == "int8" else ("defect_map_fp32",)):
            if name in golden.files:
                return golden[name]
    return None


EngineOutput = np.ndarray | tuple[np.ndarray, np.ndarray | None]


def validate(infer_one: Callable[[np.ndarray], EngineOutput], bundle: Bundle, precision: str) -> Validation:
    """Run each golden input (shape (1, C, H, W)) through `infer_one` and compare with the reference.

    `infer_one` returns the logits, or (logits, defect map or None) from a runner that knows about maps
    (`TensorRTBackend.run_with_map`): then the maps are compared too, and a missing one fails when the bundle's
    model has a map. Logits alone: the logits are compared, as for bundles without maps.
    """
    inputs, reference, name = golden_reference(bundle, precision)
    reference_map = golden_maps(bundle, precision)
    logits: list[np.ndarray] = []
    maps: list[np.ndarray | None] = []
    runner_gives_maps = True
    for i in range(len(inputs)):
        out = infer_one(inputs[i:i + 1])
        if isinstance(out, tuple):
            out, one_map = out
            maps.append(None if one_map is None else np.asarray(one_map, dtype=np.float32))
        else:
            runner_gives_maps = False
        logits.append(np.asarray(out, dtype=np.float32).reshape(1, -1))
    # Decisions are compared at the threshold this precision's engines run at on the line.
    d = bundle.metadata.decision_for(precision)
    compared = reference_map is not None and runner_gives_maps
    missing = compared and any(m is None for m in maps)
    candidate_map = None
    if compared and not missing:
        # (1, h, w) per image (or (h, w)): one (N, h, w) stack; any other shape is reported by compare_maps.
        candidate_map = np.concatenate([m.reshape(-1, *m.shape[-2:]) for m in maps if m is not None])
    result = compare(reference, np.concatenate(logits), precision, d.threshold, bundle.metadata.defect_index, name,
                     reference_map, candidate_map)
    if missing:
        problem = (f"the engine gives no defect map, though the bundle's model has one "
                   f"(outputs: {', '.join(o.name for o in bundle.metadata.outputs)})")
        return replace(result, passed=False, problems=(*result.problems, problem))
    return result
