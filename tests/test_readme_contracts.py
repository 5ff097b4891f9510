"""README contracts that had no test: durable stores, exit codes at the CLI edge, the outbox age bound, engines list.

Each test drives the real component (SQLite files, the CLIs as subprocesses) and asserts what the README says.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from appliance.reporting.outbox import Outbox
from appliance.reporting.results_log import ResultsLog

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


# --- both stores: WAL and synchronous=FULL, read back from the station's own connections ----------------------


@pytest.mark.parametrize("store", [ResultsLog, Outbox])
def test_each_station_store_runs_in_wal_mode_with_synchronous_full(tmp_path: Path, store):
    db = store(tmp_path / "store.sqlite3")
    try:
        with db.reading() as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
    finally:
        db.close()
    # WAL is a property of the file: a second connection (a support engineer's sqlite3) sees it too.
    other = sqlite3.connect(tmp_path / "store.sqlite3")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


# --- mqtt.outbox_max_age_s ----------------------------------------------------------------------------------------


def test_outbox_rows_older_than_max_age_are_dropped_at_open_and_counted_as_shed(tmp_path: Path):
    now = [1_000_000.0]
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path, max_age_s=3600, clock=lambda: now[0])
    outbox.put("t/result", '{"n": 1}', 1, "result")
    outbox.put("t/health", '{"n": 2}', 1, "health")
    now[0] += 3000
    outbox.put("t/result", '{"n": 3}', 1, "result")  # 600 s younger than the bound at the reopen below
    outbox.close()

    now[0] += 601  # the first two are now 3601 s old, the third 601 s
    reopened = Outbox(path, max_age_s=3600, clock=lambda: now[0])
    try:
        assert [m.payload for m in reopened.pending(10)] == ['{"n": 3}']
        # What the reporter turns into a spool_overflow event ({"shed": ...}).
        assert reopened.take_shed_counts() == {"result": 1, "health": 1}
    finally:
        reopened.close()


# --- exit codes at the CLI edge ------------------------------------------------------------------------------------


def test_training_on_a_broken_dataset_exits_3_naming_the_folder(tmp_path: Path):
    data = tmp_path / "parts"
    (data / "ok").mkdir(parents=True)  # no defect/ folder
    cv2.imwrite(str(data / "ok" / "a.png"), (255 * (cv2.getGaussianKernel(32, 5) @ cv2.getGaussianKernel(32, 5).T))
                .astype("uint8"))
    done = _cli("-m", "training", "--data", str(data), "--out", str(tmp_path / "run"), "--input-size", "64",
                "--epochs", "1", "--quiet", "--device", "cpu")
    assert done.returncode == 3, done.stderr[-2000:]
    assert str(data) in done.stderr


def test_export_from_a_corrupt_checkpoint_exits_5_naming_the_file(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.pt").write_bytes(b"this is not a checkpoint")
    done = _cli("-m", "export", "--run", str(run), "--out", str(tmp_path / "bundle"))
    assert done.returncode == 5, done.stderr[-2000:]
    assert str(run / "final.pt") in done.stderr
    assert not (tmp_path / "bundle").exists()


def test_appliance_run_with_a_camera_that_cannot_be_opened_exits_8(tmp_path: Path, bundle_dir: Path):
    video = tmp_path / "camera.mp4"
    video.write_bytes(b"not a video")
    config = tmp_path / "station.toml"
    config.write_text(
        f'[station]\nid = "st-cam"\n[model]\nbundle = "{bundle_dir}"\n[camera]\nsource = "{video}"\n'
        f'[inference]\nbackend = "onnxruntime"\n[mqtt]\nenabled = false\n[storage]\ndata_dir = "{tmp_path / "var"}"\n'
    )
    done = _cli("-m", "appliance.cli", "run", "--config", str(config), "--max-seconds", "5")
    assert done.returncode == 8, done.stderr[-2000:]
    assert "cannot be opened" in done.stderr and str(video) in done.stderr


# --- engines list ---------------------------------------------------------------------------------------------


def test_engines_list_on_an_empty_store_says_so_and_exits_0(tmp_path: Path):
    done = _cli("-m", "engines", "list", "--store", str(tmp_path / "engines"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"no engines in {tmp_path / 'engines'}" in done.stdout


def test_engines_list_names_an_unreadable_engine_as_unusable(tmp_path: Path):
    store = tmp_path / "engines"
    store.mkdir()
    (store / "tiny@0000_int8_sm87.engine").write_bytes(b"not an engine")  # no manifest beside it
    done = _cli("-m", "engines", "list", "--store", str(store))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "UNUSABLE" in done.stdout and "tiny@0000_int8_sm87.engine" in done.stdout
