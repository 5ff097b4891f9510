"""CUDA resources through pycuda: pinned and device buffers, streams, the context and its owning thread.

These need pycuda and an NVIDIA GPU, not TensorRT (tools/gpu_session/pycuda_check.sh runs them on a lent
GPU machine); elsewhere they skip with the reason. The last tests run everywhere: they check the failure
path of a machine without pycuda, which CUDA errors are fatal, and the context bookkeeping against a small
stand-in for pycuda's driver module that models its context stack (pycuda src/cpp/cuda.hpp).
"""

from __future__ import annotations

import ctypes
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from bundle.errors import GpuUnavailableError
from engines import cuda_memory
from engines.cuda_memory import (
    FATAL_CUDA_ERRORS,
    CudaContext,
    CudaFatalError,
    CudaStream,
    CudaThreadError,
    DeviceBuffer,
    PinnedHostBuffer,
    copy_dtoh_async,
    copy_htod_async,
    cuda_available,
    fatal_cuda_error,
    live_resources,
)
from tests.support.threads import run_on_thread

SHAPE = (1, 3, 64, 64)  # one small preprocessed frame


def require_gpu() -> None:
    ok, reason = cuda_available()
    if not ok:
        pytest.skip(f"needs pycuda and an NVIDIA GPU: run on a Jetson or a GPU machine ({reason})")


@pytest.fixture
def ctx() -> Iterator[CudaContext]:
    """The primary context, current on this (the test's) thread for the whole test."""
    require_gpu()
    context = CudaContext(0)
    context.push()
    yield context
    context.close()


class FrameBuffers:
    """One frame's worth of the backend's resources: pinned in and out, device in and out, one stream."""

    def __init__(self, shape: tuple[int, ...] = SHAPE) -> None:
        self.host_in = PinnedHostBuffer(shape, np.float32)
        self.host_out = PinnedHostBuffer(shape, np.float32)
        self.dev_in = DeviceBuffer(self.host_in.nbytes)
        self.dev_out = DeviceBuffer(self.host_out.nbytes)
        self.stream = CudaStream()

    def free(self) -> None:
        for resource in (self.stream, self.dev_out, self.dev_in, self.host_out, self.host_in):
            resource.free()


@pytest.fixture
def buffers(ctx: CudaContext) -> Iterator[FrameBuffers]:
    made = FrameBuffers()
    yield made
    made.free()


AFFINE_KERNEL = """
__global__ void affine(float *y, const float *x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * x[i] + 1.0f;
}
"""


@pytest.mark.gpu
def test_pinned_round_trip_through_the_device_returns_the_input(buffers: FrameBuffers) -> None:
    # given a frame in pinned memory
    frame = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.copyto(buffers.host_in.array, frame)
    # when it goes to the device and back on one stream
    copy_htod_async(buffers.dev_in, buffers.host_in, buffers.stream)
    copy_dtoh_async(buffers.host_out, buffers.dev_in, buffers.stream)
    buffers.stream.synchronize()
    # then it comes back bit for bit
    np.testing.assert_array_equal(buffers.host_out.array, frame)


@pytest.mark.gpu
def test_writing_into_the_pinned_array_in_place_is_what_gets_copied(buffers: FrameBuffers) -> None:
    pinned = buffers.host_in.array
    address = pinned.ctypes.data
    for value in (1.0, 2.5, -7.0):
        # the preprocess stage writes into the pinned memory, never binds a new array
        np.copyto(buffers.host_in.array, np.full(SHAPE, value, np.float32))
        copy_htod_async(buffers.dev_in, buffers.host_in, buffers.stream)
        copy_dtoh_async(buffers.host_out, buffers.dev_in, buffers.stream)
        buffers.stream.synchronize()
        assert np.all(buffers.host_out.array == value)
    assert buffers.host_in.array is pinned and pinned.ctypes.data == address
    with pytest.raises(AttributeError):
        buffers.host_in.array = np.zeros(SHAPE, np.float32)  # type: ignore[misc]


