"""PyTorch -> ONNX (opset 17, named input/output, dynamic batch), checked and compared with PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bundle.errors import BundleError
from bundle.format import INPUT_NAME, OUTPUT_NAME
from bundle.onnx_runtime import OnnxRuntimeBackend

OPSET = 17


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """Write the FP32 ONNX graph with a dynamic batch axis and validate it with onnx.checker."""
    import onnx

    model = model.eval().cpu()
    dummy = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter is chatty about constant folding of the static SAME padding.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"exported ONNX {path} fails onnx.checker: {exc}") from exc
    return path


@torch.no_grad()
def parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, tolerance: float = 1e-3) -> float:
    """Max |logit difference| between PyTorch and ONNX Runtime on real inputs; BundleError above tolerance."""
    torch_out = model.eval().cpu()(torch.from_numpy(inputs)).numpy()
    ort_out = OnnxRuntimeBackend(onnx_path).infer(inputs)
    diff = float(np.max(np.abs(torch_out - ort_out)))
    if not np.isfinite(diff) or diff > tolerance:
        raise BundleError(
            f"ONNX model {onnx_path} disagrees with PyTorch: max |logit difference| {diff:.3g} > {tolerance}"
        )
    return diff
