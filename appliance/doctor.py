"""`appliance doctor`: is this station ready to inspect? One line per check, PASS / FAIL / SKIP.

Checks, in the order a technician would fix them: the model bundle, the GPU, TensorRT, the engine for
this device, the camera (opened, a frame read), the broker (a real login with the configured credentials
and TLS), the disk for the results log and outbox. Each check catches its own failure and says why; the
command exits 1 when any check FAILs (SKIP is for checks the configuration makes irrelevant, such as the
GPU on a station configured for ONNX Runtime).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.inference.registry import primary_backend
from appliance.settings import StationSettings
from bundle.errors import ApplianceError

Outcome = Literal["PASS", "FAIL", "SKIP"]
MIN_FREE_MB = 1024  # an outbox of 100,000 results is about 100 MB; leave room for logs and review images


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


def _run(name: str, fn: Callable[[], tuple[Outcome, str]]) -> Check:
    try:
        outcome, detail = fn()
    except ApplianceError as exc:
        outcome, detail = "FAIL", str(exc).replace("\n  hint:", "; hint:")
    except Exception as exc:  # a check must report, never crash the doctor
        outcome, detail = "FAIL", f"{type(exc).__name__}: {exc}"
    return Check(name, outcome, detail)


class Doctor:
    def __init__(self, settings: StationSettings, camera_timeout_s: float = 5.0, min_free_mb: int = MIN_FREE_MB):
        self.settings = settings
        self.camera_timeout_s = camera_timeout_s
        self.min_free_mb = min_free_mb
        self._bundle = None
        self._device = None

    @property
    def _uses_gpu(self) -> bool:
        return primary_backend(self.settings.inference.backend).gpu

    def checks(self) -> list[Check]:
        return [
            _run("model bundle", self.bundle),
            _run("GPU", self.gpu),
            _run("TensorRT", self.tensorrt),
            _run("engine", self.engine),
            _run("camera", self.camera),
            _run("broker", self.broker),
            _run("HTTP API", self.http),
            _run("disk", self.disk),
        ]

    def bundle(self) -> tuple[Outcome, str]:
        from bundle.format import load_bundle

        self._bundle = load_bundle(self.settings.model.bundle, verify=True)
        m = self._bundle.metadata
        return "PASS", f"{self._bundle.model_id} at {self.settings.model.bundle}, {len(m.files)} files verified"

    def gpu(self) -> tuple[Outcome, str]:
        if not self._uses_gpu:
            return "SKIP", "inference.backend = onnxruntime (CPU)"
        from engines.cuda_memory import cuda_available

        ok, detail = cuda_available()
        return ("PASS" if ok else "FAIL"), detail

    def tensorrt(self) -> tuple[Outcome, str]:
        if not self._uses_gpu:
            return "SKIP", "inference.backend = onnxruntime (CPU)"
        from engines.tensorrt import device_info

        self._device = device_info()
        d = self._device
        return "PASS", f"TensorRT {d.tensorrt_version} on {d.gpu_name} (compute capability {d.compute_capability})"

    def engine(self) -> tuple[Outcome, str]:
        if not self._uses_gpu:
            return "SKIP", "inference.backend = onnxruntime (CPU)"
        if self._bundle is None:
            return "FAIL", "no usable model bundle (see above)"
        if self._device is None:
            return "FAIL", "cannot be checked without TensorRT and a GPU (see above)"
        from appliance.inference.tensorrt import find_engine
        from engines.manifest import incompatibilities, load_manifest, manifest_path

        engine = find_engine(self.settings.model.engine_dir, self._bundle, self.settings.inference.precision,
                             self._device)
        manifest = load_manifest(manifest_path(engine))
        problems = incompatibilities(manifest, self._device,
                                     allow_other_gpu_model=self.settings.inference.allow_other_gpu_model)
        if problems:
            return "FAIL", f"{engine.name}: " + "; ".join(problems)
        v = manifest.validation or {}
        if not v.get("passed"):
            return "FAIL", f"{engine.name} has no passed validation: rebuild it with make engine"
        return "PASS", (f"{engine.name}, {manifest.precision}, built {manifest.built_utc}, validated "
                        f"(agreement {v.get('decision_agreement', float('nan')):.1%})")

    def camera(self) -> tuple[Outcome, str]:
        from appliance.camera import open_source

        started = time.monotonic()
        source = open_source(self.settings.camera)
        if source.state().kind == "none":
            source.close()
            return "SKIP", "camera.source = none: no camera, parts come only as uploads (POST /inspect)"
        try:
            deadline = started + self.camera_timeout_s
            while time.monotonic() < deadline:
                frame = source.read(timeout=max(0.05, deadline - time.monotonic()))
                if frame is not None:
                    if not frame.ok:
                        return "FAIL", f"{self.settings.camera.source}: first frame unusable: {frame.error}"
                    h, w = frame.image.shape[:2]
                    return "PASS", f"{source.state().source}: {w}x{h} frame after {time.monotonic() - started:.1f} s"
                if source.exhausted:
                    return "FAIL", f"{self.settings.camera.source} gave no frame (empty source)"
            state = source.state()
            why = f": {state.last_error}" if state.last_error else ""
            return "FAIL", f"{state.source}: no frame within {self.camera_timeout_s:g} s{why}"
        finally:
            source.close()

    def http(self) -> tuple[Outcome, str]:
        """The [http] tokens and exposure as `appliance run` checks them, and whether its port can be had."""
        h = self.settings.http
        if not h.enabled:
            return "SKIP", "http.enabled = false"
        import socket
        import urllib.error
        import urllib.request

        from appliance.http.auth import check_exposure, role_tokens

        check_exposure(h, role_tokens(h))  # ConfigError (a FAIL naming the key) as at start
        where = f"{h.bind}:{h.port}"
        try:
            with socket.create_server((h.bind, h.port)):
                return "PASS", f"tokens valid; {where} is free to listen on"
        except OSError as exc:
            try:  # taken: by this station's own API (doctor beside a running station), or by something else?
                with urllib.request.urlopen(f"http://{where}/inspector", timeout=2) as answer:
                    if b"inspector" in answer.read(4096).lower():
                        return "PASS", f"tokens valid; a station's API already answers on {where} (this one running?)"
            except (OSError, urllib.error.URLError):
                pass
            return "FAIL", f"cannot listen on {where}: {exc.strerror or exc} (another program holds the port?)"

    def broker(self) -> tuple[Outcome, str]:
        if not self.settings.mqtt.enabled:
            return "SKIP", "mqtt.enabled = false"
        from appliance.reporting.mqtt_link import LinkError, probe_broker
        from appliance.runtime import mqtt_link_config

        try:
            return "PASS", "logged in to " + probe_broker(mqtt_link_config(self.settings))
        except LinkError as exc:
            return "FAIL", str(exc)

    def disk(self) -> tuple[Outcome, str]:
        folder = self.settings.storage.data_dir
        probe_dir = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
        free_mb = shutil.disk_usage(probe_dir).free / 2**20
        if folder.exists():
            marker = folder / ".doctor-write-test"
            try:
                marker.write_text("ok")
                marker.unlink()
            except OSError as exc:
                return "FAIL", f"storage.data_dir {folder} is not writable: {exc.strerror or exc}"
        where = str(folder) if folder.exists() else f"{folder} (not created yet; checked {probe_dir})"
        if free_mb < self.min_free_mb:
            return "FAIL", f"{where}: {free_mb:.0f} MB free, below {self.min_free_mb} MB for the outbox and logs"
        return "PASS", f"{where}: {free_mb / 1024:.1f} GB free"


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':{width}s}  result  detail"]
    lines += [f"{c.name:{width}s}  {c.outcome:6s}  {c.detail}" for c in checks]
    failed = sum(c.outcome == "FAIL" for c in checks)
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return "\n".join(lines)
