"""Prequential (test-then-train) evaluation on a time-ordered stream.

Each micro-batch is first scored by the model as it stands, then (for a learning model) given
to ``feedback``. Metrics per segment and overall:
- RMSE of predictions clipped to the rating range;
- for events rated >= ``relevant_at``: HR@k and NDCG@k of the true item ranked among ALL
  catalogue items the user has not interacted with before this micro-batch (the true item
  itself always competes). Rank = number of eligible items scored strictly higher.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .data.types import Interactions
from .online import DivergenceError
from .service import Recommender


@dataclass
class Totals:
    """Running sums for one stream segment."""

    sq_err: float = 0.0
    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    n_rel: int = 0
    update_s: float = 0.0
    rejected: int = 0
    batches: int = 0

    def add(self, other: Totals) -> None:
        for f in ("sq_err", "n", "hits", "ndcg", "n_rel", "update_s", "rejected", "batches"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def metrics(self, k: int) -> dict[str, float]:
        return {
            "rmse": math.sqrt(self.sq_err / self.n) if self.n else float("nan"),
            f"hr@{k}": self.hits / self.n_rel if self.n_rel else float("nan"),
            f"ndcg@{k}": self.ndcg / self.n_rel if self.n_rel else float("nan"),
            "events": self.n,
            "relevant": self.n_rel,
            "update_ms_per_batch": 1e3 * self.update_s / max(self.batches, 1),
            "rejected_batches": self.rejected,
        }


@dataclass
class StreamResult:
    name: str
    k: int
    segments: list[dict[str, float]] = field(default_factory=list)
    overall: dict[str, float] = field(default_factory=dict)


def prequential(
    model: Recommender,
    stream: Interactions,
    history: dict[object, set[object]],
    *,
    learn: bool = True,
    batch_size: int = 100,
    segment: int = 2_500,
    k: int = 10,
    relevant_at: float = 4.0,
    name: str = "model",
    on_batch: Callable[[int], None] | None = None,
) -> StreamResult:
    """Run test-then-train over ``stream`` (time order) and return per-segment metrics.

    history: user id -> item ids the user interacted with before the stream (updated in place
    as the stream goes). All stream items must already be in the model's catalogue.
    """
    col = {j: c for c, j in enumerate(model.item_ids)}
    lo, hi = model.rating_range
    res = StreamResult(name=name, k=k)
    total, seg, seg_start = Totals(), Totals(), 0
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    for s in range(0, len(stream), batch_size):
        b = stream.take(slice(s, s + batch_size))
        users, items = b.user.tolist(), b.item.tolist()
        pred = np.clip(model.predict(users, items), lo, hi)
        seg.sq_err += float(np.sum((pred - b.rating) ** 2))
        seg.n += len(users)
        rel = np.nonzero(b.rating >= relevant_at)[0]
        if len(rel):
            ru = list(dict.fromkeys(users[e] for e in rel))
            row = {u: a for a, u in enumerate(ru)}
            scores = model.score_all(ru)
            banned = np.zeros(scores.shape, dtype=bool)
            for u, a in row.items():
                seen = [col[j] for j in history.get(u, ()) if j in col]
                banned[a, seen] = True
            for e in rel:
                a, c = row[users[e]], col[items[e]]
                sc = scores[a]
                rank = int(np.count_nonzero((sc > sc[c]) & ~banned[a]))
                if rank < k:
                    seg.hits += 1.0
                    seg.ndcg += float(discounts[rank])
            seg.n_rel += len(rel)
        if learn:
            t0 = time.perf_counter()
            try:
                model.feedback(users, items, b.rating)
            except DivergenceError:
                seg.rejected += 1  # the model refused the step and is unchanged
            seg.update_s += time.perf_counter() - t0
        for u, j in zip(users, items, strict=True):
            history.setdefault(u, set()).add(j)
        seg.batches += 1
        if on_batch is not None:
            on_batch(len(users))
        if seg.n >= segment or s + batch_size >= len(stream):
            m = seg.metrics(k)
            m["start"] = seg_start
            res.segments.append(m)
            total.add(seg)
            seg_start += seg.n
            seg = Totals()
    res.overall = total.metrics(k)
    return res


def history_of(events: Interactions) -> dict[object, set[object]]:
    """user id -> set of item ids, from an event log."""
    h: dict[object, set[object]] = defaultdict(set)
    for u, j in zip(events.user.tolist(), events.item.tolist(), strict=True):
        h[u].add(j)
    return dict(h)
