"""CUDA resources through pycuda: the context, pinned host buffers, device buffers, streams, and copies.

The only module that imports pycuda, always inside a function: importing it works on a machine without
pycuda or a GPU, and the binding could be swapped (NVIDIA's samples moved to cuda-python) in this one place.

One class per resource, created once, freed explicitly (`free()`, `close()` for the context) instead of by
the garbage collector, which may run on another thread or after the context is gone. One thread, the
inference thread, owns the context and every resource made in it; CUDA calls from any other thread fail
with "invalid device context" at best, so each resource records its creating thread and refuses CUDA work
from another one with `CudaThreadError`. Host memory is plain memory: another thread may *write* into a
pinned buffer's `.array` (the preprocess stage does), but not copy, free or launch with it.

Every pycuda failure (pycuda._driver.Error and its LogicError, MemoryError, RuntimeError, LaunchError)
becomes a `GpuUnavailableError` naming the operation, so the station can fall back and say why. The "sticky"
ones (an illegal address, a launch failure: `FATAL_CUDA_ERRORS`) become `CudaFatalError`: after them every
CUDA call in this process fails the same way, so only a new process gets the GPU back.

The device's primary context is retained once per process and never released: pycuda's `detach()` of a
retained primary context pushes it on the thread's context stack and releases it without popping it
(pycuda src/cpp/cuda.hpp, `context::detach` with `primary_context::detach_internal` =
`cuDevicePrimaryCtxRelease`), so every open/close cycle of a backend would leave one more entry behind.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from bundle.errors import GpuUnavailableError

_PYCUDA_HINT = (
    "pycuda is built from source against the installed CUDA (on a Jetson: JetPack's CUDA, see "
    "provisioning/README.md); it needs an NVIDIA driver and GPU"
)
_THREAD_HINT = (
    "create, use and free CUDA resources on the inference thread only; other threads hand frames to it "
    "through a queue"
)

# Resources created and not yet freed, by kind: lets tests and diagnostics prove that the frame loop
# allocates nothing, without relying on the driver's memory figures alone.
_live: dict[str, int] = {"pinned": 0, "device": 0, "stream": 0}
_live_lock = threading.Lock()


def _count(kind: str, delta: int) -> None:
    with _live_lock:
        _live[kind] += delta


def live_resources() -> dict[str, int]:
    """How many pinned buffers, device buffers and streams are allocated and not yet freed."""
    with _live_lock:
        return dict(_live)


class CudaThreadError(GpuUnavailableError):
    """A CUDA resource was used from a thread other than the one that owns it (a bug in the caller)."""


class CudaFatalError(GpuUnavailableError):
    """A CUDA error that leaves this process's CUDA context unusable: only a new process gets the GPU back."""


