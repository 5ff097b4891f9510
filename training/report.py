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
) -> dict:
    """Write report.json, report.md, roc.png, confusion.png and confidence_hist.png into out_dir.

    With `history` (one dict per epoch: epoch, train_loss, val_loss, val_auc), training_curve.png too.

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
) -> dict:
    """The content of report.json as plain Python data; no I/O.

    Optional blocks ("precisions", "four_class") are None when not given, so the keys are always present.
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
