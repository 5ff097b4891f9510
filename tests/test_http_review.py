"""The review queue over HTTP (README, "The station's HTTP API"): GET /review, GET /review/{id}, GET
/review/{id}/image (with the defect map overlay), POST /labels, GET /stats and the inspector page's files, on a
real station (`build_station` on the session's bundle, ONNX Runtime, camera source a folder of frames, shadow
mode: every part is queued) served by real uvicorn on a free loopback port, called with httpx.

Every wait has a deadline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from appliance.http.openapi import schema_text
from appliance.http.review_routes import MAX_LABEL_BYTES, OVERLAY_MAX_SIDE, render_overlay
from appliance.review.stats import label_stats
from appliance.runtime import Station, build_station
from bundle.preprocess import PreprocessSpec
from tests.support.frames import write_frames
from tests.support.settings import station_settings
from tests.support.waiting import wait_until

TOKENS = {"line_pc": "line-pc-0123456789abcdef", "inspector": "inspector-0123456789abcdef",
          "admin": "admin-0123456789abcdef0123"}
HTTP = {"enabled": True, "port": 0, "tokens": TOKENS}
PARTS = 6
REVIEW_PATHS = ("/review", "/review/{inspection_id}", "/review/{inspection_id}/image", "/labels", "/stats")


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def stop(station: Station) -> None:
    station.pipeline.stop()
    assert station.pipeline.join(30), "pipeline did not stop"
    station.stop_http()
    station.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Iterator[tuple[Station, httpx.Client]]:
    """A shadow-mode station that inspected PARTS frames from a folder (all of them queued), serving HTTP."""
    tmp = tmp_path_factory.mktemp("http-review")
    frames = write_frames(tmp / "frames", PARTS)
    station = build_station(station_settings(tmp, bundle_dir, source=frames, decision={"mode": "shadow"},
                                             http=HTTP))
    assert station.review is not None
    station.start()
    try:
        assert wait_until(lambda: len(station.review.store.items()) == PARTS, 60), station.review.store.items()
        assert station.http is not None and station.http.server.port
        with httpx.Client(base_url=f"http://127.0.0.1:{station.http.server.port}", timeout=30) as client:
            yield station, client
    finally:
        stop(station)


def queued(served: tuple[Station, httpx.Client], labelled: bool | None = False) -> list[dict[str, Any]]:
    _, client = served
    params = {} if labelled is None else {"labelled": labelled}
    r = client.get("/review", params={**params, "limit": 500}, headers=auth("inspector"))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def label(client: httpx.Client, role: str = "inspector", **body: Any) -> httpx.Response:
    return client.post("/labels", json=body, headers=auth(role))


def label_events(station: Station) -> list[dict[str, Any]]:
    return [detail for _, kind, detail in station.results.events() if kind == "label_recorded"]


# --- GET /review ----------------------------------------------------------------------------------------------


def test_the_queue_lists_every_queued_part_with_its_ai_verdict_score_mode_reason_model_and_times(served):
    station, client = served
    r = client.get("/review", headers=auth("inspector"))
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["queued"] == page["total"] == len(page["items"]) == PARTS and not page["more"]
    logged = {rec.inspection_id: rec for rec in station.results.inspections()}
    for item in page["items"]:
        rec = logged[item["inspection_id"]]
        assert (item["part_id"], item["ai_verdict"], item["score"], item["mode"], item["model_id"]) == (
            rec.part_id, rec.ai_verdict, rec.score, "shadow", rec.model_id)
        assert item["ai_verdict"] in ("pass", "fail") and 0.0 <= item["score"] <= 1.0
        assert item["queue_reason"] == "shadow" and item["verdict"] == rec.verdict
        assert item["captured_at"] <= item["decided_at"] <= item["queued_at"] + 1e-6
        assert item["has_image"] and item["has_defect_map"] and not item["evicted"]
        assert (item["width"], item["height"]) == (96, 96)


def test_the_queue_is_paged_unlabelled_first_and_filtered_by_labelled(served):
    _, client = served
    everything = queued(served, None)
    first = everything[0]["inspection_id"]
    # paged: offset/limit cover the same list, in order, with `more` until the last page
    pages, offset = [], 0
    while True:
        page = client.get("/review", params={"offset": offset, "limit": 4}, headers=auth("inspector")).json()
        pages += page["items"]
        offset += len(page["items"])
        if not page["more"]:
            break
    assert [i["inspection_id"] for i in pages] == [i["inspection_id"] for i in everything]
    # the oldest part labelled: it moves behind every unlabelled one
    r = label(client, inspection_id=first, verdict="pass")
    assert r.status_code == 200, r.text
    after = queued(served, None)
    unlabelled = [i for i in after if i["label"] is None]
    assert after[: len(unlabelled)] == unlabelled and first not in {i["inspection_id"] for i in unlabelled}
    assert queued(served, True)[0]["inspection_id"] == first
    page = client.get("/review", params={"labelled": False, "limit": 1}, headers=auth("inspector")).json()
    assert page["total"] == len(unlabelled) and page["unlabelled"] == len(unlabelled)
    assert page["more"] == (len(unlabelled) > 1)
    for params, says in (({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"offset": -1}, "offset")):
        r = client.get("/review", params=params, headers=auth("inspector"))
        assert r.status_code == 422 and says in r.text, r.text


# --- GET /review/{id} and the picture -------------------------------------------------------------------------


def test_one_item_and_an_unknown_id_gets_404_naming_it(served):
    _, client = served
    item = queued(served)[0]
    r = client.get(f"/review/{item['inspection_id']}", headers=auth("inspector"))
    assert r.status_code == 200 and r.json() == item, r.text
    for path in ("/review/no-such-inspection", "/review/no-such-inspection/image"):
        r = client.get(path, headers=auth("inspector"))
        assert r.status_code == 404, r.text
        assert r.json()["inspection_id"] == "no-such-inspection" and "'no-such-inspection'" in r.json()["detail"]


def test_the_picture_is_the_stored_file_and_the_overlay_lays_the_defect_map_over_it(served):
    station, client = served
    item = queued(served)[0]
    stored = station.review.store.item(item["inspection_id"])
    r = client.get(f"/review/{item['inspection_id']}/image", headers=auth("inspector"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (station.review.store.folder / stored.image_file).read_bytes()
    assert r.headers["x-overlay"] == "none" and "no-store" in r.headers["cache-control"]
    picture = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    r = client.get(f"/review/{item['inspection_id']}/image", params={"overlay": 1}, headers=auth("inspector"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
    assert r.headers["x-overlay"] == "defect_map"
    overlay = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == picture.shape
    # blended: neither the picture nor the colour map alone (the synthetic parts are gray; the overlay is not)
    assert np.abs(overlay.astype(int) - picture.astype(int)).mean() > 10
    spread = np.ptp(overlay.astype(int), axis=2).mean()
    assert spread > 20 and np.ptp(picture.astype(int), axis=2).mean() < 5


def test_the_overlay_colours_by_the_map_s_value_and_is_bounded_in_size():
    picture = np.full((3000, 2000), 128, np.uint8)
    hot = np.full((4, 4), -8.0, np.float32)
    hot[0, 0] = 8.0  # a defect in the top-left cell only
    out = render_overlay(picture, hot)
    assert out.shape == (OVERLAY_MAX_SIDE, round(2000 * OVERLAY_MAX_SIDE / 3000), 3)
    b, _, red = (out[20, 20].astype(int))
    b2, _, red2 = (out[-20, -20].astype(int))
    assert red > b + 40 and b2 > red2 + 40, (out[20, 20], out[-20, -20])  # red where it looked, blue elsewhere


def test_the_overlay_follows_the_preprocessing_s_crop_and_letterbox():
    picture = np.full((100, 200, 3), 128, np.uint8)
    hot = np.full((2, 2), 8.0, np.float32)
    # center_crop: the model saw the middle 100 x 100; the sides stay the picture
    crop = render_overlay(picture, hot, PreprocessSpec(input_height=64, input_width=64, resize="center_crop"))
    assert (crop[:, :45] == 128).all() and (crop[:, 155:] == 128).all() and not (crop[:, 55:145] == 128).all()
    # letterbox: the whole picture was seen, in the middle rows of the input: all of it is coloured
    box = render_overlay(picture, hot, PreprocessSpec(input_height=64, input_width=64, resize="letterbox"))
    assert not (box[:10] == 128).all(axis=2).any() and not (box[-10:] == 128).all(axis=2).any()


# --- POST /labels -----------------------------------------------------------------------------------------------


def test_a_label_is_stored_with_its_history_the_latest_wins_and_each_is_a_label_recorded_event(served):
    station, client = served
    item = queued(served)[-1]
    iid = item["inspection_id"]
    r = label(client, inspection_id=iid, verdict="fail", defect_type="crack", message_id="web-1")
    assert r.status_code == 200, r.text
    first = r.json()["label"]
    assert (first["verdict"], first["defect_type"], first["labeller"], first["source"]) == (
        "fail", "crack", "inspector", "http")  # the labeller defaults to the role
    # the same message id again: recorded once
    again = label(client, inspection_id=iid, verdict="fail", defect_type="crack", message_id="web-1")
    assert again.status_code == 200 and again.json()["label"]["seq"] == first["seq"]
    # the same message id for another part is not a resend: refused, rather than that label silently dropped
    other = next(i["inspection_id"] for i in queued(served) if i["inspection_id"] != iid)
    reused = label(client, inspection_id=other, verdict="pass", message_id="web-1")
    assert reused.status_code == 422 and reused.json()["field"] == "message_id", reused.text
    assert not station.review.store.labels(other)
    # a correction by an admin with a name: the later label counts, the first one stays
    r = label(client, "admin", inspection_id=iid, verdict="pass", labeller="A. Schmidt")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"]["labeller"] == "A. Schmidt" and body["item"]["label"]["verdict"] == "pass"
    assert [x["verdict"] for x in body["item"]["labels"]] == ["fail", "pass"]
    r = label(client, "admin", inspection_id=queued(served)[0]["inspection_id"], verdict="pass")
    assert r.json()["label"]["labeller"] == "admin"
    shown = client.get(f"/review/{iid}", headers=auth("inspector")).json()
    assert shown["label"]["labeller"] == "A. Schmidt" and len(shown["labels"]) == 2
    stored = station.review.store.labels(iid)
    assert [(x.verdict, x.labeller, x.source) for x in stored] == [("fail", "inspector", "http"),
                                                                   ("pass", "A. Schmidt", "http")]
    # each stored label announced once through the station's sinks (here: the results log's events)
    assert wait_until(lambda: len([e for e in label_events(station) if e["inspection_id"] == iid]) == 2, 10)
    events = [e for e in label_events(station) if e["inspection_id"] == iid]
    assert [(e["verdict"], e["labeller"], e["source"], e["message_id"]) for e in events] == [
        ("fail", "inspector", "http", "web-1"), ("pass", "A. Schmidt", "http", None)]
    assert events[0]["part_id"] == item["part_id"] and events[0]["ai_verdict"] == item["ai_verdict"]


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"verdict": "maybe"}, "verdict", "'pass' or 'fail'"),
    ({"verdict": None}, "verdict", "verdict"),
    ({"verdict": "pass", "inspection_id": None}, "inspection_id", "inspection_id"),
    ({"verdict": "fail", "defect_type": "a crack!"}, "defect_type", "defect_type"),
    ({"verdict": "pass", "defect_type": "crack"}, "defect_type", "a defect type goes with a 'fail' label"),
    ({"verdict": "pass", "labeller": "   "}, "labeller", "labeller"),
    ({"verdict": "pass", "labeller": "x" * 65}, "labeller", "labeller"),
    ({"verdict": "pass", "colour": "red"}, "colour", "colour"),
])
def test_a_bad_label_gets_422_naming_the_field(served, body: dict[str, Any], field: str, says: str):
    station, client = served
    iid = queued(served, None)[0]["inspection_id"]
    before = len(station.review.store.labels())
    r = client.post("/labels", json={"inspection_id": iid, **body}, headers=auth("inspector"))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and says in r.json()["detail"], r.json()
    assert len(station.review.store.labels()) == before


def test_a_label_for_an_unknown_inspection_is_404_naming_it_and_bodies_that_are_no_label_are_refused(served):
    _, client = served
    r = label(client, inspection_id="not-queued-1", verdict="pass")
    assert r.status_code == 404 and r.json()["inspection_id"] == "not-queued-1", r.text
    assert "'not-queued-1'" in r.json()["detail"]
    r = client.post("/labels", content=b"verdict=pass", headers={**auth("inspector"),
                                                                  "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415, r.text
    r = client.post("/labels", content=b"{not json", headers={**auth("inspector"), "Content-Type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["detail"]
    r = client.post("/labels", json=["pass"], headers=auth("inspector"))
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    big = json.dumps({"inspection_id": "x", "verdict": "pass", "labeller": "y" * MAX_LABEL_BYTES})
    r = client.post("/labels", content=big, headers={**auth("inspector"), "Content-Type": "application/json"})
    assert r.status_code == 413, r.text


# --- GET /stats -------------------------------------------------------------------------------------------------


def test_stats_are_the_label_statistics_of_the_review_store(served):
    station, client = served
    for item in queued(served)[:2]:
        assert label(client, inspection_id=item["inspection_id"], verdict=item["ai_verdict"]).status_code == 200
    r = client.get("/stats", headers=auth("inspector"))
    assert r.status_code == 200, r.text
    expected = label_stats(station.review.store.labelled_parts()).as_dict()
    assert r.json() == expected
    assert expected["labelled"] >= 2 and expected["agreement"]["n"] == expected["with_ai_verdict"]
    assert r.json()["modes"] == {"shadow": expected["labelled"]}
    narrow = client.get("/stats", params={"confidence": 0.5}, headers=auth("inspector")).json()
    assert narrow["confidence"] == 0.5 and narrow["agreement"]["low"] >= expected["agreement"]["low"]
    assert client.get("/stats", params={"model_id": "no-such-model"}, headers=auth("inspector")).json()["labelled"] == 0
    r = client.get("/stats", params={"confidence": 1.5}, headers=auth("inspector"))
    assert r.status_code == 422 and "confidence" in r.text


# --- GET /promotion ---------------------------------------------------------------------------------------------


def test_promotion_says_not_met_with_how_many_labels_are_missing(served):
    station, client = served
    r = client.get("/promotion", headers=auth("inspector"))
    assert r.status_code == 200, r.text
    body = r.json()
    # the model running now, judged on [review.promotion]'s defaults (300 labelled parts): far from enough here
    assert body["model_id"] == station.pipeline.status().model_id
    assert body["met"] is False and body["more_labels_needed"] > 0
    assert len(body["criteria"]) == 3 and not all(c["met"] for c in body["criteria"])
    # an empty model_id is no model id: the running model is judged
    assert client.get("/promotion", params={"model_id": ""}, headers=auth("inspector")).json() == body
    assert client.get("/promotion", headers=auth("line_pc")).status_code == 403


# --- roles ------------------------------------------------------------------------------------------------------


def test_review_routes_need_the_inspector_role(served):
    _, client = served
    iid = queued(served, None)[0]["inspection_id"]
    calls = [("GET", "/review", None), ("GET", f"/review/{iid}", None), ("GET", f"/review/{iid}/image", None),
             ("GET", "/stats", None), ("POST", "/labels", {"inspection_id": iid, "verdict": "pass"})]
    for method, path, body in calls:
        r = client.request(method, path, json=body, headers=auth("line_pc"))
        assert r.status_code == 403, (path, r.text)
        assert r.json()["detail"] == f"role line_pc may not {method} {path} (needs inspector or above)"
        r = client.request(method, path, json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        for role in ("inspector", "admin"):
            assert client.request(method, path, json=body, headers=auth(role)).status_code == 200, (path, role)


# --- the inspector page -----------------------------------------------------------------------------------------


def test_the_inspector_page_is_served_offline_with_a_strict_content_security_policy(served):
    _, client = served
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/inspector"
    page = client.get("/inspector")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "form-action 'none'" in csp
    html = page.text
    assert 'src="/inspector/inspector.js"' in html and 'href="/inspector/inspector.css"' in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere: works offline
    for name, kind in (("inspector.js", "text/javascript"), ("inspector.css", "text/css")):
        r = client.get(f"/inspector/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text
    js = client.get("/inspector/inspector.js").text
    assert "sessionStorage" in js and "Authorization" in js and "localStorage" not in js
    for name in ("../review_routes.py", "%2e%2e%2fapi.py", "nothing.js"):
        assert client.get(f"/inspector/{name}").status_code == 404


def test_a_station_without_a_review_queue_serves_no_review_routes(tmp_path: Path, bundle_dir: Path):
    station = build_station(station_settings(tmp_path, bundle_dir, source="none", http=HTTP,
                                             review={"enabled": False}))
    station.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{station.http.server.port}", timeout=30) as client:
            for path in ("/review", "/stats", "/inspector"):
                assert client.get(path, headers=auth("admin")).status_code == 404
            assert client.get("/health", headers=auth("admin")).status_code == 200
    finally:
        stop(station)


def test_the_openapi_schema_documents_the_review_routes():
    schema = json.loads(schema_text())
    paths = schema["paths"]
    assert set(REVIEW_PATHS) <= set(paths) and "/inspector" not in paths and "/" not in paths
    assert {"401", "403", "404", "422"} <= set(paths["/labels"]["post"]["responses"])
    body = paths["/labels"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inspection_id", "verdict"]
    assert body["properties"]["verdict"]["enum"] == ["pass", "fail"]
    assert {"404"} <= set(paths["/review/{inspection_id}/image"]["get"]["responses"])
