"""Backend `tensorrt`: the engine `make engine` built on this device for this bundle and precision
(engines.runner), found by its manifest. Judged at the bundle's operating point for the engine's precision."""

from __future__ import annotations

from pathlib import Path

from appliance.inference.backend import BackendRequest, InferenceBackend
from bundle.errors import GpuUnavailableError
from bundle.format import Bundle
from engines.manifest import DeviceInfo


def open_backend(request: BackendRequest) -> InferenceBackend:
    """Query the device, find its engine and open it (TensorRT and pycuda imported only here)."""
    from engines.runner import TensorRTBackend
    from engines.tensorrt import device_info

    device = device_info()
    engine = find_engine(request.engine_dir, request.bundle, request.precision, device)
    return TensorRTBackend(engine, slots=request.slots, device=device,
                           allow_other_gpu_model=request.allow_other_gpu_model)


def decision_precision(configured: str) -> str:
    return configured  # an INT8 engine is judged at the INT8 operating point


def find_engine(folder: Path, bundle: Bundle, precision: str, device: DeviceInfo | None = None) -> Path:
    """The engine built for `bundle` at `precision` in `folder` (`model.engine_dir`), by its manifest.

    Several may match (an engine from before a JetPack upgrade stays until removed): the one that fits
    `device` wins, else the newest, which the backend then refuses with the reason. GpuUnavailableError
    when none matches, with the `make engine` command that builds it.
    """
    from engines.manifest import incompatibilities, load_manifest, manifest_path

    matching = []
    for engine in sorted(folder.glob("*.engine")) if folder.is_dir() else []:
        try:
            m = load_manifest(manifest_path(engine))
        except GpuUnavailableError:
            continue
        if m.bundle_model_id != bundle.model_id or m.precision != precision:
            continue
        if m.validation is not None and not m.validation.get("passed", False):
            continue
        fits = device is not None and not incompatibilities(m, device)
        matching.append((fits, m.built_utc, engine))
    if not matching:
        raise GpuUnavailableError(
            f"no {precision} engine for model {bundle.model_id} in {folder}",
            hint=f"build it on this device: make engine BUNDLE={bundle.root} PRECISION={precision}",
        )
    return max(matching)[2]
