"""The one small interface every inference backend implements, and what opening one takes.

A backend owns `slots` input buffers (host memory; pinned for TensorRT). The preprocess stage writes a
frame into a free slot's buffer in place, the inference stage runs that slot: with two slots, frame N+1
is preprocessed while frame N is on the GPU (double buffering), and no frame is ever copied into a new
array on the way.

Threading contract: a backend is created, used and closed on ONE thread (the inference thread), which
owns any CUDA context. `input_buffer(slot)` arrays may be *written* from another thread, never resized.

The defect map (where the model looked, bundle/format.py DEFECT_MAP_NAME) is optional twice over: a backend
may offer it (`DefectMapBackend.run_with_map`, both registered backends do) and a model may have it (bundles
from schema version 3). `run_slot` asks for it where it is offered and gives None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from bundle.format import Bundle


@runtime_checkable
class InferenceBackend(Protocol):
    name: str  # "tensorrt" or "onnxruntime"
    model_id: str  # bundle model id or engine id, recorded with every inspection
    slots: int

    def input_buffer(self, slot: int) -> np.ndarray:
        """The (1, C, H, W) float32 host buffer of `slot`, to be filled in place."""
        ...

    def run(self, slot: int) -> np.ndarray:
        """Logits (1, 2) for the frame in `slot` (a fresh array the caller may keep)."""
        ...

    def close(self) -> None:
        """Free every buffer, stream and context now (not at garbage collection)."""
        ...


@runtime_checkable
class DefectMapBackend(Protocol):
    """A backend that can also give the model's defect map with the logits, from the same run."""

    def run_with_map(self, slot: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (1, 2) and defect map (1, h, w) float32 for the frame in `slot`, fresh arrays the caller may
        keep; None in place of the map when the model has none."""
        ...


def run_slot(backend: InferenceBackend, slot: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and defect map of `slot` (run_with_map), or the logits and None from a backend without maps."""
    if isinstance(backend, DefectMapBackend):
        return backend.run_with_map(slot)
    return backend.run(slot), None


@dataclass(frozen=True)
class BackendRequest:
    """What any backend needs to open (from `[model]` and `[inference]`); see registry.py for who opens it."""

    bundle: Bundle
    engine_dir: Path  # model.engine_dir: where `make engine` installs engines
    precision: str  # inference.precision: the engine's ("fp16", "int8", "fp32")
    threads: int = 2  # inference.threads: CPU threads of a CPU backend
    slots: int = 3  # input slots: two for double buffering, one spare for the inference thread
    allow_other_gpu_model: bool = False  # inference.allow_other_gpu_model
