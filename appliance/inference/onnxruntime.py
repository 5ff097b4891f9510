"""Backend `onnxruntime`: the bundle's FP32 ONNX model on the CPU (bundle.onnx_runtime), for stations without a
usable GPU and as the TensorRT station's CPU fallback. Judged at the bundle's FP32 operating point. Gives the
model's defect map with the logits (`run_with_map`) where the bundle's model has one (schema version 3)."""

from __future__ import annotations

from appliance.inference.backend import BackendRequest, InferenceBackend


def open_backend(request: BackendRequest) -> InferenceBackend:
    from bundle.onnx_runtime import OnnxRuntimeBackend

    bundle = request.bundle
    # spin=False: ORT's spinning workers would take the core the camera and preprocessing threads need.
    return OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=request.threads, slots=request.slots,
                              model_id=bundle.model_id, spin=False)


def decision_precision(configured: str) -> str:
    return "fp32"  # whatever the engine's precision: this backend runs the FP32 model
