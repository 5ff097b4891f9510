"""ONNX Runtime on the CPU: the backend for stations without a usable GPU, and the reference runner.

export/ uses the same class to produce the bundle's reference outputs, so "what ONNX Runtime says" means
one thing everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle.errors import BundleError
from bundle.format import DEFECT_MAP_NAME


class OnnxRuntimeBackend:
    """One ONNX model in an ONNX Runtime CPU session; `infer` maps (N, C, H, W) float32 to logits.

    A model with a `defect_map` output (bundles from schema version 3) also gives its defect map through
    `infer_with_map` and `run_with_map`; for an older model those give None in its place. `infer` and `run` ask
    ONNX Runtime for the logits alone.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int = 2, slots: int = 3, model_id: str = "",
                 spin: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError("onnxruntime is not installed", hint="pip install -e '.[cpu]'") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A quiet log: ORT warns about initializers in graph inputs for every exported model.
        opts.log_severity_level = 3
        if not spin:
            # ORT's intra-op workers spin after each call by default, burning the core that the camera and
            # preprocessing threads need; in the station pipeline that cost ~25 % of throughput on 2 cores.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile)
            raise BundleError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        # The map's output name, when the model has it: then one session.run fetches both.
        self.defect_map_name = DEFECT_MAP_NAME if DEFECT_MAP_NAME in outputs[1:] else None
        self._with_map = [self.output_name, DEFECT_MAP_NAME] if self.defect_map_name else [self.output_name]
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.name
        # (C, H, W) from the graph; the batch axis is dynamic.
        chw = tuple(d if isinstance(d, int) else -1 for d in inp.shape[1:])
        self.slots = slots
        self._buffers = [np.zeros((1, *chw), np.float32) for _ in range(slots)] if -1 not in chw else []

    def input_buffer(self, slot: int) -> np.ndarray:
        return self._buffers[slot]

    def run(self, slot: int) -> np.ndarray:
        return self.infer(self._buffers[slot])

    def run_with_map(self, slot: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (1, 2) and defect map (1, h, w) of the frame in `slot`; None for the map of a model without one."""
        return self.infer_with_map(self._buffers[slot])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch of preprocessed frames."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def infer_with_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, 2), defect maps (N, h, w) float32 or None) for a batch, from one pass of the model.

        Both are ONNX Runtime's own fresh arrays: nothing is copied, the caller may keep them.
        """
        out = self.session.run(self._with_map, {self.input_name: batch})
        return out[0], (out[1] if len(out) > 1 else None)

    def close(self) -> None:
        self.session = None
        self._buffers = []