@pytest.mark.gpu
def test_kernel_between_the_copies_runs_100_frames_without_allocating(ctx: CudaContext, buffers: FrameBuffers) -> None:
    from pycuda.compiler import SourceModule

    affine = SourceModule(AFFINE_KERNEL).get_function("affine")
    affine.prepare("PPi")
    n = int(np.prod(SHAPE))
    block = (256, 1, 1)
    grid = ((n + block[0] - 1) // block[0], 1)
    rng = np.random.default_rng(1)

    def one_frame(x: np.ndarray) -> np.ndarray:
        np.copyto(buffers.host_in.array, x)
        copy_htod_async(buffers.dev_in, buffers.host_in, buffers.stream)
        affine.prepared_async_call(grid, block, buffers.stream.raw, buffers.dev_out.ptr, buffers.dev_in.ptr, n)
        copy_dtoh_async(buffers.host_out, buffers.dev_out, buffers.stream)
        buffers.stream.synchronize()
        return buffers.host_out.array

    one_frame(np.zeros(SHAPE, np.float32))  # warm-up: the module loads on its first launch
    resources_before = live_resources()
    free_before, _total = ctx.memory_info()
    for _ in range(100):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        np.testing.assert_allclose(one_frame(x), 2.0 * x + 1.0, rtol=1e-6, atol=1e-6)
    free_after, _total = ctx.memory_info()
    assert live_resources() == resources_before
    # The driver may round its figure to pages; a leak of one frame buffer per iteration would be ~5 MB.
    assert abs(free_after - free_before) <= 2 * 1024 * 1024


@pytest.mark.gpu
def test_context_lives_its_whole_life_on_a_worker_thread() -> None:
    require_gpu()
    # The main thread does nothing CUDA here: the worker creates, uses and closes everything.
    frame = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)

    def inference_thread() -> np.ndarray:
        context = CudaContext(0)
        with context.active():
            made = FrameBuffers()
            np.copyto(made.host_in.array, frame)
            copy_htod_async(made.dev_in, made.host_in, made.stream)
            copy_dtoh_async(made.host_out, made.dev_in, made.stream)
            made.stream.synchronize()
            result = made.host_out.array.copy()
            made.free()
        context.close()
        return result

    before = live_resources()
    np.testing.assert_array_equal(run_on_thread(inference_thread, "inference"), frame)
    assert live_resources() == before


@pytest.mark.gpu
def test_buffer_used_from_another_thread_is_refused_clearly(buffers: FrameBuffers) -> None:
    def copy_from_camera_thread() -> None:
        copy_htod_async(buffers.dev_in, buffers.host_in, buffers.stream)

    with pytest.raises(CudaThreadError) as err:
        run_on_thread(copy_from_camera_thread, "camera")
    message = str(err.value)
    assert "'camera'" in message and "MainThread" in message and "inference thread" in message
    assert isinstance(err.value, GpuUnavailableError)  # the station's GPU-failure path catches it too
    with pytest.raises(CudaThreadError):
        run_on_thread(buffers.dev_in.free, "camera")
    assert not buffers.dev_in.freed


@pytest.mark.gpu
def test_another_thread_may_write_the_pinned_array_but_not_free_it(buffers: FrameBuffers) -> None:
    # The preprocess thread fills the slot; the inference thread copies it.
    run_on_thread(lambda: np.copyto(buffers.host_in.array, np.full(SHAPE, 3.0, np.float32)), "preprocess")
    copy_htod_async(buffers.dev_in, buffers.host_in, buffers.stream)
    copy_dtoh_async(buffers.host_out, buffers.dev_in, buffers.stream)
    buffers.stream.synchronize()
    assert np.all(buffers.host_out.array == 3.0)
    with pytest.raises(CudaThreadError):
        run_on_thread(buffers.host_in.free, "preprocess")


@pytest.mark.gpu
def test_context_refuses_a_foreign_thread() -> None:
    require_gpu()
    context = CudaContext(0)
    try:
        with pytest.raises(CudaThreadError, match="CUDA context"):
            run_on_thread(context.push, "mqtt")
        with pytest.raises(CudaThreadError):
            run_on_thread(context.close, "mqtt")
    finally:
        context.close()
    assert context.closed


def driver_context_stack_depth() -> int:
    """How many contexts the CUDA driver holds on this thread's stack (popped one by one, then pushed back)."""
    lib = ctypes.CDLL("libcuda.so.1")
    pop = getattr(lib, "cuCtxPopCurrent_v2", None) or lib.cuCtxPopCurrent
    push = getattr(lib, "cuCtxPushCurrent_v2", None) or lib.cuCtxPushCurrent
    popped = []
    while True:
        current = ctypes.c_void_p()
        assert lib.cuCtxGetCurrent(ctypes.byref(current)) == 0
        if not current.value:
            break
        assert pop(ctypes.byref(current)) == 0
        popped.append(current.value)
    for handle in reversed(popped):
        assert push(ctypes.c_void_p(handle)) == 0
    return len(popped)


