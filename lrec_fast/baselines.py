"""The models a practitioner would try instead, behind the evaluation's ``StreamModel`` face.

- ``Popularity``: items scored by how often they were rated so far (all history, or only the
  last ``window`` events: recent popularity); no rating prediction.
- ``RecommenderModel``: a ``Recommender``; ``learn=True`` gives it each micro-batch through
  ``feedback`` (with the defaults of today's learner this *is* naive fine-tuning), ``False``
  keeps it static.
- ``Retrain``: a fresh ``Recommender`` fitted from scratch on every event so far, every
  ``every`` stream events; static in between.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .data.types import Interactions
from .online import DivergenceError
from .service import Recommender


class Popularity:
    """Rating counts per item, over all events seen or the last ``window`` of them."""

    rates = False

    def __init__(self, item_ids: Sequence[Any], window: int | None = None, name: str = "") -> None:
        self.item_ids = list(item_ids)
        self.col = {j: c for c, j in enumerate(self.item_ids)}
        self.counts = np.zeros(len(self.col), dtype=np.float64)
        self.window = window
        self._recent: deque[int] = deque()
        self.name = name or ("popularity" if window is None else f"recent popularity ({window})")
        self.update_s = 0.0

    def _add(self, items: Sequence[Any]) -> None:
        cols = [self.col[j] for j in items if j in self.col]
        np.add.at(self.counts, cols, 1.0)
        if self.window is not None:
            self._recent.extend(cols)
            drop = len(self._recent) - self.window
            if drop > 0:
                old = [self._recent.popleft() for _ in range(drop)]
                np.add.at(self.counts, old, -1.0)

    def fit(self, events: Interactions) -> None:
        self._add(events.item.tolist())

    def predict(self, users: Sequence[Any], items: Sequence[Any]) -> np.ndarray:
        return np.full(len(items), np.nan, dtype=np.float32)

    def score_all(self, users: Sequence[Any]) -> np.ndarray:
        # ties (never-rated items) go to the catalogue order, as everywhere else
        return np.broadcast_to(self.counts.astype(np.float32), (len(users), len(self.counts)))

    def learn(self, users: Sequence[Any], items: Sequence[Any], ratings: np.ndarray) -> None:
        t = time.perf_counter()
        self._add(items)
        self.update_s += time.perf_counter() - t


class _Answers:
    """Answers from the Recommender in ``self.rec``: ratings, and the ranking ``recommend``
    uses."""

    rec: Recommender
    rates = True

    @property
    def item_ids(self) -> list[Any]:
        return self.rec.item_ids

    def predict(self, users: Sequence[Any], items: Sequence[Any]) -> np.ndarray:
        return self.rec.predict(users, items)

    def score_all(self, users: Sequence[Any]) -> np.ndarray:
        return self.rec.rank_all(users)


class RecommenderModel(_Answers):
    """A Recommender under evaluation; ``learn`` decides whether it takes feedback."""

    def __init__(self, rec: Recommender, learn: bool, name: str) -> None:
        self.rec, self.learning, self.name = rec, learn, name
        self.update_s = 0.0
        self.rejected = 0

    def learn(self, users: Sequence[Any], items: Sequence[Any], ratings: np.ndarray) -> None:
        if not self.learning:
            return
        t = time.perf_counter()
        try:
            self.rec.feedback(users, items, ratings)
        except DivergenceError:
            self.rejected += 1  # refused and unchanged
        self.update_s += time.perf_counter() - t


class Retrain(_Answers):
    """Retraining from scratch every ``every`` stream events on everything seen so far (the
    warm-up's training events + the stream so far); static between retrains."""

    def __init__(self, make: Callable[[], Recommender], warm: Interactions, every: int = 2_500,
                 name: str = "") -> None:  # fmt: skip
        self.make, self.every = make, every
        self.seen = [warm]
        self.name = name or f"retrain every {every:,}"
        self.update_s = 0.0
        self._since = 0
        self.rec = self._train()

    def _train(self) -> Recommender:
        t = time.perf_counter()
        ev = self.seen[0] if len(self.seen) == 1 else Interactions.concat(self.seen)
        rec = self.make()
        rec.fit(ev.user, ev.item, ev.rating)
        self.update_s += time.perf_counter() - t
        return rec

    def learn(self, users: Sequence[Any], items: Sequence[Any], ratings: np.ndarray) -> None:
        n = len(users)
        zeros = np.zeros(n, dtype=np.int64)
        self.seen.append(Interactions(np.asarray(users), np.asarray(items),
                                      np.asarray(ratings, dtype=np.float32), zeros))  # fmt: skip
        self._since += n
        if self._since >= self.every:
            self._since = 0
            self.rec = self._train()


__all__ = ["Popularity", "RecommenderModel", "Retrain"]
