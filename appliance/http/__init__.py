"""The station's HTTP API (README.md, "The station's HTTP API"): FastAPI served by uvicorn in a thread of the
station, when `[http] enabled = true`. A layer above reporting (it reads the results log and the MQTT link's
state, and reports through the station's sinks), below runtime, which builds it (`build_http`).

Modules:

- `api`: the application (`create_app`), its routes (`POST /inspect`, `GET /health`, `GET /results`), the
  response bodies of the OpenAPI schema, `StationApi` (what it needs of a station), `confidence`.
- `auth`: roles (line_pc < inspector < admin), tokens from `http.tokens`, `Authenticator` (401 / 403, the
  rate-limited `http_auth_failed` event), `check_exposure` (no token: loopback only).
- `uploads`: from a multipart body to a frame: content type, size while reading, deadline, decoding with
  `camera.max_pixels` and `camera.bit_depth`; `UploadError` carries the HTTP status.
- `waiters`: `ResultWaiters`, the sink that hands an upload's record to the request waiting for it.
- `results_feed`: pages of the results log over a read-only connection.
- `server`: `HttpServer` (bind, start, stop; uvicorn with the limits that keep a client from holding it).
- `openapi`: `python -m appliance.http.openapi --out docs/openapi.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.http.api import StationApi, create_app
from appliance.http.auth import Authenticator, check_exposure, role_tokens
from appliance.http.server import HttpServer
from appliance.http.waiters import ResultWaiters
from appliance.reporting.mqtt_link import LinkState
from appliance.settings import StationSettings
from appliance.station.pipeline import Pipeline
from appliance.threads import FailureSink

__all__ = ["HttpApi", "HttpServer", "ResultWaiters", "StationApi", "build_http", "create_app"]


@dataclass
class HttpApi:
    """What `build_http` makes: the sink to add to the fan-out, the server to start and stop, and their state."""

    waiters: ResultWaiters
    station: StationApi
    server: HttpServer


def build_http(settings: StationSettings, pipeline: Pipeline, results_path: Path, *,
               on_event: Callable[[str, dict[str, Any]], None], on_failure: FailureSink,
               link_state: Callable[[], LinkState] | None = None,
               sink_errors: Callable[[], dict[str, int]] = dict, routers: Sequence[Any] = ()) -> HttpApi:
    """The HTTP API of a station, not yet listening. ConfigError: a token file that cannot be read, a token too
    short or shared by two roles, or no token at all on an address other than loopback."""
    section = settings.http
    tokens = role_tokens(section)
    check_exposure(section, tokens)
    waiters = ResultWaiters()
    station = StationApi(pipeline=pipeline, results_path=results_path, waiters=waiters,
                         auth=Authenticator(tokens, on_event), http=section, camera=settings.camera,
                         link_state=link_state, sink_errors=sink_errors)
    server = HttpServer(create_app(station, routers), section, on_failure)
    return HttpApi(waiters, station, server)
