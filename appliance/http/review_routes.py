"""The review queue over HTTP (README.md, "The station's HTTP API"), role inspector and above, and the inspector
page that uses nothing else.

- `GET /review`: queued items, unlabelled first (each oldest first), paged, with the AI verdict, score, mode,
  why each was queued, model id, times and its label history; the queue's counts beside the page.
- `GET /review/{id}`: one item (also one whose picture was evicted).
- `GET /review/{id}/image`: the stored picture as it is; `?overlay=1`: the picture with the model's defect map
  laid over it as a heat colour map (JPEG, at most `OVERLAY_MAX_SIDE` pixels a side, rendered in a worker
  thread of the request, at most `MAX_OVERLAYS` at once), or the plain picture when the item has no map
  (header `X-Overlay`: `defect_map` or `none`).
- `POST /labels`: JSON `{"inspection_id", "verdict": "pass"|"fail", "defect_type"?, "labeller"?, "message_id"?}`
  through `ReviewSink.record_label` with source `http`: stored with its history (a later label wins) and
  announced as one `label_recorded` event through the station's sinks, as `cmd/label` and the command line's
  labels are. The labeller defaults to the caller's role (`inspector`, `admin`).
- `GET /stats`: the labels' statistics (`appliance.review.stats.LabelStats.as_dict`).
- `GET /inspector` (and `GET /`, redirected): the inspector page, static files from `static/` (no
  authentication: the page holds no data; it asks for a bearer token and sends it with every API call).

Errors are `{"detail": "<why>"}` as everywhere in the API; an unknown inspection id is 404 naming it, a body
that is not a valid label 422 naming the field (`field`). Store reads and writes run in worker threads; a
review store that cannot be read or written now is 503.

`review_router(None)` builds the routes for the OpenAPI export: they answer 503 (no station behind them).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import cv2
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from appliance.http.api import ErrorResponse, require
from appliance.reporting.commands import UnknownInspection
from appliance.reporting.payloads import DEFECT_TYPE_PATTERN, LABELLER_MAX_CHARS, LABELLER_PATTERN, PART_ID_PATTERN
from appliance.reporting.sqlite_store import describe
from appliance.review.promotion import promotion_verdict
from appliance.review.queue import Label, QueuedItem
from appliance.review.sink import ReviewSink
from appliance.review.stats import PromotionCriteria
from bundle.preprocess import PreprocessSpec

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_LABEL_BYTES = 4096  # a label's JSON body; over it -> 413
LABEL_BODY_TIMEOUT_S = 10.0  # the whole label body must arrive within this -> else 408
OVERLAY_MAX_SIDE = 1024  # pixels: an overlay is scaled down to this on its longer side
OVERLAY_ALPHA = 0.45  # the heat map's weight in the blend
OVERLAY_JPEG_QUALITY = 90
MAX_OVERLAYS = 2  # overlays rendered at once (CPU the station's preprocessing also needs); more -> 503
OVERLAY_WAIT_S = 5.0
STATIC = Path(__file__).resolve().parent / "static"
# The inspector page's files: name -> media type (nothing else under static/ is served).
PAGE_FILES = {"inspector.html": "text/html; charset=utf-8", "inspector.js": "text/javascript; charset=utf-8",
              "inspector.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
_PAGE_HEADERS = {
    # Only this station's own files; images are blob: URLs made from authenticated fetches.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_PRIVATE = {"Cache-Control": "private, no-store"}


# --- bodies (the OpenAPI schema, docs/openapi.json) -----------------------------------------------------------


class LabelOut(BaseModel):
    seq: int = Field(description="The label's number in the review store (increasing)")
    inspection_id: str
    verdict: Literal["pass", "fail"]
    defect_type: str | None
    labeller: str
    labelled_at: float = Field(description="Epoch seconds (UTC)")
    source: Literal["cli", "mqtt", "http"]
    message_id: str | None


class ReviewItemOut(BaseModel):
    inspection_id: str
    part_id: str
    station_id: str
    source_name: str
    captured_at: float
    decided_at: float
    queued_at: float
    verdict: str = Field(description="What the line acted on: pass | fail | manual_required")
    ai_verdict: str | None = Field(description="The model's own verdict (differs from `verdict` in shadow mode)")
    score: float | None = Field(description="The model's defect probability, 0..1; null when no model ran")
    mode: str
    backend: str
    model_id: str
    decision_reason: str
    queue_reason: str = Field(description="Why it was queued: manual_required | shadow | audit | "
                                          "challenger_disagreement")
    width: int | None
    height: int | None
    has_image: bool = Field(description="GET /review/{id}/image has its picture")
    has_defect_map: bool = Field(description="GET /review/{id}/image?overlay=1 lays the defect map over it")
    evicted: bool = Field(description="Its files were deleted to keep review.max_bytes / max_age_days")
    label: LabelOut | None = Field(description="The latest label (the one that counts); null: unlabelled")
    labels: list[LabelOut] = Field(description="Every label given, oldest first")


class ReviewPage(BaseModel):
    items: list[ReviewItemOut]
    total: int = Field(description="Items matching the filter")
    offset: int
    limit: int
    more: bool = Field(description="More items after this page")
    queued: int = Field(description="Items in the queue (not evicted)")
    unlabelled: int = Field(description="Of them, without a label")


class LabelIn(BaseModel):
    """An inspector's label for a queued part; the latest label of an inspection counts."""

    model_config = ConfigDict(extra="forbid")

    inspection_id: str = Field(pattern=PART_ID_PATTERN, max_length=128)
    verdict: Literal["pass", "fail"] = Field(description="pass: a good part; fail: a defective one")
    defect_type: str | None = Field(None, pattern=DEFECT_TYPE_PATTERN,
                                    description="With `fail` only: 1 to 64 letters, digits and _ . -")
    labeller: str | None = Field(None, min_length=1, max_length=LABELLER_MAX_CHARS, pattern=LABELLER_PATTERN,
                                 description="Who labelled it; by default the caller's role (inspector, admin)")
    message_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="A label sent again with the same message id is recorded once")


