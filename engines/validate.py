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

A failed validation stops the install (engines/__main__.py). Pure numpy: tested with ONNX Runtime on
both sides and with perturbed outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bundle.errors import BundleError
from bundle.format import Bundle

TOLERANCE = 5e-3  # fp32: atol = rtol
FP16_UNIT_ROUNDOFF = 2.0**-11  # binary16: 11 significant bits
FP16_ROUNDINGS = 64  # layer outputs rounded to FP16 on the way to the logits, at most
FP16_RELATIVE = FP16_ROUNDINGS * FP16_UNIT_ROUNDOFF  # 2^-5 of the image's logit magnitude
MIN_AGREEMENT = 0.99


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

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = list(self.problems)
        return d

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"validation {verdict} on {self.images} golden images vs {self.reference}: max |logit diff| "
                f"{self.max_abs_diff:.2e}, RMSE {self.rmse:.2e}, decision agreement {self.decision_agreement:.1%} "
                f"at threshold {self.threshold:.4f}" + ("" if self.passed else "; " + "; ".join(self.problems)))


def defect_probability(logits: np.ndarray, defect_index: int) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, defect_index] / e.sum(axis=1)


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str, threshold: float, defect_index: int,
            reference_name: str = "reference") -> Validation:
    """The verdict on `candidate` logits against `reference` logits for the same golden inputs."""
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
    return Validation(precision, reference_name, len(reference), max_abs, rmse, agree, threshold, not problems,
                      tuple(problems))


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


def validate(infer_one: Callable[[np.ndarray], np.ndarray], bundle: Bundle, precision: str) -> Validation:
    """Run each golden input (shape (1, C, H, W)) through `infer_one` and compare with the reference."""
    inputs, reference, name = golden_reference(bundle, precision)
    outputs = np.concatenate([np.asarray(infer_one(inputs[i:i + 1]), dtype=np.float32).reshape(1, -1)
                              for i in range(len(inputs))])
    # Decisions are compared at the threshold this precision's engines run at on the line.
    d = bundle.metadata.decision_for(precision)
    return compare(reference, outputs, precision, d.threshold, bundle.metadata.defect_index, name)
