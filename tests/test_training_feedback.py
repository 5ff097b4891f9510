"""Inspectors' labels back into training (issue #14 part 7): earlier data and a station's review export combined
(duplicates by content dropped and counted, each image's provenance in run.json), `--init-from` a previous run
(its final weights are the new run's start; another input size or backbone is refused, naming file and
setting), and the report's comparison of the old and the new model on the new run's test split with McNemar's
exact test.

The review export is written by the station's own `export_labelled` from a real review store. Trainings are
tiny (64x64 pixels, one step): the numbers are not the point, where they come from is.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.review.export import export_labelled
from appliance.review.queue import ReviewItem, ReviewStore
from appliance.station.inspection import InspectionRecord
from bundle.errors import CheckpointError
from bundle.images import read_image
from synthetic.parts import render_part
from tests.conftest import TINY_INPUT, tiny_config
from training import trainer
from training.__main__ import main as training_main
from training.datasets import content_hash, load_folder, load_folders
from training.metrics import mcnemar_exact_p, mcnemar_paired
from training.synthetic import write_dataset
from training.trainer import (
    TrainConfig,
    init_checkpoint,
    initial_model,
    load_checkpoint,
    load_samples,
    split_samples,
    train,
    trained_on_hashes,
)

STATION = {"id": "st-07", "site": "plant-a", "line": "line-3"}
NOW = float(int(time.time())) - 3600  # within review.max_age_days, or the store evicts them
# The review export: (seed, defect kind or None, the inspector's verdict, labeller).
REVIEWED = [(900 + i, "scratch" if i % 3 == 0 else None, "fail" if i % 3 == 0 else "pass", "ana" if i < 5 else "bo")
            for i in range(9)]


# --- McNemar's exact test -------------------------------------------------------------------------------------


def test_mcnemar_exact_p_matches_hand_computed_binomial_tails():
    # p = min(1, 2 * sum_{k<=min(b,c)} C(b+c, k) / 2^(b+c))
    assert mcnemar_exact_p(1, 5) == pytest.approx(2 * (1 + 6) / 2**6)  # 0.21875
    assert mcnemar_exact_p(5, 1) == mcnemar_exact_p(1, 5)
    assert mcnemar_exact_p(2, 9) == pytest.approx(2 * (1 + 11 + 55) / 2**11)  # 0.0654296875
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0  # capped at 1
    assert 0.0 < mcnemar_exact_p(700, 900) < 1e-5  # n > 1024: exact integers, no float overflow
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_mcnemar_paired_counts_which_model_decided_each_part_correctly():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    old = np.array([1, 0, 0, 1, 0, 0, 1, 1])  # right on parts 0, 4, 5, 6
    new = np.array([1, 1, 1, 0, 0, 0, 0, 1])  # right on parts 0, 1, 2, 3, 4, 5
    r = mcnemar_paired(labels, old, new)
    assert (r.n, r.both_right, r.only_a_right, r.only_b_right, r.both_wrong) == (8, 3, 1, 3, 1)
    assert r.p_value == pytest.approx(2 * (1 + 4) / 2**4)  # b=1, c=3: 0.625


# --- the data: earlier folders and a station's review export ----------------------------------------------------


def _review_export(root: Path, duplicate_of: Path) -> Path:
    """A station's `appliance review export`: REVIEWED parts plus one picture identical to `duplicate_of`."""
    store = ReviewStore(root / "var" / "review", open_now=False)
    pictures = [(seed, render_part(seed, kind, 96, False), verdict, who) for seed, kind, verdict, who in REVIEWED]
    pictures.append((999, read_image(duplicate_of), "pass", "ana"))
    items = []
    for seed, image, _, _ in pictures:
        record = InspectionRecord(
            inspection_id=f"insp-{seed}", part_id=f"P-{seed}", station_id=STATION["id"], source_name=f"{seed}.png",
            frame_index=seed, captured_at=NOW - 1000 + seed, decided_at=NOW - 999 + seed, verdict="pass",
            ai_verdict="pass",
            score=0.2, mode="production", backend="onnxruntime", model_id="flange-v1", reason="test", latency_ms={})
        items.append(ReviewItem(record, image, None, "audit", NOW - 999 + seed))
    store.write_many(items)
    for seed, _, verdict, who in pictures:
        store.record_label(f"insp-{seed}", verdict, labeller=who, source="http",
                           defect_type="scratch" if verdict == "fail" else None, at=NOW + seed)
    out = root / "review-export"
    result = export_labelled(store, out, station=STATION)
    assert result.files == len(pictures)
    return out


