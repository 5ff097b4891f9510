"""The station's HTTP API (FastAPI): `POST /inspect`, `GET /health`, `GET /results`.

`create_app(api)` builds the application around a `StationApi` (what it needs of a running station); the
OpenAPI export (`python -m appliance.http.openapi`) builds it without one. Every route names the least role
it needs (auth.py); the review queue's routes (`/review`, `/review/{id}/image`, `POST /labels`) come as one
more `APIRouter` handed to `create_app(..., routers=[...])`, using `require(...)` the same way.

Nothing a client does may stall the station: the body is read asynchronously with a size limit and a deadline
(uploads.py); decoding, `Pipeline.submit` (which waits at most `SUBMIT_WAIT_S` for room) and results-log
reads run in worker threads, never on the event loop; the verdict is awaited with a deadline (504); at most
`MAX_UPLOADS_IN_FLIGHT` uploads are handled at once (503 with Retry-After beyond).
"""

from __future__ import annotations

import itertools
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from appliance import __version__
from appliance.http.auth import Authenticator, AuthFailure
from appliance.http.results_feed import DEFAULT_LIMIT, MAX_LIMIT, parse_since, read_page
from appliance.http.uploads import (
    IMAGE_FIELD,
    PART_ID_FIELD,
    UploadError,
    boundary_of,
    check_declared_length,
    decode_upload,
    read_upload,
)
from appliance.http.waiters import UPLOAD_SOURCE, ResultWaiters
from appliance.reporting.mqtt_link import LinkState
from appliance.reporting.payloads import PART_ID_PATTERN
from appliance.settings import CameraSection, HttpSection
from appliance.station.inspection import InspectionRecord
from appliance.station.pipeline import Pipeline, SubmitRefused
from appliance.station.status import StationStatus

log = logging.getLogger("appliance.http")

MAX_UPLOADS_IN_FLIGHT = 8  # uploads read, decoded or waiting for their verdict at once; more -> 503
SUBMIT_WAIT_S = 2.0  # how long an upload waits for room in the pipeline's first queue before 503 (busy)
RETRY_AFTER_S = 1


# --- what the API needs of a station --------------------------------------------------------------------------


@dataclass
class StationApi:
    """The running station as the API sees it (runtime.build_station makes one)."""

    pipeline: Pipeline
    results_path: Path
    waiters: ResultWaiters
    auth: Authenticator
    http: HttpSection
    camera: CameraSection
    link_state: Callable[[], LinkState] | None = None  # the MQTT link, when the station has one
    sink_errors: Callable[[], dict[str, int]] = dict
    uploads_in_flight: int = 0  # touched on the event loop only
    counts: dict[str, int] = field(default_factory=dict)  # outcome of POST /inspect -> count
    _upload_seq: itertools.count = field(default_factory=lambda: itertools.count(1))

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def next_part_id(self) -> str:
        """An upload without a part id: `<station>-<run>-u<seq>`, unique across restarts as camera part ids are."""
        config = self.pipeline.config
        run = f"-{config.run_id}" if config.run_id else ""
        return f"{config.station_id}{run}-u{next(self._upload_seq):08d}"


# --- response bodies (the OpenAPI schema, docs/openapi.json) ----------------------------------------------------


class InspectResult(BaseModel):
    """The verdict on one uploaded part, as recorded in the results log and sent to the sinks."""

    inspection_id: str = Field(description="The record's id in the results log (and on MQTT)")
    part_id: str
    defect_detected: bool | None = Field(
        description="true when the verdict is `fail`, false when it is `pass`; null when the station gives no "
        "automatic answer (`manual_required`: a person decides; `error`: the image could not be inspected)")
    verdict: str = Field(description="pass | fail | manual_required | error: what the line acts on")
    ai_verdict: str | None = Field(description="The model's own verdict (differs from `verdict` in shadow mode)")
    score: float | None = Field(description="The model's defect probability, 0..1; null when no model ran")
    confidence: float | None = Field(
        description="How far the score lies from the decision threshold, towards the end on its side: "
        "(score - threshold) / (1 - threshold) at or above it, (threshold - score) / threshold below; 0 at the "
        "threshold, 1 at a score of exactly 1 (or 0). Null when no model ran")
    threshold: float | None = Field(description="The operating point's threshold the score was judged against")
    processing_time_ms: float = Field(
        description="From the whole upload received to the verdict: decoding, queueing, preprocessing, inference "
        "and decision (the pipeline's own stages are in latency_ms)")
    mode: str
    backend: str = Field(description="tensorrt | onnxruntime | none (no model could run: manual_fallback)")
    model_id: str
    reason: str
    latency_ms: dict[str, float] = Field(description="The pipeline's stage latencies, as in the results log")


