"""`appliance review ...`: the review queue from the command line, on the station or a copy of its data folder.

    appliance review list      [--config F] [--all] [--limit N] [--json]
    appliance review label ID pass|fail [--defect-type T] --labeller NAME [--config F]
    appliance review stats     [--config F] [--model M] [--by day|shift] [--shifts 6,14,22] [--tz ZONE]
                               [--confidence C] [--json]
    appliance review promotion [--config F] [--model M] [--json]     exit 0: criteria met, 1: not met
    appliance review export --out DIR [--config F] [--model M]

The store is `<storage.data_dir>/review/review.sqlite3` of the station's configuration. A label given here is
stored at once; the running station announces it (`label_recorded`) at its next heartbeat or review write.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from appliance.review.queue import DB_NAME, LABEL_VERDICTS, ReviewStore, iter_rows
from appliance.review.stats import (
    LabelStats,
    PromotionCriteria,
    Rate,
    label_stats,
    stats_by_period,
)
from bundle.errors import ApplianceError, ConfigError

DEFAULT_SHIFTS = (6, 14, 22)


class ReviewError(ApplianceError):
    """The review store cannot be read or written, or a label is refused (exit 1)."""



def _positive(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value

def add_parser(sub: Any) -> None:
    """Add `review` and its subcommands to the `appliance` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="station TOML (default: defaults + APPLIANCE_* environment)")
    p = sub.add_parser("review", help="the review queue: list, label, stats, promotion, export",
                       description="The parts the station set aside for a person (manual_required, shadow mode, the "
                       "audit sample) and the labels people give them (README, \"Review queue and labels\").")
    rsub = p.add_subparsers(dest="review_command", metavar="SUBCOMMAND", required=True)

    q = rsub.add_parser("list", parents=[common], help="queued items, unlabelled first",
                        description="Queued items, unlabelled first (oldest first), then labelled ones with their "
                        "latest label; each with its picture's path.")
    q.add_argument("--all", action="store_true", help="also items whose picture was evicted (labelled ones keep a row)")
    q.add_argument("--unlabelled", action="store_true", help="only items without a label")
    q.add_argument("--limit", type=_positive, default=None, help="at most this many lines (1 or more)")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=cmd_list)

    q = rsub.add_parser("label", parents=[common], help="label a queued part pass or fail",
                        description="Record a person's label for a queued inspection. A later label for the same "
                        "inspection wins; the earlier ones are kept. Exit 1 for an inspection not in the queue.")
    q.add_argument("inspection_id", help="the inspection id (`appliance review list`)")
    q.add_argument("verdict", choices=LABEL_VERDICTS, help="pass: a good part; fail: a defective one")
    q.add_argument("--defect-type", help="what the defect is (crack, scratch, ...); with fail only")
    q.add_argument("--labeller", required=True, help="who labels (a name or badge id)")
    q.set_defaults(func=cmd_label)

    q = rsub.add_parser("stats", parents=[common], help="what the labels say about the model",
                        description="The labels against the AI's verdicts: confusion matrix (fail = defect is the "
                        "positive class), detection rate, false-positive rate, agreement and shadow agreement, each "
                        "with its Wilson interval; an AI manual_required or error counts as no AI verdict.")
    q.add_argument("--model", help="only this model's items (default: all)")
    q.add_argument("--by", choices=["day", "shift"], help="one line per UTC day or per shift")
    q.add_argument("--shifts", default=",".join(map(str, DEFAULT_SHIFTS)),
                   help="shift start hours for --by shift (default 6,14,22)")
    q.add_argument("--tz", default=None, help="the shifts' clock: a zone name such as Europe/Berlin (default UTC)")
    q.add_argument("--confidence", type=float, default=0.95, help="of the Wilson intervals (default 0.95)")
    q.add_argument("--json", action="store_true", help="as JSON")
    q.set_defaults(func=cmd_stats)

    q = rsub.add_parser("promotion", parents=[common], help="whether the labels show the model may be promoted",
                        description="Judge [review.promotion] (min_labelled, min_detection_rate, "
                        "max_false_positive_rate, confidence) at the pessimistic end of the Wilson intervals. "
                        "Exit 0 when met, 1 when not.")
    q.add_argument("--model", help="the model to judge (default: the model of the latest queued item)")
    q.add_argument("--json", action="store_true", help="as JSON")
    q.set_defaults(func=cmd_promotion)

    q = rsub.add_parser("export", parents=[common], help="labelled items as a training folder (ok/, defect/)",
                        description="Copy every labelled item's picture into OUT/ok/ or OUT/defect/ (its latest "
                        "label) with OUT/provenance.json; `make train DATA=OUT` trains on it. OUT must be new or "
                        "empty.")
    q.add_argument("--out", type=Path, required=True, help="the folder to create")
    q.add_argument("--model", help="only this model's items (default: all)")
    q.set_defaults(func=cmd_export)


