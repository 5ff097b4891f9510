"""The logic around TensorRT in engines/build.py, run on the CPU: network flags, builder flags, the timing cache,
and where a DLA engine's layers went.

TensorRT runs on no machine here, so `build_serialized` is handed a small stand-in for the `tensorrt` module
(`FakeTensorRT`) that records what the build asked of it and answers as TensorRT 10's Python API documents:
`set_timing_cache` returns a bool, `get_timing_cache` may return None, the engine inspector returns JSON.
The same steps against the real TensorRT are in test_engine_build.py (marked gpu).
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Any

import pytest

from bundle.errors import EngineBuildError
from engines.build import (
    DlaPlacement,
    attach_timing_cache,
    build_serialized,
    check_dla_share,
    configure_builder,
    dla_placement,
    network_creation_flags,
    save_timing_cache,
)
from engines.plan import BuildRequest, plan_build

AGX_ORIN = "NVIDIA Jetson AGX Orin Developer Kit"

# The network of a small classifier as the ONNX parser names its layers, in order.
NETWORK = ["/stem/Conv", "/stem/Relu", "/b1/Conv", "/b1/Relu", "/b2/Conv", "/b2/Relu", "/pool/GlobalAveragePool",
           "/Flatten", "/head/Gemm"]

# What IEngineInspector.get_engine_information(JSON) gives for a DLA build with ProfilingVerbosity.DETAILED:
# the DLA subgraph is one foreign node; transfers to and from the DLA's memory; the rest on the GPU.
DLA_ENGINE = {
    "Layers": [
        {"Name": "input to nvm", "LayerType": "Reformat"},
        {"Name": "{ForeignNode[/stem/Conv.../pool/GlobalAveragePool]}", "LayerType": "DLA"},
        {"Name": "/pool/GlobalAveragePool_output_0 from nvm", "LayerType": "Reformat"},
        {"Name": "/pool/GlobalAveragePool_output_0 copy finish", "LayerType": "NoOp"},
        {"Name": "/Flatten + /head/Gemm", "LayerType": "CaskGemmMatrixMultiply"},
    ],
    "Bindings": ["input", "logits"],
}


class Flag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Names:
    """An enum of TensorRT's as plain names: BuilderFlag.FP16 -> "BuilderFlag.FP16"."""

    def __init__(self, kind: str) -> None:
        self._kind = kind

    def __getattr__(self, name: str) -> str:
        return f"{self._kind}.{name}"


class FakeTensorRT(types.SimpleNamespace):
    """The part of the tensorrt module build_serialized uses; knobs say how TensorRT answers."""

    def __init__(self, version: str = "10.3.0", *, accept_cache: bool = True, accept_fresh_cache: bool = True,
                 give_cache: bool = True, engine_info: dict[str, Any] | None = None,
                 outputs: tuple[str, ...] = ("logits",)) -> None:
        fake = self
        self.calls: list[tuple[Any, ...]] = []
        self.cache_file_bytes: list[bytes] = []

        class ILogger:
            Severity = types.SimpleNamespace(INTERNAL_ERROR="internal", ERROR="error", WARNING="warning",
                                             INFO="info", VERBOSE="verbose")

            def __init__(self) -> None:
                pass

        class Tensor:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            num_inputs = 1
            num_outputs = len(outputs)
            num_layers = len(NETWORK)

            def get_input(self, i: int) -> Tensor:
                return Tensor("input", (-1, 3, 64, 64))

            def get_output(self, i: int) -> Tensor:
                return Tensor(outputs[i], (-1, 2) if i == 0 else (-1, 2, 2))

            def get_layer(self, i: int) -> types.SimpleNamespace:
                return types.SimpleNamespace(name=NETWORK[i])

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return b"timings after the build"

        class Config:
            def __init__(self) -> None:
                self.flags: set[str] = set()
                self.cleared: set[str] = set()
                self.cache: Cache | None = None
                self.default_device_type = self.DLA_core = self.profiling_verbosity = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag: str) -> None:
                self.flags.add(flag)

            def clear_flag(self, flag: str) -> None:
                self.cleared.add(flag)

            def add_optimization_profile(self, profile: Any) -> None:
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data: bytes) -> Cache:
                fake.cache_file_bytes.append(bytes(data))
                return Cache(bytes(data))

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                ok = fake.accept_cache if cache.data else fake.accept_fresh_cache
                if ok:
                    self.cache = cache
                return ok

            def get_timing_cache(self) -> Cache | None:
                return self.cache if fake.give_cache else None

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[Any, ...]] = {}

            def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
                self.shapes[name] = (low, opt, high)

        class Builder:
            def __init__(self, logger: Any) -> None:
                fake.builder = self

            def create_network(self, flags: int) -> Network:
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self) -> Config:
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                return b"serialized engine"

        class OnnxParser:
            def __init__(self, network: Network, logger: Any) -> None:
                self.flags: list[str] = []
                fake.parser = self

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse", path, list(self.flags)))
                return True

        class Inspector:
            def get_engine_information(self, fmt: str) -> str:
                fake.calls.append(("inspect", fmt))
                return json.dumps(fake.engine_info)

        class Engine:
            def create_engine_inspector(self) -> Inspector:
                return Inspector()

        class Runtime:
            def __init__(self, logger: Any) -> None:
                self.DLA_core = None
                fake.runtime = self

            def deserialize_cuda_engine(self, blob: bytes) -> Engine:
                fake.calls.append(("deserialize", blob, self.DLA_core))
                return Engine()

        super().__init__(
            __version__=version, ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
            NetworkDefinitionCreationFlag=Flag, BuilderFlag=Names("BuilderFlag"),
            OnnxParserFlag=Names("OnnxParserFlag"), MemoryPoolType=Names("MemoryPoolType"),
            DeviceType=Names("DeviceType"), ProfilingVerbosity=Names("ProfilingVerbosity"),
            LayerInformationFormat=Names("LayerInformationFormat"),
        )
        self.accept_cache, self.accept_fresh_cache, self.give_cache = accept_cache, accept_fresh_cache, give_cache
        self.engine_info = engine_info if engine_info is not None else DLA_ENGINE


