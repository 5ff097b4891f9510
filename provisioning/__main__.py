"""`python -m provisioning` (`make provision`): write a station's config and systemd unit.

  station  station.toml for one station (site, line, broker, camera), validated before it is written
  unit     the systemd unit (notify + watchdog, unprivileged user, restart budget, journal)
  all      both, into one folder (what `make provision` does)

Existing files are never overwritten without --force: a station's config is edited by the plant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bundle.errors import ApplianceError, ConfigError
from provisioning.render import Layout, StationRequest, render_station, render_unit


def _write(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: not overwriting a station's file (use --force, or FORCE=1 with make)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}")


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(prefix=args.prefix, config_dir=args.config_dir, state_dir=args.state_dir, user=args.user)


def _station(args: argparse.Namespace) -> str:
    return render_station(StationRequest(
        station_id=args.station, site=args.site, line=args.line, broker=args.broker, tls=not args.no_tls,
        tls_ca=args.tls_ca, camera=args.camera, trigger=args.trigger, precision=args.precision, mode=args.mode,
        bundle=args.bundle,
    ), _layout(args))


def _unit(args: argparse.Namespace) -> str:
    return render_unit(args.station, _layout(args), watchdog_s=args.watchdog_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["station", "unit", "all"])
    parser.add_argument("--station", required=True, help="station id: MQTT client id, broker user, topic level")
    parser.add_argument("--site", default="site")
    parser.add_argument("--line", default="line")
    parser.add_argument("--broker", default="broker.local:8883", help="HOST[:PORT] of the control room's broker")
    parser.add_argument("--no-tls", action="store_true", help="plain MQTT (only on an isolated network)")
    parser.add_argument("--tls-ca", type=Path, help="CA file the station trusts (default CONFIG_DIR/ca.crt)")
    parser.add_argument("--camera", default="0", help="camera.source: 0, /dev/video0, rtsp://..., a GStreamer pipeline")
    parser.add_argument("--trigger", choices=["continuous", "triggered"], default="continuous")
    parser.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16")
    parser.add_argument("--mode", choices=["shadow", "production"], default="shadow",
                        help="decision mode at first start (default shadow: commission before production)")
    parser.add_argument("--bundle", type=Path, help="model bundle on the device (default PREFIX/bundle)")
    parser.add_argument("--prefix", type=Path, default=Layout.prefix, help="where the project and .venv live")
    parser.add_argument("--config-dir", type=Path, default=Layout.config_dir)
    parser.add_argument("--state-dir", type=Path, default=Layout.state_dir)
    parser.add_argument("--user", default=Layout.user, help="the unprivileged service user")
    parser.add_argument("--watchdog-s", type=int, default=30, help="systemd WatchdogSec")
    parser.add_argument("--out", type=Path, default=Path("provisioning/out"),
                        help="folder for station.toml and appliance.service (default provisioning/out)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        out = args.out / args.station
        if args.what in ("station", "all"):
            _write(out / "station.toml", _station(args), args.force)
        if args.what in ("unit", "all"):
            _write(out / "appliance.service", _unit(args), args.force)
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    layout = _layout(args)
    print(f"next, on the station: sudo install -m 640 -g {layout.user} {out}/station.toml {layout.config_path}; "
          f"sudo install -m 644 {out}/appliance.service /etc/systemd/system/; sudo systemctl daemon-reload; "
          f"appliance doctor --config {layout.config_path}; sudo systemctl enable --now appliance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
