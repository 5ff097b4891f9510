"""`appliance review list | label | stats | promotion | export` on a real review store (SQLite and picture files,
as a station leaves them), through the command's own entry point; the export is read back with the training
side's customer-folder loader."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.review.queue import ReviewItem, ReviewStore
from appliance.review.stats import wilson_interval
from appliance.station.inspection import InspectionRecord
from tests.support.frames import part_image
from training.datasets import load_folder

NOW = float(int(time.time()))
DAY1 = datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2024, 3, 2, 23, 30, tzinfo=timezone.utc).timestamp()


def _record(i: int, verdict: str, ai: str | None, mode: str = "production", model: str = "m-new") -> InspectionRecord:
    return InspectionRecord(
        inspection_id=f"insp-{i:04d}", part_id=f"P-{i}", station_id="st-cli", source_name=f"part_{i}.png",
        frame_index=i, captured_at=NOW - 100 + i, decided_at=NOW - 99 + i, verdict=verdict, ai_verdict=ai,
        score=0.9 if ai == "fail" else 0.1, mode=mode, backend="onnxruntime", model_id=model, reason="test",
        latency_ms={})


def _config(tmp_path: Path, promotion: str = "", name: str = "station.toml") -> Path:
    config = tmp_path / name
    config.write_text(f'[station]\nid = "st-cli"\nsite = "plant-a"\nline = "line-3"\n'
                      f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[review.promotion]\n{promotion}')
    return config


@pytest.fixture
def queue(tmp_path: Path) -> ReviewStore:
    """20 audited parts (8 the AI failed, 12 it passed) and 2 manual_required ones, all unlabelled."""
    store = ReviewStore(tmp_path / "var" / "review", open_now=False)
    items = [ReviewItem(_record(i, "fail" if i < 8 else "pass", "fail" if i < 8 else "pass"),
                        part_image(i, "crack" if i < 8 else None), None, "audit", NOW - 99 + i) for i in range(20)]
    items += [ReviewItem(_record(i, "manual_required", "manual_required"), part_image(i), None, "manual_required",
                         NOW - 99 + i) for i in (20, 21)]
    store.write_many(items)
    return store


def _label_truth(store: ReviewStore, at: float | None = None) -> None:
    """The person's labels: one AI fail was a good part, one AI pass a defect; the two manual parts are defects."""
    for i in range(22):
        human = "pass" if i == 0 else "fail" if i < 8 else "fail" if i in (8, 20, 21) else "pass"
        store.record_label(f"insp-{i:04d}", human, labeller="ana", source="cli",
                           defect_type="crack" if human == "fail" else None, at=at)


