"""Where engines live on a station, what they are called, and whether the one there is still right.

An engine's identity is its key: the bundle's model and ONNX file, the precision, the TensorRT version,
the GPU (compute capability), the DLA core and the batch profile. The file name is derived from the key,
so engines for different keys sit side by side (an engine from before a JetPack upgrade does not get
overwritten until the new one validated). `make engine` rebuilds only when no engine with a valid
manifest matches the key.

Pure, no TensorRT: tested anywhere.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from bundle.errors import GpuUnavailableError
from engines.manifest import EngineManifest, Precision, load_manifest, manifest_path
from engines.plan import BuildPlan

DEFAULT_STORE = Path("engines/store")


@dataclass(frozen=True)
class EngineKey:
    bundle_model_id: str
    onnx_sha256: str
    precision: Precision
    tensorrt_version: str
    compute_capability: str
    dla_core: int | None
    batch_profile: tuple[int, int, int]

    @classmethod
    def for_plan(cls, plan: BuildPlan, bundle_model_id: str, onnx_sha256: str, compute_capability: str) -> EngineKey:
        return cls(bundle_model_id, onnx_sha256, plan.precision, plan.tensorrt_version, compute_capability,
                   plan.dla_core, plan.batch_profile)

    def file_name(self) -> str:
        """e.g. `demo_9349eb36a00d-fp16-trt10.3.0.30-sm87.engine` (`-dla0`, `-b8` when they apply)."""
        model = re.sub(r"[^A-Za-z0-9_.-]", "_", self.bundle_model_id)
        parts = [model, self.precision, f"trt{self.tensorrt_version}", "sm" + self.compute_capability.replace(".", "")]
        if self.dla_core is not None:
            parts.append(f"dla{self.dla_core}")
        if self.batch_profile != (1, 1, 1):
            parts.append(f"b{self.batch_profile[2]}")
        return "-".join(parts) + ".engine"


def differences(manifest: EngineManifest, key: EngineKey) -> list[str]:
    """What in the key no longer matches an existing engine's manifest (empty: it is the engine for this key)."""
    m = manifest
    profile = tuple(m.build_options.get("batch_profile", (1, 1, 1)))
    checks = [
        ("model", m.bundle_model_id, key.bundle_model_id),
        ("ONNX sha256", m.onnx_sha256[:16], key.onnx_sha256[:16]),
        ("precision", m.precision, key.precision),
        ("TensorRT", m.tensorrt_version, key.tensorrt_version),
        ("compute capability", m.compute_capability, key.compute_capability),
        ("DLA core", m.dla_core, key.dla_core),
        ("batch profile", profile, key.batch_profile),
    ]
    return [f"{what} {old} -> {new}" for what, old, new in checks if old != new]


def up_to_date(engine: Path, key: EngineKey) -> tuple[bool, str]:
    """(True, "") when `engine` exists, its manifest is valid, matches the key and the file is unchanged;
    else (False, why), so `make engine` can say why it rebuilds."""
    if not engine.is_file():
        return False, f"no engine at {engine} yet"
    try:
        manifest = load_manifest(manifest_path(engine))
    except GpuUnavailableError as exc:
        return False, exc.message
    changed = differences(manifest, key)
    if changed:
        return False, "changed: " + ", ".join(changed)
    digest = hashlib.sha256(engine.read_bytes()).hexdigest()
    if digest != manifest.engine_sha256:
        return False, "the engine file changed after its manifest was written"
    if manifest.validation is not None and not manifest.validation.get("passed", False):
        return False, "its validation failed"
    return True, ""


def timing_cache_path(store: Path, tensorrt_version: str, compute_capability: str, gpu_name: str,
                      gpu_multiprocessors: int | None = None) -> Path:
    """One timing cache per (TensorRT version, GPU model): tactic timings do not carry over between them.

    The compute capability alone does not name a model (AGX Orin, Orin NX and Orin Nano are all 8.7), so the
    GPU's name and, when known, its multiprocessor count are part of the key.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    size = f"-{gpu_multiprocessors}mp" if gpu_multiprocessors is not None else ""
    name = f"trt{tensorrt_version}-sm{compute_capability.replace('.', '')}-{gpu}{size}.cache"
    return store / "timing-cache" / name


def list_engines(store: Path) -> list[tuple[Path, EngineManifest | None, str]]:
    """Every engine in the store with its manifest (None and the reason when unreadable)."""
    out: list[tuple[Path, EngineManifest | None, str]] = []
    for engine in sorted(store.glob("*.engine")) if store.is_dir() else []:
        try:
            out.append((engine, load_manifest(manifest_path(engine)), ""))
        except GpuUnavailableError as exc:
            out.append((engine, None, exc.message))
    return out
