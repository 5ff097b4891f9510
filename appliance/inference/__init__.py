"""Inference: the backend protocol (`backend`), the registry of backends by name (`registry`: what
`inference.backend` accepts, which operating point judges each), the ONNX Runtime and TensorRT entries, and
the supervisor that rides out a lost GPU on a fallback or on people (`supervisor`). TensorRT itself lives in
engines/ (engines.runner), imported only when the TensorRT backend opens."""