@pytest.fixture(scope="module")
def folders(parts_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """[the current model's data (parts_folder), a newer folder, a station's review export]."""
    root = tmp_path_factory.mktemp("feedback")
    newer = write_dataset(root / "newer", n_ok=10, n_defect=6, seed=12, size=96)
    # The same picture twice with the same class: one copy is dropped. With another class: both are.
    shutil.copy(parts_folder / "ok" / "ok_00000.png", newer / "ok" / "copy_of_ok_00000.png")
    disputed = sorted((parts_folder / "defect").iterdir())[0]
    shutil.copy(disputed, newer / "ok" / "disputed.png")
    export = _review_export(root, duplicate_of=parts_folder / "ok" / "ok_00001.png")
    return [parts_folder, newer, export]


def test_folders_and_a_review_export_combine_with_duplicates_dropped_and_provenance(folders: list[Path]):
    old, _newer, export = folders
    disputed = sorted((old / "defect").iterdir())[0].name
    combined = load_folders(folders)
    names = [s.name for s in combined.samples]
    assert len(names) == len(set(names))

    # 40 + 18 + 10 pictures read; dropped: a same-class copy in `newer`, the export's copy of ok_00001, and
    # both copies of the picture whose classes disagree.
    assert combined.duplicates == {
        "images_read": 68, "images_kept": 64, "duplicates_dropped": 2, "conflicting_labels_dropped": 2,
        "conflicting_examples": [[f"data1/defect/{disputed}", "data2/ok/disputed.png"]],
    }
    assert f"data1/defect/{disputed}" not in names and "data2/ok/disputed.png" not in names
    assert "data2/ok/copy_of_ok_00000.png" not in names and "data3/ok/insp-999.png" not in names
    kept = combined.images["data1/ok/ok_00000.png"]
    assert kept["duplicates_dropped"] == ["data2/ok/copy_of_ok_00000.png"]
    assert combined.images["data1/ok/ok_00001.png"]["duplicates_dropped"] == ["data3/ok/insp-999.png"]

    # Per source: counts, and a review export's station, models and labellers (of the pictures kept).
    summary = [(s["tag"], s["kind"], s["images"], s["kept"], s["ok"], s["defect"]) for s in combined.sources]
    assert summary == [("data1", "folder", 40, 39, 24, 15), ("data2", "folder", 18, 16, 10, 6),
                       ("data3", "review export", 10, 9, 6, 3)]
    review_source = combined.sources[2]
    assert review_source["folder"] == str(export) and review_source["station"] == STATION
    assert review_source["models"] == {"flange-v1": 9} and review_source["labellers"] == {"ana": 5, "bo": 4}
    assert review_source["not_in_provenance"] == 0

    entry = combined.images["data3/defect/insp-900.png"]
    assert entry["source"] == 3 and entry["folder"] == str(export) and entry["file"] == "defect/insp-900.png"
    review = entry["review"]
    assert (review["station_id"], review["model_id"], review["labeller"], review["verdict"]) == (
        "st-07", "flange-v1", "ana", "fail")
    assert review["inspection_id"] == "insp-900" and review["labelled_at"].endswith("Z")
    assert entry["sha256"] == content_hash(read_image(export / "defect" / "insp-900.png"))
    assert "review" not in combined.images["data2/ok/ok_00000.png"]

    # Each folder's classes are their own strata: every folder is split in proportion.
    assert {s.group for s in combined.samples} == {"data1/ok", "data1/defect", "data2/ok", "data2/defect",
                                                   "data3/ok", "data3/defect"}
    # One folder: names and groups as before (a single-folder run splits exactly as it always has).
    single = load_folders([old])
    assert [(s.name, s.group) for s in single.samples] == [(s.name, s.group) for s in load_folder(old)]


def test_a_single_folder_keeps_its_duplicates_and_counts_them(tmp_path: Path):
    # Loaded whole, as before combining existed: earlier runs on it keep their split (and --evaluate-only works).
    root = write_dataset(tmp_path / "parts", n_ok=4, n_defect=4, seed=2, size=48)
    shutil.copy(root / "ok" / "ok_00000.png", root / "ok" / "again.png")
    shutil.copy(root / "ok" / "ok_00001.png", root / "defect" / "disputed.png")
    single = load_folders([root])
    assert [s.name for s in single.samples] == [s.name for s in load_folder(root)] and len(single.samples) == 10
    d = single.duplicates
    assert (d["duplicates_dropped"], d["conflicting_labels_dropped"]) == (0, 0)
    assert (d["duplicates_kept"], d["conflicting_labels_kept"]) == (2, 2)
    assert single.images["ok/ok_00000.png"]["same_picture_as"] == ["ok/again.png"]


# --- --init-from: the previous model is the start, and only a model of the same shape ---------------------------


def test_init_from_a_run_starts_from_its_final_weights_exactly(trained_run: Path, parts_folder: Path,
                                                              tmp_path: Path):
    final = load_checkpoint(trained_run / "final.pt")["model_state"]
    started = initial_model(tiny_config(parts_folder, tmp_path / "x", init_from=trained_run)).state_dict()
    assert started.keys() == final.keys()
    assert all(torch.equal(started[k], final[k]) for k in final)
    fresh = initial_model(tiny_config(parts_folder, tmp_path / "y")).state_dict()
    assert not torch.equal(fresh["head.weight"], final["head.weight"])


@pytest.mark.parametrize(("flags", "mismatch"), [
    (["--input-size", "96"], f"input_size (input_size={TINY_INPUT})"),
    (["--backbone", "efficientnet_b0"], "backbone (backbone='efficientnet_lite0')"),
])
def test_init_from_a_model_of_another_input_size_or_backbone_is_refused(
        trained_run: Path, parts_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        flags: list[str], mismatch: str):
    out = tmp_path / "refused"
    rc = training_main(["--data", str(parts_folder), "--init-from", str(trained_run), "--out", str(out),
                        "--epochs", "1", "--quiet", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert rc == CheckpointError.exit_code == 5
    assert f"checkpoint {trained_run / 'final.pt'} was trained with different {mismatch}" in err
    assert "this run asks for" in err
    assert not out.exists()  # refused before any image was read or file written
    if "--input-size" in flags:
        assert "--allow-input-size-change" in err
        # On purpose it is allowed (fine-tuning at a higher resolution): checked, not trained here.
        path, _ = init_checkpoint(tiny_config(parts_folder, out, input_size=96, init_from=trained_run,
                                              allow_input_size_change=True))
        assert path == trained_run / "final.pt"


def test_compare_to_a_checkpoint_without_an_operating_point_is_refused_before_training(
        trained_run: Path, parts_folder: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"best\.pt has no operating point to compare at"):
        train(tiny_config(parts_folder, tmp_path / "x", compare_to=trained_run / "best.pt"), progress=False)
    assert not (tmp_path / "x").exists()


# --- the whole loop: combined data, started from the current model, compared with it ----------------------------


@pytest.fixture(scope="module")
def feedback_run(folders: list[Path], trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python -m training --data OLD NEWER EXPORT --init-from RUN`, with the network the trainer starts from
    recorded as it is handed to the training loop."""
    out = tmp_path_factory.mktemp("feedback-run") / "v2"
    started: list[dict[str, torch.Tensor]] = []
    real = trainer.initial_model

    def recording(cfg: TrainConfig, start=None):
        model = real(cfg, start)
        started.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "initial_model", recording)
        rc = training_main(["--data", *map(str, folders), "--init-from", str(trained_run), "--out", str(out),
                            "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--augment", "none",
                            "--quiet", "--device", "cpu"])
    assert rc == 0
    return {"out": out, "started": started}


def test_the_new_run_started_from_the_old_final_weights(feedback_run: dict, trained_run: Path):
    final = load_checkpoint(trained_run / "final.pt")["model_state"]
    (started,) = feedback_run["started"]
    assert all(torch.equal(started[k], final[k]) for k in final)
    # Backbone, colour and input size came from the checkpoint (none was given on the command line).
    config = load_checkpoint(feedback_run["out"] / "final.pt")["config"]
    assert (config["backbone"], config["color"], config["input_size"]) == ("efficientnet_lite0", "gray", TINY_INPUT)
    assert config["data_dir"] == str(load_checkpoint(trained_run / "final.pt")["config"]["data_dir"])
    assert len(config["extra_data_dirs"]) == 2


def test_the_run_metadata_keeps_each_images_provenance(feedback_run: dict, folders: list[Path]):
    record = json.loads((feedback_run["out"] / "run.json").read_text())
    data = record["data"]
    assert data["duplicates"]["duplicates_dropped"] == 2 and data["duplicates"]["conflicting_labels_dropped"] == 2
    assert [s["folder"] for s in data["sources"]] == [str(f) for f in folders]
    assert data["sources"][2]["kind"] == "review export" and data["sources"][2]["labellers"] == {"ana": 5, "bo": 4}
    assert len(data["images"]) == record["training"]["images"] == 64
    review = data["images"]["data3/ok/insp-901.png"]["review"]
    assert (review["station_id"], review["model_id"], review["labeller"]) == ("st-07", "flange-v1", "ana")
    # The summary travels with the model (final.pt, the bundle's training metadata); per image only in run.json.
    training = load_checkpoint(feedback_run["out"] / "final.pt")["training"]
    assert training["data_dirs"] == [str(f) for f in folders]
    assert training["duplicates"] == data["duplicates"] and training["images"] == 64  # a count, not the map
    split = json.loads((feedback_run["out"] / "split.json").read_text())
    assert sorted(n for names in split.values() for n in names) == sorted(data["images"])


def test_the_report_compares_old_and_new_on_the_same_test_parts(feedback_run: dict, trained_run: Path,
                                                                 parts_folder: Path):
    out = feedback_run["out"]
    report = json.loads((out / "report" / "report.json").read_text())
    cmp = report["comparison"]
    assert cmp["old"]["checkpoint"] == str(trained_run / "final.pt") and cmp["new"]["init_from_old"] is True
    assert cmp["old"]["threshold"] == load_checkpoint(trained_run / "final.pt")["decision"]["threshold"]
    assert cmp["new"]["threshold"] == report["threshold"]

    # Overlap, counted independently: the new test split's pictures the old model trained or validated on.
    old_cfg = tiny_config(parts_folder, trained_run)
    old_splits = split_samples(old_cfg, load_samples(old_cfg))
    old_seen = {content_hash(s.image) for s in old_splits["train"] + old_splits["val"]}
    record = json.loads((out / "run.json").read_text())
    test_names = json.loads((out / "split.json").read_text())["test"]
    overlapping = [n for n in test_names if record["data"]["images"][n]["sha256"] in old_seen]
    assert overlapping, "the old model's data is part of the new run's: some of it is in the new test split"
    assert cmp["n_test"] == len(test_names) == report["n"]
    assert cmp["excluded_overlap"] == len(overlapping) and cmp["n_compared"] == len(test_names) - len(overlapping)
    assert cmp["overlap"]["checked"] is True and "run.json" in cmp["overlap"]["method"]

    for who in ("old", "new"):
        m = cmp[who]["metrics"]
        assert m["n"] == cmp["n_compared"] and m["tp"] + m["fn"] == m["n_defect"]
        for key in ("recall", "false_positive_rate", "accuracy"):
            assert 0.0 <= m[key] <= 1.0
        assert m["roc_auc"] is None or 0.0 <= m["roc_auc"] <= 1.0
    test = cmp["mcnemar"]["all_parts"]
    assert test["n"] == cmp["n_compared"]
    assert test["p_value"] == pytest.approx(mcnemar_exact_p(test["only_old_right"], test["only_new_right"]))
    assert cmp["mcnemar"]["defect_parts"]["n"] + cmp["mcnemar"]["good_parts"]["n"] == test["n"]
    assert "McNemar" in cmp["method"] and "Psychometrika" in cmp["method"]

    md = (out / "report" / "report.md").read_text()
    assert "## Compared with the previous model" in md
    assert f"{cmp['excluded_overlap']} of the {cmp['n_test']} test images were in its training or validation" in md
    assert "| Detection rate (defects caught) |" in md and "| False-positive rate (good parts flagged) |" in md
    assert "| ROC-AUC |" in md and "| Accuracy at its own operating point |" in md
    assert f"| all | {test['n']} |" in md and f"{test['p_value']:.4g} |" in md


def test_an_old_run_without_image_hashes_is_matched_by_reading_its_data_again(trained_run: Path, tmp_path: Path):
    ckpt = load_checkpoint(trained_run / "final.pt")
    recorded, how = trained_on_hashes(trained_run / "final.pt", ckpt)
    assert recorded and "run.json" in how
    older = tmp_path / "older-run"
    older.mkdir()
    shutil.copy(trained_run / "final.pt", older / "final.pt")
    shutil.copy(trained_run / "split.json", older / "split.json")
    record = json.loads((trained_run / "run.json").read_text())
    del record["data"]  # as runs before this change wrote it
    (older / "run.json").write_text(json.dumps(record))
    again, how = trained_on_hashes(older / "final.pt", ckpt)
    assert again == recorded and "reading the old run's data again" in how
    # Its data gone: not checked, and said why.
    ckpt["config"]["data_dir"] = str(tmp_path / "gone")
    missing, how = trained_on_hashes(older / "final.pt", ckpt)
    assert missing is None and "does not exist" in how


def test_evaluate_only_makes_the_comparison_again(feedback_run: dict, folders: list[Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "copy"
    shutil.copytree(feedback_run["out"], run)
    before = json.loads((run / "report" / "report.json").read_text())["comparison"]
    assert training_main(["--evaluate-only", "--out", str(run), "--quiet", "--data", *map(str, folders)]) == 0
    after = json.loads((run / "report" / "report.json").read_text())["comparison"]
    assert after["n_compared"] == before["n_compared"] and after["mcnemar"] == before["mcnemar"]
    # A run on three folders re-scored on two: refused, naming the count.
    assert training_main(["--evaluate-only", "--out", str(run), "--data", *map(str, folders[:2])]) == 3
    assert "trained on 3 data folder(s), 2 given" in capsys.readouterr().err


def test_a_single_folder_splits_as_it_did_before_folders_were_combined(parts_folder: Path, trained_run: Path):
    # load_folder is the loader single-folder runs had: the same names, groups and split as before.
    cfg = tiny_config(parts_folder, trained_run)
    split = json.loads((trained_run / "split.json").read_text())
    as_before = split_samples(cfg, load_folder(parts_folder))
    assert {k: [s.name for s in v] for k, v in as_before.items()} == split