def test_list_shows_unlabelled_items_first_with_their_pictures(tmp_path: Path, queue: ReviewStore,
                                                               capsys: pytest.CaptureFixture[str]):
    queue.record_label("insp-0003", "fail", labeller="ana", source="mqtt")
    config = _config(tmp_path)
    assert main(["review", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("22 item(s), 21 unlabelled")
    assert [line.split()[0] for line in lines[1:]][-1] == "insp-0003"  # labelled: last
    assert "labelled fail by ana" in lines[-1] and "unlabelled" in lines[1]
    assert "images/" in lines[1] and ".png" in lines[1]
    # a page of the queue still says how big the queue is
    assert main(["review", "list", "--config", str(config), "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("22 item(s), 21 unlabelled, 3 shown (--limit)") and len(lines) == 4
    assert main(["review", "list", "--config", str(config), "--json", "--unlabelled", "--limit", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["inspection_id"] for r in rows] == ["insp-0000", "insp-0001"] and rows[0]["label"] is None
    assert (tmp_path / "var" / "review" / rows[0]["image_file"]).is_file()


def test_label_from_the_command_line_is_stored_with_its_history(tmp_path: Path, queue: ReviewStore,
                                                                capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path)
    assert main(["review", "label", "insp-0004", "pass", "--labeller", "ana", "--config", str(config)]) == 0
    assert main(["review", "label", "insp-0004", "fail", "--defect-type", "crack", "--labeller", "bo",
                 "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["insp-0004: labelled pass by ana",
                   "insp-0004: labelled fail (crack) by bo; 1 earlier label(s) kept, this one counts"]
    labels = queue.labels("insp-0004")
    assert [(lb.verdict, lb.defect_type, lb.labeller, lb.source) for lb in labels] == [
        ("pass", None, "ana", "cli"), ("fail", "crack", "bo", "cli")]
    # an unknown inspection, or a label the store refuses: exit 1 with the reason, nothing stored
    assert main(["review", "label", "insp-9999", "fail", "--labeller", "ana", "--config", str(config)]) == 1
    assert "unknown inspection id 'insp-9999'" in capsys.readouterr().err
    assert main(["review", "label", "insp-0005", "pass", "--defect-type", "crack", "--labeller", "ana",
                 "--config", str(config)]) == 1
    assert "goes with a 'fail'" in capsys.readouterr().err
    assert main(["review", "label", "insp-0005", "pass", "--labeller", " ", "--config", str(config)]) == 1
    assert len(queue.labels()) == 2


def test_without_a_review_queue_the_command_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["review", "list", "--config", str(_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "no review queue at" in err and str(tmp_path / "var") in err


def test_stats_print_the_confusion_matrix_and_the_rates_with_wilson_intervals(
        tmp_path: Path, queue: ReviewStore, capsys: pytest.CaptureFixture[str]):
    _label_truth(queue)
    config = _config(tmp_path)
    assert main(["review", "stats", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    # AI fail: 7 defects caught, 1 good part failed; AI pass: 1 defect missed, 11 good; 2 manual: no AI verdict
    assert "labelled 22 (20 with an AI verdict, 2 without)" in out
    assert "TP 7  FN 1  FP 1  TN 11" in out
    low, high = wilson_interval(7, 8)
    assert f"detection rate       0.875 [{low:.3f}, {high:.3f}]  (7 of 8 defects caught)" in out
    low, high = wilson_interval(1, 12)
    assert f"false-positive rate  0.083 [{low:.3f}, {high:.3f}]  (1 of 12 good parts failed)" in out
    assert "agreement            0.900" in out and "shadow agreement     -" in out and "models m-new (22)" in out
    assert main(["review", "stats", "--config", str(config), "--json", "--confidence", "0.9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["confusion"] == {"tp": 7, "fn": 1, "fp": 1, "tn": 11} and data["confidence"] == 0.9
    assert data["detection_rate"]["low"] == round(wilson_interval(7, 8, 0.9)[0], 4)


def test_stats_by_day_and_by_shift(tmp_path: Path, queue: ReviewStore, capsys: pytest.CaptureFixture[str]):
    for i in range(10):
        queue.record_label(f"insp-{i:04d}", "fail" if i < 8 else "pass", labeller="ana", source="cli", at=DAY1)
    for i in range(10, 20):
        queue.record_label(f"insp-{i:04d}", "pass", labeller="bo", source="mqtt", at=DAY2)
    config = _config(tmp_path)
    assert main(["review", "stats", "--config", str(config), "--by", "day"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("2024-03-01 ") and lines[2].startswith("2024-03-02 ") and len(lines) == 3
    assert lines[1].split()[1:6] == ["10", "8", "0", "0", "2"]  # labelled, TP FN FP TN
    # 23:30 UTC on 2 March is 00:30 on 3 March in Berlin: the night shift that began at 22:00 on 2 March
    assert main(["review", "stats", "--config", str(config), "--by", "shift", "--shifts", "6,14,22",
                 "--tz", "Europe/Berlin", "--json"]) == 0
    periods = json.loads(capsys.readouterr().out)
    assert [(p["label"], p["labelled"]) for p in periods] == [("2024-03-01 06:00", 10), ("2024-03-02 22:00", 10)]
    assert main(["review", "stats", "--config", str(config), "--by", "day", "--tz", "UTC"]) == 2


def test_promotion_is_met_or_not_with_the_numbers_and_the_exit_code(tmp_path: Path, queue: ReviewStore,
                                                                    capsys: pytest.CaptureFixture[str]):
    _label_truth(queue)
    loose = _config(tmp_path, "min_labelled = 20\nmin_detection_rate = 0.4\nmax_false_positive_rate = 0.4\n")
    assert main(["review", "promotion", "--config", str(loose)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model m-new: 22 label(s)") and "promotion criteria met" in out
    assert "labelled 20 >= 20 required: met" in out
    assert "(7 of 8 defects caught)" in out and "(1 of 12 good parts failed)" in out
    strict = _config(tmp_path, "min_labelled = 50\nmin_detection_rate = 0.9\nmax_false_positive_rate = 0.05\n",
                     name="strict.toml")
    assert main(["review", "promotion", "--config", str(strict)]) == 1
    out = capsys.readouterr().out
    assert "promotion criteria not met" in out and "30 more labelled parts with an AI verdict needed" in out
    low = wilson_interval(7, 8)[0]
    assert f"lower bound {low:.3f} < 0.90 required: not met" in out
    assert main(["review", "promotion", "--config", str(strict), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["model_id"] == "m-new" and verdict["met"] is False and verdict["more_labels_needed"] == 30
    # another model has no labels: not met
    assert main(["review", "promotion", "--config", str(loose), "--model", "m-old"]) == 1
    # the entry point, as an operator runs it
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "review", "promotion", "--config", str(loose)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "promotion criteria met" in done.stdout


def test_export_is_a_training_folder_with_provenance(tmp_path: Path, queue: ReviewStore,
                                                     capsys: pytest.CaptureFixture[str]):
    _label_truth(queue)
    queue.record_label("insp-0000", "fail", labeller="bo", defect_type="dent", source="mqtt")  # a correction wins
    config = _config(tmp_path)
    out = tmp_path / "dataset"
    assert main(["review", "export", "--config", str(config), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{out}: 11 ok, 11 defect") and "make train DATA=" in said
    # the training side reads it as a customer folder: labels from the people, pictures as the station saw them
    samples = load_folder(out)
    assert sorted((s.name, s.label) for s in samples) == sorted(
        [(f"defect/insp-{i:04d}.png", 1) for i in (*range(9), 20, 21)] + [(f"ok/insp-{i:04d}.png", 0)
                                                                          for i in range(9, 20)])
    first = next(s for s in samples if s.name == "defect/insp-0001.png")
    assert np.array_equal(first.image, part_image(1, "crack"))
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["station"] == {"id": "st-cli", "site": "plant-a", "line": "line-3"}
    assert provenance["counts"] == {"ok": 11, "defect": 11} and provenance["models"] == {"m-new": 22}
    entry = provenance["files"]["defect/insp-0000.png"]
    assert entry["label"]["labeller"] == "bo" and entry["label"]["defect_type"] == "dent" and entry["labels_given"] == 2
    assert entry["model_id"] == "m-new" and entry["ai_verdict"] == "fail" and entry["station_id"] == "st-cli"
    assert entry["decided_at"].endswith("Z") and entry["label"]["labelled_at"].endswith("Z")
    assert set(provenance["files"]) == {s.name for s in samples}
    # never into a folder that holds something
    assert main(["review", "export", "--config", str(config), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_export_leaves_out_evicted_pictures_and_counts_them(tmp_path: Path, queue: ReviewStore,
                                                            capsys: pytest.CaptureFixture[str]):
    _label_truth(queue)
    queue.max_age_s = 0.0
    queue.keep_bounds(now=NOW + 10_000)  # every picture too old: labelled rows stay, pictures go
    out = tmp_path / "dataset"
    assert main(["review", "export", "--config", str(_config(tmp_path)), "--out", str(out)]) == 1
    assert "left out: 22 picture evicted" in capsys.readouterr().out
    assert json.loads((out / "provenance.json").read_text())["skipped"] == {"picture_evicted": 22}
    assert not any((out / "ok").iterdir()) and not any((out / "defect").iterdir())


def test_the_review_settings_in_the_readme_are_the_defaults_and_bad_values_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import tomllib

    from appliance.settings import ReviewSection

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Station configuration", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    documented = tomllib.loads(block)["review"]
    assert ReviewSection(**documented) == ReviewSection()
    config = tmp_path / "bad.toml"
    config.write_text('[review]\naudit_rate = 1.5\nimage_format = "gif"\n[review.promotion]\nconfidence = 1.0\n'
                      '[mqtt]\nenabled = false\n')
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "review.audit_rate = 1.5" in err and "review.image_format = 'gif'" in err
    assert "review.promotion.confidence = 1.0" in err


@pytest.mark.parametrize("limit", ["-1", "0", "many"])
def test_review_list_refuses_a_limit_below_one(limit: str, capsys: pytest.CaptureFixture[str]):
    from appliance.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["review", "list", "--limit", limit])
    assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: Path, queue: ReviewStore,
                                                 monkeypatch: pytest.MonkeyPatch):
    # `appliance review list | head -1`: the pipe's reader closes; the command ends quietly with 0
    import os

    from appliance.cli import main

    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert main(["review", "list", "--config", str(_config(tmp_path))]) == 0
    finally:
        monkeypatch.undo()
        stdout.close()