class ErrorResponse(BaseModel):
    detail: str
    inspection_id: str | None = Field(None, description="504 only: the part is still inspected and recorded "
                                                        "under this id (GET /results)")


class HttpStats(BaseModel):
    uploads_in_flight: int
    waiting_for_verdict: int
    inspect: dict[str, int] = Field(description="POST /inspect outcomes since start: ok, or the HTTP status")
    auth_failures: dict[str, int] = Field(description="401 and 403 responses since start")


class Health(BaseModel):
    ok: bool = Field(description="No station thread died and no fatal CUDA error (the process is not on its way "
                                 "to a restart)")
    station: StationStatus = Field(description="Pipeline.status(): mode, backend, counts, latencies (null before "
                                               "the first part), camera, queues, errors")
    mqtt: LinkState | None = Field(description="The broker link, null when MQTT is off")
    sinks: dict[str, int] = Field(description="Errors by sink since start")
    http: HttpStats
    version: str


class LoggedInspection(BaseModel):
    seq: int = Field(description="The results log's row number: the cursor for `since`")
    inspection_id: str
    part_id: str
    station_id: str
    source_name: str
    frame_index: int
    captured_at: float
    decided_at: float
    verdict: str
    ai_verdict: str | None
    score: float | None
    mode: str
    backend: str
    model_id: str
    reason: str
    latency_ms: dict[str, float]


class ResultsPage(BaseModel):
    results: list[LoggedInspection]
    next: int = Field(description="Pass as `since` for the following page")
    more: bool = Field(description="More results after this page are already in the log")


# --- authentication -------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token> (http.tokens in the station "
                                                    "config; one token per role)")


