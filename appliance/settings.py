"""The one settings model of a station: a TOML file, overridden by APPLIANCE_* environment variables.

Nothing else in the code base reads configuration. Keys are a contract with the plant (documented in
README.md); unknown keys are errors, so a typo cannot silently fall back to a default.

Environment overrides use the prefix APPLIANCE_ and `__` between levels, e.g.
`APPLIANCE_MQTT__HOST=broker.local` or `APPLIANCE_MQTT__PASSWORD=...`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.inference.registry import CHOICES
from bundle.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

ENV_PREFIX = "APPLIANCE_"
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes `true` for 1 in a number field; `max_pixels = true` would quietly mean one pixel.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if set(get_args(annotation) or (annotation,)) & {int, float} and bool not in get_args(annotation):
                raise ValueError("a number is expected here, not true/false")
        return value


class StationSection(_Section):
    """Who this station is; the ids build the MQTT topic prefix <root>/<site>/<line>/<id>."""

    id: str = Field("station-01", pattern=_ID_PATTERN)
    site: str = Field("site", pattern=_ID_PATTERN)
    line: str = Field("line", pattern=_ID_PATTERN)


class ModelSection(_Section):
    bundle: Path = Path("artifacts/bundle")
    # Where `make engine` stores engines and manifests for this device.
    engine_dir: Path = Path("engines/store")
    # Verify every bundle file's sha256 at start (a few ms for a 20 MB model; leave on).
    verify_bundle: bool = True


class CameraSection(_Section):
    # A device index ("0"), a V4L2 path (/dev/video0), a video file, an rtsp:// or http:// URL, a
    # GStreamer pipeline ending in appsink, an image folder or glob, or "synthetic".
    source: str = "synthetic"
    loop: bool = False
    width: int | None = Field(None, ge=16)
    height: int | None = Field(None, ge=16)
    fps: float | None = Field(None, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # Bits per pixel of the camera's data (bundle.images.to_8bit scales them to 0..255): 8, 10, 12, 14,
    # 16, or "auto" (8-bit frames are 8-bit, 16-bit frames are full 16-bit data). A Mono10/Mono12 camera
    # sends 16-bit frames holding 0..1023 / 0..4095 and must say 10 / 12 here; a frame with values the
    # declared depth cannot hold gets an `error` verdict. Synthetic parts are always 8-bit.
    bit_depth: Literal["auto", 8, 10, 12, 14, 16] = "auto"
    # Largest image file accepted (width x height, read from the header before decoding): a larger or
    # unrecognised file gets an `error` verdict instead of exhausting memory. Up to 2**29.
    max_pixels: int = Field(50_000_000, ge=1, le=2**29)

    @model_validator(mode="before")
    @classmethod
    def _bit_depth_from_text(cls, data: Any) -> Any:
        # An environment variable is text: APPLIANCE_CAMERA__BIT_DEPTH=12 means the number 12.
        if isinstance(data, dict) and isinstance(data.get("bit_depth"), str) and data["bit_depth"].strip().isdigit():
            data = {**data, "bit_depth": int(data["bit_depth"])}
        return data


class InferenceSection(_Section):
    # One of registry.CHOICES: "auto" (TensorRT, falling back as configured) or a registered backend's name.
    backend: Literal[CHOICES] = "auto"  # type: ignore[valid-type]
    # With backend auto or tensorrt: run the bundle's FP32 ONNX on the CPU while the GPU is unusable,
    # instead of sending every part to manual inspection.
    cpu_fallback: bool = False
    threads: int = Field(2, ge=1, le=64)
    # The GPU is retried after 1 s, doubling up to this, while the station runs on a fallback.
    gpu_retry_max_s: float = Field(60.0, ge=1.0, le=3600.0)
    precision: Literal["fp16", "int8", "fp32"] = "fp16"
    # Run an engine built on another GPU model of the same compute capability (an AGX Orin engine on an Orin
    # NX, say). TensorRT advises against it (tactics timed on the other model); off, such an engine is refused.
    allow_other_gpu_model: bool = False


class DecisionSection(_Section):
    mode: Literal["production", "shadow", "manual_fallback"] = "production"
    # None: use the operating point stored in the bundle (chosen on validation data at training).
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    band_low: float | None = Field(None, ge=0.0, le=1.0)
    band_high: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _band_ordered(self) -> DecisionSection:
        if self.band_low is not None and self.band_high is not None and self.band_low > self.band_high:
            raise ValueError(f"band_low {self.band_low} is above band_high {self.band_high}")
        return self


class TriggerSection(_Section):
    # continuous: every frame is a part; triggered: one inspection per trigger carrying a part id.
    mode: Literal["continuous", "triggered"] = "continuous"


class TlsSection(_Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_root: str = Field("inspection", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    username: str | None = None
    password: SecretStr | None = None
    # A file holding the password (e.g. a systemd credential); used when `password` is not set.
    password_file: Path | None = None
    # The broker declares the station offline 1.5 x keepalive after it went silent (15 s by default).
    keepalive_s: int = Field(10, ge=5, le=120)
    heartbeat_s: float = Field(10.0, ge=0.5, le=3600)
    # Reconnect attempts start after 1 s and double up to this.
    reconnect_max_s: float = Field(30.0, ge=0.1, le=600)
    # The outbox (storage.data_dir/outbox.sqlite3) keeps every message until the broker acknowledged it,
    # within these bounds; over them it drops heartbeats first, then the oldest messages, and says so.
    outbox_max_messages: int = Field(100_000, ge=100)
    outbox_max_age_s: float = Field(7 * 86400, ge=60)
    # On a graceful stop, wait up to this long for the outbox to reach the broker (the rest waits for
    # the next start). systemd's TimeoutStopSec must be longer.
    drain_timeout_s: float = Field(10.0, ge=0, le=600)
    # A command payload larger than this is refused before it is parsed (a real command is under 250 bytes).
    max_command_bytes: int = Field(4096, ge=256, le=1_048_576)
    tls: TlsSection = TlsSection()


class WatchdogSection(_Section):
    # Under systemd with WatchdogSec (provisioning/appliance.service.in): an inference running longer than
    # this, or a connected live camera silent this long, stops the watchdog pings and systemd restarts us.
    stall_s: float = Field(30.0, ge=1.0, le=3600.0)


class StorageSection(_Section):
    # Results log, outbox and review images live here.
    data_dir: Path = Path("var")
    # Records (inspections and events) held in memory per store while it cannot be written (locked, disk
    # full, read-only, I/O error). When a store's backlog reaches this the station turns fail-safe:
    # manual_fallback until the store takes writes again. About 2 kB a record.
    pending_max: int = Field(10_000, ge=10, le=1_000_000)


class PromotionSection(_Section):
    """When the labels say a model may decide on its own (`appliance review promotion`): at least
    `min_labelled` labelled parts with an AI verdict, the detection rate's Wilson lower bound at `confidence`
    at least `min_detection_rate`, the false-positive rate's upper bound at most `max_false_positive_rate`."""

    min_labelled: int = Field(300, ge=1, le=10_000_000)
    min_detection_rate: float = Field(0.95, ge=0.0, le=1.0)
    max_false_positive_rate: float = Field(0.05, ge=0.0, le=1.0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class ReviewSection(_Section):
    """The review queue (`<storage.data_dir>/review/`): parts set aside for a person, with their pictures."""

    enabled: bool = True
    # Share of the confident verdicts (pass / fail in production) queued as an audit sample; manual_required
    # and shadow-mode parts are always queued.
    audit_rate: float = Field(0.01, ge=0.0, le=1.0)
    # The audit sample is a hash of the inspection id and this seed; unset: a random seed per start.
    audit_seed: int | None = Field(None, ge=0, lt=2**63)
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    # Bounds on the pictures (and defect maps): over them the oldest labelled items go first, then the oldest
    # unlabelled ones (counted: evicted_unreviewed).
    max_bytes: int = Field(2 * 2**30, ge=1)
    max_age_days: float = Field(90.0, gt=0, le=36_500)
    # Parts (each with its frame) held in memory while the review folder cannot be written, or the writer is
    # behind; more are not queued (counted: refused). The station is not held: the results log has each part.
    pending_max: int = Field(64, ge=1, le=100_000)
    promotion: PromotionSection = PromotionSection()


class HttpTokensSection(_Section):
    """One bearer token per role (README, "The station's HTTP API"), each in the file or, better, in a file of
    its own (`*_file`, e.g. a systemd credential; used when the token itself is not set). A role without a token
    cannot be used. line_pc: POST /inspect, GET /health; inspector: also GET /results; admin: everything."""

    line_pc: SecretStr | None = None
    line_pc_file: Path | None = None
    inspector: SecretStr | None = None
    inspector_file: Path | None = None
    admin: SecretStr | None = None
    admin_file: Path | None = None


class HttpSection(_Section):
    # The station's HTTP API (appliance/http/), started by `appliance run`. Without any token it starts only on a
    # loopback address (and then every local client has every role).
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: a free port chosen at start (tests)
    # A request body (the whole multipart upload) larger than this is refused with 413 while it is read.
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # The whole body must arrive within this (a client that stalls gets 408), and the verdict within this (504).
    upload_timeout_s: float = Field(30.0, gt=0, le=600)
    inspect_timeout_s: float = Field(10.0, gt=0, le=600)
    # Open connections and requests at once; beyond it a request gets 503 at once (uvicorn limit_concurrency).
    max_connections: int = Field(32, ge=2, le=1024)
    tokens: HttpTokensSection = HttpTokensSection()


class StationSettings(BaseSettings):
    """Everything a station is configured with."""

    model_config = SettingsConfigDict(
        extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__", validate_default=True
    )

    station: StationSection = StationSection()
    model: ModelSection = ModelSection()
    camera: CameraSection = CameraSection()
    inference: InferenceSection = InferenceSection()
    decision: DecisionSection = DecisionSection()
    trigger: TriggerSection = TriggerSection()
    mqtt: MqttSection = MqttSection()
    watchdog: WatchdogSection = WatchdogSection()
    storage: StorageSection = StorageSection()
    review: ReviewSection = ReviewSection()
    http: HttpSection = HttpSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file's content arrives as init kwargs (see load_settings); the environment wins
        # over it, so a secret or a one-off override never has to be written into the file.
        return (env_settings, init_settings)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def format_validation_errors(exc: ValidationError, source: str) -> list[str]:
    """One line per problem: `key.path = value: message`, naming the source: the file, or the environment
    variable when one sets that key (it wins over the file)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"][:2]).upper()
        origin = f"environment {env_name}" if err["loc"] and env_name in os.environ else source
        value = err.get("input")
        shown = "<missing>" if err["type"] == "missing" else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if ("password" in key or "token" in key) and err["type"] != "missing":
            shown = "<hidden>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against README.md)"
        lines.append(f"{origin}: {key} = {shown}: {msg}")
    return lines


def load_settings(path: str | Path | None = None) -> StationSettings:
    """Read the station config (TOML) and environment overrides; ConfigError lists every problem."""
    data = _read_toml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "environment"
    try:
        return StationSettings(**data)
    except ValidationError as exc:
        lines = format_validation_errors(exc, source)
        raise ConfigError(
            f"{len(lines)} problem(s) in the station configuration:\n  " + "\n  ".join(lines)
        ) from exc


def mqtt_password(settings: StationSettings) -> str | None:
    """The broker password from the setting or its file; ConfigError names an unreadable file."""
    m = settings.mqtt
    if m.password is not None:
        return m.password.get_secret_value()
    if m.password_file is None:
        return None
    try:
        return m.password_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file {m.password_file} cannot be read: {exc.strerror or exc}") from exc