# The CUDA errors after which, in the words of the CUDA Runtime API reference (enum cudaError), "the process
# [is] in an inconsistent state and any further CUDA work will return the same error. To continue using CUDA,
# the process must be terminated and relaunched." Code: (runtime API name, driver API name, the text
# cudaGetErrorString / cuGetErrorString give, which is what pycuda's and TensorRT's messages quote).
FATAL_CUDA_ERRORS: dict[int, tuple[str, str, str]] = {
    700: ("cudaErrorIllegalAddress", "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"),
    702: ("cudaErrorLaunchTimeout", "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"),
    710: ("cudaErrorAssert", "CUDA_ERROR_ASSERT", "device-side assert triggered"),
    714: ("cudaErrorHardwareStackError", "CUDA_ERROR_HARDWARE_STACK_ERROR", "hardware stack error"),
    715: ("cudaErrorIllegalInstruction", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"),
    716: ("cudaErrorMisalignedAddress", "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"),
    717: ("cudaErrorInvalidAddressSpace", "CUDA_ERROR_INVALID_ADDRESS_SPACE",
          "operation not supported on global/shared address space"),
    718: ("cudaErrorInvalidPc", "CUDA_ERROR_INVALID_PC", "invalid program counter"),
    719: ("cudaErrorLaunchFailure", "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"),
}
_FATAL_PATTERNS = [
    (code, re.compile("|".join(re.escape(term) for term in terms), re.IGNORECASE))
    for code, terms in FATAL_CUDA_ERRORS.items()
]


def fatal_cuda_error(text: str) -> str | None:
    """The fatal CUDA error `text` reports, as "cudaErrorIllegalAddress (700)", or None when it names none.

    Read from the message because that is all pycuda's exceptions (whose classes mix fatal and recoverable
    codes: LaunchError also covers "too many resources requested") and TensorRT's logger hand over.
    """
    for code, pattern in _FATAL_PATTERNS:
        if pattern.search(text):
            return f"{FATAL_CUDA_ERRORS[code][0]} ({code})"
    return None


def _driver() -> ModuleType:
    """pycuda.driver, imported on first use; GpuUnavailableError when pycuda or libcuda is missing."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:  # no pycuda, or its extension cannot load libcuda.so.1
        raise GpuUnavailableError(f"pycuda is not importable: {exc}", hint=_PYCUDA_HINT) from exc
    return cuda


@contextmanager
def _cuda_call(operation: str) -> Iterator[None]:
    """Turn a pycuda error inside the block into GpuUnavailableError naming `operation`."""
    cuda = _driver()
    try:
        yield
    except cuda.Error as exc:
        message = f"CUDA {operation} failed: {type(exc).__name__}: {exc}"
        fatal = fatal_cuda_error(str(exc))
        if fatal is not None:
            raise CudaFatalError(f"{message} [fatal: {fatal}]",
                                 hint="this process can no longer use the GPU: restart it") from exc
        raise GpuUnavailableError(message) from exc


def cuda_available() -> tuple[bool, str]:
    """Whether pycuda imports and sees a CUDA device; the reason when not (for logs and test skips)."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return False, f"pycuda is not importable ({exc})"
    try:
        cuda.init()
        count = cuda.Device.count()
        if count == 0:
            return False, "pycuda imports but the CUDA driver reports no device"
        return True, f"{count} CUDA device(s), device 0: {cuda.Device(0).name()}"
    except cuda.Error as exc:
        return False, f"the CUDA driver did not initialise ({type(exc).__name__}: {exc})"


def device_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device; needs no context."""
    cuda = _driver()
    with _cuda_call("driver initialisation"):
        cuda.init()
        count = cuda.Device.count()
    if not 0 <= device_index < count:
        raise GpuUnavailableError(f"CUDA device {device_index} does not exist: the driver reports {count} device(s)")
    with _cuda_call(f"query of device {device_index}"):
        device = cuda.Device(device_index)
        major, minor = device.compute_capability()
        return device.name(), f"{major}.{minor}"


def device_multiprocessors(device_index: int = 0) -> int:
    """How many streaming multiprocessors the device has; with the name, tells GPU models apart that share a
    compute capability (AGX Orin 16, Orin NX and Orin Nano 8 or 4)."""
    cuda = _driver()
    with _cuda_call(f"query of device {device_index}"):
        cuda.init()
        return int(cuda.Device(device_index).get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT))


def driver_cuda_version() -> str:
    """The CUDA version the installed driver supports, e.g. "12.6" (for engine manifests)."""
    cuda = _driver()
    with _cuda_call("driver version query"):
        cuda.init()
        version = int(cuda.get_driver_version())  # e.g. 12060
    return f"{version // 1000}.{(version % 1000) // 10}"


class _ThreadBound:
    """Base of every resource: remembers the creating thread and refuses CUDA work from another one."""

    _what = "CUDA resource"

    def __init__(self) -> None:
        # The Thread object, not get_ident(): Python reuses an ident once its thread has ended, so a thread
        # started after the owner died could pass an ident check and hit "invalid device context" instead.
        self._owner = threading.current_thread()
        self._owner_name = self._owner.name

    def _check_thread(self, operation: str) -> None:
        if threading.current_thread() is not self._owner:
            raise CudaThreadError(
                f"{self._what}: {operation} called from thread {threading.current_thread().name!r}, but the "
                f"resource belongs to thread {self._owner_name!r} (the one that created it)",
                hint=_THREAD_HINT,
            )


# device index -> pycuda's handle on the retained primary context, for the life of the process.
_primary: dict[int, Any] = {}
_primary_lock = threading.Lock()


def _primary_context(device_index: int) -> Any:
    """The primary context of a device, retained on first use and kept: see the module docstring."""
    cuda = _driver()
    with _primary_lock:
        ctx = _primary.get(device_index)
        if ctx is None:
            with _cuda_call(f"retaining the primary context of device {device_index}"):
                ctx = cuda.Device(device_index).retain_primary_context()
            _primary[device_index] = ctx
        return ctx


class CudaContext(_ThreadBound):
    """The primary context of one device, made current on the owning thread when needed; `close()` ends its use.

    The primary context is the one the CUDA runtime (and so TensorRT) uses by default: using it rather than
    creating a private one means TensorRT and our buffers share a context. It is retained once per process
    and shared by every CudaContext of the device (a backend reopened after a GPU loss gets the same one).
    It is not current after construction: make it current with `push()`/`pop()` or, better,
    `with ctx.active():`.
    """

    _what = "CUDA context"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        self.device_index = device_index
        self.device_name, self.compute_capability = device_identity(device_index)
        self._ctx: Any = _primary_context(device_index)
        self._depth = 0  # pushes not yet popped, so close() can unwind what this object pushed

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def _require_open(self, operation: str) -> None:
        self._check_thread(operation)
        if self._ctx is None:
            raise GpuUnavailableError(f"CUDA context of device {self.device_index}: {operation} after close()")

    def push(self) -> None:
        """Make this context current on the owning thread (pair every push with a pop)."""
        self._require_open("push")
        with _cuda_call("context push"):
            self._ctx.push()
        self._depth += 1

    def pop(self) -> None:
        """Undo the matching push()."""
        self._require_open("pop")
        if self._depth == 0:
            raise GpuUnavailableError("CUDA context pop without a matching push")
        cuda = _driver()
        with _cuda_call("context pop"):
            # pycuda pops whatever is on top of its per-thread stack: refuse rather than pop someone else's.
            current = cuda.Context.get_current()
            if current is None or current != self._ctx:
                raise GpuUnavailableError("CUDA context pop: another context is current (pushes and pops interleaved)")
            cuda.Context.pop()
        self._depth -= 1

    @contextmanager
    def active(self) -> Iterator[CudaContext]:
        """This context current for the duration of the block, popped afterwards even on error."""
        self.push()
        try:
            yield self
        finally:
            self.pop()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, as the driver reports it."""
        cuda = _driver()
        with self.active(), _cuda_call("memory query"):
            free, total = cuda.mem_get_info()
        return int(free), int(total)

    def close(self) -> None:
        """Pop what this object pushed, leaving the thread's context stack as it found it; harmless when closed.

        The primary context itself stays retained for the process (see the module docstring): free every
        buffer and stream made through this object first, nothing frees them later.
        """
        if self._ctx is None:
            return
        self._check_thread("close")
        while self._depth:
            self.pop()
        self._ctx = None


class PinnedHostBuffer(_ThreadBound):
    """Page-locked host memory as a numpy array: the only host memory an async copy really overlaps with.

    Fill it in place (`np.copyto(buf.array, frame)` or `out=buf.array`); binding a new array to a variable
    that held `.array` silently bypasses the pinned memory, so `.array` has no setter.
    """

    _what = "pinned host buffer"

    def __init__(self, shape: Sequence[int], dtype: np.dtype[Any] | type = np.float32) -> None:
        super().__init__()
        cuda = _driver()
        shape_t = tuple(int(d) for d in shape)
        with _cuda_call(f"pinned host allocation {shape_t} {np.dtype(dtype)}"):
            self._array: np.ndarray | None = cuda.pagelocked_empty(shape_t, np.dtype(dtype))
        _count("pinned", +1)

    @property
    def array(self) -> np.ndarray:
        """The numpy view of the pinned memory (the same object every time); any thread may write into it."""
        if self._array is None:
            raise GpuUnavailableError("pinned host buffer used after free()")
        return self._array

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @property
    def freed(self) -> bool:
        return self._array is None

    def free(self) -> None:
        """Release the pinned memory now; harmless when already freed. Nobody may hold `.array` after this."""
        if self._array is None:
            return
        self._check_thread("free")
        allocation = self._array.base  # pycuda's HostAllocation behind the numpy view
        self._array = None
        _count("pinned", -1)
        with _cuda_call("pinned host free"):
            allocation.free()


class DeviceBuffer(_ThreadBound):
    """`nbytes` of device memory; `.ptr` is the address TensorRT and kernels take."""

    _what = "device buffer"

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        if nbytes <= 0:
            raise ValueError(f"device buffer size must be positive, got {nbytes}")
        cuda = _driver()
        with _cuda_call(f"device allocation of {nbytes} bytes"):
            self._alloc: Any = cuda.mem_alloc(nbytes)
        self.nbytes = nbytes
        _count("device", +1)

    @property
    def ptr(self) -> int:
        if self._alloc is None:
            raise GpuUnavailableError("device buffer used after free()")
        return int(self._alloc)

    @property
    def freed(self) -> bool:
        return self._alloc is None

    def free(self) -> None:
        """Release the device memory now; harmless when already freed."""
        if self._alloc is None:
            return
        self._check_thread("free")
        alloc, self._alloc = self._alloc, None
        _count("device", -1)
        with _cuda_call("device free"):
            alloc.free()


class CudaStream(_ThreadBound):
    """One CUDA stream: the queue the copies and the inference of a frame go through in order."""

    _what = "CUDA stream"

    def __init__(self) -> None:
        super().__init__()
        cuda = _driver()
        with _cuda_call("stream creation"):
            self._stream: Any = cuda.Stream()
        _count("stream", +1)

    @property
    def handle(self) -> int:
        """The cudaStream_t as an int (what `execute_async_v3` takes)."""
        return int(self._require("handle").handle)

    @property
    def raw(self) -> Any:
        """The pycuda Stream, for kernel launches (`stream=`); do not keep it beyond `free()`."""
        return self._require("raw")

    @property
    def freed(self) -> bool:
        return self._stream is None

    def _require(self, operation: str) -> Any:
        if self._stream is None:
            raise GpuUnavailableError(f"CUDA stream: {operation} after free()")
        return self._stream

    def synchronize(self) -> None:
        """Wait until everything queued on the stream has finished."""
        stream = self._require("synchronize")
        self._check_thread("synchronize")
        with _cuda_call("stream synchronize"):
            stream.synchronize()

    def free(self) -> None:
        """Destroy the stream now; harmless when already freed."""
        if self._stream is None:
            return
        self._check_thread("free")
        # pycuda has no explicit destroy: dropping the only reference runs cuStreamDestroy right here
        # (CPython reference counting), on this thread and while the context is still alive.
        self._stream = None
        _count("stream", -1)


def copy_htod_async(dst: DeviceBuffer, src: PinnedHostBuffer, stream: CudaStream) -> None:
    """Queue a copy of all of `src` into the start of `dst` on `stream` (returns before it is done)."""
    for resource in (dst, src, stream):
        resource._check_thread("host-to-device copy")
    if src.nbytes > dst.nbytes:
        raise ValueError(f"host-to-device copy of {src.nbytes} bytes into a {dst.nbytes}-byte device buffer")
    cuda = _driver()
    with _cuda_call(f"host-to-device copy of {src.nbytes} bytes"):
        cuda.memcpy_htod_async(dst.ptr, src.array, stream.raw)


def copy_dtoh_async(dst: PinnedHostBuffer, src: DeviceBuffer, stream: CudaStream) -> None:
    """Queue a copy filling all of `dst` from the start of `src` on `stream` (synchronize before reading)."""
    for resource in (dst, src, stream):
        resource._check_thread("device-to-host copy")
    if dst.nbytes > src.nbytes:
        raise ValueError(f"device-to-host copy of {dst.nbytes} bytes from a {src.nbytes}-byte device buffer")
    cuda = _driver()
    with _cuda_call(f"device-to-host copy of {dst.nbytes} bytes"):
        cuda.memcpy_dtoh_async(dst.array, src.ptr, stream.raw)