@pytest.mark.gpu
def test_open_close_cycles_leave_the_context_stack_depth_unchanged() -> None:
    require_gpu()

    def cycles() -> tuple[int, int]:
        before = driver_context_stack_depth()
        for _ in range(5):  # the supervisor reopens the backend after every GPU loss
            context = CudaContext(0)
            with context.active():
                buffer = DeviceBuffer(64)
                buffer.free()
            context.close()
        return before, driver_context_stack_depth()

    # a fresh thread (as the inference thread is) and the main thread
    before, after = run_on_thread(cycles, "inference")
    assert before == after == 0
    before, after = cycles()
    assert after == before


@pytest.mark.gpu
def test_free_twice_is_harmless(ctx: CudaContext) -> None:
    before = live_resources()
    made = FrameBuffers()
    made.free()
    made.free()
    assert live_resources() == before
    with pytest.raises(GpuUnavailableError, match="after free"):
        _ = made.dev_in.ptr
    with pytest.raises(GpuUnavailableError, match="after free"):
        _ = made.host_in.array
    ctx.close()
    ctx.close()
    assert ctx.closed


@pytest.mark.gpu
def test_impossible_allocation_is_a_gpu_unavailable_error_naming_the_operation(ctx: CudaContext) -> None:
    _free, total = ctx.memory_info()
    with pytest.raises(GpuUnavailableError, match="device allocation"):
        DeviceBuffer(total * 4)


@pytest.mark.gpu
def test_copy_larger_than_the_destination_is_refused(buffers: FrameBuffers) -> None:
    small = DeviceBuffer(16)
    try:
        with pytest.raises(ValueError, match="16-byte"):
            copy_htod_async(small, buffers.host_in, buffers.stream)
    finally:
        small.free()


# --- everywhere: the machine without pycuda ------------------------------------------------------------


@pytest.fixture
def without_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, module, None)


def test_cuda_available_says_why_not(without_pycuda: None) -> None:
    ok, reason = cuda_available()
    assert not ok and "pycuda is not importable" in reason


@pytest.mark.parametrize(
    "make",
    [lambda: CudaContext(0), lambda: PinnedHostBuffer(SHAPE), lambda: DeviceBuffer(64), CudaStream],
    ids=["context", "pinned", "device", "stream"],
)
def test_resources_without_pycuda_raise_gpu_unavailable(without_pycuda: None, make: Callable[[], Any]) -> None:
    with pytest.raises(GpuUnavailableError, match="pycuda is not importable"):
        make()


# --- everywhere: which CUDA errors end the process's use of the GPU ------------------------------------------


@pytest.mark.parametrize(
    ("message", "fatal"),
    [
        # pycuda: "<routine> failed: <cuGetErrorString>"
        ("cuStreamSynchronize failed: an illegal memory access was encountered", "cudaErrorIllegalAddress (700)"),
        ("cuMemcpyDtoHAsync failed: unspecified launch failure", "cudaErrorLaunchFailure (719)"),
        # TensorRT's logger
        ("IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (an illegal memory access was encountered)",
         "cudaErrorIllegalAddress (700)"),
        ("[defaultAllocator.cpp::deallocate::42] Error Code 1: Cuda Runtime (misaligned address)",
         "cudaErrorMisalignedAddress (716)"),
        ("CUDA error CUDA_ERROR_LAUNCH_FAILED in a kernel", "cudaErrorLaunchFailure (719)"),
        ("cudaErrorIllegalInstruction", "cudaErrorIllegalInstruction (715)"),
        # recoverable: the next try in the same process may work
        ("cuMemAlloc failed: out of memory", None),
        ("cuLaunchKernel failed: too many resources requested for launch", None),
        ("cuInit failed: no CUDA-capable device is detected", None),
        ("explicit_context_dependent failed: invalid device context", None),
        ("TensorRT execution failed: no error logged", None),
    ],
)
def test_fatal_cuda_errors_are_told_from_recoverable_ones(message: str, fatal: str | None) -> None:
    assert fatal_cuda_error(message) == fatal


