"""Whether a model has earned promotion, judged from the labels in a station's review store: the one place
the CLI (`appliance review promotion`) and the HTTP API (`GET /promotion`) ask."""

from __future__ import annotations

from appliance.review.queue import ReviewStore
from appliance.review.stats import PromotionCriteria, PromotionVerdict, judge_promotion, label_stats


def promotion_verdict(store: ReviewStore, criteria: PromotionCriteria,
                      model_id: str | None = None) -> tuple[str | None, int, PromotionVerdict]:
    """(model judged, its labelled parts, the verdict). `model_id` None: the model of the most recently queued
    item (the one running now). Raises the store's sqlite3.Error / OSError when it cannot be read."""
    model = model_id
    if model is None:
        items = sorted(store.items(include_evicted=True), key=lambda i: i.seq)
        model = items[-1].model_id if items else None
    parts = store.labelled_parts(model) if model is not None else []
    return model, len(parts), judge_promotion(label_stats(parts, criteria.confidence), criteria)