def _open(args: argparse.Namespace) -> tuple[Any, ReviewStore]:
    from appliance.settings import load_settings

    settings = load_settings(args.config)
    folder = settings.storage.data_dir / "review"
    if not (folder / DB_NAME).is_file():
        raise ConfigError(f"no review queue at {folder / DB_NAME}",
                          hint="the station has queued no part yet, or --config names another station "
                          f"(storage.data_dir = {settings.storage.data_dir})")
    try:
        return settings, ReviewStore(folder, open_now=True)
    except (sqlite3.Error, OSError) as exc:
        raise ReviewError(f"the review store {folder / DB_NAME} cannot be opened: {exc}") from exc


def _when(epoch_s: float) -> str:
    from appliance.review.export import iso

    return (iso(epoch_s) or "")[:19].replace("T", " ")


def cmd_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    try:
        items = store.items(include_evicted=args.all, labelled=False if args.unlabelled else None)
    finally:
        store.close()
    total, unlabelled = len(items), sum(i.label is None for i in items)  # the queue's, not the page's
    if args.limit is not None:
        items = items[:args.limit]
    if args.json:
        for row in iter_rows(items):
            print(json.dumps(row))
        return 0
    shown = f", {len(items)} shown (--limit)" if len(items) < total else ""
    print(f"{total} item(s), {unlabelled} unlabelled{shown}  ({store.folder})")
    for i in items:
        score = "-" if i.score is None else f"{i.score:.4f}"
        label = "unlabelled" if i.label is None else (
            f"labelled {i.label.verdict}{f' ({i.label.defect_type})' if i.label.defect_type else ''} by "
            f"{i.label.labeller}")
        picture = "evicted" if i.evicted_at is not None else (i.image_file or "no picture")
        print(f"{i.inspection_id}  {_when(i.queued_at)}  {i.queue_reason:15s} part {i.part_id}  verdict {i.verdict} "
              f"AI {i.ai_verdict or '-'} score {score}  {i.mode}  model {i.model_id}  {label}  {picture}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from appliance.reporting.commands import UnknownInspection

    _, store = _open(args)
    try:
        label = store.record_label(args.inspection_id, args.verdict, labeller=args.labeller,
                                   defect_type=args.defect_type, source="cli")
        before = len(store.labels(args.inspection_id)) - 1
    except UnknownInspection as exc:
        raise ReviewError(f"unknown inspection id {args.inspection_id!r}: not in the review queue",
                          hint="`appliance review list` shows the queued items") from exc
    except ValueError as exc:
        raise ReviewError(f"label refused: {exc}") from exc
    except (sqlite3.Error, OSError) as exc:
        raise ReviewError(f"the label could not be stored: {exc}") from exc
    finally:
        store.close()
    kind = f" ({label.defect_type})" if label.defect_type else ""
    again = f"; {before} earlier label(s) kept, this one counts" if before else ""
    print(f"{label.inspection_id}: labelled {label.verdict}{kind} by {label.labeller}{again}")
    return 0


def _rate(name: str, rate: Rate | None, what: str, none: str) -> str:
    if rate is None:
        return f"{name:20s} -      ({none})"
    return (f"{name:20s} {rate.value:.3f} [{rate.low:.3f}, {rate.high:.3f}]  ({rate.successes} of {rate.n} "
            f"{what})")


def _print_stats(stats: LabelStats) -> None:
    c = stats.confusion
    print(f"labelled {stats.labelled} ({stats.with_ai_verdict} with an AI verdict, {stats.without_ai_verdict} "
          f"without); confidence {stats.confidence}")
    print(f"confusion (AI vs person; fail = defect)   TP {c.tp}  FN {c.fn}  FP {c.fp}  TN {c.tn}")
    print(_rate("detection rate", stats.detection_rate, "defects caught", "no defect labelled with an AI verdict"))
    print(_rate("false-positive rate", stats.false_positive_rate, "good parts failed",
                "no good part labelled with an AI verdict"))
    print(_rate("agreement", stats.agreement, "agree", "no label with an AI verdict"))
    print(_rate("shadow agreement", stats.shadow_agreement, "shadow-mode parts agree",
                "no shadow-mode part labelled with an AI verdict"))
    if stats.models:
        print("models " + ", ".join(f"{m} ({n})" for m, n in sorted(stats.models.items())))


def cmd_stats(args: argparse.Namespace) -> int:
    _, store = _open(args)
    try:
        parts = store.labelled_parts(args.model)
    finally:
        store.close()
    try:
        if args.by is None:
            stats = label_stats(parts, args.confidence)
            if args.json:
                print(json.dumps(stats.as_dict(), indent=2))
            else:
                _print_stats(stats)
            return 0
        if args.by == "day":
            if args.tz is not None:
                raise ConfigError("--by day counts UTC days: --tz applies to --by shift")
            periods = stats_by_period(parts, "day", confidence=args.confidence)
        else:
            shifts = [int(h) for h in args.shifts.split(",") if h.strip()]
            periods = stats_by_period(parts, "shift", shifts=shifts, tz=args.tz, confidence=args.confidence)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        print(json.dumps([p.as_dict() for p in periods], indent=2))
        return 0
    print(f"{'period':17s} {'labelled':>8s}  {'TP':>4s} {'FN':>4s} {'FP':>4s} {'TN':>4s}  "
          f"{'detection rate':24s} {'false-positive rate':24s} agreement")

    def short(r: Rate | None) -> str:
        return "-" if r is None else f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]"

    for p in periods:
        s, c = p.stats, p.stats.confusion
        print(f"{p.label:17s} {s.labelled:8d}  {c.tp:4d} {c.fn:4d} {c.fp:4d} {c.tn:4d}  {short(s.detection_rate):24s} "
              f"{short(s.false_positive_rate):24s} {short(s.agreement)}")
    return 0