def test_the_fatal_list_holds_the_codes_named_by_the_review() -> None:
    assert FATAL_CUDA_ERRORS[700][0] == "cudaErrorIllegalAddress"
    assert FATAL_CUDA_ERRORS[719][:2] == ("cudaErrorLaunchFailure", "CUDA_ERROR_LAUNCH_FAILED")
    assert 2 not in FATAL_CUDA_ERRORS  # cudaErrorMemoryAllocation: recoverable


class FakeDriver(types.ModuleType):
    """pycuda.driver as far as these tests reach: the device, errors, streams, and the primary context with
    pycuda's stack semantics (a per-thread pycuda stack mirrored on the driver's, and `detach()` of a primary
    context that pushes it and releases it without popping when it is not current)."""

    class Error(Exception):
        pass

    class LaunchError(Error):
        pass

    device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT")

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.driver_stack: list[object] = []  # what cuCtxGetCurrent sees (one thread in these tests)
        self.pycuda_stack: list[object] = []
        self.retains = self.detaches = 0
        self.stream_error: Exception | None = None
        driver = self

        class Context:
            def push(self) -> None:
                if driver.pycuda_stack:  # prepare_context_switch
                    driver.driver_stack.pop()
                driver.driver_stack.append(self)
                driver.pycuda_stack.append(self)

            def detach(self) -> None:
                driver.detaches += 1
                if not (driver.pycuda_stack and driver.pycuda_stack[-1] is self):
                    driver.driver_stack.append(self)  # cuCtxPushCurrent, then cuDevicePrimaryCtxRelease

            @staticmethod
            def get_current() -> object | None:
                return driver.pycuda_stack[-1] if driver.pycuda_stack else None

            @staticmethod
            def pop() -> None:
                driver.driver_stack.pop()
                driver.pycuda_stack.pop()
                if driver.pycuda_stack:
                    driver.driver_stack.append(driver.pycuda_stack[-1])

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Orin"

            def compute_capability(self) -> tuple[int, int]:
                return 8, 7

            def get_attribute(self, attribute: str) -> int:
                return 16

            def retain_primary_context(self) -> Context:
                driver.retains += 1
                return Context()

        class Stream:
            handle = 1234

            def synchronize(self) -> None:
                if driver.stream_error is not None:
                    raise driver.stream_error

        self.Context, self.Device, self.Stream = Context, Device, Stream

    def init(self) -> None:
        pass


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    driver = FakeDriver()
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(cuda_memory, "_primary", {})
    return driver


def test_the_primary_context_is_retained_once_and_every_cycle_pops_what_it_pushed(fake_driver: FakeDriver) -> None:
    for _ in range(5):
        context = CudaContext(0)
        with context.active():
            assert fake_driver.driver_stack == [fake_driver.pycuda_stack[-1]]
        context.push()  # a push left open is popped by close()
        context.close()
        assert fake_driver.driver_stack == [] and fake_driver.pycuda_stack == []
    # retained once for the process and never detached: pycuda's detach of a primary context would leave it on
    # the driver's stack, one entry per backend reopened after a GPU loss
    assert fake_driver.retains == 1 and fake_driver.detaches == 0


def test_a_fatal_cuda_error_is_a_cuda_fatal_error_a_recoverable_one_is_not(fake_driver: FakeDriver) -> None:
    stream = CudaStream()
    try:
        fake_driver.stream_error = FakeDriver.LaunchError("cuStreamSynchronize failed: unspecified launch failure")
        fatal = r"stream synchronize failed.*\[fatal: cudaErrorLaunchFailure \(719\)\]"
        with pytest.raises(CudaFatalError, match=fatal):
            stream.synchronize()
        # same pycuda class, recoverable code: the GPU may be retried in this process
        fake_driver.stream_error = FakeDriver.LaunchError("cuLaunchKernel failed: too many resources requested")
        with pytest.raises(GpuUnavailableError) as err:
            stream.synchronize()
        assert not isinstance(err.value, CudaFatalError)
    finally:
        stream.free()


def test_the_multiprocessor_count_is_read_from_the_device(fake_driver: FakeDriver) -> None:
    assert cuda_memory.device_multiprocessors(0) == 16