@pytest.fixture
def onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    return path


# --- network and builder flags per TensorRT version -----------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "flags"),
    [
        ("8.5.2.2", 1 << Flag.EXPLICIT_BATCH),  # JetPack 5.1: 0 would make an implicit-batch network
        ("8.6.2", 1 << Flag.EXPLICIT_BATCH),  # JetPack 6.0
        ("10.3.0", 0),  # JetPack 6.1/6.2: explicit batch is the only mode
        ("10.12.0", 1 << Flag.STRONGLY_TYPED),
    ],
)
def test_networks_are_created_with_the_flags_of_their_tensorrt_version(version: str, flags: int) -> None:
    plan = plan_build(version, BuildRequest("fp32"))
    assert network_creation_flags(FakeTensorRT(version), plan) == flags


def test_fp32_clears_tf32_and_a_dla_build_asks_for_detailed_layer_information() -> None:
    trt = FakeTensorRT()
    config = trt.Builder(None).create_builder_config()
    configure_builder(trt, config, plan_build("10.3.0", BuildRequest("fp32")))
    assert config.cleared == {"BuilderFlag.TF32"} and config.flags == set()
    config = trt.Builder(None).create_builder_config()
    configure_builder(trt, config, plan_build("10.3.0", BuildRequest("int8", dla_core=1), dla_cores=2))
    assert config.flags == {"BuilderFlag.INT8", "BuilderFlag.FP16", "BuilderFlag.GPU_FALLBACK"}
    assert (config.default_device_type, config.DLA_core) == ("DeviceType.DLA", 1)
    assert config.profiling_verbosity == "ProfilingVerbosity.DETAILED" and config.cleared == set()


# --- the timing cache ---------------------------------------------------------------------------------------


def test_a_timing_cache_tensorrt_accepts_is_used_and_saved(tmp_path: Path) -> None:
    trt = FakeTensorRT()
    config = trt.Builder(None).create_builder_config()
    path = tmp_path / "timing-cache" / "trt10.3.0-sm87-orin-16mp.cache"
    path.parent.mkdir()
    path.write_bytes(b"earlier timings")
    assert attach_timing_cache(config, path) is not None
    assert ("set_timing_cache", b"earlier timings", False) in trt.calls  # a mismatch is not ignored
    assert save_timing_cache(config, path) and path.read_bytes() == b"timings after the build"


