"""The engine manifest: what a TensorRT engine was built from, with what, and on which device.

A serialized engine only runs on the exact TensorRT version and GPU (compute capability) that built it, and
TensorRT's own refusal ("Version tag does not match", "generated on an incompatible device") names neither.
So every engine gets `<engine>.json` beside it, and the runtime compares it with the device *before*
deserializing, to tell a plant engineer what differs and what to do. Another GPU *model* of the same compute
capability (AGX Orin, Orin NX and Orin Nano are all 8.7) is refused too unless the station allows it: TensorRT
loads such an engine with only a warning ("Using an engine plan file across different models of devices is not
recommended and is likely to affect performance or even cause errors"; newer releases say "not supported"),
its tactics having been timed on the other model.

Pure data: this module imports neither TensorRT nor CUDA, so the check runs (and is tested) anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bundle.errors import GpuUnavailableError

MANIFEST_SCHEMA_VERSION = 1
REBUILD = "rebuild with `make engine`"

Precision = Literal["fp16", "int8", "fp32"]

# Compute capability -> the GPU family a reader recognises; for messages only, never for decisions.
_GPU_FAMILIES: dict[str, str] = {
    "5.3": "Jetson Nano",
    "6.2": "Jetson TX2",
    "7.2": "Xavier",
    "7.5": "Turing",
    "8.0": "A100",
    "8.6": "Ampere",
    "8.7": "Orin",
    "8.9": "Ada",
    "9.0": "Hopper",
    "10.0": "Blackwell",
    "11.0": "Thor",
    "12.0": "Blackwell",
}


class EngineManifest(BaseModel):
    """Everything that ties one engine file to its model, its TensorRT and its GPU."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    bundle_name: str
    bundle_model_id: str
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    precision: Precision
    tensorrt_version: str = Field(min_length=1)
    cuda_version: str = Field(min_length=1)
    l4t_version: str | None = None
    gpu_name: str
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    # Streaming multiprocessors of the GPU that built it (None in manifests from before it was recorded):
    # tells apart models whose CUDA device name is the same.
    gpu_multiprocessors: int | None = Field(default=None, ge=1)
    dla_core: int | None = Field(default=None, ge=0)
    # Builder settings as given (workspace, timing cache, strongly typed, profile...): for the record.
    build_options: dict[str, Any] = Field(default_factory=dict)
    built_utc: str
    build_seconds: float = Field(ge=0.0)
    engine_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str
    output_name: str
    # -1 marks a dynamic axis (the batch axis of a dynamic-batch engine).
    input_shape: list[int] = Field(min_length=1)
    # The golden-set comparison with ONNX Runtime made right after the build (engines/validate.py).
    validation: dict[str, Any] | None = None


class DeviceInfo(BaseModel):
    """What this device offers, as far as engine compatibility goes."""

    model_config = ConfigDict(extra="forbid")

    tensorrt_version: str
    gpu_name: str
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    gpu_multiprocessors: int | None = Field(default=None, ge=1)


def manifest_path(engine_path: str | Path) -> Path:
    """The manifest of an engine: `model.engine` -> `model.engine.json` (same folder)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def load_manifest(path: str | Path) -> EngineManifest:
    """Read and validate a manifest; GpuUnavailableError naming the file if missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise GpuUnavailableError(
            f"engine manifest {p} is missing: the engine cannot be checked against this device",
            hint=f"{REBUILD} (it writes the engine and its manifest together)",
        )
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GpuUnavailableError(f"engine manifest {p} is not valid JSON: {exc}", hint=REBUILD) from exc
    try:
        manifest = EngineManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise GpuUnavailableError(f"engine manifest {p} is invalid: {problems}", hint=REBUILD) from exc
    if manifest.schema_version > MANIFEST_SCHEMA_VERSION:
        raise GpuUnavailableError(
            f"engine manifest {p} has schema_version {manifest.schema_version}; this software reads up to "
            f"{MANIFEST_SCHEMA_VERSION}",
            hint="update the appliance software or rebuild the engine with this one",
        )
    return manifest


def write_manifest(path: str | Path, manifest: EngineManifest) -> Path:
    """Write a manifest atomically (a crash leaves the old file or the new one, never half)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(target)
    return target


def gpu_family(compute_capability: str) -> str:
    """A readable family name for a compute capability ("8.7" -> "Orin"), or "" when unknown."""
    return _GPU_FAMILIES.get(compute_capability, "")


def other_gpu_model(manifest: EngineManifest, device: DeviceInfo) -> str | None:
    """How the engine's GPU differs from this one when both share a compute capability, else None."""
    if manifest.compute_capability != device.compute_capability:
        return None
    built, here = manifest.gpu_multiprocessors, device.gpu_multiprocessors
    if manifest.gpu_name != device.gpu_name:
        return f"built on {manifest.gpu_name}, this GPU is {device.gpu_name}"
    if built is not None and here is not None and built != here:
        return f"built on a {manifest.gpu_name} with {built} multiprocessors, this one has {here}"
    return None


def incompatibilities(manifest: EngineManifest, device: DeviceInfo, *, dla_core: int | None = None,
                      allow_other_gpu_model: bool = False) -> list[str]:
    """Why this engine cannot run on `device` (empty when it can), one actionable sentence each.

    `dla_core` is the core the station asks for (None: whatever the engine was built for).
    `allow_other_gpu_model` (`inference.allow_other_gpu_model`) accepts an engine from another GPU model of the
    same compute capability; it is then only an advisory.
    """
    problems: list[str] = []
    # Exact string: an engine is tied to the exact TensorRT build, not to a major.minor range.
    if manifest.tensorrt_version != device.tensorrt_version:
        problems.append(
            f"engine built with TensorRT {manifest.tensorrt_version}, this device has "
            f"{device.tensorrt_version}: {REBUILD}"
        )
    if manifest.compute_capability != device.compute_capability:
        family = gpu_family(manifest.compute_capability)
        built_for = f"{manifest.compute_capability} ({family})" if family else manifest.compute_capability
        problems.append(
            f"engine built for compute capability {built_for}, this GPU is {device.compute_capability} "
            f"({device.gpu_name}): {REBUILD} on this device"
        )
    other = other_gpu_model(manifest, device)
    if other is not None and not allow_other_gpu_model:
        problems.append(
            f"engine {other} (same compute capability {device.compute_capability}): TensorRT advises against "
            f"running engines across GPU models (its tactics were timed on the other one): {REBUILD} on this "
            "device, or set inference.allow_other_gpu_model = true to run it anyway"
        )
    if dla_core is not None and manifest.dla_core is None:
        problems.append(
            f"DLA core {dla_core} was requested but the engine was built for the GPU only: "
            f"{REBUILD} with a DLA core, or run without one"
        )
    return problems


def advisories(manifest: EngineManifest, device: DeviceInfo) -> list[str]:
    """Differences that do not stop the engine but deserve a log line: another GPU model of the same compute
    capability, when the station allows it (`incompatibilities` refuses it otherwise)."""
    notes: list[str] = []
    other = other_gpu_model(manifest, device)
    if other is not None:
        # TensorRT runs such an engine with a warning; tactics were timed on the other model, so speed may differ.
        notes.append(
            f"engine {other} (same compute capability {device.compute_capability}), allowed by "
            f"inference.allow_other_gpu_model: it runs, but may be slower than an engine built here ({REBUILD})"
        )
    return notes
