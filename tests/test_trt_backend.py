"""The TensorRT backend: refusals that need no GPU run everywhere; the real path runs where TensorRT is.

Tests marked `gpu` build tiny engines with TensorRT's network API (no ONNX needed) and skip with the
reason on machines without TensorRT, pycuda or a CUDA device.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from appliance.inference.backend import InferenceBackend
from bundle.errors import GpuUnavailableError
from engines.build import network_creation_flags
from engines.cuda_memory import CudaThreadError, live_resources
from engines.manifest import DeviceInfo, EngineManifest, manifest_path, write_manifest
from engines.plan import BuildRequest, plan_build
from engines.runner import TensorRTBackend
from engines.tensorrt import device_info

ORIN = DeviceInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
REPO = Path(__file__).resolve().parents[1]


def write_engine(folder: Path, blob: bytes, device: DeviceInfo = ORIN, **overrides: object) -> Path:
    """An engine file and the manifest that describes it, as `make engine` leaves them."""
    engine = folder / "model.engine"
    engine.write_bytes(blob)
    values: dict[str, object] = dict(
        bundle_name="tiny",
        bundle_model_id="tiny@0123456789ab",
        onnx_sha256="a" * 64,
        precision="fp32",
        tensorrt_version=device.tensorrt_version,
        cuda_version="12.6",
        l4t_version=None,
        gpu_name=device.gpu_name,
        compute_capability=device.compute_capability,
        gpu_multiprocessors=device.gpu_multiprocessors,
        dla_core=None,
        build_options={},
        built_utc="2026-11-20T10:00:00Z",
        build_seconds=1.0,
        engine_sha256=hashlib.sha256(blob).hexdigest(),
        input_name="image",
        output_name="logits",
        input_shape=[1, 3, 8, 8],
    )
    values.update(overrides)
    write_manifest(manifest_path(engine), EngineManifest.model_validate(values))
    return engine


@pytest.fixture
def without_gpu_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any import of tensorrt or pycuda fails from here on, as on a PC: proves what a code path touches."""
    for module in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, module, None)


# --- everywhere ----------------------------------------------------------------------------------------


