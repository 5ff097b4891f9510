"""What the build machine is: TensorRT, CUDA and JetPack (L4T) versions, GPU, Jetson model, DLA cores.

Queried once per `make engine`, written into the manifest. TensorRT and pycuda are imported here on
first use only, so this module loads anywhere; `read_l4t_version` and `read_jetson_model` are pure and
tested with sample files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bundle.errors import GpuUnavailableError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


@dataclass(frozen=True)
class BuildDevice:
    tensorrt_version: str
    cuda_version: str
    l4t_version: str | None  # None off a Jetson
    gpu_name: str
    compute_capability: str
    dla_cores: int
    gpu_multiprocessors: int | None = None
    # e.g. "NVIDIA Jetson AGX Orin Developer Kit"; None off a Jetson. The CUDA name of every Orin is "Orin".
    jetson_model: str | None = None


def read_l4t_version(path: Path = NV_TEGRA_RELEASE) -> str | None:
    """"# R36 (release), REVISION: 4.0, GCID: ..." -> "36.4.0"; None when the file is absent or unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def read_jetson_model(path: Path = DEVICE_TREE_MODEL) -> str | None:
    """The board name from the device tree ("NVIDIA Jetson AGX Orin Developer Kit"); None off a Jetson."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    model = text.replace("\x00", "").strip()
    return model or None


def probe(device_index: int = 0) -> BuildDevice:
    """This device; GpuUnavailableError (exit 7) naming what is missing: TensorRT, pycuda, a CUDA device."""
    from engines.cuda_memory import device_identity, device_multiprocessors, driver_cuda_version
    from engines.tensorrt import import_tensorrt, make_logger

    trt = import_tensorrt()
    name, capability = device_identity(device_index)
    try:
        builder = trt.Builder(make_logger(trt))
    except Exception as exc:  # TensorRT raises plain exceptions (e.g. "no CUDA device") from its constructor
        raise GpuUnavailableError(f"TensorRT cannot create a builder on this device: {exc}") from exc
    return BuildDevice(
        tensorrt_version=str(trt.__version__), cuda_version=driver_cuda_version(), l4t_version=read_l4t_version(),
        gpu_name=name, compute_capability=capability, dla_cores=int(getattr(builder, "num_DLA_cores", 0)),
        gpu_multiprocessors=device_multiprocessors(device_index), jetson_model=read_jetson_model(),
    )
