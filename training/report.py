"""The evaluation report: report.json, report.md and three PNG plots written into one directory.

report.json is for machines (dashboards, the bundle's metadata, regression checks between runs);
report.md embeds the plots for a plant engineer. All numbers come from training.metrics, so the report
and the threshold chosen from it cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bundle.format import CLASS_NAMES
from training.metrics import (
    band_outcomes,
    binary_metrics,
    confusion_matrix,
    mcnemar_paired,
    multiclass_accuracy,
    roc_auc,
    roc_curve,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_VERSION = 1
REFERENCE_PRECISION = "fp32"
FOUR_CLASS_COUNT = 4
JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"
PLOT_FILES = {"roc": "roc.png", "confusion": "confusion.png", "confidence_hist": "confidence_hist.png"}
# Written only when the training history is given (a report of a training run, not of an export).
TRAINING_CURVE_FILE = "training_curve.png"
FIGSIZE_INCHES = (6.0, 5.0)
DPI = 100
# The significance level the comparison's plain-language reading uses.
COMPARISON_ALPHA = 0.05
MCNEMAR_REFERENCE = (
    "McNemar's exact test on the paired pass/fail decisions: McNemar, Q. (1947), Note on the sampling error of "
    "the difference between correlated proportions or percentages, Psychometrika 12(2), 153-157; exact "
    "(binomial) form as in Fagerland, Lydersen & Laake (2013), BMC Medical Research Methodology 13, 91; for two "
    "classifiers on one test set, Dietterich (1998), Neural Computation 10(7), 1895-1923"
)


def write_report(
    out_dir: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    band: tuple[float, float],
    image_names: list[str],
    title: str,
    extra: dict | None = None,
    precision_scores: dict[str, np.ndarray] | None = None,
    four_class: tuple[np.ndarray, np.ndarray] | None = None,
    history: list[dict] | None = None,
    comparison: dict | None = None,
) -> dict:
    """Write report.json, report.md, roc.png, confusion.png and confidence_hist.png into out_dir.

    With `history` (one dict per epoch: epoch, train_loss, val_loss, val_auc), training_curve.png too.
    With `comparison` (from `build_comparison`), a previous model against this one on the same parts.

    Returns the dict written to report.json (plain Python types only). Each file is written to a
    temporary name and renamed into place, so a reader never sees a half-written file; report.json is
    written last, so its presence means the report is complete.
    """
    report = build_report(
        labels,
        scores,
        threshold,
        band,
        image_names,
        title,
        extra=extra,
        precision_scores=precision_scores,
        four_class=four_class,
        comparison=comparison,
    )
    if history:
        report["plots"]["training_curve"] = TRAINING_CURVE_FILE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)

    _replace_atomically(out_dir / PLOT_FILES["roc"], _savefig(_plot_roc(labels, scores, report)))
    _replace_atomically(out_dir / PLOT_FILES["confusion"], _savefig(_plot_confusion(report)))
    _replace_atomically(
        out_dir / PLOT_FILES["confidence_hist"], _savefig(_plot_confidence_hist(labels, scores, report))
    )
    if history:
        _replace_atomically(out_dir / TRAINING_CURVE_FILE, _savefig(_plot_training_curve(history, report)))
    _replace_atomically(out_dir / MARKDOWN_FILE, _write_text(render_markdown(report)))
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    _replace_atomically(out_dir / JSON_FILE, _write_text(text))
    return report


def build_report(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    band: tuple[float, float],
    image_names: list[str],
    title: str,
    extra: dict | None = None,
    precision_scores: dict[str, np.ndarray] | None = None,
    four_class: tuple[np.ndarray, np.ndarray] | None = None,
    comparison: dict | None = None,
) -> dict:
    """The content of report.json as plain Python data; no I/O.

    Optional blocks ("precisions", "four_class", "comparison") are None when not given, so the keys are always
    present.
    In "precisions", each entry is compared with the "fp32" entry; when precision_scores has no "fp32"
    key, `scores` are taken as the fp32 scores.
    """
    low, high = (float(v) for v in band)
    metrics = binary_metrics(labels, scores, threshold)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "title": title,
        "class_names": list(CLASS_NAMES),
        # Headline numbers at the top level, under the names of BinaryMetrics: readers pick them by name.
        **metrics.to_dict(),
        "n_no_defect": metrics.n - metrics.n_defect,
        "roc_auc": _auc_or_none(labels, scores),
        "band": band_outcomes(labels, scores, threshold, low, high),
        "precisions": None,
        "four_class": None,
        "comparison": comparison,
        "heldout_images": [str(name) for name in image_names],
        "extra": extra or {},
        "plots": dict(PLOT_FILES),
    }
    if precision_scores is not None:
        report["precisions"] = _compare_precisions(labels, scores, threshold, (low, high), precision_scores)
    if four_class is not None:
        true_4, pred_4 = (np.asarray(a) for a in four_class)
        if true_4.shape != np.shape(labels):
            raise ValueError(f"four_class has {true_4.size} true levels for {np.size(labels)} labels")
        # Where the pass/fail decision goes wrong, by the annotators' level: tells label ambiguity (the
        # middle levels) apart from plain misses and false alarms (the outer ones).
        wrong = (np.asarray(scores) >= threshold) != (np.asarray(labels) == 1)
        report["four_class"] = {
            "n": int(true_4.size),
            "accuracy": multiclass_accuracy(true_4, pred_4),
            "confusion": confusion_matrix(true_4, pred_4, FOUR_CLASS_COUNT).tolist(),
            "confusion_layout": "rows are the true class, columns the predicted class",
            "decision_errors_by_level": [
                {"level": level, "n": int((true_4 == level).sum()), "errors": int(wrong[true_4 == level].sum())}
                for level in range(FOUR_CLASS_COUNT)
            ],
        }
    return _plain(report)


def build_comparison(
    labels: np.ndarray,
    old_scores: np.ndarray,
    old_threshold: float,
    new_scores: np.ndarray,
    new_threshold: float,
    compared: np.ndarray,
    *,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    overlap: Mapping[str, Any],
) -> dict[str, Any]:
    """A previous model against this run's on the same held-out parts, each at its own operating point.

    `compared` marks the parts both models are scored on (False: the old model trained on that image).
    `old` / `new` describe the models (checkpoint, backbone, input size ...); `overlap` says how the old
    model's training images were matched (checked: bool, method: str, and why not when unchecked).
    Per model: detection rate (recall), false-positive rate, ROC-AUC (None with one class only) and accuracy;
    McNemar's exact test on which model decided each part correctly, over all compared parts and per class.
    """
    labels = np.asarray(labels)
    compared = np.asarray(compared, dtype=bool)
    old_scores = np.asarray(old_scores, dtype=np.float64)
    new_scores = np.asarray(new_scores, dtype=np.float64)
    if not (labels.shape == compared.shape == old_scores.shape == new_scores.shape):
        raise ValueError(
            f"labels {labels.shape}, compared {compared.shape}, old {old_scores.shape} and new {new_scores.shape} "
            "scores must have one entry per held-out part"
        )
    y = labels[compared]
    models: dict[str, dict[str, Any]] = {}
    for key, info, scores, threshold in (("old", old, old_scores, old_threshold),
                                         ("new", new, new_scores, new_threshold)):
        m = binary_metrics(y, scores[compared], threshold)
        models[key] = {
            **info, "threshold": float(threshold),
            "metrics": {"n": m.n, "n_defect": m.n_defect, "tp": m.tp, "fp": m.fp, "tn": m.tn, "fn": m.fn,
                        "recall": m.recall, "false_positive_rate": m.false_positive_rate,
                        "accuracy": m.accuracy, "roc_auc": _auc_or_none(y, scores[compared])},
        }
    old_flags = old_scores[compared] >= old_threshold
    new_flags = new_scores[compared] >= new_threshold
    tests = {}
    for key, subset in (("all_parts", np.ones_like(y, dtype=bool)), ("defect_parts", y == 1),
                        ("good_parts", y == 0)):
        r = mcnemar_paired(y[subset], old_flags[subset], new_flags[subset])
        tests[key] = {"n": r.n, "both_right": r.both_right, "only_old_right": r.only_a_right,
                      "only_new_right": r.only_b_right, "both_wrong": r.both_wrong, "p_value": r.p_value}
    excluded = int(np.sum(~compared))
    return _plain({
        "heldout": "this run's test split",
        "n_test": int(labels.size),
        "n_compared": int(compared.sum()),
        "excluded_overlap": excluded,
        "overlap": dict(overlap),
        "old": models["old"],
        "new": models["new"],
        "mcnemar": tests,
        "alpha": COMPARISON_ALPHA,
        "reading": _comparison_reading(tests["all_parts"]),
        "method": MCNEMAR_REFERENCE,
    })


def _comparison_reading(test: Mapping[str, Any]) -> str:
    b, c, p = test["only_old_right"], test["only_new_right"], test["p_value"]
    if b == c:
        return (f"Both models decide the same number of compared parts correctly ({b} the old one alone, {c} the "
                "new one alone): no difference to find.")
    better, worse = ("new", "old") if c > b else ("old", "new")
    if p < COMPARISON_ALPHA:
        return (f"The {better} model decides more parts correctly ({max(b, c)} against {min(b, c)} of the parts "
                f"the two decide differently); McNemar p = {p:.4g} < {COMPARISON_ALPHA}: unlikely to be chance.")
    return (f"The {better} model decides more parts correctly ({max(b, c)} against {min(b, c)} of the parts the "
            f"two decide differently), but McNemar p = {p:.4g} >= {COMPARISON_ALPHA}: a split this uneven is "
            f"common by chance alone; the {better} model is not shown to be better than the {worse} one.")


def _comparison_markdown(cmp: Mapping[str, Any]) -> list[str]:
    old, new = cmp["old"], cmp["new"]
    overlap = cmp["overlap"]

    def model_line(who: str, m: Mapping[str, Any]) -> str:
        what = [str(m[k]) for k in ("backbone", "color") if m.get(k)]
        what += [f"{m['input_size']} px"] if m.get("input_size") else []
        described = f" ({', '.join(what)})" if what else ""
        return f"- {who}: `{m.get('checkpoint', 'this run')}`{described}, threshold {m['threshold']:.4f}"

    lines = [
        "## Compared with the previous model",
        "",
        model_line("Old", old),
        model_line("New", new),
        "",
        f"Both models are scored on the same parts: {cmp['heldout']}, each at its own operating point "
        "(the threshold it ships with).",
        "",
    ]
    if overlap.get("checked"):
        lines.append(
            "The old model may have trained on some of these images where its data overlapped this run's. "
            f"{cmp['excluded_overlap']} of the {cmp['n_test']} test images were in its training or validation "
            f"split ({overlap.get('method')}) and are left out here: {cmp['n_compared']} parts compared."
        )
    else:
        lines.append(
            "The old model may have trained on some of these images where its data overlapped this run's; that "
            f"could not be checked ({overlap.get('method')}), so all {cmp['n_test']} test parts are compared "
            "and the old model's numbers may be optimistic."
        )
    if new.get("init_from_old"):
        lines.append("The new model started from the old one's weights: images the old model trained on are "
                     "no fair test of either, which is one more reason to leave them out.")
    lines.append("")
    if cmp["n_compared"] == 0:
        return [*lines, "No parts are left to compare.", ""]
    om, nm = old["metrics"], new["metrics"]
    n_good = om["n"] - om["n_defect"]

    def auc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    d_auc = "n/a" if om["roc_auc"] is None or nm["roc_auc"] is None else f"{nm['roc_auc'] - om['roc_auc']:+.4f}"
    lines += [
        "| Metric | Old | New | Change |",
        "|---|---|---|---|",
        f"| Detection rate (defects caught) | {_pct(om['recall'])} ({om['tp']} of {om['n_defect']}) "
        f"| {_pct(nm['recall'])} ({nm['tp']} of {nm['n_defect']}) | {100 * (nm['recall'] - om['recall']):+.2f} pt |",
        f"| False-positive rate (good parts flagged) | {_pct(om['false_positive_rate'])} ({om['fp']} of {n_good}) "
        f"| {_pct(nm['false_positive_rate'])} ({nm['fp']} of {n_good}) "
        f"| {100 * (nm['false_positive_rate'] - om['false_positive_rate']):+.2f} pt |",
        f"| ROC-AUC | {auc(om['roc_auc'])} | {auc(nm['roc_auc'])} | {d_auc} |",
        f"| Accuracy at its own operating point | {_pct(om['accuracy'])} | {_pct(nm['accuracy'])} "
        f"| {100 * (nm['accuracy'] - om['accuracy']):+.2f} pt |",
        f"| Threshold | {old['threshold']:.4f} | {new['threshold']:.4f} | |",
        "",
        "Which model decides each part correctly (pass/fail at its threshold), and McNemar's exact test: the "
        "probability of a split at least this uneven between the two columns if both models were equally good.",
        "",
        "| Parts | Compared | Both right | Only old right | Only new right | Both wrong | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"all_parts": "all", "defect_parts": "defective", "good_parts": "good"}
    for key, name in names.items():
        t = cmp["mcnemar"][key]
        lines.append(f"| {name} | {t['n']} | {t['both_right']} | {t['only_old_right']} | {t['only_new_right']} "
                     f"| {t['both_wrong']} | {t['p_value']:.4g} |")
    lines += ["", cmp["reading"], "", f"Method: {cmp['method']}.", ""]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable summary of a report dict from build_report, with the PNGs embedded by relative link."""
    m, band = report, report["band"]
    n_good = m["n_no_defect"]
    auc = "undefined (one class only)" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
    lines = [
        f"# {report['title']}",
        "",
        f"Evaluated on {m['n']} held-out parts: {m['n_defect']} defect, {n_good} no_defect. "
        f"A part is flagged as defective when its defect score is >= {report['threshold']:.4f}.",
        "",
        "## Metrics at the operating point",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Defect recall (defects caught) | {_pct(m['recall'])} ({m['tp']} of {m['n_defect']}) |",
        f"| Missed defects | {m['fn']} |",
        f"| False-positive rate (good parts flagged) | {_pct(m['false_positive_rate'])} "
        f"({m['fp']} of {n_good}) |",
        f"| Precision (flagged parts that are defective) | {_pct(m['precision'])} |",
        f"| F1 (defect class) | {m['f1']:.4f} |",
        f"| Accuracy | {_pct(m['accuracy'])} |",
        f"| Specificity | {_pct(m['specificity'])} |",
        f"| ROC-AUC | {auc} |",
        f"| Threshold | {report['threshold']:.4f} |",
        "",
        "## Uncertainty band",
        "",
        f"Parts scored in [{band['low']:.4f}, {band['high']:.4f}] go to a human inspector: "
        f"{band['n_manual']} of {band['n']} parts ({_pct(band['manual_fraction'])}). "
        f"The band holds {band['errors_in_band']} of the {band['errors_at_threshold']} parts "
        "that the threshold alone gets wrong.",
        "",
        "| Automatically decided parts | Value |",
        "|---|---|",
        f"| Parts | {band['n_auto']} |",
        f"| Accuracy | {_pct(band['auto_accuracy'])} |",
        f"| Defect recall | {_pct(band['auto_recall'])} |",
        f"| False-positive rate | {_pct(band['auto_false_positive_rate'])} |",
        f"| Missed defects | {band['auto_missed_defects']} |",
        f"| False alarms | {band['auto_false_alarms']} |",
        "",
    ]
    if report.get("precisions"):
        lines += [
            "## Numeric precisions",
            "",
            f"Compared with {REFERENCE_PRECISION} at the same threshold and band.",
            "",
            "| Precision | Accuracy | Δ accuracy | Decision agreement | Verdict agreement | Recall "
            "| False-positive rate | ROC-AUC | Max score difference |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in report["precisions"].items():
            p_auc = "n/a" if p["roc_auc"] is None else f"{p['roc_auc']:.4f}"
            lines.append(
                f"| {name} | {_pct(p['accuracy'])} | {100 * p['accuracy_delta_vs_fp32']:+.2f} pt "
                f"| {_pct(p['decision_agreement_vs_fp32'])} | {_pct(p['verdict_agreement_vs_fp32'])} "
                f"| {_pct(p['recall'])} | {_pct(p['false_positive_rate'])} | {p_auc} "
                f"| {p['max_abs_score_diff_vs_fp32']:.4f} |"
            )
        lines += [
            "",
            "Decision agreement: same pass/fail at the threshold. Verdict agreement: same pass/fail/manual "
            "with the band.",
            "",
        ]
    if report.get("comparison"):
        lines += _comparison_markdown(report["comparison"])
    if report.get("four_class"):
        four = report["four_class"]
        lines += [
            "## Four-class model",
            "",
            f"Accuracy {_pct(four['accuracy'])} on {four['n']} parts. Rows: true class; columns: predicted.",
            "",
            "| true \\ predicted | " + " | ".join(str(i) for i in range(FOUR_CLASS_COUNT)) + " |",
            "|---" * (FOUR_CLASS_COUNT + 1) + "|",
        ]
        for true_class, row in enumerate(four["confusion"]):
            lines.append(f"| {true_class} | " + " | ".join(str(c) for c in row) + " |")
        lines += [
            "",
            "Pass/fail errors at the operating point, by annotated level:",
            "",
            "| level | parts | wrong decisions |",
            "|---|---|---|",
        ]
        lines += [f"| {e['level']} | {e['n']} | {e['errors']} |" for e in four["decision_errors_by_level"]]
        lines.append("")
    lines += [
        "## Plots",
        "",
        f"![ROC curve]({PLOT_FILES['roc']})",
        "",
        f"![Confusion matrix]({PLOT_FILES['confusion']})",
        "",
        f"![Defect score histograms]({PLOT_FILES['confidence_hist']})",
        "",
    ]
    if "training_curve" in report["plots"]:
        lines += [f"![Training curve]({report['plots']['training_curve']})", ""]
    sources = (report.get("extra") or {}).get("training", {}).get("data_sources")
    if sources:
        lines += _sources_markdown(sources, report["extra"]["training"].get("duplicates") or {})
    if report.get("extra"):
        lines += ["## Run details", "", "| Key | Value |", "|---|---|"]
        lines += [f"| {key} | `{json.dumps(value)}` |" for key, value in report["extra"].items()]
        lines.append("")
    lines += [
        f"The {len(report['heldout_images'])} held-out image names are listed under `heldout_images` "
        f"in {JSON_FILE}.",
        "",
    ]
    return "\n".join(lines)


def _sources_markdown(sources: list[Mapping[str, Any]], duplicates: Mapping[str, Any]) -> list[str]:
    lines = ["## Data", "", "| Folder | Kind | Images | Kept (ok / defect) | Station | Labellers |",
             "|---|---|---|---|---|---|"]
    for s in sources:
        station = s.get("station") or {}
        where = station.get("id", "") if isinstance(station, Mapping) else str(station)
        who = ", ".join(f"{k} ({v})" for k, v in (s.get("labellers") or {}).items())
        tag = f"{s['tag']}: " if s.get("tag") else ""
        lines.append(f"| {tag}`{s['folder']}` | {s['kind']} | {s['images']} | {s['kept']} ({s['ok']} / {s['defect']}) "
                     f"| {where} | {who} |")
    if "duplicates_kept" in duplicates:
        lines += ["", f"One folder is read whole, as always: it holds {duplicates['duplicates_kept']} extra copies of "
                  f"a picture (by its decoded pixels), {duplicates['conflicting_labels_kept']} of them images whose "
                  "copies disagree on the class; none is dropped."]
    elif duplicates:
        lines += ["", f"The same picture (by its decoded pixels) more than once: {duplicates['duplicates_dropped']} "
                  f"extra copies dropped, and {duplicates['conflicting_labels_dropped']} images dropped whose copies "
                  "disagree on the class."]
    lines += ["", "Each image's folder and content hash and, for a review export, its inspection, station, model "
              "and labeller are in the run's run.json under `data.images`."]
    return [*lines, ""]


def _compare_precisions(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    band: tuple[float, float],
    precision_scores: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    by_name = {REFERENCE_PRECISION: scores, **precision_scores}
    reference = np.asarray(by_name[REFERENCE_PRECISION], dtype=np.float64)
    reference_metrics = binary_metrics(labels, reference, threshold)
    reference_verdicts = _verdicts(reference, threshold, band)
    results = {}
    for name, raw in by_name.items():
        these = np.asarray(raw, dtype=np.float64)
        if these.shape != reference.shape:
            raise ValueError(
                f"precision_scores['{name}'] has shape {these.shape}, expected {reference.shape} "
                "(one score per evaluated part, in the same order)"
            )
        m = binary_metrics(labels, these, threshold)
        results[name] = {
            **m.to_dict(),
            "roc_auc": _auc_or_none(labels, these),
            "accuracy_delta_vs_fp32": m.accuracy - reference_metrics.accuracy,
            "decision_agreement_vs_fp32": _mean((these >= threshold) == (reference >= threshold)),
            "verdict_agreement_vs_fp32": _mean(_verdicts(these, threshold, band) == reference_verdicts),
            "max_abs_score_diff_vs_fp32": float(np.max(np.abs(these - reference), initial=0.0)),
            "manual_fraction": band_outcomes(labels, these, threshold, *band)["manual_fraction"],
        }
    return results


def _verdicts(scores: np.ndarray, threshold: float, band: tuple[float, float]) -> np.ndarray:
    # 0 pass, 1 fail, 2 manual: the three outcomes a station can give a part.
    verdicts = (scores >= threshold).astype(np.int8)
    verdicts[(scores >= band[0]) & (scores <= band[1])] = 2
    return verdicts


def _mean(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if flags.size else 0.0


def _auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    # A test split with one class has no ROC curve; the rest of the report is still useful.
    try:
        return roc_auc(labels, scores)
    except ValueError:
        return None


def _plain(value: Any) -> Any:
    """Recursively convert to JSON-safe plain Python: numpy scalars and arrays, tuples, Paths."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float):
        # JSON has no NaN or infinity; null keeps report.json loadable by strict parsers.
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} into {JSON_FILE}: {value!r}")


def _pct(fraction: float) -> str:
    return f"{100.0 * fraction:.2f} %"


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


def _savefig(fig: Figure) -> Callable[[Path], None]:
    return lambda path: fig.savefig(path, format="png", dpi=DPI)


def _new_figure() -> Figure:
    # Figure with an explicit Agg canvas rather than pyplot: no global backend switch, no figure registry
    # to leak, safe on a headless box and in worker threads. Imported here because only reports need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heading(report: Mapping[str, Any], what: str) -> str:
    return f"{textwrap.shorten(report['title'], width=60, placeholder='…')}\n{what}"


def _plot_roc(labels: np.ndarray, scores: np.ndarray, report: Mapping[str, Any]) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    m = report
    ax.set_title(_heading(report, "ROC curve"))
    ax.set_xlabel("False-positive rate (good parts flagged)")
    ax.set_ylabel("Defect recall (defects caught)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if m["roc_auc"] is None:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in this set", ha="center", va="center", fontsize=12)
        return fig
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"ROC (AUC = {m['roc_auc']:.3f})")
    ax.plot(
        m["false_positive_rate"],
        m["recall"],
        marker="o",
        markersize=9,
        color="tab:red",
        linestyle="none",
        label=(
            f"operating point, threshold {m['threshold']:.3f}\n"
            f"recall {_pct(m['recall'])}, FPR {_pct(m['false_positive_rate'])}"
        ),
    )
    ax.legend(loc="lower right")
    return fig


def _plot_confusion(report: Mapping[str, Any]) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    m = report
    counts = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    captions = [["correct pass", "false alarm"], ["missed defect", "defect caught"]]
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for row in range(2):
        row_total = int(counts[row].sum())
        for col in range(2):
            count = int(counts[row, col])
            share = count / row_total if row_total else 0.0
            dark = count > counts.max() / 2
            ax.text(
                col,
                row,
                f"{count}\n{_pct(share)} of row\n{captions[row][col]}",
                ha="center",
                va="center",
                fontsize=12,
                color="white" if dark else "black",
            )
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(_heading(report, f"Confusion matrix at threshold {m['threshold']:.3f}"))
    return fig


def _plot_confidence_hist(labels: np.ndarray, scores: np.ndarray, report: Mapping[str, Any]) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    band = report["band"]
    bins = np.linspace(0.0, 1.0, 41)
    ax.axvspan(
        band["low"],
        band["high"],
        color="gold",
        alpha=0.35,
        label=f"manual band [{band['low']:.3f}, {band['high']:.3f}], {_pct(band['manual_fraction'])}",
    )
    for class_index, colour in ((0, "tab:blue"), (1, "tab:red")):
        these = scores[labels == class_index]
        ax.hist(
            these,
            bins=bins,
            color=colour,
            alpha=0.55,
            edgecolor=colour,
            label=f"true {CLASS_NAMES[class_index]} (n={these.size})",
        )
    ax.axvline(
        report["threshold"],
        color="black",
        linestyle="--",
        linewidth=1.5,
        label=f"threshold {report['threshold']:.3f}",
    )
    from matplotlib.ticker import FuncFormatter

    # Most parts score near 0 or 1; a log axis keeps the few parts near the threshold visible. Plain
    # numbers on it (1, 10, 100) read better than powers of ten, and headroom keeps the legend off the bars.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.set_ylim(0.7, max(ax.get_ylim()[1], 1.0) * 12)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Defect score (probability of 'defect')")
    ax.set_ylabel("Number of parts (log scale)")
    ax.set_title(_heading(report, "Defect score by true class"))
    ax.legend(loc="upper center", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return fig


def _plot_training_curve(history: list[dict], report: Mapping[str, Any]) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", marker=".", label="training loss")
    ax.plot(epochs, [h["val_loss"] for h in history], color="tab:orange", marker=".", label="validation loss")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Cross-entropy loss")
    ax.grid(alpha=0.3)
    # Validation AUC on its own axis: it is what picks best.pt, and its scale (0.5-1) is not the loss's.
    auc_ax = ax.twinx()
    auc = [h["val_auc"] for h in history]
    auc_ax.plot(epochs, auc, color="tab:green", marker=".", label="validation ROC-AUC")
    best = int(np.nanargmax(np.asarray(auc, dtype=np.float64)))
    auc_ax.scatter([epochs[best]], [auc[best]], s=80, facecolors="none", edgecolors="black",
                   label=f"best validation AUC {auc[best]:.4f} (epoch {epochs[best]})", zorder=3)
    auc_ax.set_ylabel("Validation ROC-AUC")
    handles = ax.get_legend_handles_labels()[0] + auc_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=9)
    ax.set_title(_heading(report, "Training curve"))
    return fig
