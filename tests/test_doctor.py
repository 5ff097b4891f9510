"""`appliance doctor` on this machine: real bundle, real camera sources, a real Mosquitto, the real disk.

GPU checks fail cleanly here (no CUDA, no TensorRT): that is what they must do on a PC.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.doctor import Doctor, format_table
from tests.support.frames import write_frames
from tests.support.mqtt import needs_mosquitto, start_station, stop_station
from tests.support.pki import write_password_file
from tests.support.settings import station_settings
from tools.broker import MosquittoBroker


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


@needs_mosquitto
def test_a_cpu_station_with_its_broker_passes_and_skips_the_gpu(tmp_path: Path, bundle_dir: Path):
    frames = write_frames(tmp_path / "frames", 2)
    with MosquittoBroker(tmp_path / "broker") as broker:
        checks = _by_name(Doctor(station_settings(tmp_path, bundle_dir, broker.port, station_id="st-doc",
                                                  source=frames)).checks())
    assert [checks[n].outcome for n in ("model bundle", "camera", "broker", "disk")] == ["PASS"] * 4
    assert {checks[n].outcome for n in ("GPU", "TensorRT", "engine")} == {"SKIP"}
    assert "logged in to mqtt://127.0.0.1" in checks["broker"].detail
    assert "frame after" in checks["camera"].detail and "GB free" in checks["disk"].detail


def _gpu_stack_here() -> str | None:
    """Why this machine is not a PC without a GPU stack (TensorRT importable, or a CUDA device answers), else None.

    The test below needs both absent: it expects the GPU check and the TensorRT check to FAIL. pycuda alone is not
    enough to tell: with pycuda and a GPU but no TensorRT the GPU check passes.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        return "TensorRT is importable here"
    from engines.cuda_memory import cuda_available

    ok, detail = cuda_available()
    return f"a CUDA device answers here ({detail})" if ok else None


_GPU_STACK = _gpu_stack_here()


@pytest.mark.skipif(_GPU_STACK is not None, reason=f"needs a machine without TensorRT and without a CUDA device: "
                    f"{_GPU_STACK}")
def test_a_gpu_station_on_a_pc_fails_the_gpu_checks_with_reasons(tmp_path: Path, bundle_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "station.toml"
    config.write_text(f'[station]\nid = "st-doc"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "synthetic"\n'
                      f'[inference]\nbackend = "tensorrt"\n[mqtt]\nenabled = false\n'
                      f'[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             ("GPU", "TensorRT", "engine", "broker", "camera")}
    assert "FAIL" in lines["GPU"] and ("pycuda" in lines["GPU"] or "CUDA" in lines["GPU"])
    assert "FAIL" in lines["TensorRT"] and "JetPack" in lines["TensorRT"]
    assert "FAIL" in lines["engine"] and "without TensorRT" in lines["engine"]
    assert "SKIP" in lines["broker"] and "PASS" in lines["camera"]
    assert "3 check(s) failed" in out


@needs_mosquitto
def test_wrong_broker_password_and_unreachable_broker_fail_with_the_station_messages(tmp_path: Path,
                                                                                     bundle_dir: Path,
                                                                                     refused_port: int):
    passwd = write_password_file(tmp_path / "passwd", {"st-doc": "right"})
    frames = write_frames(tmp_path / "frames", 2)
    with MosquittoBroker(tmp_path / "broker", password_file=passwd) as broker:
        wrong = _by_name(Doctor(station_settings(tmp_path, bundle_dir, broker.port, station_id="st-doc", source=frames,
                                                 mqtt={"username": "st-doc", "password": "wrong"})).checks())["broker"]
        right = _by_name(Doctor(station_settings(tmp_path, bundle_dir, broker.port, station_id="st-doc", source=frames,
                                                 mqtt={"username": "st-doc", "password": "right"})).checks())["broker"]
    assert wrong.outcome == "FAIL" and "refused the station's login as 'st-doc'" in wrong.detail
    assert right.outcome == "PASS" and "as st-doc" in right.detail
    down = _by_name(Doctor(station_settings(tmp_path, bundle_dir, refused_port, station_id="st-doc",
                                            source=frames)).checks())["broker"]
    assert down.outcome == "FAIL" and "refused the TCP connection" in down.detail


@needs_mosquitto
def test_doctor_does_not_knock_the_running_station_off_the_broker(tmp_path: Path, bundle_dir: Path):
    with MosquittoBroker(tmp_path / "broker") as broker:
        station = start_station(station_settings(tmp_path, bundle_dir, broker.port, station_id="st-doc"))
        try:
            before = station.link.state().connections
            check = _by_name(Doctor(station_settings(tmp_path, bundle_dir, broker.port, station_id="st-doc",
                                                     source=write_frames(tmp_path / "frames", 2))).checks())["broker"]
            assert check.outcome == "PASS"
            assert station.link.state().connected and station.link.state().connections == before
        finally:
            stop_station(station)


def test_camera_bundle_and_disk_failures_name_the_cause(tmp_path: Path, bundle_dir: Path):
    (tmp_path / "empty").mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    settings = station_settings(tmp_path, tmp_path / "no-bundle", station_id="st-doc", source="/dev/video9",
                                data_dir=not_a_dir)
    checks = _by_name(Doctor(settings, camera_timeout_s=1.0).checks())
    assert checks["model bundle"].outcome == "FAIL" and "no-bundle" in checks["model bundle"].detail
    assert checks["camera"].outcome == "FAIL" and "/dev/video9" in checks["camera"].detail
    assert checks["disk"].outcome == "FAIL" and "not writable" in checks["disk"].detail
    assert checks["broker"].outcome == "SKIP"
    small = _by_name(Doctor(station_settings(tmp_path, bundle_dir, station_id="st-doc",
                                             source=write_frames(tmp_path / "frames", 2)),
                            min_free_mb=10**9).checks())["disk"]
    assert small.outcome == "FAIL" and "below" in small.detail
    empty = _by_name(Doctor(station_settings(tmp_path, bundle_dir, station_id="st-doc",
                                             source=tmp_path / "empty")).checks())["camera"]
    assert empty.outcome == "FAIL"
    table = format_table(list(checks.values()))
    assert table.splitlines()[0].startswith("check") and "check(s) failed" in table


def test_a_station_without_a_camera_skips_the_camera_check_saying_why(tmp_path: Path, bundle_dir: Path):
    checks = _by_name(Doctor(station_settings(tmp_path, bundle_dir, station_id="st-doc", source="none"),
                             camera_timeout_s=1.0).checks())
    assert checks["camera"].outcome == "SKIP" and "uploads" in checks["camera"].detail