class LabelRecorded(BaseModel):
    label: LabelOut
    item: ReviewItemOut


class RateOut(BaseModel):
    value: float
    low: float = Field(description="Wilson interval, lower end")
    high: float = Field(description="Wilson interval, upper end")
    successes: int
    n: int


class ConfusionOut(BaseModel):
    tp: int = Field(description="AI fail, person fail")
    fn: int = Field(description="AI pass, person fail")
    fp: int = Field(description="AI fail, person pass")
    tn: int = Field(description="AI pass, person pass")


class StatsOut(BaseModel):
    """appliance.review.stats.LabelStats: each inspection counted once, with its latest label."""

    confidence: float
    labelled: int
    with_ai_verdict: int
    without_ai_verdict: int
    confusion: ConfusionOut
    detection_rate: RateOut | None
    false_positive_rate: RateOut | None
    agreement: RateOut | None
    shadow_labelled: int
    shadow_agreement: RateOut | None
    first_labelled_at: float | None
    last_labelled_at: float | None
    models: dict[str, int]
    modes: dict[str, int]


class ReviewError(BaseModel):
    detail: str
    inspection_id: str | None = Field(None, description="404: the id not in the review queue")
    field: str | None = Field(None, description="422: the field of the label at fault")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ReviewError if status in (404, 422) else ErrorResponse} for status in statuses}


# The body is read and validated by hand (bounded, errors naming the field); the schema still documents it.
_LABEL_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": LabelIn.model_json_schema()}}}}


# --- conversions ----------------------------------------------------------------------------------------------


def _label(label: Label) -> LabelOut:
    return LabelOut(**label.as_dict())


def _item(item: QueuedItem, history: list[Label]) -> ReviewItemOut:
    labels = [_label(x) for x in history]
    evicted = item.evicted_at is not None
    return ReviewItemOut(
        inspection_id=item.inspection_id, part_id=item.part_id, station_id=item.station_id,
        source_name=item.source_name, captured_at=item.captured_at, decided_at=item.decided_at,
        queued_at=item.queued_at, verdict=item.verdict, ai_verdict=item.ai_verdict, score=item.score,
        mode=item.mode, backend=item.backend, model_id=item.model_id, decision_reason=item.decision_reason,
        queue_reason=item.queue_reason, width=item.width, height=item.height,
        has_image=item.image_file is not None and not evicted,
        has_defect_map=item.defect_map_file is not None and not evicted, evicted=evicted,
        label=labels[-1] if labels else (None if item.label is None else _label(item.label)), labels=labels)


def _not_found(inspection_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"inspection {inspection_id!r} is not in the review queue",
                         "inspection_id": inspection_id}, 404)


def _unavailable(exc: BaseException) -> HTTPException:
    return HTTPException(503, f"the review store cannot be read or written now: {describe(exc)}")


