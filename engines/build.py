"""Apply a BuildPlan to TensorRT: parse the bundle's ONNX, configure the builder, serialize the engine.

The only module of engines/ that calls TensorRT (imported on first use, or handed in: `trt=`). Written
against the TensorRT 10 Python API, with the TensorRT 8.5+ differences the plan names (EXPLICIT_BATCH) and
the 10.12+/11 strongly typed mode (no precision flags). Errors name what went wrong in the plant engineer's
terms: the ONNX nodes the parser rejected, a workspace too small, a DLA the device lacks, a DLA engine that
runs mostly on the GPU.

After a DLA build the engine inspector says where each engine layer runs (`dla_placement`, pure and tested
with sample inspector output): GPU fallback moves what the DLA cannot run to the GPU without an error, so the
share of the network on the DLA is measured and a build below the plan's `dla_min_share` is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bundle.errors import EngineBuildError
from bundle.format import DEFECT_MAP_NAME
from engines.plan import BuildPlan

log = logging.getLogger(__name__)

_MEMORY_WORDS = ("workspace", "out of memory", "insufficient memory", "cudaerrormemoryallocation", "memory pool")


@dataclass(frozen=True)
class DlaPlacement:
    """Where a DLA engine's layers run, from the engine inspector: names, and network layers each stands for."""

    dla_layers: tuple[str, ...]
    gpu_layers: tuple[str, ...]
    dla_weight: int  # network layers inside the DLA engine layers
    gpu_weight: int  # network layers inside the GPU engine layers (DLA transfers and reformats not counted)

    @property
    def share(self) -> float:
        """The share of the network's (counted) layers that run on the DLA, 0..1."""
        total = self.dla_weight + self.gpu_weight
        return self.dla_weight / total if total else 0.0

    def summary(self) -> str:
        gpu = ", ".join(self.gpu_layers[:8]) + (", ..." if len(self.gpu_layers) > 8 else "")
        return (f"{self.share:.0%} of the network's layers on the DLA ({self.dla_weight} in {len(self.dla_layers)} "
                f"DLA engine layer(s), {self.gpu_weight} in {len(self.gpu_layers)} on the GPU"
                + (f": {gpu})" if self.gpu_layers else ")"))

    def as_dict(self) -> dict[str, Any]:
        return {"share": round(self.share, 4), "dla_layers": list(self.dla_layers), "gpu_layers": list(self.gpu_layers),
                "dla_weight": self.dla_weight, "gpu_weight": self.gpu_weight}


@dataclass(frozen=True)
class BuiltEngine:
    blob: bytes
    input_name: str
    output_name: str
    input_shape: list[int]  # as the network declares it: -1 for the dynamic batch axis
    dla_placement: DlaPlacement | None = None  # DLA builds only


def parser_errors(parser: Any) -> list[str]:
    """One line per ONNX parser error: node index, name and operator where TensorRT gives them."""
    lines = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        node = err.node()
        name = err.node_name() if hasattr(err, "node_name") else ""  # TensorRT 10+
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        where = f"node {node}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "") if node >= 0 else "model"
        lines.append(f"{where}: {err.desc()}")
    return lines


def network_creation_flags(trt: Any, plan: BuildPlan) -> int:
    """`builder.create_network` flags for the plan's TensorRT: EXPLICIT_BATCH on 8.x (0 means implicit batch
    there), STRONGLY_TYPED from 10.12."""
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def configure_builder(trt: Any, config: Any, plan: BuildPlan) -> None:
    """The plan's workspace, precision and DLA settings on a builder config (the optimization profile aside)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        # Layer types in the engine inspector's output tell DLA from GPU layers (dla_placement).
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED


def attach_timing_cache(config: Any, path: Path) -> Any | None:
    """Load the timing cache at `path` into the config, or a fresh one when TensorRT refuses it; None when
    TensorRT refuses even a fresh one (the build then runs without a cache)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises plain exceptions on data it cannot read
            log.warning("timing cache %s could not be read by TensorRT: %s", path, exc)
    # ignore_mismatch=False: a cache from another TensorRT/GPU is rejected rather than silently misused.
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if data:
        log.warning("timing cache %s was refused by TensorRT (made by another TensorRT or GPU, or damaged): "
                    "building with a fresh one, which replaces it", path)
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    log.warning("TensorRT refused an empty timing cache: building without one (%s is left as it is)", path)
    return None


