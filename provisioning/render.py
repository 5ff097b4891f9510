"""Render a station's config file and systemd unit from the templates beside this file.

Pure text in, text out (the CLI in __main__.py writes the files). The rendered config is validated with
the station's own settings model before anything is written, so a typo in a station id or a broker port
fails at provisioning time with the key named, not at 3 a.m. on the line.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from appliance.settings import StationSettings, format_validation_errors
from bundle.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Layout:
    """Where things live on a provisioned Jetson (install-jetpack6.sh creates these)."""

    prefix: Path = Path("/opt/appliance")  # the project and its .venv
    config_dir: Path = Path("/etc/appliance")  # station.toml, mqtt-password, ca.crt, station.env
    state_dir: Path = Path("/var/lib/appliance")  # results log, outbox, engines
    user: str = "appliance"

    @property
    def config_path(self) -> Path:
        return self.config_dir / "station.toml"


@dataclass(frozen=True)
class StationRequest:
    station_id: str
    site: str
    line: str
    broker: str = "broker.local:8883"  # host[:port]
    tls_ca: Path | None = None  # None with port 8883: <config_dir>/ca.crt
    tls: bool = True
    camera: str = "0"
    trigger: str = "continuous"
    precision: str = "fp16"
    mode: str = "shadow"
    bundle: Path | None = None  # default <prefix>/bundle


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _broker(text: str, tls: bool) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ConfigError(f"broker {text!r}: expected HOST or HOST:PORT")
    try:
        return host, int(port) if port else (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker {text!r}: port {port!r} is not a number") from exc


def render_station(req: StationRequest, layout: Layout = Layout()) -> str:
    """The station.toml text; ConfigError lists every key the settings model refuses."""
    host, port = _broker(req.broker, req.tls)
    tls_block = ""
    if req.tls:
        ca = req.tls_ca or layout.config_dir / "ca.crt"
        tls_block = f'\n[mqtt.tls]\nenabled = true\nca_file = "{ca}"\n'
    text = Template((TEMPLATES / "station.toml.in").read_text()).substitute(
        station_id=req.station_id, site=req.site, line=req.line, created=_now(), config_path=layout.config_path,
        bundle=req.bundle or layout.prefix / "bundle", engine_dir=layout.state_dir / "engines", camera=req.camera,
        precision=req.precision, mode=req.mode, trigger=req.trigger, mqtt_enabled="true", broker_host=host,
        broker_port=port, config_dir=layout.config_dir, tls_block=tls_block, state_dir=layout.state_dir,
    )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a value that broke the TOML (a quote in a camera URL, say)
        raise ConfigError(f"the rendered station config is not valid TOML ({exc}): check the values given") from exc
    from pydantic import ValidationError

    try:
        StationSettings.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_errors(exc, "station config")
        raise ConfigError("the values given make an invalid station config:\n  " + "\n  ".join(lines)) from exc
    return text


def render_unit(station_id: str, layout: Layout = Layout(), watchdog_s: int = 30, drain_timeout_s: float = 10.0,
                burst: int = 5, interval_s: int = 600) -> str:
    """The systemd unit text. TimeoutStopSec covers the pipeline's drain plus the outbox's drain, with margin."""
    if watchdog_s < 5:
        raise ConfigError(f"watchdog of {watchdog_s} s is too short: the station pings at half of it (use >= 10)")
    return Template((TEMPLATES / "appliance.service.in").read_text()).substitute(
        station_id=station_id, created=_now(), prefix=layout.prefix, config=layout.config_path,
        config_dir=layout.config_dir, state_dir=layout.state_dir, user=layout.user, watchdog_s=watchdog_s,
        stop_timeout_s=int(drain_timeout_s + 30), burst=burst, interval_s=interval_s,
    )
