"""How to build an engine with the TensorRT on this device: a plain-data plan, decided without TensorRT.

TensorRT changed how precision is chosen, and a build that ignores that either fails or silently runs
in another precision:

- TensorRT 8.5 to 10.11, "weakly typed": the network is parsed from the FP32 ONNX (fp16, fp32) or the
  Q/DQ ONNX (int8) and precision comes from builder flags (FP16; INT8 plus FP16 so the float head may
  use half precision). TensorRT 8.x (JetPack 5.1: 8.5, JetPack 6.0: 8.6) also needs the EXPLICIT_BATCH
  creation flag: without it a network is implicit batch there.
- TensorRT 10.12 and later, "strongly typed" (weak typing deprecated in 10.12, removed in 11): the ONNX's
  own types decide, so fp16 builds from the bundle's FP16 ONNX, int8 from the Q/DQ ONNX, fp32 from the
  FP32 ONNX, and no precision flag may be set.
- fp32 means FP32: the TF32 builder flag, on by default, lets FP32 convolutions and matrix products round
  their inputs to 10-bit mantissas on Ampere and later (Orin included); it is cleared.

DLA (Jetson AGX Orin / Xavier): FP16 or INT8 only, GPU fallback on, a static shape. Refused with the reason:

- TensorRT 10.8 to 11.4.0: no DLA support on Jetson.
- INT8 on TensorRT 8.x: the bundle's INT8 model is explicitly quantized (Q/DQ), which DLA does not run in
  TensorRT 8.x; with GPU fallback every quantized layer would silently move to the GPU. FP16 on the DLA,
  INT8 on the GPU, or TensorRT 10 (JetPack 6.1) are the ways out.
- TensorRT 11.4.1 and later: DLA only on Jetson AGX Orin (JetPack 7.2.2 or later, where TensorRT 11.4.1
  is installed), strongly typed; the ONNX parser's ADJUST_FOR_DLA flag lets it reshape layers for the DLA
  (NVIDIA, "Strongly Typed Networks for DLA", TensorRT 11.4.1).

Even a DLA build TensorRT accepts may run mostly on the GPU: engines/build.py reports where the layers went
and fails the build below `dla_min_share`.

Everything here is pure and tested on any machine; engines/build.py applies a plan to TensorRT.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engines.manifest import Precision

MIN_TENSORRT = (8, 5)  # JetPack 5.1 (TensorRT 8.5.2): named tensors and execute_async_v3 exist from here
STRONG_TYPING_FROM = (10, 12)
DLA_STRONGLY_TYPED_FROM = (11, 4, 1)  # DLA back on Jetson (AGX Orin, JetPack 7.2.2+), strongly typed
DEFAULT_WORKSPACE_MB = 1024
# Share of the network's layers that must run on the DLA for a DLA build to be installed (--dla-min-share).
DEFAULT_DLA_MIN_SHARE = 0.5

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
    # DLA builds only: the smallest share of layers on the DLA accepted (None: DEFAULT_DLA_MIN_SHARE).
    dla_min_share: float | None = None


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
    cleared_builder_flags: tuple[str, ...] = ()  # trt.BuilderFlag names to clear (on by default)
    parser_flags: tuple[str, ...] = ()  # trt.OnnxParserFlag names to set before parsing
    dla_min_share: float | None = None  # DLA builds: below this share of layers on the DLA, the build fails

    @property
    def dynamic_batch(self) -> bool:
        return self.batch_profile != (1, 1, 1)

    def as_options(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("builder_flags", "batch_profile", "notes", "cleared_builder_flags", "parser_flags"):
            d[key] = list(d[key])
        return d


def plan_build(tensorrt_version: str, request: BuildRequest, *, dla_cores: int = 0,
               available_roles: frozenset[str] | set[str] | None = None,
               jetson_model: str | None = None) -> BuildPlan:
    """The build for this TensorRT version and device; PlanError names what cannot be done and why.

    `dla_cores`: DLA cores the device has (builder.num_DLA_cores). `available_roles`: the ONNX files the
    bundle holds (None: assume all). `jetson_model`: the board (/proc/device-tree/model), which decides
    whether TensorRT 11.4.1+ may use the DLA.
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
    cleared: list[str] = []
    parser_flags: list[str] = []
    if request.precision == "fp32":
        cleared.append("TF32")
        notes.append("fp32: TF32 cleared, so FP32 layers compute in FP32")
    if not strongly_typed:
        if request.precision == "fp16":
            flags.append("FP16")
        elif request.precision == "int8":
            # The Q/DQ nodes place INT8 exactly; FP16 lets the float layers between them (the head) run in half.
            flags += ["INT8", "FP16"]
    else:
        notes.append("strongly typed: precision comes from the ONNX's own types")

    min_share = None
    if request.dla_core is None and request.dla_min_share is not None:
        raise PlanError("a minimum DLA share only applies to a DLA build: give --dla-core too, or leave out "
                        "--dla-min-share")
    if request.dla_core is not None:
        min_share = DEFAULT_DLA_MIN_SHARE if request.dla_min_share is None else request.dla_min_share
        if not 0.0 <= min_share <= 1.0:
            raise PlanError(f"minimum DLA share must be between 0 and 1, got {min_share}")
        if request.precision == "fp32":
            raise PlanError("DLA runs FP16 or INT8 only: ask for --precision fp16 or int8 with a DLA core")
        if not dla_supported(version):
            raise PlanError(f"TensorRT {tensorrt_version} has no DLA support on Jetson (10.8 to 11.4.0): build "
                            "for the GPU (leave out the DLA core)")
        if request.precision == "int8" and version[0] < 10:
            raise PlanError(
                f"TensorRT {tensorrt_version} cannot run the bundle's INT8 model on the DLA: it is explicitly "
                "quantized (Q/DQ), which DLA does not support in TensorRT 8.x, and with GPU fallback every "
                "quantized layer would silently run on the GPU. Build fp16 for the DLA, int8 for the GPU (leave "
                "out the DLA core), or move to JetPack 6.1 or later (TensorRT 10)")
        if version[:3] >= DLA_STRONGLY_TYPED_FROM:
            if jetson_model is None or "agx orin" not in jetson_model.lower():
                raise PlanError(
                    f"TensorRT {tensorrt_version} supports the DLA only on Jetson AGX Orin (JetPack 7.2.2 or "
                    f"later); this device is {jetson_model or 'not a recognised Jetson'}: build for the GPU "
                    "(leave out the DLA core)")
            # NVIDIA's recipe for strongly typed DLA networks from ONNX (TensorRT 11.4.1 documentation).
            parser_flags.append("ADJUST_FOR_DLA")
            notes.append("DLA, strongly typed: precision from the ONNX's types; parser flag ADJUST_FOR_DLA")
        if dla_cores <= 0:
            raise PlanError("this device has no DLA (Orin Nano, Thor and PCs have none): build for the GPU "
                            "(leave out the DLA core)")
        if request.dla_core >= dla_cores:
            raise PlanError(f"DLA core {request.dla_core} does not exist: this device has {dla_cores} "
                            f"(cores 0..{dla_cores - 1})")
        if request.max_batch not in (None, 1):
            raise PlanError("DLA engines here are built for a static batch of 1: leave out --max-batch")
        flags.append("GPU_FALLBACK")  # layers DLA cannot run go to the GPU instead of failing the build
        notes.append(f"DLA core {request.dla_core} with GPU fallback; at least {min_share:.0%} of the layers on "
                     "the DLA or the build fails")

    batch = (1, 1, 1) if request.max_batch is None else (1, request.max_batch, request.max_batch)
    return BuildPlan(
        tensorrt_version=tensorrt_version, precision=request.precision, onnx_role=role,
        strongly_typed=strongly_typed, explicit_batch_flag=version[0] < 10, builder_flags=tuple(flags),
        workspace_bytes=request.workspace_mb * 2**20, dla_core=request.dla_core, batch_profile=batch,
        notes=tuple(notes), cleared_builder_flags=tuple(cleared), parser_flags=tuple(parser_flags),
        dla_min_share=min_share,
    )
