"""Export: trained weights -> model bundle (FP32 ONNX, INT8 Q/DQ ONNX, FP16 ONNX, metadata, golden set)."""
