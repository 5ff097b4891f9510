"""Engines: model bundle -> TensorRT engine built on the station's own GPU, with manifest and validation."""
