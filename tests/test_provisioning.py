"""Provisioning: the station config and systemd unit as rendered, checked by the station's own settings
model and by `systemd-analyze verify`; the JetPack install script in its dry-run mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.settings import load_settings
from bundle.errors import ConfigError
from provisioning.__main__ import main
from provisioning.render import Layout, StationRequest, render_station, render_unit

REPO = Path(__file__).resolve().parents[1]


def test_rendered_station_config_loads_with_the_given_values(tmp_path: Path):
    text = render_station(StationRequest("st-07", "plant-a", "line-3", broker="broker.plant:8884", camera="/dev/video2",
                                         trigger="triggered"))
    path = tmp_path / "station.toml"
    path.write_text(text)
    s = load_settings(path)
    assert (s.station.id, s.station.site, s.station.line) == ("st-07", "plant-a", "line-3")
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.username) == ("broker.plant", 8884, "st-07")
    assert s.mqtt.tls.enabled and s.mqtt.tls.ca_file == Path("/etc/appliance/ca.crt")
    assert s.mqtt.password_file == Path("/etc/appliance/mqtt-password")
    assert s.camera.source == "/dev/video2" and s.trigger.mode == "triggered"
    assert s.decision.mode == "shadow" and s.inference.backend == "auto" and s.inference.cpu_fallback
    assert s.storage.data_dir == Path("/var/lib/appliance") and s.model.engine_dir == Path("/var/lib/appliance/engines")


def test_plain_mqtt_gets_the_plain_port_and_no_tls_section(tmp_path: Path):
    text = render_station(StationRequest("st-08", "a", "b", broker="10.0.0.5", tls=False))
    path = tmp_path / "s.toml"
    path.write_text(text)
    s = load_settings(path)
    assert s.mqtt.port == 1883 and not s.mqtt.tls.enabled and "[mqtt.tls]" not in text


@pytest.mark.parametrize(("request_", "message"), [
    (StationRequest("bad id", "a", "b"), "station.id = 'bad id'"),
    (StationRequest("st-1", "a/b", "c"), "station.site"),
    (StationRequest("st-1", "a", "b", broker="host:eighty"), "port 'eighty' is not a number"),
    (StationRequest("st-1", "a", "b", camera='rtsp://x"y'), "not valid TOML"),
])
def test_bad_values_are_refused_before_anything_is_written(request_, message):
    with pytest.raises(ConfigError, match=message):
        render_station(request_)


def test_unit_has_notify_watchdog_restart_budget_and_an_unprivileged_user():
    unit = render_unit("st-07", Layout(user="inspect"), watchdog_s=20, drain_timeout_s=10)
    for line in ("Type=notify", "WatchdogSec=20", "User=inspect", "SupplementaryGroups=video render",
                 "After=network-online.target", "Restart=on-failure", "StartLimitBurst=5", "TimeoutStopSec=40",
                 "ExecStart=/opt/appliance/.venv/bin/appliance run --config /etc/appliance/station.toml",
                 "ReadWritePaths=/var/lib/appliance", "StandardOutput=journal", "NoNewPrivileges=yes"):
        assert line in unit.splitlines(), line
    with pytest.raises(ConfigError, match="too short"):
        render_unit("st-07", watchdog_s=2)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_rendered_unit(tmp_path: Path):
    # Paths that exist on this machine, so verify checks the unit itself rather than a missing /opt/appliance.
    prefix = tmp_path / "opt"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    exe = prefix / ".venv" / "bin" / "appliance"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    layout = Layout(prefix=prefix, config_dir=tmp_path, state_dir=tmp_path, user="root")
    unit = tmp_path / "appliance.service"
    unit.write_text(render_unit("st-07", layout))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "appliance.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr
    # and the check is able to fail: a broken unit is reported
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    broken = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "appliance.service" in broken.stdout + broken.stderr and "sometimes" in broken.stdout + broken.stderr


def test_provision_command_writes_both_files_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = ["all", "--station", "st-09", "--site", "plant-b", "--line", "l1", "--broker", "b.plant:8883",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "st-09" / "station.toml").is_file() and (tmp_path / "st-09" / "appliance.service").is_file()
    assert "systemctl enable --now appliance" in capsys.readouterr().out
    (tmp_path / "st-09" / "station.toml").write_text("# edited by the plant\n")
    assert main(args) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert (tmp_path / "st-09" / "station.toml").read_text() == "# edited by the plant\n"
    assert main([*args, "--force"]) == 0


def make_provision(*variables: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "provision", *variables], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


# PIP=false PYTHON=false: any attempt to create a venv or pip-install (the package index) fails the command.
NO_INSTALL = ("PIP=false", "PYTHON=false")


def test_make_provision_needs_a_station_id(tmp_path: Path):
    # the usage comes first: no venv is looked at, let alone installed
    proc = make_provision(f"VENV={tmp_path / 'no-venv'}", *NO_INSTALL)
    assert proc.returncode != 0 and "usage: make provision STATION=" in proc.stdout + proc.stderr
    assert "false" not in proc.stdout + proc.stderr and not (tmp_path / "no-venv").exists()


def test_make_provision_renders_with_the_venv_there_without_installing(tmp_path: Path):
    # a venv without install stamps whose python (the one running these tests) imports `provisioning`, as .venv's
    # does after `make test`: rendered with it, nothing installed
    proc = make_provision(f"VENV={tmp_path / 'venv'}", f"PY={sys.executable}", *NO_INSTALL, "STATION=st-mk",
                          "SITE=plant-t", "LINE=line-9", "BROKER=b.plant:8883", f"PROVISION_OUT={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    settings = load_settings(tmp_path / "st-mk" / "station.toml")
    assert (settings.station.id, settings.station.site, settings.station.line) == ("st-mk", "plant-t", "line-9")
    assert (tmp_path / "st-mk" / "appliance.service").is_file()
    assert not (REPO / "provisioning" / "out" / "st-mk").exists()


def test_make_provision_installs_the_runtime_only_where_the_venv_lacks_it(tmp_path: Path):
    # a venv whose python cannot import `provisioning` (here: none at all) -> the runtime install (.stamp-runtime),
    # shown by echo instead of run
    venv = tmp_path / "venv"
    venv.mkdir()
    proc = make_provision(f"VENV={venv}", "PYTHON=echo would-run python3", "PIP=echo would-run pip",
                          "STATION=st-mk", f"PROVISION_OUT={tmp_path / 'out'}")
    out = proc.stdout + proc.stderr
    assert f"would-run python3 -m venv --system-site-packages {venv}" in out
    assert "would-run pip install -q -e .[cpu]" in out
    assert proc.returncode != 0  # and then there is still no python in that venv to render with


def test_install_script_dry_run_lists_the_steps_in_order():
    script = REPO / "provisioning" / "install-jetpack6.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = dict(os.environ, DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(script), "st-07", "plant-a", "line-3", "broker.plant:8883"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    order = ["apt-get install", "usermod -aG video,render", "venv --system-site-packages", "install --no-deps -e",
             "--no-binary pycuda pycuda", "-m provisioning all --station st-07", "systemctl daemon-reload"]
    positions = [next(i for i, c in enumerate(commands) if key in c) for key in order]
    assert positions == sorted(positions)
    assert "opencv" not in " ".join(commands)  # JetPack's GStreamer OpenCV must not be shadowed
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