def test_a_refused_timing_cache_is_replaced_by_a_fresh_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # set_timing_cache returns False for a cache from another TensorRT or GPU (ignore_mismatch=False)
    trt = FakeTensorRT(accept_cache=False)
    config = trt.Builder(None).create_builder_config()
    path = tmp_path / "x.cache"
    path.write_bytes(b"timings from another GPU")
    assert attach_timing_cache(config, path) is not None
    assert trt.cache_file_bytes == [b"timings from another GPU", b""]
    assert "refused by TensorRT" in caplog.text
    assert save_timing_cache(config, path) and path.read_bytes() == b"timings after the build"


def test_no_timing_cache_at_all_builds_without_one_and_leaves_the_file(tmp_path: Path) -> None:
    trt = FakeTensorRT(accept_cache=False, accept_fresh_cache=False)
    config = trt.Builder(None).create_builder_config()
    path = tmp_path / "x.cache"
    path.write_bytes(b"old")
    assert attach_timing_cache(config, path) is None
    assert path.read_bytes() == b"old"


def test_get_timing_cache_returning_none_saves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = FakeTensorRT(give_cache=False)
    config = trt.Builder(None).create_builder_config()
    path = tmp_path / "x.cache"
    assert attach_timing_cache(config, path) is not None
    assert not save_timing_cache(config, path) and not path.exists()
    assert "returned no timing cache" in caplog.text


# --- where a DLA engine's layers run ------------------------------------------------------------------------


def test_dla_placement_counts_network_layers_not_engine_layers() -> None:
    placement = dla_placement(json.dumps(DLA_ENGINE), NETWORK)
    # one DLA engine layer holding 7 network layers, one GPU layer fusing 2; transfers and reformats count for none
    assert placement.dla_layers == ("{ForeignNode[/stem/Conv.../pool/GlobalAveragePool]}",)
    assert placement.gpu_layers == ("/Flatten + /head/Gemm",)
    assert (placement.dla_weight, placement.gpu_weight) == (7, 2)
    assert placement.share == pytest.approx(7 / 9)
    summary = placement.summary()
    assert "78% of the network's layers on the DLA" in summary and "/Flatten + /head/Gemm" in summary
    assert placement.as_dict()["share"] == pytest.approx(0.7778, abs=1e-4)


def test_a_myelin_foreign_node_runs_on_the_gpu() -> None:
    info = {"Layers": [{"Name": "{ForeignNode[/stem/Conv.../b1/Relu]}", "LayerType": "DLA"},
                       {"Name": "{ForeignNode[/b2/Conv.../head/Gemm]}", "LayerType": "Myelin"}]}
    placement = dla_placement(info, NETWORK)
    assert (placement.dla_weight, placement.gpu_weight) == (4, 5)
    assert placement.gpu_layers == ("{ForeignNode[/b2/Conv.../head/Gemm]}",)


def test_layer_names_only_and_unknown_names_still_give_a_placement() -> None:
    # ProfilingVerbosity.LAYER_NAMES_ONLY: a list of names; a foreign node whose ends are not network layers
    # counts as one layer
    info = {"Layers": ["input to nvm", "{ForeignNode[(Unnamed Layer* 0) [ElementWise]]}", "out from nvm", "/head/Gemm"]}
    placement = dla_placement(info, NETWORK)
    assert (placement.dla_weight, placement.gpu_weight) == (1, 1) and placement.share == 0.5
    assert dla_placement({"Layers": []}, NETWORK).share == 0.0


def test_a_dla_build_below_the_minimum_share_is_refused_naming_the_gpu_layers(onnx: Path) -> None:
    plan = plan_build("10.3.0", BuildRequest("fp16", dla_core=0, dla_min_share=0.8), dla_cores=2)
    placement = DlaPlacement(("{ForeignNode[a...b]}",), ("/Flatten + /head/Gemm",), 7, 2)
    with pytest.raises(EngineBuildError, match=r"78% of the network's layers on the DLA.*at least 80%") as err:
        check_dla_share(placement, plan, onnx)
    assert err.value.exit_code == 9 and "/head/Gemm" in str(err.value) and "DLA_MIN_SHARE" in str(err.value)
    check_dla_share(placement, plan_build("10.3.0", BuildRequest("fp16", dla_core=0), dla_cores=2), onnx)


# --- the whole build with the stand-in ----------------------------------------------------------------------


