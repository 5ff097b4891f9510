"""FP16 ONNX for strongly typed TensorRT builds: FP16 weights and compute, FP32 inputs and outputs."""

from __future__ import annotations

from pathlib import Path


def _toposort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs.

    ONNX Runtime's converter appends the input Cast nodes at the end of the node list; ONNX Runtime
    sorts on load, but onnx.checker and TensorRT's parser expect the order the standard requires.
    """
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            names = ", ".join(n.name for n in pending[:5])
            raise ValueError(f"FP16 graph has a cycle or a dangling input near: {names}")
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for dst, src in zip(copies, ordered, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Convert weights and compute to FP16, keeping the FP32 input/output so callers need not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _toposort(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path
