"""Specification of the evaluation report written by training.report.write_report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from training.metrics import binary_metrics, roc_auc, threshold_for_recall, uncertainty_band
from training.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = ("report.json", "report.md", "roc.png", "confusion.png", "confidence_hist.png")


@pytest.fixture
def evaluation() -> dict:
    """A held-out split of 200 parts with realistic scores, its threshold and band."""
    rng = np.random.default_rng(42)
    labels = np.r_[np.zeros(150, int), np.ones(50, int)]
    scores = 1.0 / (1.0 + np.exp(-np.r_[rng.normal(-2.5, 1.5, 150), rng.normal(2.0, 1.5, 50)]))
    threshold = threshold_for_recall(labels, scores, 0.95)
    return {
        "labels": labels,
        "scores": scores,
        "threshold": threshold,
        "band": uncertainty_band(labels, scores, threshold, 0.1),
        "image_names": [f"{'defect' if y else 'ok'}/part_{i:03d}.png" for i, y in enumerate(labels)],
    }


def write(out_dir: Path, evaluation: dict, **kwargs) -> dict:
    return write_report(
        out_dir,
        evaluation["labels"],
        evaluation["scores"],
        evaluation["threshold"],
        evaluation["band"],
        evaluation["image_names"],
        title="efficientnet_lite0 on synthetic - held-out test split",
        **kwargs,
    )


def read_json_strictly(path: Path) -> dict:
    def reject(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_report_writes_all_five_files_and_leaves_no_temporaries(tmp_path, evaluation):
    out_dir = tmp_path / "runs" / "report"  # does not exist yet

    write(out_dir, evaluation)

    assert sorted(p.name for p in out_dir.iterdir()) == sorted(REPORT_FILES)
    assert all((out_dir / name).stat().st_size > 0 for name in REPORT_FILES)


def test_training_history_adds_a_training_curve(tmp_path, evaluation):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_auc": a}
               for e, a in ((1, 0.7), (2, 0.9), (3, 0.85))]

    report = write(tmp_path, evaluation, history=history)

    curve = tmp_path / "training_curve.png"
    assert curve.read_bytes().startswith(PNG_SIGNATURE)
    assert report["plots"]["training_curve"] == "training_curve.png"
    assert "![Training curve](training_curve.png)" in (tmp_path / "report.md").read_text()
    # A report without a training run (an export's re-score) has no curve and does not list one.
    bare = write(tmp_path / "bare", evaluation)
    assert "training_curve" not in bare["plots"] and not (tmp_path / "bare" / "training_curve.png").exists()


def test_json_round_trips_and_matches_binary_metrics(tmp_path, evaluation):
    returned = write(tmp_path, evaluation, extra={"epochs": 3})

    on_disk = read_json_strictly(tmp_path / "report.json")

    assert on_disk == returned
    expected = binary_metrics(evaluation["labels"], evaluation["scores"], evaluation["threshold"]).to_dict()
    assert {key: on_disk[key] for key in expected} == expected
    assert on_disk["roc_auc"] == roc_auc(evaluation["labels"], evaluation["scores"])
    assert on_disk["n_no_defect"] == 150
    assert on_disk["class_names"] == ["no_defect", "defect"]
    assert on_disk["heldout_images"] == evaluation["image_names"]
    assert on_disk["extra"] == {"epochs": 3}
    assert on_disk["precisions"] is None
    assert on_disk["four_class"] is None


def test_band_block_holds_the_band_and_its_outcomes(tmp_path, evaluation):
    report = write(tmp_path, evaluation)

    band = report["band"]
    assert (band["low"], band["high"]) == tuple(evaluation["band"])
    assert band["threshold"] == evaluation["threshold"]
    assert 0.0 < band["manual_fraction"] <= 0.1
    assert band["n_manual"] + band["n_auto"] == 200
    # Counted here from the scores: wrong at the threshold alone, and of those, the ones the band catches.
    labels, scores = evaluation["labels"], evaluation["scores"]
    low, high = evaluation["band"]
    wrong = (scores >= evaluation["threshold"]) != (labels == 1)
    caught = wrong & (scores >= low) & (scores <= high)
    assert band["errors_at_threshold"] == int(wrong.sum()) > 0
    assert band["errors_in_band"] == int(caught.sum()) > 0


def test_precision_block_compares_each_precision_with_fp32(tmp_path, evaluation):
    scores = evaluation["scores"]
    int8 = scores.copy()
    # Push the two parts nearest the threshold across it: two decisions change.
    nearest = np.argsort(np.abs(scores - evaluation["threshold"]))[:2]
    int8[nearest] = np.where(scores[nearest] >= evaluation["threshold"], 0.0, 1.0)

    report = write(tmp_path, evaluation, precision_scores={"fp32": scores, "int8": int8})

    fp32, quantized = report["precisions"]["fp32"], report["precisions"]["int8"]
    assert fp32["decision_agreement_vs_fp32"] == 1.0
    assert fp32["accuracy_delta_vs_fp32"] == 0.0
    assert quantized["decision_agreement_vs_fp32"] == pytest.approx(198 / 200)
    expected = binary_metrics(evaluation["labels"], int8, evaluation["threshold"])
    assert quantized["accuracy"] == expected.accuracy
    assert quantized["accuracy_delta_vs_fp32"] == pytest.approx(expected.accuracy - fp32["accuracy"])
    assert quantized["max_abs_score_diff_vs_fp32"] > 0.0


def test_precision_block_takes_the_main_scores_as_fp32_when_not_given(tmp_path, evaluation):
    report = write(tmp_path, evaluation, precision_scores={"fp16": evaluation["scores"] + 1e-6})

    assert set(report["precisions"]) == {"fp32", "fp16"}
    assert report["precisions"]["fp32"]["accuracy"] == report["accuracy"]


def test_precision_scores_of_the_wrong_length_are_rejected(tmp_path, evaluation):
    with pytest.raises(ValueError, match=r"precision_scores\['int8'\]"):
        write(tmp_path, evaluation, precision_scores={"int8": evaluation["scores"][:-1]})


def test_four_class_block_holds_confusion_accuracy_and_errors_by_level(tmp_path):
    # Six parts, threshold 0.5: levels 0/1 are "no defect", 2/3 "defect" (labels follow the level).
    true_4 = np.array([0, 1, 2, 3, 3, 2])
    pred_4 = np.array([0, 1, 2, 3, 2, 2])
    labels = np.array([0, 0, 1, 1, 1, 1])
    # Wrong decisions: the level-1 part (0.7, a false alarm) and one level-3 part (0.2, a miss).
    scores = np.array([0.1, 0.7, 0.6, 0.9, 0.2, 0.8])
    names = [f"cell{i}" for i in range(6)]

    report = write_report(tmp_path, labels, scores, 0.5, (0.4, 0.6), names, title="t", four_class=(true_4, pred_4))

    assert report["four_class"]["accuracy"] == pytest.approx(5 / 6)
    assert report["four_class"]["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 1, 1]]
    assert report["four_class"]["decision_errors_by_level"] == [
        {"level": 0, "n": 1, "errors": 0},
        {"level": 1, "n": 1, "errors": 1},
        {"level": 2, "n": 2, "errors": 0},
        {"level": 3, "n": 2, "errors": 1},
    ]
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| 1 | 1 | 1 |" in markdown and "| 3 | 2 | 1 |" in markdown


def test_four_class_levels_must_match_the_labels(tmp_path, evaluation):
    with pytest.raises(ValueError, match="6 true levels for 200 labels"):
        write(tmp_path, evaluation, four_class=(np.zeros(6, int), np.zeros(6, int)))


def test_numpy_values_in_extra_are_written_as_plain_json(tmp_path, evaluation):
    extra = {
        "seed": np.int64(7),
        "lr": np.float32(0.5),
        "history": np.array([0.9, 0.8]),
        "split": (1, 2),
        "val_loss": float("nan"),  # JSON has no NaN: written as null
    }

    report = write(tmp_path, evaluation, extra=extra)

    assert read_json_strictly(tmp_path / "report.json")["extra"] == {
        "seed": 7,
        "lr": 0.5,
        "history": [0.9, 0.8],
        "split": [1, 2],
        "val_loss": None,
    }
    assert type(report["extra"]["seed"]) is int


def test_pngs_are_readable_images_of_six_by_five_inches_at_100_dpi(tmp_path, evaluation):
    write(tmp_path, evaluation)

    for name in ("roc.png", "confusion.png", "confidence_hist.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[:2] == (500, 600), name
        assert image.std() > 0.01, f"{name} is blank"


def test_markdown_summarises_metrics_and_embeds_the_plots(tmp_path, evaluation):
    report = write(tmp_path, evaluation)

    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")

    assert markdown.startswith("# efficientnet_lite0 on synthetic")
    for name in ("roc.png", "confusion.png", "confidence_hist.png"):
        assert f"]({name})" in markdown
    assert "| Defect recall (defects caught) |" in markdown
    assert f"{report['roc_auc']:.4f}" in markdown


def test_single_class_test_set_still_gets_a_full_report(tmp_path, evaluation):
    # A split with good parts only has no ROC curve, but the rest of the report is still meaningful.
    labels = np.zeros(20, int)
    scores = np.linspace(0.0, 0.6, 20)

    report = write_report(tmp_path, labels, scores, 0.5, (0.45, 0.55), [], title="good parts only")

    assert report["roc_auc"] is None
    assert report["fp"] == 4  # 0.505, 0.537, 0.568 and 0.6 are >= 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    assert read_json_strictly(tmp_path / "report.json")["roc_auc"] is None


def test_writing_again_replaces_the_previous_report(tmp_path, evaluation):
    write(tmp_path, evaluation, extra={"run": 1})

    write(tmp_path, evaluation, extra={"run": 2})

    assert read_json_strictly(tmp_path / "report.json")["extra"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)


def test_band_that_misses_the_threshold_is_rejected_before_anything_is_written(tmp_path, evaluation):
    evaluation["band"] = (evaluation["threshold"] + 0.01, evaluation["threshold"] + 0.02)

    with pytest.raises(ValueError, match="must contain threshold"):
        write(tmp_path / "report", evaluation)

    assert not (tmp_path / "report").exists()
