"""The station's HTTP API (README, "The station's HTTP API"): real uvicorn on a free loopback port, real HTTP
requests (httpx, and raw sockets where a client misbehaves), real stations (`build_station` on the session's
bundle, ONNX Runtime, MQTT off, camera source `none` unless a camera part is compared).

Every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from test_images_bit_depth import claiming_png

from appliance import runtime
from appliance.http import server as http_server
from appliance.http.api import confidence
from appliance.http.openapi import schema_text
from appliance.inference.supervisor import BackendSupervisor
from appliance.reporting.results_log import ResultsLog
from appliance.runtime import Station, build_station
from bundle.errors import ConfigError
from bundle.format import ROLE_FILES
from bundle.onnx_runtime import OnnxRuntimeBackend
from tests.support.frames import NOT_A_PNG, part_image
from tests.support.settings import station_settings
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
TOKENS = {"line_pc": "line-pc-0123456789abcdef", "inspector": "inspector-0123456789abcdef",
          "admin": "admin-0123456789abcdef0123"}
MAX_UPLOAD = 256 * 1024
# Small limits, so that the refusals happen within a test's seconds.
HTTP = {"enabled": True, "port": 0, "max_upload_bytes": MAX_UPLOAD, "upload_timeout_s": 2.0,
        "inspect_timeout_s": 10.0, "tokens": TOKENS}


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def upload(client: httpx.Client, data: bytes, role: str = "line_pc", filename: str = "part.png",
           part_id: str | None = None, **kwargs: Any) -> httpx.Response:
    form = {"part_id": part_id} if part_id is not None else None
    return client.post("/inspect", files={"image": (filename, data, "image/png")}, data=form, headers=auth(role),
                       **kwargs)


def stop(station: Station) -> None:
    station.pipeline.stop()
    assert station.pipeline.join(30), "pipeline did not stop"
    station.stop_http()
    station.close()


@contextmanager
def serving(station: Station) -> Iterator[httpx.Client]:
    station.start()
    assert station.http is not None and station.http.server.port
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{station.http.server.port}", timeout=30) as client:
            yield client
    finally:
        stop(station)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Iterator[tuple[Station, httpx.Client]]:
    """One uploads-only station with a token per role, shared by the tests that do not stop or break it."""
    tmp = tmp_path_factory.mktemp("http")
    station = build_station(station_settings(tmp, bundle_dir, source="none", http=HTTP))
    with serving(station) as client:
        yield station, client


def logged(station: Station) -> dict[str, Any]:
    return {r.inspection_id: r for r in station.results.inspections()}


# --- POST /inspect --------------------------------------------------------------------------------------------------


def test_an_upload_gets_its_verdict_and_is_recorded_in_the_results_log_under_its_inspection_id(api):
    station, client = api
    r = upload(client, png(part_image(701, "crack")), part_id="SN-HTTP-1", filename="cam 1/part#1.png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["part_id"] == "SN-HTTP-1" and re.fullmatch(r"[0-9a-f]{32}", body["inspection_id"])
    assert body["verdict"] in ("pass", "fail", "manual_required") and body["backend"] == "onnxruntime"
    assert body["defect_detected"] == {"pass": False, "fail": True}.get(body["verdict"])
    assert 0.0 <= body["score"] <= 1.0 and 0.0 <= body["confidence"] <= 1.0
    assert body["confidence"] == pytest.approx(confidence(body["score"], body["threshold"]), abs=1e-6)
    assert body["processing_time_ms"] >= body["latency_ms"]["end_to_end_ms"] > 0
    # the same record the results log keeps, under the same id, with the upload's (sanitised) file name
    assert wait_until(lambda: body["inspection_id"] in logged(station), 10)
    record = logged(station)[body["inspection_id"]]
    assert (record.part_id, record.verdict, record.score) == ("SN-HTTP-1", body["verdict"], body["score"])
    assert record.source_name == "upload:cam_1_part_1.png"
    # an upload without a part id gets one in the station's own scheme
    r2 = upload(client, png(part_image(702)))
    assert r2.status_code == 200, r2.text
    run_id = station.pipeline.config.run_id
    assert re.fullmatch(rf"st-mqtt-{run_id}-u\d{{8}}", r2.json()["part_id"]), r2.json()["part_id"]


def test_the_same_image_gets_the_same_score_by_upload_as_through_a_camera_folder(api, tmp_path: Path,
                                                                                   bundle_dir: Path):
    _, client = api
    data = png(part_image(703, "crack"))
    by_upload = upload(client, data).json()["score"]
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "part.png").write_bytes(data)
    camera = build_station(station_settings(tmp_path, bundle_dir, source=frames, station_id="st-folder"))
    camera.pipeline.start()
    assert camera.pipeline.join(60)
    camera.close()
    log = ResultsLog(tmp_path / "var-st-folder" / "results.sqlite3")
    try:
        (record,) = list(log.inspections())
    finally:
        log.close()
    assert record.score == pytest.approx(by_upload, abs=1e-6)


@pytest.mark.parametrize(("data", "status", "says"), [
    (b"just some text, not an image", 415, "is not an image"),
    (NOT_A_PNG, 415, "is not an image"),
    (png(part_image(704))[:600], 422, "truncated"),
    (b"", 422, "empty"),
    (claiming_png(100_000, 100_000), 413, "over camera.max_pixels"),
])
def test_a_file_that_is_not_a_decodable_image_within_the_limits_is_refused_with_the_reason(api, data, status, says):
    _, client = api
    r = upload(client, data, filename="bad.png")
    assert r.status_code == status, r.text
    assert says in r.json()["detail"] and "bad.png" in r.json()["detail"]


def test_16_bit_data_the_camera_bit_depth_cannot_hold_is_refused(tmp_path: Path, bundle_dir: Path):
    station = build_station(station_settings(tmp_path, bundle_dir, source="none", http=HTTP,
                                             camera={"bit_depth": 8}))
    with serving(station) as client:
        r = upload(client, png(np.full((64, 64), 3000, np.uint16)))
        assert r.status_code == 422 and "camera.bit_depth = 8" in r.json()["detail"], r.text
        ok = upload(client, png(part_image(705)))
        assert ok.status_code == 200, ok.text


def test_bad_requests_get_415_or_422_with_the_reason(api):
    _, client = api
    image = png(part_image(706))
    # not multipart
    r = client.post("/inspect", content=image, headers={**auth("line_pc"), "Content-Type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    assert r.headers["connection"] == "close"
    # multipart without the image field
    r = client.post("/inspect", files={"picture": ("p.png", image, "image/png")}, headers=auth("line_pc"))
    assert r.status_code == 422 and "no file field 'image'" in r.json()["detail"]
    # a part id outside the pattern every part id follows
    r = upload(client, image, part_id="-not allowed-")
    assert r.status_code == 422 and "part_id" in r.json()["detail"]
    # two images
    two = [("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))]
    r = client.post("/inspect", files=two, headers=auth("line_pc"))
    assert r.status_code == 422 and "more than one" in r.json()["detail"]
    # two part ids: which would the record carry? Refused as two images are
    r = client.post("/inspect", files={"image": ("a.png", image, "image/png")},
                    data={"part_id": ["A1", "B2"]}, headers=auth("line_pc"))
    assert r.status_code == 422 and "more than one 'part_id'" in r.json()["detail"]


def test_a_body_over_max_upload_bytes_is_refused_with_413_before_it_is_read(api):
    station, client = api
    # A client announcing 50 MB gets 413 at once: the server answers without waiting for (or reading) the body.
    port = station.http.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /inspect HTTP/1.1\r\nHost: station\r\n"
                     + f"Authorization: Bearer {TOKENS['line_pc']}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 52428800\r\n\r\n")
        started = time.monotonic()
        response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        assert time.monotonic() - started < 5
        assert b"52428800 bytes, over http.max_upload_bytes = 262144" in response
    # A body without a length (chunked) is counted while it arrives and refused once it passes the limit.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /inspect HTTP/1.1\r\nHost: station\r\n"
                     + f"Authorization: Bearer {TOKENS['line_pc']}\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        pixels = b"x" * (MAX_UPLOAD // 4 - len(head))
        chunks = [head + pixels] + [b"x" * (MAX_UPLOAD // 4)] * 3  # exactly the limit: still taken
        for chunk in chunks:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        # then 16 more bytes: a client with 50 MB to send is cut off here (it stops sending once it has an
        # answer; a connection closed with bytes unread would be reset, and the answer lost)
        sock.sendall(b"10\r\n" + b"x" * 16 + b"\r\n")
        response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 ") and b"the rest is not read" in response, response[:300]
    # and the station goes on
    assert upload(client, png(part_image(707))).status_code == 200


def test_a_client_that_stalls_does_not_block_other_requests_and_is_cut_off(api, monkeypatch: pytest.MonkeyPatch):
    station, client = api
    port = station.http.server.port
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as body_stall, \
            socket.create_connection(("127.0.0.1", port), timeout=15) as head_stall:
        # Given one client that sent its headers and part of the body, and one that sent half a request head
        body_stall.sendall(b"POST /inspect HTTP/1.1\r\nHost: station\r\n"
                           + f"Authorization: Bearer {TOKENS['line_pc']}\r\n".encode()
                           + b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 5000\r\n\r\n"
                           + b"--xyz\r\n")
        head_stall.sendall(b"GET /health HTTP/1.1\r\nHost: sta")
        # When others call meanwhile, they are served at once
        started = time.monotonic()
        assert client.get("/health", headers=auth("line_pc")).status_code == 200
        assert upload(client, png(part_image(708))).status_code == 200
        assert time.monotonic() - started < 1.5
        # Then the stalled body gets 408 after http.upload_timeout_s, and the half head is closed
        response = _read_response(body_stall)
        assert response.startswith(b"HTTP/1.1 408 "), response[:200]
        assert b"upload_timeout_s = 2" in response
        assert head_stall.recv(1024) == b""
        assert time.monotonic() - started < 6


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (each of these responses closes it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_busy_station_answers_503_with_retry_after_and_a_late_verdict_504_with_its_inspection_id(
        tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from appliance.http import api as http_api

    gate = threading.Event()

    class Gated(OnnxRuntimeBackend):
        name = "onnxruntime"

        def run(self, slot: int):
            assert gate.wait(60)
            return super().run(slot)

        def run_with_map(self, slot: int):  # the pipeline's call where the backend offers defect maps
            assert gate.wait(60)
            return super().run_with_map(slot)

    def supervisor_factory(settings, bundle):
        onnx = bundle.path("onnx_fp32")
        return lambda on_event: BackendSupervisor(lambda: Gated(onnx, threads=1, slots=3, model_id="gated"),
                                                  "onnxruntime", None, on_event)

    # Given a station whose backend does not finish (yet), and uploads that wait briefly for room
    monkeypatch.setattr(runtime, "supervisor_factory", supervisor_factory)
    monkeypatch.setattr(http_api, "SUBMIT_WAIT_S", 0.3)
    station = build_station(station_settings(tmp_path, bundle_dir, source="none",
                                             http={**HTTP, "inspect_timeout_s": 2.0}))
    with serving(station) as client:
        image = png(part_image(709))
        responses: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: responses.append(upload(client, image))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        statuses = sorted(r.status_code for r in responses)
        # When more come than its queues hold: the overflow is refused at once, to be retried ...
        busy = [r for r in responses if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in busy), statuses
        # ... and those taken get 504 with the id under which they will still be recorded
        late = [r for r in responses if r.status_code == 504]
        assert late and len(late) + len(busy) == 8, statuses
        ids = {r.json()["inspection_id"] for r in late}
        gate.set()
        assert wait_until(lambda: ids <= set(logged(station)), 20)
        health = client.get("/health", headers=auth("line_pc")).json()
        assert health["http"]["inspect"]["503"] == len(busy) and health["http"]["inspect"]["504"] == len(late)


def test_an_upload_while_the_backend_is_lost_gets_the_fallback_verdict_a_camera_part_gets(tmp_path: Path,
                                                                                          bundle_dir: Path):
    import shutil

    # Given a station with a camera (triggered) whose model file is broken when its pipeline starts
    bundle = shutil.copytree(bundle_dir, tmp_path / "bundle")
    station = build_station(station_settings(tmp_path, bundle, http=HTTP))
    (bundle / ROLE_FILES["onnx_fp32"]).write_bytes(b"not an onnx model")
    with serving(station) as client:
        # When a camera part is triggered and a part is uploaded
        station.pipeline.trigger("CAM-1")
        r = upload(client, png(part_image(710)), part_id="UP-1")
        assert r.status_code == 200, r.text
        assert wait_until(lambda: {"CAM-1", "UP-1"} <= {x.part_id for x in logged(station).values()}, 20)
        camera = next(x for x in logged(station).values() if x.part_id == "CAM-1")
        # Then both go to a person, for the same reason, and the answer says there is no automatic verdict
        body = r.json()
        assert body["verdict"] == camera.verdict == "manual_required"
        assert body["reason"] == camera.reason and "onnx" in body["reason"].lower()
        assert body["backend"] == "none" and body["defect_detected"] is None
        assert body["score"] is None and body["confidence"] is None
        health = client.get("/health", headers=auth("line_pc")).json()
        assert health["station"]["mode"] == "manual_fallback" and health["station"]["backend"] == "none"


def test_a_stopping_station_refuses_uploads_with_503(tmp_path: Path, bundle_dir: Path):
    station = build_station(station_settings(tmp_path, bundle_dir, source="none", http=HTTP))
    with serving(station) as client:
        station.pipeline.stop()
        assert station.pipeline.join(30)
        r = upload(client, png(part_image(711)))
        assert r.status_code == 503 and "stopping" in r.json()["detail"] and "retry-after" not in r.headers


# --- auth -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "path", "status"), [
    ("line_pc", "/health", 200), ("line_pc", "/results", 403),
    ("inspector", "/health", 200), ("inspector", "/results", 200),
    ("admin", "/health", 200), ("admin", "/results", 200),
])
def test_each_role_may_do_what_it_is_for_and_no_more(api, role: str, path: str, status: int):
    _, client = api
    r = client.get(path, headers=auth(role))
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["detail"] == f"role {role} may not GET {path} (needs inspector or above)"


@pytest.mark.parametrize("role", ["line_pc", "inspector", "admin"])
def test_every_role_may_upload(api, role: str):
    _, client = api
    assert upload(client, png(part_image(712)), role=role).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKENS['admin']}"}, {"Authorization": "Bearer"}])
def test_a_missing_or_wrong_token_gets_401_on_every_endpoint(api, headers: dict[str, str]):
    _, client = api
    for r in (client.get("/health", headers=headers), client.get("/results", headers=headers),
              client.post("/inspect", files={"image": ("p.png", b"x", "image/png")}, headers=headers)):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text


def test_a_token_in_the_url_is_not_a_token(api):
    _, client = api
    assert client.get(f"/health?token={TOKENS['admin']}").status_code == 401
    assert client.get(f"/health?access_token={TOKENS['admin']}").status_code == 401


def test_auth_failures_are_counted_and_reported_as_rate_limited_events_without_the_token(api):
    station, client = api
    authn = station.http.station.auth
    saved = authn.report_every_s

    def reported() -> list[dict[str, Any]]:
        return [detail for _, kind, detail in station.results.events() if kind == "http_auth_failed"]

    try:
        authn.report_every_s = 1.5
        time.sleep(1.6)  # a fresh window
        before_events = len(reported())
        before = client.get("/health", headers=auth("admin")).json()["http"]["auth_failures"]
        # A scanner: 30 wrong tokens and 10 forbidden calls in a burst
        for i in range(30):
            client.get("/health", headers={"Authorization": f"Bearer scanner-guess-{i:08d}"})
        for _ in range(10):
            client.get("/results", headers=auth("line_pc"))
        after = client.get("/health", headers=auth("admin")).json()["http"]["auth_failures"]
        assert after["401"] - before["401"] == 30 and after["403"] - before["403"] == 10
        # one event for the burst ...
        assert wait_until(lambda: len(reported()) == before_events + 1, 10), reported()
        time.sleep(0.5)
        assert len(reported()) == before_events + 1
        # ... and after the window the next failure reports the count since
        time.sleep(1.5)
        client.get("/results", headers=auth("line_pc"))
        assert wait_until(lambda: len(reported()) == before_events + 2, 10), reported()
        last = reported()[-1]
        assert last["status"] == 403 and last["path"] == "/results" and last["since_last_report"] == 40
        assert last["client"] == "127.0.0.1"
        text = repr(station.results.events())
        assert not any(token in text for token in TOKENS.values()) and "scanner-guess" not in text
    finally:
        authn.report_every_s = saved


def test_without_tokens_the_api_is_open_on_loopback_and_refuses_to_start_on_any_other_address(tmp_path: Path,
                                                                                            bundle_dir: Path):
    with pytest.raises(ConfigError, match=r"http.bind = '0.0.0.0' without any token"):
        build_station(station_settings(tmp_path, bundle_dir, source="none",
                                       http={"enabled": True, "bind": "0.0.0.0", "port": 0}))
    station = build_station(station_settings(tmp_path, bundle_dir, source="none",
                                             http={"enabled": True, "port": 0}))
    with serving(station) as client:
        health = client.get("/health")
        assert health.status_code == 200
        # before the first part the latencies are not numbers yet: null, not NaN (which is no JSON)
        assert health.json()["station"]["latency_p50_ms"] is None
        assert health.json()["station"]["camera"]["kind"] == "none"
        assert client.get("/results").status_code == 200


def test_tokens_from_files_and_bad_tokens_are_config_errors_naming_the_key(tmp_path: Path, bundle_dir: Path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKENS["admin"] + "\n")
    from_file = {"enabled": True, "port": 0, "tokens": {"admin_file": str(token_file)}}
    station = build_station(station_settings(tmp_path, bundle_dir, source="none", http=from_file))
    with serving(station) as client:
        assert client.get("/results", headers=auth("admin")).status_code == 200
        assert client.get("/results", headers=auth("inspector")).status_code == 401
    for tokens, message in (({"admin_file": str(tmp_path / "missing")}, "http.tokens.admin_file .* cannot be read"),
                            ({"line_pc": "short"}, "http.tokens.line_pc: a token must be at least 16"),
                            ({"line_pc": TOKENS["admin"], "admin": TOKENS["admin"]},
                             "http.tokens.admin is the same token as http.tokens.line_pc")):
        with pytest.raises(ConfigError, match=message):
            build_station(station_settings(tmp_path, bundle_dir, source="none",
                                           http={"enabled": True, "port": 0, "tokens": tokens}))


# --- the server's life ------------------------------------------------------------------------------------------------


def test_a_taken_port_is_a_config_error_naming_bind_and_port_before_the_station_starts(tmp_path: Path,
                                                                                      bundle_dir: Path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        station = build_station(station_settings(tmp_path, bundle_dir, source="none", http={**HTTP, "port": port}))
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*another process"):
            station.start()
        assert not station.pipeline.alive
        station.close()


def test_appliance_run_serves_the_api_and_stops_it_cleanly_on_sigterm(tmp_path: Path, bundle_dir: Path):
    data_dir = tmp_path / "var"
    config = tmp_path / "station.toml"
    config.write_text(f'[station]\nid = "st-http"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "none"\n'
                      f'[inference]\nbackend = "onnxruntime"\nthreads = 1\n[storage]\ndata_dir = "{data_dir}"\n'
                      f'[mqtt]\nenabled = false\n[http]\nenabled = true\nport = 0\n'
                      f'[http.tokens]\nline_pc = "{TOKENS["line_pc"]}"\n')
    log_path = tmp_path / "station.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(config)], cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                                stderr=log_file)
        try:
            def port() -> int | None:
                found = re.search(r"HTTP API listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
                return int(found.group(1)) if found else None

            assert wait_until(lambda: port() is not None or proc.poll() is not None, 60), log_path.read_text()[-3000:]
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with httpx.Client(base_url=f"http://127.0.0.1:{port()}", timeout=30) as client:
                r = upload(client, png(part_image(713)), part_id="RUN-1")
                assert r.status_code == 200, r.text
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port()), timeout=2):
        pass
    log = ResultsLog(data_dir / "results.sqlite3")
    try:
        assert [(x.inspection_id, x.part_id) for x in log.inspections()] == [(r.json()["inspection_id"], "RUN-1")]
    finally:
        log.close()


# --- GET /results -----------------------------------------------------------------------------------------------------


def test_results_are_paged_forward_by_seq_or_time_with_the_next_cursor(api):
    station, client = api
    ids = [upload(client, png(part_image(720 + i)), part_id=f"PAGE-{i}").json()["inspection_id"] for i in range(5)]
    assert wait_until(lambda: set(ids) <= set(logged(station)), 10)
    headers = auth("inspector")
    newest = client.get("/results", params={"limit": 3}, headers=headers).json()
    assert [x["part_id"] for x in newest["results"]] == ["PAGE-2", "PAGE-3", "PAGE-4"]
    assert newest["next"] == newest["results"][-1]["seq"] and newest["more"] is False
    # forward from a seq, two at a time
    first_seq = newest["results"][0]["seq"] - 2  # PAGE-0's
    page = client.get("/results", params={"since": first_seq - 1, "limit": 2}, headers=headers).json()
    assert [x["part_id"] for x in page["results"]] == ["PAGE-0", "PAGE-1"] and page["more"] is True
    page = client.get("/results", params={"since": page["next"], "limit": 2}, headers=headers).json()
    assert [x["part_id"] for x in page["results"]] == ["PAGE-2", "PAGE-3"]
    page = client.get("/results", params={"since": page["next"], "limit": 2}, headers=headers).json()
    assert [x["part_id"] for x in page["results"]] == ["PAGE-4"] and page["more"] is False
    end = client.get("/results", params={"since": page["next"]}, headers=headers).json()
    assert end == {"results": [], "next": page["next"], "more": False}
    # by time: decided at or after PAGE-3 (ISO 8601, UTC)
    from datetime import datetime, timezone

    at = logged(station)[ids[3]].decided_at
    iso = datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")
    page = client.get("/results", params={"since": iso}, headers=headers).json()
    assert [x["part_id"] for x in page["results"]][:2] == ["PAGE-3", "PAGE-4"]
    record = page["results"][0]
    assert record["inspection_id"] == ids[3] and record["latency_ms"]["end_to_end_ms"] > 0


@pytest.mark.parametrize(("params", "says"), [({"limit": 1001}, "less than or equal to 1000"),
                                              ({"limit": 0}, "greater"),
                                              ({"since": "yesterday"}, "neither a result seq"),
                                              ({"since": "9" * 23}, "at most 18 digits")])
def test_results_refuse_a_bad_cursor_or_limit_with_422(api, params: dict[str, Any], says: str):
    _, client = api
    r = client.get("/results", params=params, headers=auth("inspector"))
    assert r.status_code == 422 and says in r.text, r.text


# --- GET /health ------------------------------------------------------------------------------------------------------


def test_health_is_the_station_status_with_the_http_counters(api):
    station, client = api
    body = client.get("/health", headers=auth("line_pc")).json()
    status = station.pipeline.status()
    assert body["ok"] is True and body["mqtt"] is None
    assert body["station"]["station_id"] == status.station_id and body["station"]["mode"] == "production"
    assert body["station"]["backend"] == "onnxruntime" and body["station"]["backend_ready"] is True
    assert body["station"]["camera"] == {"kind": "none", "source": "none", "connected": False, "fps": 0.0,
                                         "frames_delivered": 0, "frames_dropped": 0, "reconnects": 0,
                                         "last_frame_age_s": None, "last_error": None}
    assert set(body["station"]["queues"]) == {"preprocess", "infer", "decide"}
    assert body["sinks"]["http_waiters"] == 0 and body["sinks"]["results_log"] == 0
    assert body["http"]["uploads_in_flight"] == 0 and body["http"]["inspect"].get("ok", 0) >= 0


# --- the OpenAPI schema ------------------------------------------------------------------------------------------


def test_the_checked_in_openapi_schema_is_the_api_s_own():
    checked_in = (REPO / "docs" / "openapi.json").read_text()
    assert checked_in == schema_text(), \
        "docs/openapi.json is stale: python -m appliance.http.openapi --out docs/openapi.json"


def test_the_openapi_schema_names_every_endpoint_its_errors_and_bearer_auth():
    import json

    schema = json.loads(schema_text())
    review = {"/review", "/review/{inspection_id}", "/review/{inspection_id}/image", "/labels", "/stats",
              "/promotion"}  # their behaviour: test_http_review
    assert set(schema["paths"]) == {"/inspect", "/health", "/results"} | review
    inspect = schema["paths"]["/inspect"]["post"]
    assert "multipart/form-data" in inspect["requestBody"]["content"]
    assert {"200", "401", "403", "408", "413", "415", "422", "503", "504"} <= set(inspect["responses"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
