"""TensorRT on the station's GPU: one engine, one execution context, pinned input slots, one stream.

TensorRT 10 named-tensor API (also TensorRT 11: what changed there, weakly typed build flags, does not
touch the runtime). The engine's manifest is checked against this device before TensorRT deserializes
anything, so a stale engine fails with "built with TensorRT X, this device has Y" instead of TensorRT's
"Version tag does not match".

Threading: the backend is created, run and closed on ONE thread, the inference thread, which owns the CUDA
context (engines.cuda_memory refuses CUDA work from any other thread). The preprocess stage may write
into `input_buffer(slot)` from its own thread: it is pinned host memory, filled in place.

Everything is allocated once in the constructor; `run()` allocates nothing on the GPU or in pinned memory.

Outputs: `logits` (1, classes), and `defect_map` (1, h, w) when the engine has it (built from a bundle of
schema version 3, bundle/format.py). An engine must have an address for every I/O tensor before it runs, so
the map is bound whenever it exists, and `run_with_map` copies it back on the same stream as the logits,
before the one synchronize. Named tensors throughout: TensorRT 8.5/8.6 (JetPack 5.1/6.0) have the same
calls (`num_io_tensors`, `get_tensor_mode`, `set_tensor_address`, `execute_async_v3`) as 10.x.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from bundle.errors import GpuUnavailableError
from bundle.format import DEFECT_MAP_NAME
from engines.cuda_memory import (
    CudaContext,
    CudaFatalError,
    CudaStream,
    DeviceBuffer,
    PinnedHostBuffer,
    copy_dtoh_async,
    copy_htod_async,
    fatal_cuda_error,
)
from engines.manifest import (
    REBUILD,
    DeviceInfo,
    EngineManifest,
    advisories,
    incompatibilities,
    load_manifest,
    manifest_path,
)
from engines.tensorrt import device_info, import_tensorrt, make_logger

log = logging.getLogger(__name__)

class TensorRTBackend:
    """A serialized TensorRT engine run one frame at a time through pinned, double-buffered input slots."""

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        slots: int = 2,
        device_index: int = 0,
        dla_core: int | None = None,
        *,
        device: DeviceInfo | None = None,
        allow_other_gpu_model: bool = False,
    ) -> None:
        """Check the engine against the device, then deserialize it and allocate every buffer once.

        `device` replaces the query of this device (TensorRT version, GPU) for the compatibility check: for a
        caller that already has it, and for tests. Left out, TensorRT is imported first, so a machine without
        it gets the JetPack hint before anything else. `allow_other_gpu_model` (`inference.allow_other_gpu_model`)
        accepts an engine built on another GPU model of the same compute capability, which TensorRT warns against.
        """
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.engine_path = Path(engine_path)
        self.slots = slots
        # Every resource starts as None so close() can run after a failure at any step.
        self._cuda: CudaContext | None = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._exec: Any = None
        self._h_inputs: list[PinnedHostBuffer] = []
        self._d_input: DeviceBuffer | None = None
        self._h_output: PinnedHostBuffer | None = None
        self._d_output: DeviceBuffer | None = None
        self._h_map: PinnedHostBuffer | None = None  # only for an engine with a defect map
        self._d_map: DeviceBuffer | None = None
        self._stream: CudaStream | None = None
        self.defect_map_name: str | None = None
        self.defect_map_shape: tuple[int, ...] | None = None

        if device is None:
            device = device_info(device_index)
        self.device = device
        self.allow_other_gpu_model = allow_other_gpu_model
        self.manifest = self._checked_manifest(device, dla_core)
        blob = self._verified_engine_bytes()
        self.dla_core = dla_core if dla_core is not None else self.manifest.dla_core
        m = self.manifest
        self.model_id = f"{m.bundle_model_id}/trt-{m.precision}@{m.engine_sha256[:12]}"

        trt = import_tensorrt()
        self._cuda = CudaContext(device_index)
        try:
            with self._cuda.active():
                self._open(trt, blob)
        except BaseException:
            try:
                self.close()
            except GpuUnavailableError as cleanup:  # the first failure is the one worth reporting
                log.warning("cleanup after a failed open of %s: %s", self.engine_path, cleanup)
            raise

    # --- construction steps, in order ------------------------------------------------------------------

    def _checked_manifest(self, device: DeviceInfo, dla_core: int | None) -> EngineManifest:
        """The engine's manifest, refused when it does not fit this device (no TensorRT call needed)."""
        if not self.engine_path.is_file():
            raise GpuUnavailableError(
                f"TensorRT engine {self.engine_path} does not exist", hint=f"build it on this device: {REBUILD}"
            )
        manifest = load_manifest(manifest_path(self.engine_path))
        problems = incompatibilities(manifest, device, dla_core=dla_core,
                                     allow_other_gpu_model=self.allow_other_gpu_model)
        if problems:
            raise GpuUnavailableError(
                f"TensorRT engine {self.engine_path} cannot run on this device: " + "; ".join(problems),
                hint=f"engines are tied to the TensorRT version and GPU that built them: {REBUILD} on this device",
            )
        for note in advisories(manifest, device):
            log.warning("%s: %s", self.engine_path, note)
        return manifest

    def _verified_engine_bytes(self) -> bytes:
        """The engine file, refused when it is not the one its manifest describes."""
        blob = self.engine_path.read_bytes()
        actual = hashlib.sha256(blob).hexdigest()
        if actual != self.manifest.engine_sha256:
            raise GpuUnavailableError(
                f"TensorRT engine {self.engine_path} has sha256 {actual[:16]}..., its manifest says "
                f"{self.manifest.engine_sha256[:16]}...: the engine changed after its manifest was written",
                hint=REBUILD,
            )
        return blob

    def _open(self, trt: ModuleType, blob: bytes) -> None:
        """Deserialize, find the tensors, allocate the buffers and bind them (context current)."""
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if self.dla_core is not None:
            available = int(self._runtime.num_DLA_cores)
            if self.dla_core >= available:
                raise GpuUnavailableError(
                    f"engine {self.engine_path} runs on DLA core {self.dla_core}, this device has {available} "
                    "DLA core(s)",
                    hint=f"Orin Nano and Thor have no DLA: {REBUILD} for the GPU",
                )
            # Must be set before deserializing: it picks the DLA core the engine's DLA layers run on.
            self._runtime.DLA_core = self.dla_core
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise GpuUnavailableError(
                f"TensorRT could not deserialize {self.engine_path}: {self._logger.last_error or 'no error logged'}",
                hint=REBUILD,
            )
        self.input_name, self.output_name, self.defect_map_name = self._io_tensor_names(trt)
        self.input_shape, dynamic_batch = self._input_shape(trt)

        self._exec = self._engine.create_execution_context()
        if self._exec is None:
            raise GpuUnavailableError(
                f"TensorRT could not create an execution context for {self.engine_path}: "
                f"{self._logger.last_error or 'no error logged'} (GPU memory exhausted?)"
            )
        # A dynamic-batch engine runs at batch 1 here: fix the shape once, before sizing the output.
        if dynamic_batch and not self._exec.set_input_shape(self.input_name, self.input_shape):
            raise GpuUnavailableError(
                f"TensorRT refused input shape {self.input_shape} for {self.input_name!r}: {self._logger.last_error}"
            )
        self.output_shape = tuple(int(d) for d in self._exec.get_tensor_shape(self.output_name))
        if len(self.output_shape) != 2 or self.output_shape[0] != 1 or min(self.output_shape) < 1:
            raise GpuUnavailableError(
                f"engine {self.engine_path} output {self.output_name!r} has shape {self.output_shape}, "
                "expected (1, classes)",
                hint=REBUILD,
            )
        output_dtype = self._float_dtype(trt, self.output_name, allow_half=True)
        if self.defect_map_name is not None:
            self.defect_map_shape = tuple(int(d) for d in self._exec.get_tensor_shape(self.defect_map_name))
            if len(self.defect_map_shape) != 3 or self.defect_map_shape[0] != 1 or min(self.defect_map_shape) < 1:
                raise GpuUnavailableError(
                    f"engine {self.engine_path} output {self.defect_map_name!r} has shape {self.defect_map_shape}, "
                    "expected (1, height, width)",
                    hint=REBUILD,
                )
            map_dtype = self._float_dtype(trt, self.defect_map_name, allow_half=True)

        # Allocated once, in this order; close() frees in the reverse one.
        for _ in range(self.slots):
            self._h_inputs.append(PinnedHostBuffer(self.input_shape, np.float32))
        self._d_input = DeviceBuffer(self._h_inputs[0].nbytes)
        self._h_output = PinnedHostBuffer(self.output_shape, output_dtype)
        self._d_output = DeviceBuffer(self._h_output.nbytes)
        bindings = [(self.input_name, self._d_input), (self.output_name, self._d_output)]
        if self.defect_map_name is not None and self.defect_map_shape is not None:
            self._h_map = PinnedHostBuffer(self.defect_map_shape, map_dtype)
            self._d_map = DeviceBuffer(self._h_map.nbytes)
            bindings.append((self.defect_map_name, self._d_map))
        self._stream = CudaStream()
        # Every slot is copied into the same device input, so the addresses are bound once for good.
        for tensor, buffer in bindings:
            if not self._exec.set_tensor_address(tensor, buffer.ptr):
                raise GpuUnavailableError(
                    f"TensorRT refused the device address for {tensor!r}: {self._logger.last_error}"
                )

    def _io_tensor_names(self, trt: ModuleType) -> tuple[str, str, str | None]:
        """(input, logits output, defect map output or None) tensor names: the manifest's input and output, and
        the defect map beside them where the engine has one (bundles of schema version 3); nothing else."""
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected_in, expected_out = self.manifest.input_name, self.manifest.output_name
        if inputs != [expected_in] or sorted(outputs) not in ([expected_out], sorted([expected_out, DEFECT_MAP_NAME])):
            raise GpuUnavailableError(
                f"engine {self.engine_path} has inputs {inputs} and outputs {outputs}; its manifest says "
                f"{expected_in!r} -> {expected_out!r} (and optionally {DEFECT_MAP_NAME!r})",
                hint=REBUILD,
            )
        return expected_in, expected_out, (DEFECT_MAP_NAME if DEFECT_MAP_NAME in outputs else None)

    def _input_shape(self, trt: ModuleType) -> tuple[tuple[int, int, int, int], bool]:
        """The (1, C, H, W) shape this backend feeds, and whether the engine's batch axis is dynamic."""
        shape = tuple(int(d) for d in self._engine.get_tensor_shape(self.input_name))
        where = f"engine {self.engine_path} input {self.input_name!r}"
        if len(shape) != 4 or min(shape[1:]) < 1:
            raise GpuUnavailableError(
                f"{where} has shape {shape}: expected (N, C, H, W) with only N dynamic", hint=REBUILD
            )
        if list(shape[1:]) != self.manifest.input_shape[1:]:
            raise GpuUnavailableError(
                f"{where} has shape {shape}, its manifest says {self.manifest.input_shape}", hint=REBUILD
            )
        self._float_dtype(trt, self.input_name, allow_half=False)
        dynamic = shape[0] == -1
        if dynamic:
            low, _opt, high = self._engine.get_tensor_profile_shape(self.input_name, 0)
            if not int(low[0]) <= 1 <= int(high[0]):
                raise GpuUnavailableError(
                    f"{where}: optimization profile batch range {low[0]}..{high[0]} excludes 1", hint=REBUILD
                )
        elif shape[0] != 1:
            raise GpuUnavailableError(
                f"{where} was built for batch {shape[0]}; the station runs one frame at a time", hint=REBUILD
            )
        _, c, h, w = shape
        return (1, c, h, w), dynamic

    def _float_dtype(self, trt: ModuleType, tensor: str, allow_half: bool) -> np.dtype[Any]:
        """The numpy dtype of an I/O tensor: float32 (or float16 for outputs), else a clear refusal."""
        dtype = self._engine.get_tensor_dtype(tensor)
        accepted = (trt.DataType.FLOAT, trt.DataType.HALF) if allow_half else (trt.DataType.FLOAT,)
        if dtype not in accepted:
            raise GpuUnavailableError(
                f"engine {self.engine_path} tensor {tensor!r} is {dtype}; the appliance exchanges float32 "
                "(keep FP32 inputs and outputs when converting or building)",
                hint=REBUILD,
            )
        return np.dtype(trt.nptype(dtype))

    # --- the InferenceBackend interface --------------------------------------------------------------

    def input_buffer(self, slot: int) -> np.ndarray:
        """The pinned (1, C, H, W) float32 array of `slot`: write into it (`np.copyto`), never replace it."""
        return self._input_slot(slot).array

    def run(self, slot: int) -> np.ndarray:
        """Logits (1, classes) float32 for the frame in `slot`: H2D, execute, D2H on one stream, then wait."""
        self._execute(slot, with_map=False)
        # A copy: the pinned output is overwritten by the next frame, the caller may keep this one.
        return self._h_output.array.astype(np.float32, copy=True)  # type: ignore[union-attr]

    def run_with_map(self, slot: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (1, classes) and defect map (1, h, w), float32, for the frame in `slot`; None in place of the
        map for an engine without one. Both copied back on the stream before its one synchronize."""
        self._execute(slot, with_map=True)
        logits = self._h_output.array.astype(np.float32, copy=True)  # type: ignore[union-attr]
        # A copy too (h*w floats, 196 bytes at 7x7): the pinned map is overwritten by the next frame.
        defect_map = None if self._h_map is None else self._h_map.array.astype(np.float32, copy=True)
        return logits, defect_map

    def _execute(self, slot: int, with_map: bool) -> None:
        """H2D of `slot`, execute, D2H of the logits (and of the map when asked and present), then wait."""
        host_input = self._input_slot(slot)
        with self._cuda.active():  # type: ignore[union-attr]  # _input_slot refused a closed backend
            copy_htod_async(self._d_input, host_input, self._stream)
            if not self._exec.execute_async_v3(self._stream.handle):
                detail = self._logger.last_error or "no error logged"
                message = f"TensorRT execution of {self.engine_path} failed: {detail}"
                fatal = fatal_cuda_error(detail)
                if fatal is not None:
                    raise CudaFatalError(f"{message} [fatal: {fatal}]",
                                         hint="this process can no longer use the GPU: restart it")
                raise GpuUnavailableError(message)
            copy_dtoh_async(self._h_output, self._d_output, self._stream)
            if with_map and self._h_map is not None:
                copy_dtoh_async(self._h_map, self._d_map, self._stream)
            self._stream.synchronize()

    def _input_slot(self, slot: int) -> PinnedHostBuffer:
        if self._cuda is None:
            raise GpuUnavailableError(f"TensorRT backend for {self.engine_path} used after close()")
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range: this backend has {self.slots} slot(s)")
        return self._h_inputs[slot]

    def close(self) -> None:
        """Free every buffer, the stream and TensorRT's objects now, in reverse order, then release the context.

        Harmless when already closed. Must run on the inference thread; garbage collection would free
        these on whichever thread it happens to run, possibly after the context is gone.
        """
        cuda = self._cuda
        if cuda is None:
            return
        failures: list[GpuUnavailableError] = []

        def attempt(step: str, action: Any) -> None:
            try:
                action()
            except GpuUnavailableError as exc:  # keep freeing the rest; report the first failure at the end
                log.warning("closing %s: %s failed: %s", self.engine_path, step, exc)
                failures.append(exc)

        with cuda.active():  # raises CudaThreadError on a foreign thread, before anything is freed
            if self._stream is not None:
                # A run that failed half-way may still have copies queued on buffers about to be freed.
                attempt("stream synchronize", self._stream.synchronize)
                attempt("stream", self._stream.free)
            for step, buffer in (("device map", self._d_map), ("pinned map", self._h_map),
                                 ("device output", self._d_output), ("pinned output", self._h_output),
                                 ("device input", self._d_input)):
                if buffer is not None:
                    attempt(step, buffer.free)
            for slot_buffer in reversed(self._h_inputs):
                attempt("pinned input slot", slot_buffer.free)
            # Dropping the last reference destroys each TensorRT object now, while the context is current.
            self._exec = None
            self._engine = None
            self._runtime = None
        self._logger = None
        self._cuda = None
        attempt("context release", cuda.close)
        if failures:
            raise failures[0]

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
