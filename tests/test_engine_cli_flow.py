"""`make engine` (`python -m engines build`) on the CPU: the flow around TensorRT with its calls handed in.

`engines.__main__.main(..., build_steps=...)` takes the three calls that need TensorRT, CUDA and a GPU as
stand-ins: the device probe (here an AGX Orin with JetPack 6.1's TensorRT 10.3), the builder (returning a real
`engines.build.BuiltEngine` of fixed bytes) and the engine validation (the real golden-set comparison of
`engines.validate`, fed the bundle's own reference logits, or logits that are off). Everything else is the real
code on the session's real bundle: plan, key and file name, "up to date", the candidate beside the store,
validation before install, the rejected report, the atomic install, the exit codes of README.md's table.

Also here, on the CPU with stand-ins, what test_engine_build_logic.py and test_cuda_memory.py cover only on a
GPU: the ONNX parser's error lines, the out-of-workspace message, and the CUDA thread-ownership rule.
The same flow against the real TensorRT is test_engine_build.py (marked gpu).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundle.errors import ConfigError, EngineBuildError, GpuUnavailableError
from bundle.format import Bundle, load_bundle
from engines import cuda_memory
from engines.__main__ import BuildSteps, main
from engines.build import BuiltEngine, DlaPlacement, build_serialized, parser_errors
from engines.cuda_memory import (
    CudaContext,
    CudaStream,
    CudaThreadError,
    DeviceBuffer,
    PinnedHostBuffer,
    copy_dtoh_async,
    copy_htod_async,
    live_resources,
)
from engines.device import BuildDevice
from engines.manifest import DeviceInfo, load_manifest, manifest_path
from engines.plan import BuildPlan, BuildRequest, plan_build
from engines.store import timing_cache_path
from engines.validate import Validation, golden_reference, validate
from tests.support.cuda import pagelocked_empty
from tests.support.threads import run_on_thread
from tests.test_cuda_memory import FakeDriver
from tests.test_engine_build_logic import FakeTensorRT

REPO = Path(__file__).resolve().parents[1]

# JetPack 6.1 on a Jetson AGX Orin, as engines.device.probe() reports it.
AGX_ORIN = BuildDevice(tensorrt_version="10.3.0.30", cuda_version="12.6", l4t_version="36.4.0", gpu_name="Orin",
                       compute_capability="8.7", dla_cores=2, gpu_multiprocessors=16,
                       jetson_model="NVIDIA Jetson AGX Orin Developer Kit")
ORIN_NANO = BuildDevice(tensorrt_version="10.3.0.30", cuda_version="12.6", l4t_version="36.4.0", gpu_name="Orin",
                        compute_capability="8.7", dla_cores=0, gpu_multiprocessors=8,
                        jetson_model="NVIDIA Jetson Orin Nano Developer Kit")


def readme_exit_codes() -> dict[int, str]:
    """README.md's exit-code table: "Exit codes: 0 ok, 1 unexpected (...), 2 configuration, ..." -> {code: text}."""
    text = (REPO / "README.md").read_text()
    paragraph = text[text.index("Exit codes: "):].split("\n\n", 1)[0].replace("\n", " ")
    paragraph = re.sub(r"\([^)]*\)", "", paragraph.removeprefix("Exit codes: "))
    return {int(m.group(1)): m.group(2).strip() for m in re.finditer(r"(\d+) ([^,]+)", paragraph)}


def test_the_exit_codes_used_here_are_the_readmes() -> None:
    codes = readme_exit_codes()
    assert codes[0] == "ok" and codes[2] == "configuration" and codes[7] == "GPU unavailable"
    assert codes[9] == "engine build or validation failed"
    assert (ConfigError.exit_code, GpuUnavailableError.exit_code, EngineBuildError.exit_code) == (2, 7, 9)