def require(role: str) -> Any:
    """A route dependency: the caller's role when it has `role`'s rights; 401 / 403 otherwise (and counted)."""

    # async: on the event loop (a few constant-time compares), not a worker thread per request
    async def check(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
        api = _station(request)
        method, path = request.method, request.url.path
        try:
            return api.auth.check(request.headers.get("authorization"), role, method, path)
        except AuthFailure as failure:
            api.auth.failed(failure, method, path, request.client.host if request.client else None)
            headers = {"WWW-Authenticate": "Bearer"} if failure.status == 401 else None
            raise HTTPException(failure.status, failure.reason, headers=headers) from None

    return Depends(check)


def _station(request: Request) -> StationApi:
    api = request.app.state.station
    if api is None:  # the schema-only application of the OpenAPI export
        raise HTTPException(503, "no station behind this application")
    return api


# --- the application ------------------------------------------------------------------------------------------

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [IMAGE_FIELD],
            "properties": {
                IMAGE_FIELD: {"type": "string", "format": "binary",
                              "description": "The part's image: PNG, JPEG, BMP, TIFF or WebP, 8 or 16 bits (read "
                                             "with camera.bit_depth), at most camera.max_pixels pixels"},
                PART_ID_FIELD: {"type": "string", "pattern": PART_ID_PATTERN,
                                "description": "The part's id; by default `<station>-<run>-u<seq>`"},
            },
        }}},
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def create_app(station: StationApi | None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The API around `station` (None: for the schema only). `routers`: more routes (the review queue's)."""
    app = FastAPI(
        title="Inspection station API", version=__version__,
        description="A visual-inspection station's HTTP API (README.md, \"The station's HTTP API\"). Every request "
                    "needs `Authorization: Bearer <token>`; roles line_pc < inspector < admin.",
        # The schema is exported to docs/openapi.json; the station serves no documentation pages.
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.station = station

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        response = await http_exception_handler(request, exc)
        if request.method == "POST":  # refused before its body was read (401, 403): do not read it
            response.headers["Connection"] = "close"
        return response

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        _station(request).count(str(exc.status))
        # The body may be partly unread: close the connection rather than read the rest of it.
        return JSONResponse({"detail": exc.detail}, exc.status, headers={"Connection": "close"})

    @app.post("/inspect", response_model=InspectResult, openapi_extra=_UPLOAD_BODY,
              responses=_errors(400, 401, 403, 408, 413, 415, 422, 503, 504),
              summary="Inspect an uploaded image (role line_pc)")
    async def inspect(request: Request, _role: str = require("line_pc")) -> Any:
        api = _station(request)
        if api.uploads_in_flight >= MAX_UPLOADS_IN_FLIGHT:
            api.count("503")
            return _busy(f"{MAX_UPLOADS_IN_FLIGHT} uploads are being inspected; retry")
        api.uploads_in_flight += 1
        try:
            return await _inspect(api, request)
        finally:
            api.uploads_in_flight -= 1

    @app.get("/health", response_model=Health, responses=_errors(401, 403),
             summary="The station's state (role line_pc)")
    async def health(request: Request, _role: str = require("line_pc")) -> Health:
        # On the event loop, where the upload counters change: status() and the link state only take short locks.
        api = _station(request)
        status = api.pipeline.status()
        return Health(
            ok=status.failure is None and status.fatal is None, station=status,
            mqtt=api.link_state() if api.link_state is not None else None, sinks=api.sink_errors(),
            http=HttpStats(uploads_in_flight=api.uploads_in_flight, waiting_for_verdict=api.waiters.waiting,
                           inspect=dict(api.counts),
                           auth_failures=api.auth.counts()),
            version=__version__,
        )

    @app.get("/results", response_model=ResultsPage, responses=_errors(401, 403, 422, 503),
             summary="Recorded inspections, paged (role inspector)")
    def results(request: Request, _role: str = require("inspector"),
                since: str | None = Query(None, description="A seq (the `next` of the previous page: results after "
                                                            "it) or an ISO 8601 time (results decided at or after "
                                                            "it; UTC when no zone is given). Absent: the newest."),
                limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)) -> Any:
        api = _station(request)
        try:
            cursor = parse_since(since)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            page = read_page(api.results_path, cursor, limit)
        except sqlite3.Error as exc:
            raise HTTPException(503, f"the results log cannot be read now: {exc}") from None
        return ResultsPage(results=[LoggedInspection(**r) for r in page.results], next=page.next, more=page.more)

    # The review queue (/review, /review/{id}/image) and POST /labels (role inspector) come as routers here.
    for router in routers:
        app.include_router(router)
    return app


def _busy(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, 503, headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


async def _inspect(api: StationApi, request: Request) -> Any:
    limits = api.http
    boundary = boundary_of(request.headers.get("content-type"))
    check_declared_length(request.headers.get("content-length"), limits.max_upload_bytes)
    try:
        upload = await read_upload(request.stream(), boundary, limits.max_upload_bytes, limits.upload_timeout_s)
    except ClientDisconnect:
        api.count("disconnected")
        return Response(status_code=400)  # never sent: the client is gone
    received = time.monotonic()
    part_id = upload.fields.get(PART_ID_FIELD, "").strip() or api.next_part_id()
    if re.fullmatch(PART_ID_PATTERN, part_id) is None:
        raise UploadError(422, f"part_id {part_id[:80]!r} is not 1-128 letters, digits and _ . : - starting with a "
                               "letter or digit")
    frame = await run_in_threadpool(decode_upload, upload.image, upload.filename, api.camera.max_pixels,
                                    api.camera.bit_depth)
    source_name = f"{UPLOAD_SOURCE}:{upload.filename}" if upload.filename else UPLOAD_SOURCE
    deadline = received + limits.inspect_timeout_s
    try:
        inspection_id = await run_in_threadpool(api.pipeline.submit, frame, part_id, source_name,
                                                min(SUBMIT_WAIT_S, limits.inspect_timeout_s))
    except SubmitRefused as exc:
        api.count("503")
        if exc.busy:
            return _busy(f"{exc.message}; retry")
        return JSONResponse({"detail": exc.message}, 503, headers={"Connection": "close"})
    record = await api.waiters.wait(inspection_id, max(0.0, deadline - time.monotonic()))
    if record is None:
        api.count("504")
        return JSONResponse(
            {"detail": f"no verdict within http.inspect_timeout_s = {limits.inspect_timeout_s:g} s; the part is "
                       "still inspected and recorded (GET /results)", "inspection_id": inspection_id}, 504)
    api.count("ok")
    return _result(api, record, (time.monotonic() - received) * 1000)


def _result(api: StationApi, record: InspectionRecord, elapsed_ms: float) -> InspectResult:
    config = api.pipeline.config
    threshold = config.operating_point_by_backend.get(record.backend, config.operating_point).threshold
    has_score = record.score is not None
    return InspectResult(
        inspection_id=record.inspection_id, part_id=record.part_id,
        defect_detected={"fail": True, "pass": False}.get(record.verdict), verdict=record.verdict,
        ai_verdict=record.ai_verdict, score=record.score,
        confidence=confidence(record.score, threshold) if has_score else None,
        threshold=threshold if has_score else None, processing_time_ms=round(elapsed_ms, 3), mode=record.mode,
        backend=record.backend, model_id=record.model_id, reason=record.reason, latency_ms=record.latency_ms,
    )


def confidence(score: float | None, threshold: float) -> float | None:
    """0 at the threshold, 1 at the end of the score's side (1.0 above, 0.0 below); see InspectResult."""
    if score is None:
        return None
    if score >= threshold:
        span = 1.0 - threshold
        value = (score - threshold) / span if span > 0 else 1.0
    else:
        value = (threshold - score) / threshold if threshold > 0 else 1.0
    return round(min(1.0, max(0.0, value)), 6)
