"""The station settings model and `appliance check-config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import main
from appliance.settings import load_settings, mqtt_password
from bundle.errors import ConfigError

GOOD = """
[station]
id = "st-07"
site = "plant-a"
line = "l3"

[camera]
source = "/dev/video0"

[mqtt]
host = "broker.plant"
port = 8883
username = "st-07"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "station.toml"
    p.write_text(text)
    return p


def test_a_good_file_loads_with_defaults_for_the_rest(tmp_path: Path):
    s = load_settings(_write(tmp_path, GOOD))
    assert (s.station.id, s.station.site, s.mqtt.port, s.camera.source) == ("st-07", "plant-a", 8883, "/dev/video0")
    assert s.inference.backend == "auto" and s.decision.mode == "production"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("APPLIANCE_MQTT__HOST", "10.0.0.5")
    monkeypatch.setenv("APPLIANCE_MQTT__PASSWORD", "s3cret")
    s = load_settings(_write(tmp_path, GOOD))
    assert s.mqtt.host == "10.0.0.5"
    assert mqtt_password(s) == "s3cret"
    assert "s3cret" not in repr(s)


def test_password_from_a_file(tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    s = load_settings(_write(tmp_path, GOOD + f'password_file = "{secret}"\n'))
    assert mqtt_password(s) == "from-file"


def test_every_problem_is_listed_with_key_value_and_message(tmp_path: Path):
    bad = _write(tmp_path, GOOD.replace("port = 8883", 'port = "eighty"') + '\n[camera2]\nx = 1\n'
                 + '[decision]\nmode = "yolo"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert f"{bad}: mqtt.port = 'eighty':" in text
    assert "camera2 = " in text and "unknown key" in text
    assert "decision.mode = 'yolo':" in text


def test_check_config_exits_2_and_prints_each_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = _write(tmp_path, '[station]\nid = "has space"\n[inference]\nthreads = 0\n')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "station.id = 'has space'" in err
    assert "inference.threads = 0" in err


def test_check_config_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["check-config", str(_write(tmp_path, GOOD))]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("http, says", [
    ('enabled = true\n[http.tokens]\nline_pc = "short"\n', "http.tokens.line_pc: a token must be at least 16"),
    ('enabled = true\nbind = "0.0.0.0"\n', "http.bind = '0.0.0.0' without any token"),
    ('enabled = true\n[http.tokens]\ninspector = "aaaaaaaaaaaaaaaaaaaa"\nadmin = "aaaaaaaaaaaaaaaaaaaa"\n',
     "http.tokens.admin is the same token as http.tokens.inspector"),
    ('enabled = true\n[http.tokens]\ninspector_file = "/nonexistent/token"\n', "cannot be read"),
])
def test_check_config_and_doctor_refuse_what_appliance_run_would_refuse_in_http(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], http: str, says: str):
    from appliance.doctor import Doctor
    from appliance.settings import load_settings

    config = _write(tmp_path, "[mqtt]\nenabled = false\n[http]\n" + http)
    assert main(["check-config", str(config)]) == 2
    assert says in capsys.readouterr().err
    check = next(c for c in Doctor(load_settings(config)).checks() if c.name == "HTTP API")
    assert check.outcome == "FAIL" and says in check.detail


def test_doctor_says_whether_the_http_port_can_be_had(tmp_path: Path):
    import socket

    from appliance.doctor import Doctor
    from appliance.settings import load_settings

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = _write(tmp_path, f"[mqtt]\nenabled = false\n[http]\nenabled = true\nport = {port}\n")
        check = next(c for c in Doctor(load_settings(config)).checks() if c.name == "HTTP API")
        assert check.outcome == "FAIL" and f"cannot listen on 127.0.0.1:{port}" in check.detail
    check = next(c for c in Doctor(load_settings(config)).checks() if c.name == "HTTP API")
    assert check.outcome == "PASS" and "free" in check.detail


def test_missing_file_and_broken_toml_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err
    broken = _write(tmp_path, "[station\nid = 1\n")
    assert main(["check-config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_band_order_is_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"band_low 0\.6 is above band_high 0\.4"):
        load_settings(_write(tmp_path, "[decision]\nband_low = 0.6\nband_high = 0.4\n"))


def test_help_explains_the_commands(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("check-config", "show-bundle", "classify"):
        assert command in out


def test_check_config_names_a_missing_tls_or_password_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    tls = _write(tmp_path, GOOD + f'[mqtt.tls]\nenabled = true\nca_file = "{tmp_path / "ca.crt"}"\n')
    assert main(["check-config", str(tls)]) == 2
    captured = capsys.readouterr()
    assert "mqtt.tls.ca_file" in captured.err and "ca.crt" in captured.err and "OK" not in captured.out
    pw = _write(tmp_path, GOOD + f'password_file = "{tmp_path / "missing-pw"}"\n')
    assert main(["check-config", str(pw)]) == 2
    assert "mqtt.password_file" in capsys.readouterr().err


def test_check_config_shows_the_broker_and_topic_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["check-config", str(_write(tmp_path, GOOD))]) == 0
    assert "mqtt://broker.plant:8883 as st-07  topics inspection/plant-a/l3/st-07/..." in capsys.readouterr().out


@pytest.mark.parametrize("key", ["camera.max_pixels", "storage.pending_max", "mqtt.max_command_bytes",
                                 "mqtt.heartbeat_s", "inference.threads"])
def test_true_or_false_in_a_number_setting_is_an_error_not_one_or_zero(tmp_path: Path, key: str):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key} = True: .*a number is expected here, not true/false"):
        load_settings(_write(tmp_path, f"[{section}]\n{name} = true\n"))


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("APPLIANCE_STORAGE__PENDING_MAX", "abc")
    path = _write(tmp_path, GOOD + '[storage]\npending_max = 20\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "environment APPLIANCE_STORAGE__PENDING_MAX: storage.pending_max = 'abc'" in str(info.value)
    assert f"{path}: storage.pending_max" not in str(info.value)


def test_the_new_bounds_are_enforced(tmp_path: Path):
    for text, key in (("[storage]\npending_max = 9\n", "storage.pending_max"),
                      ("[mqtt]\nmax_command_bytes = 100\n", "mqtt.max_command_bytes")):
        with pytest.raises(ConfigError, match=key):
            load_settings(_write(tmp_path, text))