class FakeSteps:
    """Stand-ins for the probe, the TensorRT builder and the engine validation, recording what they were given."""

    def __init__(self, device: BuildDevice = AGX_ORIN, *, blob: bytes = b"engine v1", passes: bool = True,
                 build_error: Exception | None = None, validate_error: Exception | None = None,
                 placement: DlaPlacement | None = None) -> None:
        self.device, self.blob, self.passes = device, blob, passes
        self.build_error, self.validate_error, self.placement = build_error, validate_error, placement
        self.builds: list[tuple[BuildPlan, Path, Path | None]] = []
        # (engine file validated, its bytes then, whether the installed engine existed then, device given)
        self.validations: list[tuple[Path, bytes, bool, DeviceInfo]] = []
        self.target: Path | None = None

    def probe(self) -> BuildDevice:
        return self.device

    def build(self, plan: BuildPlan, onnx: Path, timing_cache: Path | None) -> BuiltEngine:
        self.builds.append((plan, onnx, timing_cache))
        if self.build_error is not None:
            raise self.build_error
        shape = [-1 if plan.dynamic_batch else 1, 1, 64, 64]
        return BuiltEngine(self.blob, "image", "logits", shape, self.placement)

    def validate_engine(self, engine: Path, bundle: Bundle, plan: BuildPlan, device: DeviceInfo) -> Validation:
        installed = engine.with_name(engine.name.removesuffix(".candidate"))
        self.validations.append((engine, engine.read_bytes(), installed.exists(), device))
        if self.validate_error is not None:
            raise self.validate_error
        # The engine "computes" the bundle's reference logits (passes) or logits 1.0 off each (fails): the real
        # comparison of engines/validate.py judges them.
        _, reference, _ = golden_reference(bundle, plan.precision)
        rows = iter(reference if self.passes else reference + 1.0)
        return validate(lambda x: next(rows), bundle, plan.precision)

    def steps(self) -> BuildSteps:
        return BuildSteps(probe=self.probe, build=self.build, validate_engine=self.validate_engine)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def build(bundle_dir: Path, store: Path, steps: FakeSteps, *args: str) -> int:
    return main(["build", "--bundle", str(bundle_dir), "--store", str(store), *args], build_steps=steps.steps())


def engine_name(bundle_dir: Path, precision: str = "fp16", suffix: str = "") -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]", "_", load_bundle(bundle_dir).model_id)
    return f"{model}-{precision}-trt10.3.0.30-sm87{suffix}.engine"


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("*.candidate*"))


def snapshot(engine: Path) -> tuple[bytes, bytes]:
    return engine.read_bytes(), manifest_path(engine).read_bytes()


# --- the first build, then nothing to do, then --force --------------------------------------------------------