def cmd_promotion(args: argparse.Namespace) -> int:
    from appliance.review.promotion import promotion_verdict

    settings, store = _open(args)
    p = settings.review.promotion
    criteria = PromotionCriteria(p.min_labelled, p.min_detection_rate, p.max_false_positive_rate, p.confidence)
    try:
        model, labelled, verdict = promotion_verdict(store, criteria, args.model)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"model_id": model, **verdict.as_dict()}, indent=2))
    else:
        print(f"model {model or '(none queued)'}: {labelled} label(s); criteria [review.promotion]: at least "
              f"{p.min_labelled} labelled, detection rate >= {p.min_detection_rate}, false-positive rate <= "
              f"{p.max_false_positive_rate}, judged at the pessimistic end of {p.confidence:.0%} Wilson intervals")
        print(verdict.reason)
    return 0 if verdict.met else 1


def cmd_export(args: argparse.Namespace) -> int:
    from appliance.review.export import DEFECT_DIR, OK_DIR, export_labelled

    settings, store = _open(args)
    s = settings.station
    try:
        result = export_labelled(store, args.out, station={"id": s.id, "site": s.site, "line": s.line},
                                 model_id=args.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise ReviewError(f"export to {args.out} failed: {exc}") from exc
    finally:
        store.close()
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in result.skipped.items())
    print(f"{args.out}: {result.counts[OK_DIR]} ok, {result.counts[DEFECT_DIR]} defect"
          f"{f' (left out: {skipped})' if skipped else ''}; provenance.json; train with `make train DATA={args.out}`")
    empty = [sub for sub in (OK_DIR, DEFECT_DIR) if not result.counts[sub]]
    if empty:
        print(f"warning: {' and '.join(f'{sub}/' for sub in empty)} empty: training needs both classes",
              file=sys.stderr)
    return 0 if result.files else 1
