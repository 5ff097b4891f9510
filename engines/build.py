"""Apply a BuildPlan to TensorRT: parse the bundle's ONNX, configure the builder, serialize the engine.

The only module of engines/ that calls TensorRT (imported on first use). Written against the TensorRT 10
Python API, with the TensorRT 8.5+ differences the plan names (EXPLICIT_BATCH) and the 10.12+/11 strongly
typed mode (no precision flags). Errors name what went wrong in the plant engineer's terms: the ONNX
nodes the parser rejected, a workspace too small, a DLA the device lacks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import EngineBuildError
from engines.plan import BuildPlan

log = logging.getLogger(__name__)

_MEMORY_WORDS = ("workspace", "out of memory", "insufficient memory", "cudaerrormemoryallocation", "memory pool")


@dataclass(frozen=True)
class BuiltEngine:
    blob: bytes
    input_name: str
    output_name: str
    input_shape: list[int]  # as the network declares it: -1 for the dynamic batch axis


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


def _network_flags(trt: Any, plan: BuildPlan) -> int:
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def build_serialized(plan: BuildPlan, onnx_path: Path, timing_cache: Path | None) -> BuiltEngine:
    """Build the engine described by `plan` from `onnx_path`; EngineBuildError says why it could not."""
    from appliance.trt_backend import _make_logger, import_tensorrt

    trt = import_tensorrt()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        raise EngineBuildError(
            f"TensorRT {plan.tensorrt_version} cannot parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no detail)"]),
            hint="re-export the bundle with this software (opset 17), or report the nodes above",
        )
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise EngineBuildError(f"{onnx_path} has {network.num_inputs} inputs and {network.num_outputs} outputs; "
                               "a bundle model has one of each")
    inp, out = network.get_input(0), network.get_output(0)
    shape = [int(d) for d in inp.shape]

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    # Always a profile: the bundle's ONNX has a dynamic batch axis; (1, 1, 1) makes the engine static batch 1.
    profile = builder.create_optimization_profile()
    low, opt, high = plan.batch_profile
    dims = shape[1:]
    profile.set_shape(inp.name, (low, *dims), (opt, *dims), (high, *dims))
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        # ignore_mismatch=False: a cache from another TensorRT/GPU is rejected rather than silently misused.
        config.set_timing_cache(cache, False)

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
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return BuiltEngine(bytes(serialized), inp.name, out.name, shape)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
