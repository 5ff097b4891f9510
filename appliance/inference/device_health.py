"""GPU state for heartbeats, with the Jetson's temperature and load where sysfs offers them.

Jetsons have no NVML; the integrated GPU shows its load (per mille) and its thermal zone in sysfs,
under paths that moved between generations. Everything here reads files only, and a missing or
unreadable file just leaves the value out (a PC, a container without /sys, a newer L4T).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.inference.registry import primary_backend, runs_on_gpu

# Relative to the sysfs root. Nano/TX2/Xavier: gpu.0; Orin: the 17000000.gpu platform device.
_LOAD_FILES = (
    "devices/gpu.0/load",
    "devices/platform/gpu.0/load",
    "devices/platform/17000000.ga10b/load",
    "devices/platform/17000000.gpu/load",
    "devices/platform/bus@0/17000000.gpu/load",
)
_GPU_ZONE_TYPES = ("gpu-therm", "gpu-thermal", "gpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def jetson_gpu_readings(sysfs: Path = Path("/sys")) -> dict[str, float]:
    """`temperature_c` and `utilisation_pct` when this is a Jetson whose sysfs shows them; else {}."""
    out: dict[str, float] = {}
    for rel in _LOAD_FILES:
        text = _read(sysfs / rel)
        if text is not None and text.isdigit():
            out["utilisation_pct"] = int(text) / 10.0  # the driver reports per mille
            break
    zones = sysfs / "class/thermal"
    if zones.is_dir():
        for zone in sorted(zones.glob("thermal_zone*")):
            kind = (_read(zone / "type") or "").lower()
            if kind in _GPU_ZONE_TYPES:
                temp = _read(zone / "temp")
                if temp is not None and temp.lstrip("-").isdigit():
                    out["temperature_c"] = int(temp) / 1000.0  # millidegrees
                    break
    return out


def gpu_health(configured_backend: str, running_backend: str, sysfs: Path = Path("/sys")) -> dict[str, Any]:
    """`state`: in_use (TensorRT runs), unavailable (configured but not running: a fallback is active) or
    not_used (the station is configured for ONNX Runtime on the CPU); plus Jetson readings if any."""
    if not primary_backend(configured_backend).gpu:
        state = "not_used"
    elif runs_on_gpu(running_backend):
        state = "in_use"
    else:
        state = "unavailable"
    return {"state": state, **jetson_gpu_readings(sysfs)}
