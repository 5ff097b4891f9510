"""Who may call the HTTP API: one bearer token per role, and the `http_auth_failed` events.

Roles, each with every right of the ones before it:

- `line_pc`: POST /inspect, GET /health (the line's PC that uploads parts);
- `inspector`: also GET /results (and the review queue and labels to come);
- `admin`: everything.

A request carries `Authorization: Bearer <token>` (never a token in the URL: URLs end up in logs). Missing or
unknown -> 401, a role without the right -> 403; each is counted and reported to the station's sinks as an
`http_auth_failed` event, rate-limited (at once the first time, then at most once per `report_every_s` with
the count since), so a scanner cannot flood the results log or the broker.

With no token configured at all the API is open (every client has every role), which is allowed only on a
loopback address (`check_exposure`).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.settings import HttpSection
from bundle.errors import ConfigError

log = logging.getLogger("appliance.http.auth")

ROLES: tuple[str, ...] = ("line_pc", "inspector", "admin")  # lowest first
MIN_TOKEN_CHARS = 16
EventSink = Callable[[str, dict[str, Any]], None]


def role_tokens(section: HttpSection) -> dict[str, str]:
    """role -> token from `http.tokens` (the token, else its `*_file`); ConfigError names the key at fault."""
    tokens: dict[str, str] = {}
    for role in ROLES:
        secret = getattr(section.tokens, role)
        path = getattr(section.tokens, f"{role}_file")
        if secret is not None:
            token = secret.get_secret_value().strip()
            where = f"http.tokens.{role}"
        elif path is not None:
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"http.tokens.{role}_file {path} cannot be read: {exc.strerror or exc}") from exc
            where = f"http.tokens.{role}_file {path}"
        else:
            continue
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ConfigError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters without spaces "
                              "(e.g. `openssl rand -hex 24`)")
        for other, known in tokens.items():
            if hmac.compare_digest(known, token):
                raise ConfigError(f"http.tokens.{role} is the same token as http.tokens.{other}: "
                                  "each role needs its own")
        tokens[role] = token
    return tokens


def is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def check_exposure(section: HttpSection, tokens: dict[str, str]) -> None:
    """ConfigError when the API would be open (no token) on an address other machines can reach."""
    if not tokens and not is_loopback(section.bind):
        raise ConfigError(
            f"http.bind = {section.bind!r} without any token in http.tokens: the API would let anyone on the network "
            "inspect parts and read results. Set http.tokens.line_pc / inspector / admin (or their *_file), or "
            'bind to "127.0.0.1"')


@dataclass(frozen=True)
class AuthFailure(Exception):
    status: int  # 401 or 403
    reason: str  # for the client and the event; never holds the token


class Authenticator:
    """The role a request's Authorization header gives, or AuthFailure; counts and reports every failure."""

    def __init__(self, tokens: dict[str, str], on_event: EventSink | None = None,
                 report_every_s: float = 60.0) -> None:
        self._tokens = [(role, token.encode()) for role, token in tokens.items()]
        self._on_event = on_event
        self.report_every_s = report_every_s
        self._lock = threading.Lock()
        self.failures: dict[int, int] = {401: 0, 403: 0}
        self._reported_at: float | None = None
        self._total_at_report = 0

    @property
    def open(self) -> bool:
        """No token configured: every client has every role (loopback only, see check_exposure)."""
        return not self._tokens

    def role_of(self, authorization: str | None) -> str:
        """The role of the bearer token in `authorization`; AuthFailure(401) when there is none or it is unknown."""
        if self.open:
            return ROLES[-1]
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthFailure(401, "missing bearer token (Authorization: Bearer <token>)")
        given = presented.strip().encode()
        found = None
        for role, token in self._tokens:  # every token compared, in constant time each: no early exit
            if hmac.compare_digest(given, token) and found is None:
                found = role
        if found is None:
            raise AuthFailure(401, "unknown token")
        return found

    def counts(self) -> dict[str, int]:
        """Failures since start by status ("401", "403")."""
        with self._lock:
            return {str(status): n for status, n in self.failures.items()}

    @staticmethod
    def allows(role: str, needed: str) -> bool:
        return ROLES.index(role) >= ROLES.index(needed)

    def check(self, authorization: str | None, needed: str, method: str, path: str) -> str:
        """The caller's role if it has `needed`'s rights, else AuthFailure(401 or 403)."""
        role = self.role_of(authorization)
        if not self.allows(role, needed):
            raise AuthFailure(403, f"role {role} may not {method} {path} (needs {needed} or above)")
        return role

    def failed(self, failure: AuthFailure, method: str, path: str, client: str | None) -> None:
        """Count a failure; report it as an `http_auth_failed` event unless one was reported within the window."""
        now = time.monotonic()
        with self._lock:
            self.failures[failure.status] = self.failures.get(failure.status, 0) + 1
            total = sum(self.failures.values())
            due = self._reported_at is None or now - self._reported_at >= self.report_every_s
            if not due:
                return
            since = total - self._total_at_report
            self._reported_at, self._total_at_report = now, total
        counts = self.counts()
        detail = {"status": failure.status, "reason": failure.reason, "method": method, "path": path[:200],
                  "client": client or "", "failures": counts, "since_last_report": since,
                  "report_every_s": self.report_every_s}
        # %r: the path is the client's text, decoded (a newline in it must not forge a journal line)
        log.warning("HTTP %d for %s %r from %s: %s (%d failure(s) since the last report)", failure.status,
                    method, path[:200], client, failure.reason, since)
        if self._on_event is not None:
            self._on_event("http_auth_failed", detail)
