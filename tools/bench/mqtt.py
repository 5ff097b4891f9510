"""`python -m tools.bench.mqtt` (part of `make bench`): reporting throughput to a real local Mosquitto.

Two measurements, both with QoS 1, the outbox and the results log exactly as the station opens them
(SQLite WAL, synchronous=FULL: a committed row survives a power cut), and a control-room subscriber at
QoS 1 counting what arrives:

- sustained: the decide thread's reporter call (the fan-out's `inspection`: hand the record to the results
  log's writer and the result message to the outbox's writer; each writer thread commits in batches and
  the link publishes) for N results as fast as it goes; results per second from the first call until the
  subscriber holds all N and the outbox is empty; and the time one call takes (what inspection waits).
- drain: an outbox holding M results left by an outage; the time from starting the link (broker up,
  subscriber connected) until the broker has acknowledged all M, and the subscriber has them.

No timing is asserted anywhere: the figures go to artifacts/bench/mqtt.json and the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.reporting.fanout import FanOut
from appliance.reporting.mqtt_link import LinkConfig, MqttLink
from appliance.reporting.mqtt_sink import MqttSink
from appliance.reporting.outbox import Outbox
from appliance.reporting.payloads import BirthPayload, ResultPayload, Topics
from appliance.reporting.results_log import ResultsLog
from appliance.reporting.results_sink import ResultsLogSink
from appliance.station.inspection import InspectionRecord
from tools.bench.report import machine_info
from tools.broker import MosquittoBroker, find_mosquitto

STATION = "bench-01"
TOPICS = Topics("inspection", "bench", "line", STATION)


def record(i: int) -> InspectionRecord:
    now = time.time()
    return InspectionRecord(
        inspection_id=uuid.uuid4().hex, part_id=f"{STATION}-{i:08d}", station_id=STATION, source_name=f"f{i}.png",
        frame_index=i, captured_at=now - 0.03, decided_at=now, verdict="pass" if i % 10 else "fail",
        ai_verdict="pass" if i % 10 else "fail", score=0.1 if i % 10 else 0.9, mode="production",
        backend="onnxruntime", model_id="bench@0000", reason="below threshold",
        latency_ms={"queue_ms": 1.0, "preprocess_ms": 1.0, "infer_ms": 8.0, "end_to_end_ms": 30.0},
    )


class Counter:
    """A control-room subscriber counting distinct results."""

    def __init__(self, port: int) -> None:
        self.ids: set[str] = set()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, *a: (c.subscribe(TOPICS.of("result"), qos=1), self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("bench subscriber could not connect")
        time.sleep(0.2)  # SUBACK

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.ids.add(json.loads(msg.payload)["inspection_id"])

    def count(self) -> int:
        with self.lock:
            return len(self.ids)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.50), 3), "p99": round(pick(0.99), 3), "max": round(ordered[-1], 3)}


def sustained(folder: Path, port: int, n: int) -> dict[str, Any]:
    results = ResultsLog(folder / "results.sqlite3")
    outbox = Outbox(folder / "outbox.sqlite3")
    config = LinkConfig("127.0.0.1", port, STATION, TOPICS)
    birth = lambda bd: BirthPayload(station=STATION, software_version="bench", model_id="bench@0000",  # noqa: E731
                                    backend="onnxruntime", config_hash="bench", cameras=[], boot_id="bench", bd_seq=bd)
    link = MqttLink(config, outbox, birth)
    # The station's two sinks of a result, as the runtime wires them (results log, then MQTT).
    reporter = FanOut([ResultsLogSink(results, echo=False), MqttSink(link, outbox)])
    sub = Counter(port)
    link.start()
    if not link.wait_connected(10):
        raise RuntimeError(f"station link did not connect: {link.state()}")
    call_ms: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        c0 = time.perf_counter()
        reporter.inspection(record(i))
        call_ms.append((time.perf_counter() - c0) * 1000)
    produced = time.perf_counter() - t0
    delivered = _wait(lambda: sub.count() >= n and outbox.depth() <= 1, 120)  # <= 1: a heartbeat may be in flight
    elapsed = time.perf_counter() - t0
    reporter.flush(5)
    link.stop(5)
    sub.close()
    results.close()
    outbox.close()
    return {"results": n, "received": sub.count(), "all_delivered": delivered and sub.count() == n,
            "results_per_s": round(n / elapsed, 1), "seconds": round(elapsed, 3),
            "producer_results_per_s": round(n / produced, 1), "reporter_call_ms": _percentiles(call_ms)}


def drain(folder: Path, port: int, m: int) -> dict[str, Any]:
    outbox = Outbox(folder / "drain-outbox.sqlite3")
    fill0 = time.perf_counter()
    for i in range(m):  # what an outage leaves behind: results put while no broker answered
        outbox.put(TOPICS.of("result"), ResultPayload.from_record(record(i), STATION).model_dump_json(), 1, "result")
    fill_s = time.perf_counter() - fill0
    sub = Counter(port)
    birth = lambda bd: BirthPayload(station=STATION, software_version="bench", model_id="bench@0000",  # noqa: E731
                                    backend="onnxruntime", config_hash="bench", cameras=[], boot_id="bench", bd_seq=bd)
    link = MqttLink(LinkConfig("127.0.0.1", port, STATION, TOPICS), outbox, birth)
    t0 = time.perf_counter()
    link.start()
    acked = _wait(lambda: outbox.depth() == 0, 300)
    acked_s = time.perf_counter() - t0
    received = _wait(lambda: sub.count() >= m, 60)
    received_s = time.perf_counter() - t0
    link.stop(5)
    sub.close()
    outbox.close()
    return {"results": m, "received": sub.count(), "all_delivered": acked and received and sub.count() == m,
            "seconds_to_acknowledged": round(acked_s, 3), "seconds_to_received": round(received_s, 3),
            "results_per_s": round(m / acked_s, 1), "fill_seconds": round(fill_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=3000, help="results for the sustained case (default 3000)")
    parser.add_argument("--drain", type=int, default=10_000, help="results in the outbox to drain (default 10000)")
    parser.add_argument("--json", type=Path, default=Path("artifacts/bench/mqtt.json"))
    args = parser.parse_args(argv)
    if find_mosquitto() is None:
        print("bench mqtt: mosquitto is not installed (apt-get install mosquitto); skipped", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-", dir=args.json.parent if args.json.parent.exists()
                                     else None) as tmp:
        folder = Path(tmp)
        with MosquittoBroker(folder / "broker") as broker:
            print(f"bench mqtt: sustained, {args.results} results ...", flush=True)
            s = sustained(folder / "s", broker.port, args.results)
            print(f"bench mqtt: drain, {args.drain} results ...", flush=True)
            d = drain(folder / "d", broker.port, args.drain)
    report = {"machine": machine_info(), "sustained": s, "drain": d,
              "notes": ["QoS 1 both ways; outbox and results log in WAL mode with synchronous=FULL on this disk",
                        "sustained: from the first reporter call until the subscriber holds every result",
                        "drain: from starting the link (broker up) until the broker acknowledged every result"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"sustained: {s['results_per_s']} results/s delivered ({s['results']} results, {s['seconds']} s); "
          f"reporter call p50 {s['reporter_call_ms']['p50']} ms, p99 {s['reporter_call_ms']['p99']} ms")
    print(f"drain: {d['results']} results acknowledged in {d['seconds_to_acknowledged']} s "
          f"({d['results_per_s']} results/s), all received in {d['seconds_to_received']} s")
    print(f"report: {args.json}")
    return 0 if s["all_delivered"] and d["all_delivered"] else 1


if __name__ == "__main__":
    sys.exit(main())
