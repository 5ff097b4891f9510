"""How to build an engine with the TensorRT on this device: a plain-data plan, decided without TensorRT.

TensorRT changed how precision is chosen, and a build that ignores that either fails or silently runs
in FP32:

- TensorRT 8.5 to 10.11, "weakly typed": the network is parsed from the FP32 ONNX (fp16, fp32) or the
  Q/DQ ONNX (int8) and precision comes from builder flags (FP16; INT8 plus FP16 so the float head may
  use half precision). TensorRT 8.x also needs the EXPLICIT_BATCH creation flag.
- TensorRT 10.12 and later, "strongly typed" (weak typing deprecated in 10.12, removed in 11): the ONNX's
  own types decide, so fp16 builds from the bundle's FP16 ONNX, int8 from the Q/DQ ONNX, fp32 from the
  FP32 ONNX, and no precision flag may be set.

DLA (Jetson AGX Orin / Xavier): FP16 or INT8 only, GPU fallback on, a static shape; TensorRT 10.8 to
11.4.0 ship without DLA support on Jetson, so a DLA build is refused there with that reason.

Everything here is pure and tested on any machine; engines/build.py applies a plan to TensorRT.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engines.manifest import Precision

MIN_TENSORRT = (8, 5)  # JetPack 5.1 (TensorRT 8.5.2): named tensors and execute_async_v3 exist from here
STRONG_TYPING_FROM = (10, 12)
DEFAULT_WORKSPACE_MB = 1024

_ONNX_ROLE: dict[tuple[bool, str], str] = {
    # (strongly typed, precision) -> the bundle file to parse
    (False, "fp32"): "onnx_fp32",
    (False, "fp16"): "onnx_fp32",
    (False, "int8"): "onnx_int8",
    (True, "fp32"): "onnx_fp32",
    (True, "fp16"): "onnx_fp16",
    (True, "int8"): "onnx_int8",
}


class PlanError(ValueError):
    """The requested build cannot be done with this TensorRT or device; the message says why and what to do."""


def parse_version(text: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30); suffixes such as "+cuda12.2" or "rc1" are ignored."""
    match = re.match(r"^\s*(\d+(?:\.\d+)*)", text)
    if not match:
        raise PlanError(f"cannot read the TensorRT version {text!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def dla_supported(version: tuple[int, ...]) -> bool:
    """DLA builds exist up to TensorRT 10.7 and again from 11.4.1 (on JetPack 7.2.2 and later)."""
    return version[:2] <= (10, 7) or version[:3] >= (11, 4, 1)


@dataclass(frozen=True)
class BuildRequest:
    precision: Precision
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    dla_core: int | None = None
    # None: a static batch of 1. N: an optimization profile for batches 1..N (optimised for N).
    max_batch: int | None = None


@dataclass(frozen=True)
class BuildPlan:
    """What engines/build.py does, as data (also written into the manifest's build_options)."""

    tensorrt_version: str
    precision: Precision
    onnx_role: str  # bundle file to parse: onnx_fp32 | onnx_fp16 | onnx_int8
    strongly_typed: bool
    explicit_batch_flag: bool  # TensorRT 8.x only
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names
    workspace_bytes: int
    dla_core: int | None
    # (min, opt, max) batch of the input's optimization profile; (1, 1, 1) with a static batch
    batch_profile: tuple[int, int, int]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dynamic_batch(self) -> bool:
        return self.batch_profile != (1, 1, 1)

    def as_options(self) -> dict[str, Any]:
        d = asdict(self)
        d["builder_flags"] = list(self.builder_flags)
        d["batch_profile"] = list(self.batch_profile)
        d["notes"] = list(self.notes)
        return d


def plan_build(tensorrt_version: str, request: BuildRequest, *, dla_cores: int = 0,
               available_roles: frozenset[str] | set[str] | None = None) -> BuildPlan:
    """The build for this TensorRT version and device; PlanError names what cannot be done and why.

    `dla_cores`: DLA cores the device has (builder.num_DLA_cores). `available_roles`: the ONNX files the
    bundle holds (None: assume all).
    """
    version = parse_version(tensorrt_version)
    if version[:2] < MIN_TENSORRT:
        raise PlanError(f"TensorRT {tensorrt_version} is older than {'.'.join(map(str, MIN_TENSORRT))}: flash "
                        "JetPack 5.1 or later (JetPack 6 recommended)")
    if request.workspace_mb < 16:
        raise PlanError(f"workspace of {request.workspace_mb} MB is too small to build anything (use >= 256)")
    if request.max_batch is not None and request.max_batch < 1:
        raise PlanError(f"max batch must be at least 1, got {request.max_batch}")
    strongly_typed = version[:2] >= STRONG_TYPING_FROM
    role = _ONNX_ROLE[(strongly_typed, request.precision)]
    if available_roles is not None and role not in available_roles:
        raise PlanError(f"a {request.precision} build with TensorRT {tensorrt_version} needs the bundle's {role} "
                        f"file, which this bundle lacks: re-export it with `make export`")

    flags: list[str] = []
    notes: list[str] = []
    if not strongly_typed:
        if request.precision == "fp16":
            flags.append("FP16")
        elif request.precision == "int8":
            # The Q/DQ nodes place INT8 exactly; FP16 lets the float layers between them (the head) run in half.
            flags += ["INT8", "FP16"]
    else:
        notes.append("strongly typed: precision comes from the ONNX's own types")

    if request.dla_core is not None:
        if request.precision == "fp32":
            raise PlanError("DLA runs FP16 or INT8 only: ask for --precision fp16 or int8 with a DLA core")
        if not dla_supported(version):
            raise PlanError(f"TensorRT {tensorrt_version} has no DLA support on Jetson (10.8 to 11.4.0): build "
                            "for the GPU (leave out the DLA core)")
        if dla_cores <= 0:
            raise PlanError("this device has no DLA (Orin Nano, Thor and PCs have none): build for the GPU "
                            "(leave out the DLA core)")
        if request.dla_core >= dla_cores:
            raise PlanError(f"DLA core {request.dla_core} does not exist: this device has {dla_cores} "
                            f"(cores 0..{dla_cores - 1})")
        if request.max_batch not in (None, 1):
            raise PlanError("DLA engines here are built for a static batch of 1: leave out --max-batch")
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build
        notes.append(f"DLA core {request.dla_core} with GPU fallback")

    batch = (1, 1, 1) if request.max_batch is None else (1, request.max_batch, request.max_batch)
    return BuildPlan(
        tensorrt_version=tensorrt_version, precision=request.precision, onnx_role=role,
        strongly_typed=strongly_typed, explicit_batch_flag=version[0] < 10, builder_flags=tuple(flags),
        workspace_bytes=request.workspace_mb * 2**20, dla_core=request.dla_core, batch_profile=batch,
        notes=tuple(notes),
    )