# --- the overlay ----------------------------------------------------------------------------------------------


def _model_region(height: int, width: int, spec: PreprocessSpec | None
                  ) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """Where the model's input lies on the picture, as the preprocessing put it there: (y0, y1, x0, x1) of the
    picture covered, and of the model input that covers it, both as fractions (bundle/preprocess._resize)."""
    full = (0.0, 1.0, 0.0, 1.0)
    if spec is None or spec.resize == "stretch" or (height, width) == (spec.input_height, spec.input_width):
        return full, full
    th, tw = spec.input_height, spec.input_width
    if spec.resize == "center_crop":
        scale = max(th / height, tw / width)
        nh, nw = max(th, round(height * scale)), max(tw, round(width * scale))
        y0, x0 = (nh - th) // 2, (nw - tw) // 2
        return (y0 / nh, (y0 + th) / nh, x0 / nw, (x0 + tw) / nw), full
    scale = min(th / height, tw / width)  # letterbox
    nh, nw = min(th, max(1, round(height * scale))), min(tw, max(1, round(width * scale)))
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    return full, (y0 / th, (y0 + nh) / th, x0 / tw, (x0 + nw) / tw)


def render_overlay(picture: np.ndarray, defect_map: np.ndarray, spec: PreprocessSpec | None = None,
                   max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """The picture (BGR or gray, uint8) with the defect map laid over it as a heat colour map (OpenCV's JET:
    blue where the model saw no defect, red where it did), BGR, at most `max_side` pixels a side.

    The map holds the defect-vs-ok logit difference per location (bundle/format.py, DEFECT_MAP_NAME); its
    colour is the logistic of that value, so the scale is the same for every part: 0.5 (green) is "either",
    and a good part stays blue. The map covers the model's input, placed on the picture as `spec`'s
    preprocessing placed the input (stretch: the whole picture)."""
    if picture.ndim == 2:
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
    elif picture.shape[2] == 4:
        picture = cv2.cvtColor(picture, cv2.COLOR_BGRA2BGR)
    height, width = picture.shape[:2]
    (py0, py1, px0, px1), (my0, my1, mx0, mx1) = _model_region(height, width, spec)
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        picture = cv2.resize(picture, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        height, width = picture.shape[:2]
    values = np.nan_to_num(np.asarray(defect_map, dtype=np.float32), nan=0.0, posinf=50.0, neginf=-50.0)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a defect map is (h, w), got shape {values.shape}")
    # The map over the model input at a resolution fine enough to crop, then its part over the picture.
    ih, iw = (spec.input_height, spec.input_width) if spec is not None else (max(values.shape[0], 64),
                                                                              max(values.shape[1], 64))
    ih, iw = min(ih, 1024), min(iw, 1024)
    heat_in = cv2.resize(values, (iw, ih), interpolation=cv2.INTER_LINEAR)
    heat_in = heat_in[round(my0 * ih):max(round(my0 * ih) + 1, round(my1 * ih)),
                      round(mx0 * iw):max(round(mx0 * iw) + 1, round(mx1 * iw))]
    y0, x0 = round(py0 * height), round(px0 * width)
    y1, x1 = max(y0 + 1, round(py1 * height)), max(x0 + 1, round(px1 * width))
    region = cv2.resize(heat_in, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    probability = 1.0 / (1.0 + np.exp(-np.clip(region, -50.0, 50.0)))
    heat = cv2.applyColorMap(np.round(probability * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    out = picture.copy()
    out[y0:y1, x0:x1] = cv2.addWeighted(picture[y0:y1, x0:x1], 1.0 - OVERLAY_ALPHA, heat, OVERLAY_ALPHA, 0.0)
    return out


def _file(folder: Path, rel: str | None) -> Path | None:
    """A file the store names, only inside its folder."""
    if rel is None:
        return None
    root = folder.resolve()
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


# --- the router -----------------------------------------------------------------------------------------------


def review_router(review: ReviewSink | None, spec: PreprocessSpec | None = None,
                  criteria: PromotionCriteria | None = None) -> APIRouter:
    """The review routes and the inspector page around the station's review sink (None: for the schema only).
    `spec`: the station's preprocessing, to place the defect map on a picture (None: stretched over it).
    `criteria`: `[review.promotion]`, for GET /promotion (None: that route answers 503)."""
    router = APIRouter()
    overlays = threading.BoundedSemaphore(MAX_OVERLAYS)

    def sink() -> ReviewSink:
        if review is None:
            raise HTTPException(503, "no review queue behind this application")
        return review

    def history(inspection_id: str | None = None) -> dict[str, list[Label]]:
        by_id: dict[str, list[Label]] = {}
        for label in sink().store.labels(inspection_id):
            by_id.setdefault(label.inspection_id, []).append(label)
        return by_id

    @router.get("/review", response_model=ReviewPage, responses=_errors(401, 403, 422, 503),
                summary="Queued parts, unlabelled first, paged (role inspector)")
    def review_list(_role: str = require("inspector"),
                    labelled: bool | None = Query(None, description="true: labelled only; false: unlabelled "
                                                                    "only; absent: both (unlabelled first)"),
                    model_id: str | None = Query(None, max_length=200, description="One model's items only"),
                    include_evicted: bool = Query(False, description="Also items whose files were evicted"),
                    offset: int = Query(0, ge=0),
                    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)) -> Any:
        store = sink().store
        try:
            items = store.items(include_evicted=include_evicted, labelled=labelled, model_id=model_id)
            every = items if labelled is None and model_id is None and not include_evicted else store.items()
            page = items[offset:offset + limit]
            labels = history() if page else {}
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None
        return ReviewPage(items=[_item(i, labels.get(i.inspection_id, [])) for i in page], total=len(items),
                          offset=offset, limit=limit, more=offset + len(page) < len(items), queued=len(every),
                          unlabelled=sum(i.label is None for i in every))

    @router.get("/review/{inspection_id}", response_model=ReviewItemOut, responses=_errors(401, 403, 404, 503),
                summary="One queued part with its label history (role inspector)")
    def review_item(inspection_id: Annotated[str, PathParam(max_length=200)],
                    _role: str = require("inspector")) -> Any:
        store = sink().store
        try:
            item = store.item(inspection_id)
            labels = history(inspection_id).get(inspection_id, []) if item is not None else []
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None
        if item is None:
            return _not_found(inspection_id)
        return _item(item, labels)

    @router.get("/review/{inspection_id}/image", response_class=Response, responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}},
              "description": "The picture; with overlay=1 and a defect map, a JPEG with the map laid over it "
                             "(header X-Overlay: defect_map, else none)"},
        **_errors(401, 403, 404, 503)}, summary="A queued part's picture, optionally with its defect map (role "
                                                "inspector)")
    def review_image(inspection_id: Annotated[str, PathParam(max_length=200)], _role: str = require("inspector"),
                     overlay: bool = Query(False, description="Lay the defect map over the picture as a heat "
                                                              "colour map (when the item has one)")) -> Any:
        store = sink().store
        try:
            item = store.item(inspection_id)
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None
        if item is None:
            return _not_found(inspection_id)
        picture = _file(store.folder, item.image_file) if item.evicted_at is None else None
        if picture is None:
            why = "was evicted (review.max_bytes / max_age_days)" if item.evicted_at is not None else \
                "is not on the disk (it could not be encoded, or was removed)"
            return JSONResponse({"detail": f"the picture of inspection {inspection_id!r} {why}",
                                 "inspection_id": inspection_id}, 404)
        media = "image/jpeg" if picture.suffix == ".jpg" else "image/png"
        defect_map = _file(store.folder, item.defect_map_file) if overlay and item.evicted_at is None else None
        if defect_map is None:
            return Response(picture.read_bytes(), media_type=media, headers={**_PRIVATE, "X-Overlay": "none"})
        if not overlays.acquire(timeout=OVERLAY_WAIT_S):
            return JSONResponse({"detail": f"{MAX_OVERLAYS} overlays are being rendered; retry"}, 503,
                                headers={"Retry-After": "1"})
        try:
            image = cv2.imdecode(np.frombuffer(picture.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
            values = np.load(defect_map, allow_pickle=False)
            if image is None:
                raise ValueError("the stored picture cannot be decoded")
            ok, encoded = cv2.imencode(".jpg", render_overlay(image, values, spec),
                                       [cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY])
            if not ok:
                raise ValueError("the overlay cannot be encoded")
        except (ValueError, OSError, cv2.error) as exc:
            raise HTTPException(500, f"the overlay of inspection {inspection_id!r} cannot be made: "
                                     f"{' '.join(str(exc).split())[:200]}") from None
        finally:
            overlays.release()
        return Response(encoded.tobytes(), media_type="image/jpeg", headers={**_PRIVATE, "X-Overlay": "defect_map"})

    @router.post("/labels", response_model=LabelRecorded, openapi_extra=_LABEL_BODY,
                 responses=_errors(401, 403, 404, 408, 413, 415, 422, 503),
                 summary="Label a queued part pass or fail (role inspector)")
    async def post_label(request: Request, role: str = require("inspector")) -> Any:
        body = await _read_label(request)
        if isinstance(body, JSONResponse):
            return body
        labeller = body.labeller if body.labeller is not None else role
        try:
            label = await run_in_threadpool(sink().record_label, body.inspection_id, body.verdict,
                                            labeller=labeller, defect_type=body.defect_type, source="http",
                                            message_id=body.message_id)
            item = await run_in_threadpool(sink().store.item, body.inspection_id)
            labels = await run_in_threadpool(history, body.inspection_id)
        except UnknownInspection:
            return _not_found(body.inspection_id)
        except ValueError as exc:  # the store's own rules (check_label): a defect type with `pass`, ...
            text = str(exc)
            field = next((f for f in ("defect_type", "labeller", "verdict", "message_id") if text.startswith(f)),
                         "defect_type" if "defect type" in text else None)
            return JSONResponse({"detail": text, "field": field}, 422)
        except (sqlite3.Error, OSError) as exc:
            raise HTTPException(503, f"the review store cannot record the label now ({describe(exc)}); retry "
                                     "with the same message_id") from None
        if item is None:  # evicted entirely between the label and this read: the label stands
            return _not_found(body.inspection_id)
        return LabelRecorded(label=_label(label), item=_item(item, labels.get(body.inspection_id, [])))

    @router.get("/stats", response_model=StatsOut, responses=_errors(401, 403, 422, 503),
                summary="What the labels say about the model (role inspector)")
    def stats(_role: str = require("inspector"),
              model_id: str | None = Query(None, max_length=200, description="One model's labels only"),
              confidence: float = Query(0.95, gt=0.0, lt=1.0, description="Of the Wilson intervals")) -> Any:
        try:
            return sink().store.stats(model_id, confidence).as_dict()
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None

    @router.get("/promotion", responses=_errors(401, 403, 422, 503),
                summary="Whether a model has met [review.promotion] on the labels (role inspector)")
    def promotion(_role: str = require("inspector"),
                  model_id: str | None = Query(None, max_length=200,
                                               description="The model to judge (default: the one running now)")
                  ) -> Any:
        if criteria is None:
            raise HTTPException(503, "no promotion criteria behind this application")
        try:
            model, _labelled, verdict = promotion_verdict(sink().store, criteria, model_id or None)
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from None
        return {"model_id": model, **verdict.as_dict()}

    # --- the inspector page -----------------------------------------------------------------------------------
    @router.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/inspector", 303)

    @router.get("/inspector", include_in_schema=False)
    async def page() -> Response:
        return _page_file("inspector.html")

    @router.get("/inspector/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        return _page_file(name)

    return router


def _page_file(name: str) -> Response:
    media = PAGE_FILES.get(name)
    if media is None:
        return JSONResponse({"detail": f"no file {name[:60]!r} here"}, 404)
    return Response((STATIC / name).read_bytes(), media_type=media, headers=_PAGE_HEADERS)


async def _read_label(request: Request) -> LabelIn | JSONResponse:
    """The label in the request's JSON body: 415 not JSON, 413 over MAX_LABEL_BYTES, 408 too slow, 422 invalid
    (naming the field)."""
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPException(415, f"content type {kind or 'none'!r}: send the label as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_LABEL_BYTES:
        raise HTTPException(413, f"a label is at most {MAX_LABEL_BYTES} bytes of JSON; not read")

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > MAX_LABEL_BYTES:
                raise HTTPException(413, f"a label is at most {MAX_LABEL_BYTES} bytes of JSON")
        return bytes(data)

    try:
        raw = await asyncio.wait_for(read(), LABEL_BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the label did not arrive within {LABEL_BODY_TIMEOUT_S:g} s") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return _invalid(f"the body is not JSON: {exc}", None)
    if not isinstance(data, dict):
        return _invalid('the body must be a JSON object {"inspection_id", "verdict", ...}', None)
    try:
        return LabelIn.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(x) for x in error["loc"]) or None
        given = error.get("input")
        shown = f", got {json.dumps(given)[:80]}" if error["type"] != "missing" and _jsonable(given) else ""
        return _invalid(f"{field}: {error['msg']}{shown}", field)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _invalid(detail: str, field: str | None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field}, 422)
