"""The `appliance` command: the station's one entry point (subcommands grow with the product).

Exit codes: 0 ok, 1 unexpected failure, 2 configuration error, 3 dataset/image error, 4 model bundle
error, 5 checkpoint error; see bundle/errors.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from appliance import __version__
from bundle.errors import ApplianceError, ConfigError

DESCRIPTION = """\
Visual-inspection station runtime.

A station reads parts from a camera, classifies each with the model bundle (TensorRT on the Jetson's
GPU, ONNX Runtime on a CPU), decides pass / fail / manual_required, and reports to the control room.
Configuration is one TOML file (see README.md, "Station configuration"), overridable with
APPLIANCE_<SECTION>__<KEY> environment variables.
"""


def _cmd_check_config(args: argparse.Namespace) -> int:
    from appliance.settings import load_settings

    settings = load_settings(args.file)
    mqtt_line = "off"
    if settings.mqtt.enabled:
        from appliance.runtime import mqtt_link_config

        link = mqtt_link_config(settings)  # TLS and password files must exist: ConfigError names the key
        login = f" as {link.username}" if link.username else ""
        mqtt_line = f"{link.broker}{login}  topics {link.topics.prefix}/..."
    http_line = "off"
    if settings.http.enabled:
        from appliance.http.auth import check_exposure, role_tokens

        tokens = role_tokens(settings.http)  # ConfigError: a token too short, shared, or a file unreadable
        check_exposure(settings.http, tokens)
        roles = ", ".join(tokens) or "none (loopback only)"
        http_line = f"http://{settings.http.bind}:{settings.http.port}  token roles: {roles}"
    print(f"{args.file}: OK")
    print(f"  station  {settings.station.site}/{settings.station.line}/{settings.station.id}")
    print(f"  model    {settings.model.bundle}  backend={settings.inference.backend}")
    print(f"  camera   {settings.camera.source}  trigger={settings.trigger.mode}")
    print(f"  mqtt     {mqtt_line}")
    print(f"  http     {http_line}")
    return 0


def _cmd_show_bundle(args: argparse.Namespace) -> int:
    from bundle.format import load_bundle

    bundle = load_bundle(args.bundle, verify=True)
    m = bundle.metadata
    p = m.preprocess
    print(f"bundle {bundle.root}  (all {len(m.files)} file hashes verified)")
    print(f"  model       {bundle.model_id}  backbone {m.backbone}  created {m.created_utc}")
    print(f"  input       {m.input_name} {p.channels}x{p.input_height}x{p.input_width} {p.color}, "
          f"resize {p.resize}, mean {p.mean}, std {p.std}")
    print(f"  classes     {', '.join(m.class_names)}")
    for out in m.outputs:
        print(f"  output      {out.name} {out.dtype} ({', '.join(str(d) for d in out.shape)})")
    d = m.decision
    print(f"  decision    fp32 and ONNX Runtime fail at defect probability >= {d.threshold:.4f}; manual band "
          f"[{d.band_low:.4f}, {d.band_high:.4f}] (target recall {d.target_recall})")
    for precision, d in m.decision_by_precision.items():
        print(f"  {precision:5s}       engines fail at >= {d.threshold:.4f}; manual band "
              f"[{d.band_low:.4f}, {d.band_high:.4f}]")
    for precision, metrics in m.metrics.items():
        print(f"  {precision:5s}       held-out accuracy {metrics.get('accuracy', float('nan')):.4f}  "
              f"recall {metrics.get('recall', float('nan')):.4f}  F1 {metrics.get('f1', float('nan')):.4f}"
              " at the FP32 threshold")
        if "own_point_threshold" in metrics:
            print(f"              at its own threshold: accuracy {metrics['own_point_accuracy']:.4f}  "
                  f"recall {metrics['own_point_recall']:.4f}  F1 {metrics['own_point_f1']:.4f}")
    for role, f in m.files.items():
        print(f"  file        {role:10s} {f.path:22s} {f.bytes:>10d} bytes  sha256 {f.sha256[:16]}...")
    return 0


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (OpenCV's span several), with its type if foreign."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if isinstance(exc, ApplianceError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cmd_classify(args: argparse.Namespace) -> int:
    """Classify image files with the bundle's FP32 model on ONNX Runtime (CPU)."""
    import numpy as np

    from bundle.decision import OperatingPoint, Verdict, decide, defect_score
    from bundle.format import load_bundle
    from bundle.images import DEFAULT_MAX_PIXELS, bit_depth_warning, decode_image, list_images, to_8bit
    from bundle.onnx_runtime import OnnxRuntimeBackend
    from bundle.preprocess import preprocess

    bundle = load_bundle(args.bundle)
    meta = bundle.metadata
    backend = OnnxRuntimeBackend(bundle.path("onnx_fp32"), threads=args.threads)
    op = OperatingPoint(meta.decision.threshold, meta.decision.band_low, meta.decision.band_high)
    paths: list[Path] = []
    for item in args.images:
        try:
            paths += list_images(item) if item.is_dir() else [item]
        except OSError as exc:
            raise ConfigError(f"folder {item} cannot be listed: {exc.strerror or exc}") from exc
    if not paths:
        raise ConfigError(f"no images found in {', '.join(str(i) for i in args.images)}")
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    buf = np.empty((1, *meta.preprocess.input_shape), dtype=np.float32)
    counts: dict[str, int] = {}
    for path in paths:
        # Whatever goes wrong with one image (a hostile file, a decoder error, memory) is that image's
        # `error` line: the others are still classified and the summary still printed.
        try:
            raw = decode_image(path, max_pixels)
            warning = bit_depth_warning(raw, args.bit_depth)
            preprocess(to_8bit(raw, args.bit_depth), meta.preprocess, out=buf[0])
            del raw  # a large frame need not stay in memory while the next one is read
            score = defect_score(backend.infer(buf)[0], meta.defect_index)
            verdict = decide(score, op).value
            detail = f"defect probability {score:.4f}" + (f"  (warning: {warning})" if warning else "")
        except MemoryError:
            verdict, detail = Verdict.ERROR.value, "out of memory while reading or classifying this image"
        except Exception as exc:
            verdict, detail = Verdict.ERROR.value, _first_line(exc)
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{path}: {verdict:15s} {detail}", flush=True)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"  (model {bundle.model_id})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    from appliance.runtime import run
    from appliance.settings import load_settings

    settings = load_settings(args.config)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s station={settings.station.id} %(name)s: %(message)s",
    )
    return run(settings, max_seconds=args.max_seconds, trigger_stdin=args.trigger_stdin)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import Doctor, format_table
    from appliance.settings import load_settings

    settings = load_settings(args.config)
    checks = Doctor(settings, camera_timeout_s=args.camera_timeout, min_free_mb=args.min_free_mb).checks()
    s = settings.station
    print(f"station {s.site}/{s.line}/{s.id} ({args.config or 'environment'})")
    print(format_table(checks))
    return 1 if any(c.outcome == "FAIL" for c in checks) else 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from engines.__main__ import main as engines_main

    return engines_main(args.engine_args)