def save_timing_cache(config: Any, path: Path) -> bool:
    """Write the config's timing cache to `path` (atomically); False when TensorRT has none to give."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build: %s not updated", path)
        return False
    _write_atomic(path, bytes(cache.serialize()))
    return True


_FOREIGN_NODE = re.compile(r"^\{ForeignNode\[(.*)\]\}$", re.DOTALL)
# Engine layers that only move data to and from the DLA or change formats: neither side's compute.
_TRANSFER_SUFFIXES = (" to nvm", " from nvm", " copy finish")
_TRANSFER_TYPES = {"reformat", "noop"}


def _layer_name_and_type(entry: Any) -> tuple[str, str]:
    if isinstance(entry, dict):  # ProfilingVerbosity.DETAILED
        return str(entry.get("Name", "")), str(entry.get("LayerType", ""))
    return str(entry), ""  # LAYER_NAMES_ONLY: names alone


def _network_layers_in(name: str, index: dict[str, int]) -> int:
    """How many network layers one engine layer stands for: a foreign node's first...last range, the parts of a
    fused "a + b + c" name, else 1."""
    foreign = _FOREIGN_NODE.match(name)
    if foreign:
        first, _, last = foreign.group(1).partition("...")
        if last and first in index and last in index:
            return abs(index[last] - index[first]) + 1
        return 1
    return max(1, len([part for part in name.split(" + ") if part.strip()]))


def dla_placement(engine_information: str | dict[str, Any], network_layers: Sequence[str]) -> DlaPlacement:
    """Which engine layers run on the DLA, from `IEngineInspector.get_engine_information(JSON)` of a DLA build.

    TensorRT compiles each DLA subgraph into one engine layer named `{ForeignNode[first...last]}` (a LayerType
    naming the DLA counts too); a foreign node on the GPU is a Myelin graph, LayerType "Myelin". Transfers to
    and from the DLA ("x to nvm", "x from nvm", "x copy finish") and reformats count for neither side. Each
    engine layer is weighted by the network layers it stands for (`network_layers`: the network's layer names in
    order; a foreign node spans first..last), so one DLA subgraph of 200 layers outweighs two GPU layers. These
    names and types are TensorRT's output format as logged by trtexec and the builder, not a documented
    contract: tests/test_engine_build.py checks the result on a Jetson with a DLA.
    """
    info = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    index = {name: i for i, name in enumerate(network_layers)}
    dla: list[str] = []
    gpu: list[str] = []
    dla_weight = gpu_weight = 0
    for entry in info.get("Layers", []):
        name, kind = _layer_name_and_type(entry)
        kind_l = kind.lower()
        if kind_l in _TRANSFER_TYPES or name.startswith("Reformatting CopyNode") or name.endswith(_TRANSFER_SUFFIXES):
            continue
        weight = _network_layers_in(name, index)
        if "dla" in kind_l or (_FOREIGN_NODE.match(name) and kind_l != "myelin"):
            dla.append(name)
            dla_weight += weight
        else:
            gpu.append(name)
            gpu_weight += weight
    return DlaPlacement(tuple(dla), tuple(gpu), dla_weight, gpu_weight)


def check_dla_share(placement: DlaPlacement, plan: BuildPlan, onnx_path: Path) -> None:
    """EngineBuildError when less of the network runs on the DLA than the plan's minimum share."""
    minimum = plan.dla_min_share if plan.dla_min_share is not None else 0.0
    if placement.share < minimum:
        raise EngineBuildError(
            f"DLA build of {onnx_path} for core {plan.dla_core}: {placement.summary()}; at least {minimum:.0%} is "
            "required, so it was not installed (TensorRT's GPU fallback moved the rest)",
            hint="build for the GPU (leave out DLA_CORE), accept a lower share with DLA_MIN_SHARE (--dla-min-share), "
                 "or change the model to layers the DLA supports (NVIDIA: DLA Supported Layers and Restrictions)",
        )


def inspect_dla_placement(trt: Any, logger: Any, blob: bytes, dla_core: int,
                          network_layers: Sequence[str]) -> DlaPlacement:
    """Deserialize a freshly built DLA engine and read from the engine inspector where its layers run."""
    runtime = trt.Runtime(logger)
    runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise EngineBuildError(f"TensorRT could not load the engine it just built for DLA core {dla_core}: "
                               f"{logger.last_error or 'no error logged'}")
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return dla_placement(text, network_layers)


def build_serialized(plan: BuildPlan, onnx_path: Path, timing_cache: Path | None, *,
                     trt: ModuleType | Any | None = None) -> BuiltEngine:
    """Build the engine described by `plan` from `onnx_path`; EngineBuildError says why it could not.

    `trt` is the tensorrt module (imported when left out; tests hand in a stand-in).
    """
    from engines.tensorrt import import_tensorrt, make_logger

    trt = trt if trt is not None else import_tensorrt()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    for flag in plan.parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, flag))
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        raise EngineBuildError(
            f"TensorRT {plan.tensorrt_version} cannot parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no detail)"]),
            hint="re-export the bundle with this software (opset 17), or report the nodes above",
        )
    # A bundle model has one input and the logits, plus (schema 3) the defect map as its second output.
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if network.num_inputs != 1 or not (len(outputs) == 1 or (len(outputs) == 2 and outputs[1] == DEFECT_MAP_NAME)):
        raise EngineBuildError(f"{onnx_path} has {network.num_inputs} inputs and outputs {outputs}; a bundle model "
                               f"has one input and the logits, optionally followed by {DEFECT_MAP_NAME!r}")
    inp, out = network.get_input(0), network.get_output(0)
    shape = [int(d) for d in inp.shape]

    config = builder.create_builder_config()
    configure_builder(trt, config, plan)
    # Always a profile: the bundle's ONNX has a dynamic batch axis; (1, 1, 1) makes the engine static batch 1.
    profile = builder.create_optimization_profile()
    low, opt, high = plan.batch_profile
    dims = shape[1:]
    profile.set_shape(inp.name, (low, *dims), (opt, *dims), (high, *dims))
    config.add_optimization_profile(profile)

    cache = attach_timing_cache(config, timing_cache) if timing_cache is not None else None

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.last_error or "TensorRT logged no error"
        if any(word in detail.lower() for word in _MEMORY_WORDS):
            raise EngineBuildError(
                f"TensorRT ran out of workspace building {onnx_path} with {plan.workspace_bytes // 2**20} MB: {detail}",
                hint="raise it: make engine WORKSPACE_MB=2048 (and close other GPU programs)",
            )
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}: {detail}")
    if timing_cache is not None and cache is not None:
        save_timing_cache(config, timing_cache)
    blob = bytes(serialized)
    placement = None
    if plan.dla_core is not None:
        layers = [network.get_layer(i).name for i in range(network.num_layers)]
        placement = inspect_dla_placement(trt, logger, blob, plan.dla_core, layers)
        log.info("DLA placement of %s: %s", onnx_path, placement.summary())
        check_dla_share(placement, plan, onnx_path)
    return BuiltEngine(blob, inp.name, out.name, shape, placement)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