def test_backend_modules_import_without_tensorrt_or_pycuda() -> None:
    # A fresh interpreter: other tests in this session may have imported pycuda legitimately.
    code = (
        "import sys, engines.runner, engines.cuda_memory, engines.manifest\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_backend_without_tensorrt_names_the_jetpack_package(tmp_path: Path, without_gpu_stack: None) -> None:
    # given a proper engine and manifest, on a machine without TensorRT's Python bindings
    engine = write_engine(tmp_path, b"engine bytes")
    # when the station opens the TensorRT backend
    with pytest.raises(GpuUnavailableError) as err:
        TensorRTBackend(engine)
    # then the message says where the bindings come from and how the venv must be made
    message = str(err.value)
    assert message.startswith("TensorRT Python bindings not importable")
    assert "python3-libnvinfer" in message and "--system-site-packages" in message


def test_backend_without_tensorrt_fails_the_same_with_no_engine_at_all(
    tmp_path: Path, without_gpu_stack: None
) -> None:
    # `make engine` needs TensorRT too, so the missing bindings are the first thing to fix.
    with pytest.raises(GpuUnavailableError, match="python3-libnvinfer"):
        TensorRTBackend(tmp_path / "missing.engine")


def test_engine_from_other_tensorrt_is_refused_before_tensorrt_is_touched(
    tmp_path: Path, without_gpu_stack: None
) -> None:
    # given an engine whose manifest says TensorRT 10.3.0, and a device with 10.7.0
    engine = write_engine(tmp_path, b"engine bytes", tensorrt_version="10.3.0")
    device = ORIN.model_copy(update={"tensorrt_version": "10.7.0"})
    # when the backend opens it (tensorrt and pycuda imports would fail: see the fixture)
    with pytest.raises(GpuUnavailableError) as err:
        TensorRTBackend(engine, device=device)
    # then the refusal is the version mismatch, not an import error: TensorRT was never reached
    message = str(err.value)
    assert "engine built with TensorRT 10.3.0, this device has 10.7.0: rebuild with `make engine`" in message
    assert str(engine) in message
    assert "python3-libnvinfer" not in message


def test_engine_for_other_gpu_is_refused_before_tensorrt_is_touched(tmp_path: Path, without_gpu_stack: None) -> None:
    engine = write_engine(tmp_path, b"engine bytes")  # built on an Orin (8.7)
    h100 = DeviceInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(GpuUnavailableError, match=r"compute capability 8\.7 \(Orin\), this GPU is 9\.0 \(NVIDIA H100"):
        TensorRTBackend(engine, device=h100)


def test_engine_without_manifest_is_refused_naming_the_manifest(tmp_path: Path, without_gpu_stack: None) -> None:
    engine = write_engine(tmp_path, b"engine bytes")
    manifest_path(engine).unlink()
    with pytest.raises(GpuUnavailableError, match="manifest") as err:
        TensorRTBackend(engine, device=ORIN)
    assert str(manifest_path(engine)) in str(err.value)


def test_missing_engine_is_refused_with_the_build_command(tmp_path: Path, without_gpu_stack: None) -> None:
    with pytest.raises(GpuUnavailableError, match="does not exist") as err:
        TensorRTBackend(tmp_path / "model.engine", device=ORIN)
    assert "make engine" in str(err.value)


def test_engine_replaced_after_its_manifest_is_refused(tmp_path: Path, without_gpu_stack: None) -> None:
    # given an engine copied over without its manifest (a classic manual "update")
    engine = write_engine(tmp_path, b"engine bytes")
    engine.write_bytes(b"another engine")
    # then its bytes no longer match the manifest, and it is refused before deserializing
    with pytest.raises(GpuUnavailableError, match="changed after its manifest"):
        TensorRTBackend(engine, device=ORIN)


def test_engine_for_another_gpu_model_of_the_same_compute_capability_is_refused(
    tmp_path: Path, without_gpu_stack: None
) -> None:
    # given an engine built on an AGX Orin (16 multiprocessors) and an Orin NX (8) with the same TensorRT
    engine = write_engine(tmp_path, b"engine bytes", gpu_multiprocessors=16)
    orin_nx = ORIN.model_copy(update={"gpu_multiprocessors": 8})
    # then it is refused before TensorRT deserializes it, naming the setting that would allow it
    with pytest.raises(GpuUnavailableError, match=r"inference\.allow_other_gpu_model = true") as err:
        TensorRTBackend(engine, device=orin_nx)
    assert "16 multiprocessors, this one has 8" in str(err.value)
    # and with the setting, the next step is TensorRT itself (not installed here)
    with pytest.raises(GpuUnavailableError, match="python3-libnvinfer"):
        TensorRTBackend(engine, device=orin_nx, allow_other_gpu_model=True)


def test_the_station_setting_reaches_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import runtime
    from appliance.settings import StationSettings

    assert StationSettings().inference.allow_other_gpu_model is False  # refused unless a station says otherwise
    seen: dict[str, object] = {}

    class Recorder:
        def __init__(self, engine: Path, **kwargs: object) -> None:
            seen.update(kwargs)

    monkeypatch.setattr("engines.runner.TensorRTBackend", Recorder)
    monkeypatch.setattr("engines.tensorrt.device_info", lambda: ORIN)
    monkeypatch.setattr("appliance.inference.tensorrt.find_engine",
                        lambda folder, bundle, precision, device: tmp_path / "model.engine")
    settings = StationSettings(inference={"backend": "tensorrt", "allow_other_gpu_model": True},
                               mqtt={"enabled": False})
    events: list[str] = []
    supervisor = runtime.supervisor_factory(settings, bundle=_NoFallbackBundle())(lambda kind, d: events.append(kind))
    supervisor.start()
    assert seen["allow_other_gpu_model"] is True and supervisor.on_primary and events == []


class _NoFallbackBundle:
    def has(self, role: str) -> bool:
        return False


def test_dla_core_for_a_gpu_engine_is_refused_before_tensorrt_is_touched(
    tmp_path: Path, without_gpu_stack: None
) -> None:
    engine = write_engine(tmp_path, b"engine bytes", dla_core=None)
    with pytest.raises(GpuUnavailableError, match="GPU only"):
        TensorRTBackend(engine, dla_core=0, device=ORIN)


def test_compatible_engine_then_needs_tensorrt(tmp_path: Path, without_gpu_stack: None) -> None:
    # Every check that needs no GPU passes; the next step is TensorRT itself.
    engine = write_engine(tmp_path, b"engine bytes")
    with pytest.raises(GpuUnavailableError, match="python3-libnvinfer"):
        TensorRTBackend(engine, device=ORIN)


def test_slots_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slots"):
        TensorRTBackend(tmp_path / "model.engine", slots=0, device=ORIN)


# --- on a GPU with TensorRT ----------------------------------------------------------------------------

WEIGHTS = np.array([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], np.float32)  # (C=3, classes=2)


def reference_logits(frame: np.ndarray) -> np.ndarray:
    """What the tiny engine computes: the per-channel mean of the frame times WEIGHTS."""
    return frame.mean(axis=(2, 3)) @ WEIGHTS


def build_tiny_engine(trt: ModuleType, dynamic_batch: bool) -> bytes:
    """image (N, 3, 8, 8) -> mean over H, W -> matmul WEIGHTS -> logits (N, 2), built on this GPU."""
    # The plan's rules for this TensorRT: EXPLICIT_BATCH on 8.x (JetPack 5.1: 8.5, JetPack 6.0: 8.6), where
    # flags 0 would make an implicit-batch network; FP32 with TF32 cleared, so the 1e-4 comparisons hold.
    plan = plan_build(str(trt.__version__), BuildRequest("fp32"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt, plan))
    image = network.add_input("image", trt.float32, (-1 if dynamic_batch else 1, 3, 8, 8))
    pooled = network.add_reduce(image, trt.ReduceOperation.AVG, (1 << 2) | (1 << 3), False)
    weights = network.add_constant(WEIGHTS.shape, trt.Weights(WEIGHTS))
    logits = network.add_matrix_multiply(
        pooled.get_output(0), trt.MatrixOperation.NONE, weights.get_output(0), trt.MatrixOperation.NONE
    ).get_output(0)
    logits.name = "logits"
    network.mark_output(logits)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 26)
    for flag in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if dynamic_batch:
        profile = builder.create_optimization_profile()
        profile.set_shape("image", (1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None, "TensorRT failed to build the tiny test engine"
    return bytes(blob)


@pytest.fixture(scope="module")
def engines(trt: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    here = device_info()
    paths = {}
    for kind, dynamic in (("static", False), ("dynamic", True)):
        folder = tmp_path_factory.mktemp(kind)
        shape = [-1, 3, 8, 8] if dynamic else [1, 3, 8, 8]
        paths[kind] = write_engine(folder, build_tiny_engine(trt, dynamic), device=here, input_shape=shape)
    return paths


@pytest.fixture
def backend(engines: dict[str, Path]) -> Iterator[TensorRTBackend]:
    opened = TensorRTBackend(engines["static"], slots=2)
    yield opened
    opened.close()


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)


@pytest.mark.gpu
def test_backend_is_an_inference_backend(backend: TensorRTBackend) -> None:
    assert isinstance(backend, InferenceBackend)
    assert backend.name == "tensorrt" and backend.slots == 2
    assert backend.model_id.startswith("tiny@0123456789ab/trt-fp32@")


@pytest.mark.gpu
def test_each_slot_gives_the_logits_of_its_own_frame(backend: TensorRTBackend) -> None:
    # given two different frames written into the two pinned slots
    frames = [frame(1), frame(2)]
    for slot, f in enumerate(frames):
        np.copyto(backend.input_buffer(slot), f)
    # when each slot runs
    outputs = [backend.run(slot) for slot in (1, 0)]
    # then each result is that frame's logits, as float32 (1, 2) arrays the caller owns
    np.testing.assert_allclose(outputs[0], reference_logits(frames[1]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs[1], reference_logits(frames[0]), rtol=1e-4, atol=1e-5)
    assert outputs[0].shape == (1, 2) and outputs[0].dtype == np.float32
    assert not np.shares_memory(outputs[0], outputs[1])


@pytest.mark.gpu
def test_dynamic_batch_engine_runs_one_frame(engines: dict[str, Path]) -> None:
    with TensorRTBackend(engines["dynamic"], slots=1) as dynamic:
        assert dynamic.input_buffer(0).shape == (1, 3, 8, 8)
        np.copyto(dynamic.input_buffer(0), frame(3))
        np.testing.assert_allclose(dynamic.run(0), reference_logits(frame(3)), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_frames_are_written_into_the_pinned_buffer_not_rebound(backend: TensorRTBackend) -> None:
    buffer = backend.input_buffer(0)
    address = buffer.ctypes.data
    for seed in range(5):
        np.copyto(backend.input_buffer(0), frame(seed))
        np.testing.assert_allclose(backend.run(0), reference_logits(frame(seed)), rtol=1e-4, atol=1e-5)
    assert backend.input_buffer(0) is buffer and buffer.ctypes.data == address


@pytest.mark.gpu
def test_running_allocates_nothing(backend: TensorRTBackend) -> None:
    np.copyto(backend.input_buffer(0), frame(4))
    backend.run(0)  # warm-up: lazy module loading happens on the first execution
    before = live_resources()
    for _ in range(200):
        backend.run(0)
    assert live_resources() == before


@pytest.mark.gpu
def test_running_from_another_thread_is_refused(backend: TensorRTBackend) -> None:
    caught: list[BaseException] = []

    def wrong_thread() -> None:
        try:
            backend.run(0)
        except BaseException as exc:
            caught.append(exc)

    worker = threading.Thread(target=wrong_thread, name="camera")
    worker.start()
    worker.join()
    assert len(caught) == 1 and isinstance(caught[0], CudaThreadError)
    assert "'camera'" in str(caught[0])
    backend.run(0)  # the owning thread still runs it


@pytest.mark.gpu
def test_close_frees_everything_once(engines: dict[str, Path]) -> None:
    before = live_resources()
    opened = TensorRTBackend(engines["static"], slots=3)
    assert live_resources()["pinned"] == before["pinned"] + 4  # three input slots and the output
    opened.close()
    opened.close()
    assert live_resources() == before
    with pytest.raises(GpuUnavailableError, match="after close"):
        opened.run(0)


@pytest.mark.gpu
def test_corrupt_engine_is_refused_with_tensorrt_own_words(trt: ModuleType, tmp_path: Path) -> None:
    engine = write_engine(tmp_path, np.random.default_rng(0).bytes(4096), device=device_info())
    before = live_resources()
    with pytest.raises(GpuUnavailableError, match="could not deserialize"):
        TensorRTBackend(engine)
    assert live_resources() == before


@pytest.mark.gpu
def test_stale_engine_is_refused_on_the_real_device(engines: dict[str, Path], tmp_path: Path) -> None:
    blob = engines["static"].read_bytes()
    engine = write_engine(tmp_path, blob, device=device_info(), tensorrt_version="8.6.2")
    with pytest.raises(GpuUnavailableError, match=r"engine built with TensorRT 8\.6\.2"):
        TensorRTBackend(engine)


@pytest.mark.gpu
def test_engine_from_another_gpu_model_is_refused_on_the_real_device(engines: dict[str, Path], tmp_path: Path) -> None:
    here = device_info()
    blob = engines["static"].read_bytes()
    engine = write_engine(tmp_path, blob, device=here, gpu_name=f"not {here.gpu_name}")
    with pytest.raises(GpuUnavailableError, match="allow_other_gpu_model"):
        TensorRTBackend(engine)
    with TensorRTBackend(engine, allow_other_gpu_model=True) as allowed:
        np.copyto(allowed.input_buffer(0), frame(5))
        np.testing.assert_allclose(allowed.run(0), reference_logits(frame(5)), rtol=1e-4, atol=1e-5)
