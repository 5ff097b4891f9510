"""INT8 explicit quantization on the CPU: a Q/DQ ONNX that TensorRT's ONNX parser accepts.

TensorRT takes only symmetric quantization (every zero point 0), so activations and weights are both
symmetric INT8, weights per output channel. Following NVIDIA's ModelOpt recipe, only convolutions are
quantized (TensorRT fuses the rest around them), biases stay float, and the Linear(1280, 2) head stays
float: it is tiny, and at batch 1 its matmul has a dimension of 1, where INT8 gains nothing and costs
accuracy. So does the defect map's MatMul (the same head weights at every location, export/onnx_export.py):
every Gemm and MatMul is left float, and only convolutions are counted. Calibration images go through
exactly the runtime preprocessing.

The first few convolutions stay float too (FLOAT_CONVS, in graph order): on ELPV the per-tensor INT8
activations of the stem and the first two blocks, at full resolution and with few channels, cost the
shipped Lite0 1.5 points of test ROC-AUC (0.9161 against FP32's 0.9307) and doubled its false-positive
rate at a threshold fitted to INT8 scores; keeping those 6 of its 49 convolutions float gave 0.9304, INT8
scores within 0.009 of FP32's on average (README, "INT8 accuracy"). Later convolutions quantize with little
loss.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bundle.errors import BundleError
from bundle.preprocess import PreprocessSpec, preprocess_batch

QUANTIZED_OPS = ("Conv",)
# ONNX Runtime's histogram calibrators (percentile, entropy) keep every activation of every calibration
# image in memory before binning: about 95 MB per 300x300 image for EfficientNet-Lite0, so 256 images
# exhausted a 24 GB machine. They get at most this many images; minmax streams and takes any number.
HISTOGRAM_MAX_IMAGES = 64
FLOAT_CONVS = 6


class _Calibration:
    """ONNX Runtime CalibrationDataReader over preprocessed frames, a small batch at a time."""

    def __init__(self, input_name: str, frames: Sequence[np.ndarray], spec: PreprocessSpec, batch: int) -> None:
        self._input_name, self._frames, self._spec, self._batch = input_name, frames, spec, batch
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        # Preprocess lazily, batch by batch: a few hundred 224x224 inputs need not sit in memory at once.
        f, n = self._frames, self._batch
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {self._input_name: preprocess_batch(list(f[i : i + n]), self._spec)} for i in range(0, len(f), n)
        )


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    frames: Sequence[np.ndarray],
    spec: PreprocessSpec,
    method: str = "minmax",
    batch: int = 16,
    float_convs: int = FLOAT_CONVS,
) -> dict[str, object]:
    """Write a symmetric Q/DQ INT8 model calibrated on `frames`; return what was done, for metadata.

    The first `float_convs` convolutions in graph order (the stem and the first blocks) stay float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(frames) < 2:
        raise BundleError(f"INT8 calibration needs images; got {len(frames)}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(methods)}")
    if method != "minmax" and len(frames) > HISTOGRAM_MAX_IMAGES:
        # Evenly spaced, so both classes stay represented in the order the caller chose them.
        keep = np.linspace(0, len(frames) - 1, HISTOGRAM_MAX_IMAGES).round().astype(int)
        frames = [frames[i] for i in keep]
    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    head = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]  # logits and defect map
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    if not 0 <= float_convs < len(convs):
        raise BundleError(f"float_convs {float_convs}: {fp32_path} has {len(convs)} convolutions; keep 0 to "
                          f"{len(convs) - 1} of them float")
    float_nodes = convs[:float_convs] + head
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up, as ORT recommends before static quantization.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out_path), _Calibration(input_name, frames, spec, batch),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    problems = check_qdq(out_path)
    if problems:
        raise BundleError(f"INT8 model {out_path} is not TensorRT-compatible: {'; '.join(problems[:5])}")
    return {"calibration_images": len(frames), "calibration_method": method, "format": "QDQ",
            "activations": "int8 symmetric", "weights": "int8 symmetric per-channel",
            "quantized_ops": list(QUANTIZED_OPS), "float_convs": float_convs, "float_nodes": float_nodes,
            "bias": "float"}


def check_qdq(path: Path) -> list[str]:
    """Problems that would make TensorRT reject or mis-read a Q/DQ model (empty list: fine)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        problems.append("no QuantizeLinear/DequantizeLinear nodes")
    for node in qdq:
        if len(node.input) < 3 or node.input[2] not in inits:
            problems.append(f"{node.name}: zero point missing or not a constant")
            continue
        zp = numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.int8:
            problems.append(f"{node.name}: zero point type {zp.dtype}, TensorRT needs int8")
        if np.any(zp != 0):
            problems.append(f"{node.name}: zero point {zp.ravel()[:4]} is not 0 (asymmetric)")
    return problems