def build_parser() -> argparse.ArgumentParser:
    from bundle.images import bit_depth_option, max_pixels_option

    parser = argparse.ArgumentParser(
        prog="appliance", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a station config file and print every problem",
                       description="Validate a station TOML file (and APPLIANCE_* environment overrides). "
                       "Prints each problem as `file: key.path = value: message` and exits 2 if any.")
    p.add_argument("file", type=Path, help="station config, e.g. /etc/appliance/station.toml")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("run", help="inspect parts from the configured camera until stopped",
                       description="Run the station: camera -> preprocess -> inference -> decision -> results log "
                       "(and reports). SIGTERM or Ctrl-C stops capture, finishes the parts in flight, records them "
                       "and exits 0. A file, folder or synthetic source ends the run when it is exhausted.")
    p.add_argument("--config", type=Path, help="station TOML (default: defaults + APPLIANCE_* environment)")
    p.add_argument("--max-seconds", type=float, help="stop after this long (tests, soak runs)")
    p.add_argument("--trigger-stdin", action="store_true",
                   help="trigger.mode=triggered: read one part id per line from standard input")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("doctor", help="check GPU, TensorRT, engine, camera, broker and disk; exit 1 on a failure",
                       description="Check that this station can run: model bundle (hashes), GPU, TensorRT version, an "
                       "engine built and validated for this device, the camera gives a frame, the broker accepts the "
                       "configured login (and TLS), storage.data_dir is writable with free space. Prints a "
                       "PASS / FAIL / SKIP table; exits 1 when any check fails.")
    p.add_argument("--config", type=Path, help="station TOML (default: defaults + APPLIANCE_* environment)")
    p.add_argument("--camera-timeout", type=float, default=5.0, help="seconds to wait for a first frame")
    p.add_argument("--min-free-mb", type=int, default=1024, help="free space required in storage.data_dir")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("engine", help="build / list TensorRT engines for this device (as python -m engines)",
                       description="Same as `python -m engines`: build (and validate) a TensorRT engine from a bundle "
                       "on this device, list the engines in the store, or show a build plan. "
                       "`appliance engine build --help` for the options.", add_help=False)
    p.add_argument("engine_args", nargs=argparse.REMAINDER, help="build | list | plan, and their options")
    p.set_defaults(func=_cmd_engine)

    p = sub.add_parser("show-bundle", help="verify a model bundle and print what it holds",
                       description="Check every file of a model bundle against its sha256 and print the "
                       "preprocessing, operating point and held-out metrics.")
    p.add_argument("bundle", type=Path, help="model bundle directory (holds metadata.json)")
    p.set_defaults(func=_cmd_show_bundle)

    p = sub.add_parser("classify", help="classify image files with a bundle on the CPU",
                       description="Run the bundle's FP32 model (ONNX Runtime, CPU) on image files or folders "
                       "and print a verdict per image: pass, fail, manual_required or error. An image that "
                       "cannot be read, is over --max-pixels, or does not match --bit-depth gets an `error` "
                       "line with the reason and the others are still classified; a summary line ends the "
                       "output. Exit code 0 when every image got its line (error lines included); 2 when no "
                       "image was found, 4 when the bundle is unusable.")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"), help="model bundle directory")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--bit-depth", type=bit_depth_option, default="auto", metavar="{auto,8,10,12,14,16}",
                   help="bits per pixel of the images' data, as camera.bit_depth: 12 for Mono12 frames saved "
                   "as 16-bit PNG/TIFF (values 0..4095); auto (default) takes 8-bit files as 8-bit and "
                   "16-bit files as full 16-bit data")
    # The default is camera.max_pixels's, resolved when classify runs: bundle.images loads OpenCV.
    p.add_argument("--max-pixels", type=max_pixels_option, default=None,
                   help="largest image accepted, width x height read from the file header before decoding, "
                   "as camera.max_pixels (default 50000000)")
    p.set_defaults(func=_cmd_classify)

    from appliance.review.cli import add_parser as add_review_parser

    add_review_parser(sub)  # appliance review list | label | stats | promotion | export
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`appliance review list | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
