"""The last step of `make demo`: a station reporting to a local Mosquitto, and what the control room sees.

Starts Mosquitto on a free loopback port (the Debian package; `make demo` installs it when run as root),
subscribes to `inspection/#` like a dashboard would, runs `appliance run` with the demo station config
against it, and prints each message as it arrives. Without Mosquitto it says so and runs the station on
its outbox alone: every result is kept on disk for a broker that is not there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tools.broker import MOSQUITTO_HINT, MosquittoBroker, find_mosquitto, free_port


def describe(kind: str, p: dict) -> str:
    """One line per message, the fields a person watching the line cares about."""
    if kind == "status":
        return f"{p['state']} (bdSeq {p['bd_seq']})"
    if kind == "birth":
        return (f"software {p['software_version']}, model {p['model_id']}, backend {p['backend']}, "
                f"boot {p['boot_id'][:8]}")
    if kind == "result":
        score = "-" if p["score"] is None else f"{p['score']:.3f}"
        return (f"{p['part_id']} {p['verdict']:15s} score {score}  {p['latency_ms'].get('end_to_end_ms', 0):.0f} ms"
                f"{'  (replayed)' if p['replayed'] else ''}")
    if kind == "alert":
        return f"DEFECT on {p['part_id']} (score {p['score']:.3f})"
    if kind == "health":
        p50 = p["latency_p50_ms"]
        return (f"{p['inspections']} inspected, {p['defects']} defects, mode {p['mode']}, backend {p['backend']}, "
                f"p50 {'-' if p50 is None else f'{p50:.0f} ms'}, outbox {p['spool_depth']}")
    if kind == "event":
        return f"{p['kind']} {json.dumps(p['detail'])}"
    return json.dumps(p)[:100]


class Watcher:
    def __init__(self, port: int) -> None:
        self.counts: dict[str, int] = {}
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-control-room")
        self.client.on_connect = lambda c, *a: c.subscribe("inspection/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.split("/", 5)[-1]
        payload = json.loads(msg.payload)
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            print(f"  {msg.topic:45s} {describe(kind, payload)}", flush=True)
        if kind == "status" and payload["state"] == "stopped":
            self.stopped.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo_station", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("provisioning/demo-station.toml"))
    parser.add_argument("--var", type=Path, default=Path("artifacts/demo-var"), help="broker and station files")
    args = parser.parse_args(argv)

    env = dict(os.environ, APPLIANCE_MQTT__ENABLED="true")
    broker = watcher = None
    if find_mosquitto() is None:
        port = free_port()  # nothing listens there: the station spools everything in its outbox
        print(f"demo: no Mosquitto here ({MOSQUITTO_HINT});\n      running the station on its outbox alone")
    else:
        broker = MosquittoBroker(args.var / "broker").start()
        port = broker.port
        watcher = Watcher(port)
        print(f"demo: Mosquitto on 127.0.0.1:{port}; what a control room subscribed to inspection/# sees:")
        print(f"      (watch it yourself: mosquitto_sub -h 127.0.0.1 -p {port} -t 'inspection/#' -v)")
    env["APPLIANCE_MQTT__PORT"] = str(port)
    station_log = args.var / "station.log"
    station_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(station_log, "w") as out:
            rc = subprocess.call([sys.executable, "-m", "appliance.cli", "run", "--config", str(args.config)],
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
        if watcher is not None:
            watcher.stopped.wait(10)
            time.sleep(0.2)
    finally:
        if watcher is not None:
            watcher.close()
        if broker is not None:
            broker.stop()
    lines = station_log.read_text().splitlines()
    summary = next((line for line in reversed(lines) if "stopped:" in line), lines[-1] if lines else "")
    print(f"station: {summary.split(': ', 2)[-1] if summary else '(no output)'}  (full log: {station_log})")
    if watcher is not None:
        seen = ", ".join(f"{n} {kind}" for kind, n in sorted(watcher.counts.items()))
        print(f"control room received: {seen}")
    else:
        print(f"results are waiting in {args.var / 'outbox.sqlite3'} for a broker")
    queued = subprocess.run([sys.executable, "-m", "appliance.cli", "review", "list", "--config", str(args.config),
                             "--limit", "5"], capture_output=True, text=True)
    print("queued for a person (review queue):")
    for line in (queued.stdout or queued.stderr).splitlines():
        print(f"  {line}")
    print("label them on the inspector page: make demo-review, then open http://127.0.0.1:8080/inspector "
          "(token demo-inspector-token)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
