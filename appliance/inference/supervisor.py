"""Which backend runs, and what happens when the GPU goes: owned by the inference thread.

- `tensorrt` / `auto`: the TensorRT engine on the GPU. When it is unusable (no TensorRT, no CUDA
  device, engine for another GPU, a CUDA error mid-run) the station switches within one part to the
  CPU fallback (`inference.cpu_fallback = true` and a FP32 ONNX in the bundle) or to manual_fallback
  (every part `manual_required`, with the reason), and retries the GPU with capped exponential backoff,
  returning to production by itself when it works.
- `onnxruntime`: the bundle's FP32 ONNX on the CPU; a failure there is retried the same way.
- A fatal CUDA error (illegal address, launch failure: `engines.cuda_memory.FATAL_CUDA_ERRORS`) leaves this
  process's CUDA context unusable, so retrying in the same process can never succeed: the part at hand still
  goes to the fallback, then `fatal` holds the reason, no retry follows, and a `cuda_fatal` event asks for
  the restart (the runtime then exits with EXIT_CUDA_FATAL and systemd starts a fresh process).

Every switch is an event (`gpu_lost`, `gpu_back`, `cpu_fallback`, `backend_failed`, `cuda_fatal`) handed to
`on_event`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from appliance.inference.backend import InferenceBackend
from appliance.threads import EXIT_CUDA_FATAL
from bundle.errors import ApplianceError
from engines.cuda_memory import fatal_cuda_error

BackendFactory = Callable[[], InferenceBackend]
EventSink = Callable[[str, dict[str, Any]], None]


class BackendSupervisor:
    def __init__(
        self,
        primary: BackendFactory,
        primary_name: str,
        fallback: BackendFactory | None,
        on_event: EventSink,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        primary_gpu: bool | None = None,
    ) -> None:
        """`primary_gpu`: the primary runs on the GPU (registry entry's `gpu`; left out: named "tensorrt"),
        so its loss and return are reported as gpu_lost / gpu_back."""
        self._primary = primary
        self.primary_name = primary_name
        self.primary_gpu = primary_name == "tensorrt" if primary_gpu is None else primary_gpu
        self._fallback = fallback
        self._on_event = on_event
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._clock = clock
        self.backend: InferenceBackend | None = None
        self.on_primary = False
        self.why_no_model = ""
        self._delay = retry_initial_s
        self._next_retry = 0.0
        self.generation = 0  # bumps on every backend change: slot buffers of older generations are stale
        # Set after a fatal CUDA error: why this process must be restarted to use the GPU again.
        self.fatal: str | None = None

    def start(self) -> None:
        """Bring up the primary backend, or the fallback path if it cannot start."""
        try:
            self._install(self._primary(), primary=True)
        except Exception as exc:
            self._degrade(exc, at_start=True)

    def failed(self, exc: BaseException) -> None:
        """The running backend raised: drop it, go to the fallback path, schedule a retry."""
        self._close_backend()
        self._degrade(exc, at_start=False)

    def maybe_retry(self) -> bool:
        """Retry the primary backend when its backoff has elapsed; True when it came back."""
        if self.on_primary or self.fatal is not None or self._clock() < self._next_retry:
            return False
        try:
            backend = self._primary()
        except Exception as exc:
            self._schedule_retry()
            self.why_no_model = self.why_no_model or _describe(exc)
            self._check_fatal(_describe(exc))
            return False
        self._close_backend()
        self._install(backend, primary=True)
        self._delay = self._retry_initial
        self._on_event("gpu_back" if self.primary_gpu else "backend_back",
                       {"backend": backend.name, "model_id": backend.model_id})
        return True

    def close(self) -> None:
        self._close_backend()

    # --- internals ---------------------------------------------------------------------------------
    def _install(self, backend: InferenceBackend, primary: bool) -> None:
        self.backend = backend
        self.on_primary = primary
        self.generation += 1
        if primary:
            self.why_no_model = ""

    def _degrade(self, exc: BaseException, at_start: bool) -> None:
        reason = _describe(exc)
        lost = "gpu_lost" if self.primary_gpu else "backend_failed"
        self._on_event(lost, {"backend": self.primary_name, "reason": reason, "at_start": at_start})
        self._schedule_retry()
        self.on_primary = False
        if self._fallback is not None:
            try:
                self._install(self._fallback(), primary=False)
            except Exception as fallback_exc:
                reason = f"{reason}; CPU fallback failed too: {_describe(fallback_exc)}"
            else:
                self.why_no_model = ""
                self._on_event("cpu_fallback", {"backend": self.backend.name, "reason": reason})
                self._check_fatal(reason)
                return
        self.backend = None
        self.generation += 1
        label = "GPU unavailable" if self.primary_gpu else "inference unavailable"
        self.why_no_model = f"{label}: {reason}"
        self._on_event("manual_fallback", {"reason": self.why_no_model})
        self._check_fatal(_describe(exc))

    def _check_fatal(self, reason: str) -> None:
        """After the fallback is in place: a fatal CUDA error in `reason` ends the GPU's use by this process."""
        error = fatal_cuda_error(reason)
        if error is None or self.fatal is not None:
            return
        self.fatal = f"fatal CUDA error {error}, the process must restart to use the GPU again: {reason}"
        self._on_event("cuda_fatal", {"backend": self.primary_name, "error": error, "reason": reason,
                                      "exit_code": EXIT_CUDA_FATAL})

    def _schedule_retry(self) -> None:
        self._next_retry = self._clock() + self._delay
        self._delay = min(self._delay * 2, self._retry_max)

    def _close_backend(self) -> None:
        if self.backend is not None:
            # A dying CUDA context may refuse to free; the station keeps inspecting regardless.
            with contextlib.suppress(Exception):
                self.backend.close()
            self.backend = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApplianceError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