def test_a_dla_build_reports_its_placement_and_keeps_the_timing_cache(onnx: Path, tmp_path: Path) -> None:
    trt = FakeTensorRT()
    plan = plan_build("10.3.0", BuildRequest("int8", dla_core=1), dla_cores=2)
    cache = tmp_path / "store" / "timing-cache" / "t.cache"
    built = build_serialized(plan, onnx, cache, trt=trt)
    assert built.blob == b"serialized engine" and built.input_name == "input"
    assert built.dla_placement is not None and built.dla_placement.share == pytest.approx(7 / 9)
    # the engine was loaded on the DLA core it was built for, and inspected as JSON
    assert ("deserialize", b"serialized engine", 1) in trt.calls
    assert ("inspect", "LayerInformationFormat.JSON") in trt.calls
    assert cache.read_bytes() == b"timings after the build"


def test_a_dla_build_that_mostly_fell_back_to_the_gpu_fails(onnx: Path) -> None:
    mostly_gpu = {"Layers": [{"Name": "{ForeignNode[/stem/Conv.../stem/Relu]}", "LayerType": "DLA"},
                             {"Name": "/b1/Conv + /b1/Relu", "LayerType": "CaskConvolution"},
                             {"Name": "/b2/Conv + /b2/Relu", "LayerType": "CaskConvolution"},
                             {"Name": "/pool/GlobalAveragePool", "LayerType": "CaskPooling"},
                             {"Name": "/Flatten + /head/Gemm", "LayerType": "CaskGemmMatrixMultiply"}]}
    plan = plan_build("10.3.0", BuildRequest("fp16", dla_core=0), dla_cores=2)
    with pytest.raises(EngineBuildError, match="22% of the network's layers on the DLA"):
        build_serialized(plan, onnx, None, trt=FakeTensorRT(engine_info=mostly_gpu))


def test_tensorrt_11_dla_builds_parse_with_adjust_for_dla(onnx: Path) -> None:
    trt = FakeTensorRT("11.4.1")
    plan = plan_build("11.4.1", BuildRequest("fp16", dla_core=0), dla_cores=2, jetson_model=AGX_ORIN)
    build_serialized(plan, onnx, None, trt=trt)
    assert ("parse", str(onnx), ["OnnxParserFlag.ADJUST_FOR_DLA"]) in trt.calls  # set before parsing
    assert ("create_network", 1 << Flag.STRONGLY_TYPED) in trt.calls
    assert trt.config.flags == {"BuilderFlag.GPU_FALLBACK"}  # no precision flags in strongly typed mode


def test_a_gpu_build_neither_inspects_nor_sets_parser_flags(onnx: Path) -> None:
    trt = FakeTensorRT("8.6.2")
    built = build_serialized(plan_build("8.6.2", BuildRequest("fp32")), onnx, None, trt=trt)
    assert built.dla_placement is None and not any(call[0] == "inspect" for call in trt.calls)
    assert ("create_network", 1 << Flag.EXPLICIT_BATCH) in trt.calls and trt.parser.flags == []
    assert trt.config.cleared == {"BuilderFlag.TF32"}


def test_a_model_with_the_defect_map_builds_with_logits_as_the_engine_output(onnx: Path) -> None:
    trt = FakeTensorRT(outputs=("logits", "defect_map"))
    built = build_serialized(plan_build("10.3.0", BuildRequest("fp16")), onnx, None, trt=trt)
    assert built.output_name == "logits"


@pytest.mark.parametrize("outputs", [("logits", "heatmap"), ("logits", "defect_map", "extra"), ()])
def test_any_other_set_of_outputs_is_refused_naming_them(onnx: Path, outputs: tuple[str, ...]) -> None:
    with pytest.raises(EngineBuildError, match=r"outputs \[.*\]; a bundle model has one input and the logits"):
        build_serialized(plan_build("10.3.0", BuildRequest("fp16")), onnx, None, trt=FakeTensorRT(outputs=outputs))


# --- the board, for the TensorRT 11.4.1 DLA rule ----------------------------------------------------------------


def test_the_jetson_model_is_read_from_the_device_tree(tmp_path: Path) -> None:
    from engines.device import read_jetson_model

    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")  # the device tree's string ends with a NUL
    assert read_jetson_model(model) == AGX_ORIN
    assert plan_build("11.4.1", BuildRequest("fp16", dla_core=0), dla_cores=2,
                      jetson_model=read_jetson_model(model)).parser_flags == ("ADJUST_FOR_DLA",)
    assert read_jetson_model(tmp_path / "absent") is None  # off a Jetson
    model.write_bytes(b"\x00")
    assert read_jetson_model(model) is None
