"""`make bench`: how fast the station runtime is on this machine, against the bare backend and a naive loop.

Three cases over the same folder of camera frames, each in its own fresh process:

- (a) `backend`: the bundle's FP32 ONNX in `OnnxRuntimeBackend`, inputs preprocessed beforehand: the
  ceiling the pipeline is measured against.
- (b) `pipeline`: the whole appliance pipeline (folder source -> preprocess -> infer -> decide -> SQLite
  results log), built by `appliance.runtime.build_pipeline`; this process never imports torch.
- (c) `naive`: the prototype a data scientist would write first: per frame imread, gray, resize,
  normalise, PyTorch eager `model(x)`, softmax.

Modules: `inputs` (bundle and frames, cached under artifacts/bench/), `cases` (the measured code, one
process per case), `report` (machine info, target checks, the table), `__main__` (the command).

This package's own modules import nothing heavy at import time: the pipeline case runs in a process
that must stay free of torch, and the orchestrating process must stay small because Linux hands a
parent's peak RSS down to every child it starts (see `cases.process_usage`).
"""
