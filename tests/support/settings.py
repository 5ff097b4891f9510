"""The one factory of a test station's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.settings import StationSettings

SITE, LINE = "plant-a", "line-3"
STATION_ID = "st-mqtt"  # the default station id (topic prefix inspection/plant-a/line-3/st-mqtt)

# Short MQTT timings, so that heartbeats, reconnects and a drain happen within a test's seconds.
TEST_MQTT: dict[str, Any] = {"keepalive_s": 5, "heartbeat_s": 0.5, "reconnect_max_s": 0.5, "drain_timeout_s": 10}


def station_settings(tmp_path: Path, bundle_dir: Path, port: int | None = None, *, station_id: str = STATION_ID,
                     source: str | Path = "synthetic", data_dir: Path | None = None, **sections: Any
                     ) -> StationSettings:
    """A station on `bundle_dir` with ONNX Runtime on one thread, in site SITE, line LINE.

    port: the broker's loopback port (MQTT on, with TEST_MQTT's short timings), or None for MQTT off.
    source: "synthetic" (an endless synthetic camera, one part per trigger: trigger mode "triggered"), or a
      frames folder, glob, device or URL (each frame once, continuously).
    data_dir: storage.data_dir; by default tmp_path / f"var-{station_id}", so two stations in one test do not
      share their stores.
    sections: further settings sections, e.g. `mqtt={"username": "st-a"}`; each is merged into the section
      built here (its keys win), so `camera={"loop": False}` changes only the loop.
    """
    if str(source) == "synthetic":
        camera: dict[str, Any] = {"source": "synthetic", "loop": True}
        trigger: dict[str, Any] = {"mode": "triggered"}
    else:
        camera, trigger = {"source": str(source)}, {}
    values: dict[str, Any] = {
        "station": {"id": station_id, "site": SITE, "line": LINE},
        "model": {"bundle": str(bundle_dir)},
        "camera": camera,
        "trigger": trigger,
        "inference": {"backend": "onnxruntime", "threads": 1},
        "storage": {"data_dir": str(data_dir if data_dir is not None else tmp_path / f"var-{station_id}")},
        # No random audit sample: a test's review queue holds exactly the parts its rules queue.
        "review": {"audit_rate": 0.0},
        "mqtt": {"enabled": False} if port is None else {"enabled": True, "port": port, **TEST_MQTT},
    }
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    return StationSettings(**values)
