"""GPU readings for heartbeats from a Jetson-like sysfs tree (real files in a temporary folder)."""

from __future__ import annotations

from pathlib import Path

from appliance.inference.device_health import gpu_health, jetson_gpu_readings
from appliance.reporting.payloads import Topics


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_orin_load_and_gpu_thermal_zone_are_read(tmp_path: Path) -> None:
    _write(tmp_path, "devices/platform/bus@0/17000000.gpu/load", "437\n")
    _write(tmp_path, "class/thermal/thermal_zone0/type", "cpu-thermal\n")
    _write(tmp_path, "class/thermal/thermal_zone0/temp", "51000\n")
    _write(tmp_path, "class/thermal/thermal_zone1/type", "gpu-thermal\n")
    _write(tmp_path, "class/thermal/thermal_zone1/temp", "48500\n")
    assert jetson_gpu_readings(tmp_path) == {"utilisation_pct": 43.7, "temperature_c": 48.5}


def test_a_pc_without_jetson_files_gives_no_readings(tmp_path: Path) -> None:
    _write(tmp_path, "class/thermal/thermal_zone0/type", "x86_pkg_temp\n")
    _write(tmp_path, "class/thermal/thermal_zone0/temp", "40000\n")
    _write(tmp_path, "devices/gpu.0/load", "garbage\n")
    assert jetson_gpu_readings(tmp_path) == {}
    assert jetson_gpu_readings(tmp_path / "missing") == {}


def test_gpu_state_follows_the_configured_and_running_backend(tmp_path: Path) -> None:
    assert gpu_health("onnxruntime", "onnxruntime", tmp_path) == {"state": "not_used"}
    assert gpu_health("tensorrt", "tensorrt", tmp_path) == {"state": "in_use"}
    assert gpu_health("auto", "onnxruntime", tmp_path) == {"state": "unavailable"}  # on the CPU fallback
    assert gpu_health("tensorrt", "none", tmp_path)["state"] == "unavailable"


def test_topics_name_every_kind_and_recognise_only_their_own_commands() -> None:
    t = Topics("inspection", "plant-a", "line-3", "st-1")
    assert t.of("result") == "inspection/plant-a/line-3/st-1/result"
    assert t.command_filter == "inspection/plant-a/line-3/st-1/cmd/+"
    assert t.kind_of("inspection/plant-a/line-3/st-1/cmd/mode") == "cmd/mode"
    assert t.kind_of("inspection/plant-a/line-3/st-2/cmd/mode") is None
    assert t.kind_of("inspection/plant-a/line-3/st-1/cmd/reboot") is None
