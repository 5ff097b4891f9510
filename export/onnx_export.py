"""PyTorch -> ONNX (opset 17, named input and outputs, dynamic batch), checked and compared with PyTorch.

The exported graph has two outputs: `logits` (N, 2), exactly what training's forward computes, and
`defect_map` (N, h, w), where the model looked (bundle/format.py, DEFECT_MAP_NAME). The map comes from an
export-only wrapper (`WithDefectMap`) around the trained classifier: training's forward and checkpoints do not
change.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bundle.errors import BundleError
from bundle.format import DEFECT_MAP_NAME, INPUT_NAME, OUTPUT_NAME
from bundle.onnx_runtime import OnnxRuntimeBackend

OPSET = 17
# Defect map checks, all on one measure (map_difference): the largest |map difference| over a set of images,
# relative to the set's map magnitude max(1, max |reference map|). Relative to the set, not to each cell or
# image: a cell is a 1280-term sum whose terms cancel (their absolute sum reached 6x the map's largest value on
# the demo model), so its rounding error follows the scale of the features, the same for every image, not its
# own value, which may be near zero. Per comparison:
# - PyTorch against ONNX Runtime FP32: the same float32 network, additions in another order. The logits' 1e-3
#   absolute holds values of a few units; map cells reach several times that (|map| up to ~15 on the demo
#   model), hence relative. Measured: 1.2e-5 (demo model, 160 px, 5x5 map).
MAP_PARITY_RELATIVE = 1e-3
# - ONNX Runtime FP16 against FP32: rounding. As engines/validate.py bounds FP16 logits: n roundings of a layer
#   output by FP16's unit roundoff u = 2^-11 add up to n*u (Higham), with n = 64 layer outputs -> 2^-5.
#   Measured: 0.8 % (demo model).
# - ONNX Runtime INT8 against FP32: not rounding but the quantization itself, which moves maps much more than
#   logits (no pooling averages it out): measured 16 to 31 % on the demo model (percentile calibration, the
#   first 6 convolutions float), so half the magnitude. It cannot tell a good INT8 map from a mediocre one (the
#   measured figure is recorded in the metadata for that); it stops a map that is not the model's at all: all
#   zeros, or another image's, differs by about the whole magnitude.
MAP_RELATIVE = {"fp16": 64 * 2.0**-11, "int8": 0.5}


class WithDefectMap(nn.Module):
    """Export wrapper: the trained DefectClassifier's logits, and its defect map, from one pass of the features.

    The map is the class activation map (Zhou et al. 2016, "Learning Deep Features for Discriminative
    Localization", CVPR) of the defect-vs-ok logit difference: the Linear head applied at every location of the
    last feature maps F (N, 1280, h, w) before the global average pool,

        defect_map[n, y, x] = sum_c (W[defect, c] - W[ok, c]) * F[n, c, y, x] + (b[defect] - b[ok]).

    The bias difference is included so that the map's spatial mean is exactly the part's logit difference,
    logits[n, defect] - logits[n, ok] (pooling and the linear head commute; dropout is the identity at
    inference): the map is in the units the part is judged in (its softmax defect score is
    sigmoid(mean(map))), a cell reads as "the logit difference this part would get if it looked like this
    location everywhere", and a consumer can check a map against its logits. The bias is one constant per
    model: it moves no peak.

    Computed as a MatMul with the head's weight difference (a constant after folding): INT8 quantization
    (export/quantize.py) leaves MatMul nodes, like the head's Gemm, in float, and counts only convolutions.
    """

    def __init__(self, classifier: nn.Module, defect_index: int = 1) -> None:
        super().__init__()
        self.classifier = classifier
        self.defect_index = defect_index

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.classifier
        features = c.features(x)
        # Training's forward, step by step, on the same features: the logits path is unchanged.
        logits = c.head(c.dropout(torch.flatten(c.pool(features), 1)))
        ok_index = 1 - self.defect_index
        weight = c.head.weight[self.defect_index] - c.head.weight[ok_index]  # (C,)
        bias = c.head.bias[self.defect_index] - c.head.bias[ok_index]
        # (N, h, w, C) @ (C, 1): one MatMul over the channels at every location; h and w stay static in the graph.
        cam = torch.matmul(features.permute(0, 2, 3, 1), weight.view(-1, 1)).squeeze(-1) + bias
        return logits, cam


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path, defect_index: int = 1) -> Path:
    """Write the FP32 ONNX graph (logits, defect_map) with a dynamic batch axis and validate it with onnx.checker."""
    import onnx

    wrapper = WithDefectMap(model.eval().cpu(), defect_index).eval()
    dummy = torch.zeros(1, *input_shape)
    with torch.no_grad():
        shapes = [tuple(t.shape[1:]) for t in wrapper(dummy)]
    outputs = [OUTPUT_NAME, DEFECT_MAP_NAME]
    with warnings.catch_warnings():
        # The TorchScript exporter is chatty about constant folding of the static SAME padding.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy,), str(path), input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    graph_model = onnx.load(str(path))
    # The exporter names the map's static axes after the nodes that made them (even "batch" for h): declare
    # (batch, h, w) as they are, the shape TensorRT and the bundle metadata read.
    for output, shape in zip(graph_model.graph.output, shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for size in shape:
            dims.add().dim_value = int(size)
    try:
        onnx.checker.check_model(graph_model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"exported ONNX {path} fails onnx.checker: {exc}") from exc
    onnx.save(graph_model, str(path))
    return path


def map_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| / max(1, max |reference|) over a set of maps: what every map check bounds."""
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if candidate.shape != reference.shape:
        return float("inf")
    return float(np.max(np.abs(candidate - reference)) / max(1.0, float(np.max(np.abs(reference)))))


def check_map(reference: np.ndarray, candidate: np.ndarray | None, tolerance: float, what: str) -> float:
    """map_difference of `candidate` maps against `reference`; BundleError naming `what` above `tolerance`."""
    if candidate is None:
        raise BundleError(f"{what} has no {DEFECT_MAP_NAME!r} output")
    diff = map_difference(reference, candidate)
    if not np.isfinite(diff) or diff > tolerance:
        raise BundleError(
            f"{what} disagrees on the defect map: max |difference| {diff:.3g} of the maps' magnitude > {tolerance:.3g}",
            hint="a larger share than FP16's or INT8's rounding explains: re-export; for INT8 keep more "
            "convolutions float (--int8-float-convs) or leave INT8 out (--no-int8)",
        )
    return diff


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


@torch.no_grad()
def map_parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, tolerance: float = MAP_PARITY_RELATIVE,
               defect_index: int = 1) -> float:
    """map_difference between the defect maps of PyTorch (WithDefectMap) and ONNX Runtime on real inputs;
    BundleError above `tolerance` or when the ONNX model has no map."""
    torch_map = WithDefectMap(model.eval().cpu(), defect_index).eval()(torch.from_numpy(inputs))[1].numpy()
    _, ort_map = OnnxRuntimeBackend(onnx_path).infer_with_map(inputs)
    return check_map(torch_map, ort_map, tolerance, f"ONNX model {onnx_path} (against PyTorch)")