def test_the_first_build_validates_the_candidate_then_installs_engine_and_manifest(
        bundle_dir: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = FakeSteps()
    assert build(bundle_dir, store, steps) == 0

    target = store / engine_name(bundle_dir)
    # (the timing cache is build_serialized's to write: not there with the stand-in builder)
    assert sorted(p.name for p in store.iterdir()) == sorted([target.name, manifest_path(target).name])
    assert target.read_bytes() == b"engine v1"
    # TensorRT 10.3 (JetPack 6.1) fp16: weakly typed, the FP32 ONNX with the FP16 flag; the timing cache keyed by
    # TensorRT version and GPU model
    bundle = load_bundle(bundle_dir)
    [(plan, onnx, cache)] = steps.builds
    assert (plan.precision, plan.onnx_role, plan.strongly_typed, plan.builder_flags) == \
        ("fp16", "onnx_fp32", False, ("FP16",))
    assert onnx == bundle.path("onnx_fp32")
    assert cache == timing_cache_path(store, "10.3.0.30", "8.7", "Orin", 16)
    # validated BEFORE the install: a candidate beside the store holding the built bytes, the real name still free
    [(validated, validated_bytes, installed_then, device)] = steps.validations
    assert validated.name == target.name + ".candidate" and validated.parent == store
    assert validated_bytes == b"engine v1" and not installed_then
    assert device == DeviceInfo(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7",
                                gpu_multiprocessors=16)
    assert leftovers(store) == []

    manifest = load_manifest(manifest_path(target))
    assert manifest.engine_sha256 == hashlib.sha256(b"engine v1").hexdigest()
    assert manifest.onnx_sha256 == bundle.metadata.files["onnx_fp32"].sha256
    assert (manifest.bundle_model_id, manifest.precision, manifest.tensorrt_version, manifest.cuda_version,
            manifest.l4t_version, manifest.gpu_name, manifest.compute_capability, manifest.gpu_multiprocessors,
            manifest.dla_core) == (bundle.model_id, "fp16", "10.3.0.30", "12.6", "36.4.0", "Orin", "8.7", 16, None)
    assert (manifest.input_name, manifest.output_name, manifest.input_shape) == ("image", "logits", [1, 1, 64, 64])
    assert manifest.build_options["onnx_role"] == "onnx_fp32" and manifest.build_options["batch_profile"] == [1, 1, 1]
    assert manifest.validation is not None and manifest.validation["passed"] is True
    assert manifest.validation["images"] == len(golden_reference(bundle, "fp16")[1])

    out = capsys.readouterr().out
    assert f"building {target} (no engine at {target} yet)" in out
    assert "plan: onnx_fp32 (model_fp32.onnx), weakly typed, flags ['FP16']" in out
    assert "validation PASSED" in out
    assert f"installed {target} (+ {target.name}.json)" in out


def test_the_second_run_is_up_to_date_and_builds_nothing(bundle_dir: Path, store: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    steps = FakeSteps()
    assert build(bundle_dir, store, steps) == 0
    target = store / engine_name(bundle_dir)
    before = snapshot(target)
    capsys.readouterr()

    assert build(bundle_dir, store, steps) == 0
    out = capsys.readouterr().out
    assert f"{target}: up to date" in out and "nothing to do" in out and "building" not in out
    assert len(steps.builds) == 1 and len(steps.validations) == 1
    assert snapshot(target) == before


def test_force_rebuilds_an_up_to_date_engine(bundle_dir: Path, store: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert build(bundle_dir, store, FakeSteps()) == 0
    target = store / engine_name(bundle_dir)
    capsys.readouterr()

    steps = FakeSteps(blob=b"engine v2")
    assert build(bundle_dir, store, steps, "--force") == 0
    assert f"building {target} (forced)" in capsys.readouterr().out
    assert len(steps.builds) == 1 and target.read_bytes() == b"engine v2"
    assert load_manifest(manifest_path(target)).engine_sha256 == hashlib.sha256(b"engine v2").hexdigest()
    assert leftovers(store) == []


def test_make_engine_force_1_passes_force() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def dry_run(*variables: str) -> str:
        # -n prints the recipes without running them (the venv stamp's pip included)
        proc = subprocess.run(["make", "-n", "engine", "BUNDLE=/opt/appliance/bundle", *variables], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines() if "-m engines build" in line)

    assert "--force" in dry_run("FORCE=1") and "--bundle /opt/appliance/bundle --precision fp16" in dry_run()
    assert "--force" not in dry_run()


def test_an_engine_file_changed_after_install_is_rebuilt_saying_so(bundle_dir: Path, store: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert build(bundle_dir, store, FakeSteps()) == 0
    target = store / engine_name(bundle_dir)
    target.write_bytes(b"engine v1, damaged")
    capsys.readouterr()
    steps = FakeSteps()
    assert build(bundle_dir, store, steps) == 0
    assert "the engine file changed after its manifest was written" in capsys.readouterr().out
    assert len(steps.builds) == 1 and target.read_bytes() == b"engine v1"


# --- a failed validation --------------------------------------------------------------------------------------


def test_a_failed_validation_exits_9_with_a_report_and_keeps_the_installed_engine(
        bundle_dir: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build(bundle_dir, store, FakeSteps()) == 0
    target = store / engine_name(bundle_dir)
    before = snapshot(target)
    capsys.readouterr()

    # a forced rebuild for the same key whose engine does not compute the model
    steps = FakeSteps(blob=b"engine v2", passes=False)
    assert build(bundle_dir, store, steps, "--force") == EngineBuildError.exit_code == 9
    captured = capsys.readouterr()
    rejected = store / (target.name + ".rejected.json")
    assert "validation FAILED" in captured.out
    assert f"error: engine for {load_bundle(bundle_dir).model_id} (fp16) failed validation and was not installed" \
        in captured.err
    assert f"(report: {rejected})" in captured.err

    report = json.loads(rejected.read_text())
    assert report["validation"]["passed"] is False
    reason = report["validation"]["problems"]
    assert reason and "logits differ by more than FP16's" in reason[0] and reason[0] in captured.err
    assert report["engine_sha256"] == hashlib.sha256(b"engine v2").hexdigest()  # the report is of the rejected one
    # the engine and manifest installed before are byte for byte what they were; no candidate is left behind
    assert snapshot(target) == before
    assert leftovers(store) == []
    assert sorted(p.name for p in store.glob("*.engine*")) == sorted(
        [target.name, manifest_path(target).name, rejected.name])

    # and the installed engine is still the valid one for this key
    again = FakeSteps()
    assert build(bundle_dir, store, again) == 0 and again.builds == []
    assert "up to date" in capsys.readouterr().out


def test_a_rejected_engine_is_not_installed_and_not_taken_as_up_to_date(bundle_dir: Path, store: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert build(bundle_dir, store, FakeSteps(passes=False)) == 9
    target = store / engine_name(bundle_dir)
    assert not target.exists() and not manifest_path(target).exists() and leftovers(store) == []
    assert (store / (target.name + ".rejected.json")).is_file()
    capsys.readouterr()
    steps = FakeSteps()
    assert build(bundle_dir, store, steps) == 0
    assert len(steps.builds) == 1 and target.read_bytes() == b"engine v1"
    assert "installed" in capsys.readouterr().out
    # the old rejection's report went with the install: it no longer describes what is there
    assert not (store / (target.name + ".rejected.json")).exists()


def test_an_engine_that_cannot_even_be_validated_is_not_installed(bundle_dir: Path, store: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # e.g. TensorRT refusing to deserialize what it just built: a failed validation like any other (exit 9,
    # a report), and the candidate goes
    assert build(bundle_dir, store, FakeSteps()) == 0
    target = store / engine_name(bundle_dir)
    before = snapshot(target)
    error = GpuUnavailableError("TensorRT could not deserialize the engine")
    assert build(bundle_dir, store, FakeSteps(blob=b"engine v2", validate_error=error), "--force") == 9
    err = capsys.readouterr().err
    assert "could not be run on the golden set: GpuUnavailableError: TensorRT could not deserialize" in err
    report = json.loads((store / (target.name + ".rejected.json")).read_text())
    assert report["validation"]["passed"] is False and "deserialize" in report["validation"]["problems"][0]
    assert report["engine_sha256"] == hashlib.sha256(b"engine v2").hexdigest()
    assert snapshot(target) == before and leftovers(store) == []


# --- a build that fails, a request the device cannot do -------------------------------------------------------


def test_a_builder_error_exits_9_with_its_message_and_hint_and_installs_nothing(
        bundle_dir: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build(bundle_dir, store, FakeSteps()) == 0
    target = store / engine_name(bundle_dir)
    before = snapshot(target)
    capsys.readouterr()

    error = EngineBuildError("TensorRT ran out of workspace building model_fp32.onnx with 1024 MB: out of memory",
                             hint="raise it: make engine WORKSPACE_MB=2048 (and close other GPU programs)")
    steps = FakeSteps(build_error=error)
    assert build(bundle_dir, store, steps, "--force") == EngineBuildError.exit_code == 9
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT ran out of workspace building model_fp32.onnx with 1024 MB")
    assert "hint: raise it: make engine WORKSPACE_MB=2048" in err
    assert steps.validations == []
    assert snapshot(target) == before and leftovers(store) == []
    assert not list(store.glob("*.rejected.json"))


def test_no_tensorrt_on_the_probe_exits_7_before_anything_is_built(bundle_dir: Path, store: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    steps = FakeSteps()

    def no_tensorrt() -> BuildDevice:
        raise GpuUnavailableError("TensorRT Python bindings not importable: on a Jetson they come with JetPack")

    steps.probe = no_tensorrt  # type: ignore[method-assign]
    assert build(bundle_dir, store, steps) == 7
    assert "error: TensorRT Python bindings not importable" in capsys.readouterr().err
    assert steps.builds == [] and not store.exists()


def test_a_dla_core_on_a_device_without_dla_exits_2_and_builds_nothing(bundle_dir: Path, store: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    steps = FakeSteps(ORIN_NANO)
    assert build(bundle_dir, store, steps, "--dla-core", "0") == ConfigError.exit_code == 2
    assert "has no DLA" in capsys.readouterr().err
    assert steps.builds == [] and not store.exists()


def test_a_dla_build_prints_and_records_where_its_layers_run(bundle_dir: Path, store: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    placement = DlaPlacement(("{ForeignNode[/stem/Conv.../pool/GlobalAveragePool]}",), ("/Flatten + /head/Gemm",),
                             7, 2)
    steps = FakeSteps(placement=placement)
    assert build(bundle_dir, store, steps, "--dla-core", "1") == 0
    target = store / engine_name(bundle_dir, suffix="-dla1")
    [(plan, _, _)] = steps.builds
    assert plan.dla_core == 1 and plan.batch_profile == (1, 1, 1) and "GPU_FALLBACK" in plan.builder_flags
    out = capsys.readouterr().out
    assert "DLA core 1 (at least 50% of the layers on it)" in out
    assert "DLA placement: 78% of the network's layers on the DLA" in out
    manifest = load_manifest(manifest_path(target))
    assert manifest.dla_core == 1 and manifest.build_options["dla_placement"]["share"] == pytest.approx(0.7778)
    # DLA engines are static batch 1; a batch profile is refused before anything is built (exit 2)
    again = FakeSteps(placement=placement)
    assert build(bundle_dir, store, again, "--dla-core", "1", "--max-batch", "4") == 2
    assert "static batch of 1" in capsys.readouterr().err and again.builds == []


def test_max_batch_gives_a_dynamic_batch_engine_of_its_own(bundle_dir: Path, store: Path) -> None:
    assert build(bundle_dir, store, FakeSteps()) == 0
    steps = FakeSteps(blob=b"engine b8")
    assert build(bundle_dir, store, steps, "--max-batch", "8") == 0
    [(plan, _, _)] = steps.builds
    assert plan.batch_profile == (1, 8, 8)
    batched = store / engine_name(bundle_dir, suffix="-b8")
    assert batched.read_bytes() == b"engine b8" and (store / engine_name(bundle_dir)).read_bytes() == b"engine v1"
    assert load_manifest(manifest_path(batched)).input_shape == [-1, 1, 64, 64]


# --- the ONNX parser's errors and the out-of-workspace message (engines/build.py, stand-in TensorRT) ----------


class ParserError:
    """One `IParserError` as TensorRT 10 gives it (node_name and node_operator exist from TensorRT 10 on)."""

    def __init__(self, node: int, desc: str, name: str | None = None, op: str | None = None) -> None:
        self._node, self._desc = node, desc
        if name is not None:
            self.node_name = lambda: name
        if op is not None:
            self.node_operator = lambda: op

    def node(self) -> int:
        return self._node

    def desc(self) -> str:
        return self._desc


class RejectingParser:
    """An OnnxParser whose parse_from_file fails with the given errors."""

    errors: tuple[ParserError, ...] = ()

    def __init__(self, network: Any, logger: Any) -> None:
        pass

    def set_flag(self, flag: Any) -> None:
        pass

    def parse_from_file(self, path: str) -> bool:
        return False

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]


def test_parser_errors_name_node_index_name_and_operator_where_tensorrt_gives_them() -> None:
    parser = RejectingParser(None, None)
    parser.errors = (
        ParserError(3, "No importer registered for op: NoSuchOp", name="/stem/Conv", op="NoSuchOp"),  # TensorRT 10
        ParserError(7, "Assertion failed: zero point must be 0"),  # TensorRT 8.x: index only
        ParserError(4, "unsupported attribute", name="", op="Resize"),
        ParserError(-1, "ModelImporter.cpp:773: ONNX IR version 12 is newer than supported"),  # not about a node
    )
    assert parser_errors(parser) == [
        "node 3 '/stem/Conv' (NoSuchOp): No importer registered for op: NoSuchOp",
        "node 7: Assertion failed: zero point must be 0",
        "node 4 (Resize): unsupported attribute",
        "model: ModelImporter.cpp:773: ONNX IR version 12 is newer than supported",
    ]


@pytest.fixture
def onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    return path


def test_an_onnx_the_parser_rejects_is_an_engine_build_error_listing_the_nodes(onnx: Path) -> None:
    trt = FakeTensorRT()
    trt.OnnxParser = type("Parser", (RejectingParser,), {
        "errors": (ParserError(0, "No importer registered for op: NoSuchOp", name="/stem/Conv", op="NoSuchOp"),
                   ParserError(5, "Invalid Node", name="/b1/Conv", op="Conv"))})
    plan = plan_build("10.3.0", BuildRequest("fp16"))
    with pytest.raises(EngineBuildError) as err:
        build_serialized(plan, onnx, None, trt=trt)
    message = str(err.value)
    assert message.startswith(f"TensorRT 10.3.0 cannot parse {onnx}:\n")
    assert "\n  node 0 '/stem/Conv' (NoSuchOp): No importer registered" in message
    assert "\n  node 5 '/b1/Conv' (Conv): Invalid Node" in message
    assert "hint: re-export the bundle" in message and err.value.exit_code == 9
    # a parser that fails without saying why still gives a line
    trt.OnnxParser = RejectingParser
    with pytest.raises(EngineBuildError, match=r"cannot parse .*:\n  \(no detail\)"):
        build_serialized(plan, onnx, None, trt=trt)


def test_out_of_workspace_names_the_size_and_the_knob_to_raise(onnx: Path) -> None:
    trt = FakeTensorRT()
    base = trt.Builder

    class OutOfWorkspace(base):  # type: ignore[misc, valid-type]
        def __init__(self, logger: Any) -> None:
            super().__init__(logger)
            self.logger = logger

        def build_serialized_network(self, network: Any, config: Any) -> None:
            # TensorRT logs the reason through the logger, then returns None
            self.logger.log(trt.ILogger.Severity.ERROR, "[optimizer.cpp::computeCosts] Error Code 10: Internal "
                            "Error (Could not find any implementation: insufficient memory for the workspace)")
            return None

    trt.Builder = OutOfWorkspace
    plan = plan_build("10.3.0", BuildRequest("fp16", workspace_mb=64))
    with pytest.raises(EngineBuildError, match=r"ran out of workspace .* with 64 MB: .*insufficient memory") as err:
        build_serialized(plan, onnx, None, trt=trt)
    assert "WORKSPACE_MB=2048" in str(err.value)


# --- CUDA resources belong to the thread that made them (engines/cuda_memory.py, stand-in pycuda) -------------


class Allocation:
    """pycuda's DeviceAllocation: an address (`int()`) and `free()`."""

    def __init__(self, address: int) -> None:
        self.address, self.freed = address, False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.freed = True


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    """test_cuda_memory.py's stand-in for pycuda.driver, with memory and copies; records every call it gets."""
    fake = FakeDriver()
    fake.calls = []  # type: ignore[attr-defined]

    def record(name: str, result: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            fake.calls.append((name, threading.current_thread().name))  # type: ignore[attr-defined]
            return result(*args)
        return call

    fake.pagelocked_empty = record("pagelocked_empty", pagelocked_empty)
    fake.mem_alloc = record("mem_alloc", lambda nbytes: Allocation(0x7000_0000 + nbytes))
    fake.memcpy_htod_async = record("memcpy_htod_async", lambda dst, src, stream: None)
    fake.memcpy_dtoh_async = record("memcpy_dtoh_async", lambda dst, src, stream: None)
    package = types.ModuleType("pycuda")
    package.driver = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake)
    monkeypatch.setattr(cuda_memory, "_primary", {})
    before = live_resources()
    yield fake
    assert live_resources() == before, "a test left CUDA resources allocated"


def test_a_copy_from_another_thread_is_refused_before_any_cuda_call(driver: FakeDriver) -> None:
    host, device, stream = PinnedHostBuffer((1, 1, 8, 8)), DeviceBuffer(256), CudaStream()
    try:
        copy_htod_async(device, host, stream)  # the owner may
        driver.calls.clear()  # type: ignore[attr-defined]
        with pytest.raises(CudaThreadError) as err:
            run_on_thread(lambda: copy_htod_async(device, host, stream), "camera")
        message = str(err.value)
        assert "device buffer: host-to-device copy called from thread 'camera'" in message
        assert "belongs to thread 'MainThread'" in message and "inference thread" in message  # the hint
        assert isinstance(err.value, GpuUnavailableError)  # the station's GPU-failure path catches it too
        with pytest.raises(CudaThreadError, match="pinned host buffer: device-to-host copy"):
            run_on_thread(lambda: copy_dtoh_async(host, device, stream), "mqtt")
        with pytest.raises(CudaThreadError, match="CUDA stream: synchronize"):
            run_on_thread(stream.synchronize, "camera")
        assert driver.calls == []  # type: ignore[attr-defined]  # nothing reached pycuda from the wrong thread
    finally:
        for resource in (stream, device, host):
            resource.free()


def test_only_the_owner_frees_and_another_thread_may_only_write_the_pinned_array(driver: FakeDriver) -> None:
    host, device, stream = PinnedHostBuffer((1, 1, 8, 8)), DeviceBuffer(256), CudaStream()
    allocation = host.array.base
    # the preprocess thread fills the slot in place
    run_on_thread(lambda: np.copyto(host.array, np.full((1, 1, 8, 8), 3.0, np.float32)), "preprocess")
    assert np.all(host.array == 3.0)
    for resource, what in ((host, "pinned host buffer"), (device, "device buffer"), (stream, "CUDA stream")):
        with pytest.raises(CudaThreadError, match=f"{what}: free called from thread 'preprocess'"):
            run_on_thread(resource.free, "preprocess")
        assert not resource.freed
    assert not allocation.freed
    for resource in (stream, device, host):
        resource.free()  # the owner can, after the refusals
    assert stream.freed and device.freed and host.freed and allocation.freed


def test_resources_made_on_the_inference_thread_are_refused_to_the_main_thread(driver: FakeDriver) -> None:
    # one long-lived inference thread (a pool of one), as in the station
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as inference:
        made = inference.submit(lambda: (PinnedHostBuffer((4,)), DeviceBuffer(16), CudaStream())).result()
        for resource in made:
            with pytest.raises(CudaThreadError, match=r"from thread 'MainThread'.*belongs to thread 'inference_0'"):
                resource.free()
        inference.submit(lambda: [resource.free() for resource in reversed(made)]).result()
    assert all(resource.freed for resource in made)


def test_the_context_refuses_a_foreign_thread(driver: FakeDriver) -> None:
    context = CudaContext(0)
    try:
        with pytest.raises(CudaThreadError, match="CUDA context: push called from thread 'mqtt'"):
            run_on_thread(context.push, "mqtt")
        with pytest.raises(CudaThreadError, match="CUDA context: close"):
            run_on_thread(context.close, "mqtt")
        assert not context.closed and driver.pycuda_stack == []
        with context.active():
            assert driver.pycuda_stack != []
    finally:
        context.close()
    assert context.closed and driver.driver_stack == [] and driver.pycuda_stack == []


def test_a_thread_reusing_a_dead_owners_ident_is_still_refused(driver: FakeDriver) -> None:
    # Python hands a finished thread's ident to the next thread; ownership must not follow the number.
    made: dict[str, Any] = {}
    owner = threading.Thread(target=lambda: made.update(buffer=DeviceBuffer(16), ident=threading.get_ident()),
                             name="inference")
    owner.start()
    owner.join()
    buffer = made["buffer"]
    try:
        for _ in range(200):  # usually the first new thread already gets the same ident
            seen: dict[str, Any] = {}

            def body(seen: dict[str, Any] = seen) -> None:
                seen["ident"] = threading.get_ident()
                try:
                    buffer.free()
                except CudaThreadError as exc:
                    seen["refused"] = str(exc)

            worker = threading.Thread(target=body, name="successor")
            worker.start()
            worker.join()
            if seen["ident"] == made["ident"]:
                break
        else:
            pytest.skip("no new thread got the dead owner's ident here (the reuse this test is about)")
        assert "free called from thread 'successor'" in seen.get("refused", ""), seen
        assert not buffer.freed
    finally:
        # Cleanup only: nobody can free a dead thread's resource, so hand it to this thread.
        buffer._owner = threading.current_thread()
        buffer.free()
