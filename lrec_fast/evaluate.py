"""Prequential (test-then-train) evaluation on a time-ordered stream, and the lifelong-learning
protocol built on it (``run_protocol``, ``lrec-fast evaluate``).

Each micro-batch is first scored by the model as it stands, then (for a learning model) given
to it. Metrics per segment and overall:
- RMSE of predictions clipped to the rating range (models that predict ratings);
- for events rated >= ``relevant_at``: HR@k, NDCG@k and the percentile rank of the true item
  among ALL catalogue items the user has not interacted with before the event (the true item
  itself always competes). The model scores the whole micro-batch as it stood before it, but
  the candidates are each event's own: items the user interacted with earlier in the same
  micro-batch are excluded too, as a service's seen-filter would (``exclude="event"``, the
  default; ``"batch"`` excludes only what came before the micro-batch, so those items stay
  candidates and compete with the true item). Rank = number of eligible items ahead of it:
  scored higher, or scored the same and earlier in the catalogue (``recommend``'s tie rule);
  percentile = rank / (eligible - 1), 0 is the top;
- the same split by cold users (no event the model saw before their micro-batch) and warm
  users, and for new items (absent from the warm-up).

The protocol (``run_protocol``): events in time order; the first half is the warm-up, less a
random ``retain_fraction`` of it kept aside as the retention set (never trained on, but
counted as interactions); the rest is the stream, in micro-batches. Retention RMSE and HR@k are
measured right after the warm-up and after the stream. Every model sees the same events; any
tuning (the recent-popularity window) uses the warm-up only.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .data.types import Interactions
from .service import Recommender

GROUPS = ("all", "cold users", "warm users", "new items")
EXCLUDE_SCOPES = ("event", "batch")


def _check_exclude(exclude: str) -> None:
    if exclude not in EXCLUDE_SCOPES:
        raise ValueError(f"exclude must be one of {EXCLUDE_SCOPES}, not {exclude!r}")


class StreamModel(Protocol):
    """What the evaluation needs of a model (see ``lrec_fast.baselines``)."""

    name: str
    rates: bool  # predicts ratings (RMSE applies)
    update_s: float  # time spent learning so far

    @property
    def item_ids(self) -> list[Any]: ...  # the catalogue, in the column order of score_all

    def predict(self, users: Sequence[Any], items: Sequence[Any]) -> np.ndarray: ...

    def score_all(self, users: Sequence[Any]) -> np.ndarray: ...

    def learn(self, users: Sequence[Any], items: Sequence[Any], ratings: np.ndarray) -> None: ...


@dataclass
class Totals:
    """Running sums for one stream segment and one group of events."""

    sq_err: float = 0.0
    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    prank: float = 0.0
    n_rel: int = 0

    def add(self, other: Totals) -> None:
        for f in ("sq_err", "n", "hits", "ndcg", "prank", "n_rel"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def metrics(self, k: int, rates: bool = True) -> dict[str, float]:
        nan = float("nan")
        return {
            "rmse": math.sqrt(self.sq_err / self.n) if self.n and rates else nan,
            f"hr@{k}": self.hits / self.n_rel if self.n_rel else nan,
            f"ndcg@{k}": self.ndcg / self.n_rel if self.n_rel else nan,
            "percentile": self.prank / self.n_rel if self.n_rel else nan,
            "events": self.n,
            "relevant": self.n_rel,
        }


@dataclass
class StreamResult:
    name: str
    k: int
    segments: list[dict[str, float]] = field(default_factory=list)
    overall: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)


def rank_events(
    scores: np.ndarray, banned: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For events (row a, true column c): the position of c in row a's ranking of the columns
    not banned (c always competes), and the number of such eligible columns. Ties go to the
    earlier column, as in ``recommend``: a model that scores many items alike (a popularity
    count) gets no credit for the tie. A NaN score ranks below every number (a diverged model
    must not score hits because NaN compares false)."""
    sc = np.nan_to_num(scores[rows], nan=-np.inf)
    ok = ~banned[rows]
    ev = np.arange(len(rows))
    ok[ev, cols] = True
    target = sc[ev, cols][:, None]
    ahead = (sc > target) | ((sc == target) & (np.arange(sc.shape[1])[None, :] < cols[:, None]))
    ahead |= np.isnan(scores[rows][ev, cols])[:, None]  # a NaN true item ranks last
    ahead[ev, cols] = False
    return np.count_nonzero(ahead & ok, axis=1), np.count_nonzero(ok, axis=1)


def prequential(
    model: StreamModel | Recommender,
    stream: Interactions,
    history: dict[Any, set[Any]],
    *,
    learn: bool = True,
    batch_size: int = 100,
    segment: int = 2_500,
    k: int = 10,
    relevant_at: float = 4.0,
    name: str = "model",
    known_users: set[Any] | None = None,
    warm_items: set[Any] | None = None,
    rating_range: tuple[float, float] = (1.0, 5.0),
    on_batch: Callable[[int], None] | None = None,
    exclude: str = "event",
) -> StreamResult:
    """Run test-then-train over ``stream`` (time order); per-segment and per-group metrics.

    history: user id -> item ids the user interacted with before the stream (updated in place
    as the stream goes). known_users: users whose events the model has learned from (default:
    the users in ``history``); warm_items: items of the warm-up (default: all in ``history``).
    A ``Recommender`` is wrapped (``learn`` says whether it takes feedback). ``exclude``:
    "event" or "batch", which interactions leave the candidates (module doc).
    """
    _check_exclude(exclude)
    from .baselines import RecommenderModel

    sm: StreamModel
    if isinstance(model, Recommender):
        rating_range = model.rating_range
        sm = RecommenderModel(model, learn, name)
    else:
        sm = model
    known = set(history) if known_users is None else set(known_users)
    warm_items = set().union(*history.values()) if warm_items is None else warm_items
    col = {j: c for c, j in enumerate(sm.item_ids)}
    lo, hi = rating_range
    res = StreamResult(name=sm.name, k=k)
    total = {g: Totals() for g in GROUPS}
    seg, seg_start, update0 = Totals(), 0, sm.update_s
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    for s in range(0, len(stream), batch_size):
        b = stream.take(slice(s, s + batch_size))
        users, items = b.user.tolist(), b.item.tolist()
        groups = {
            "cold users": np.array([u not in known for u in users]),
            "new items": np.array([j not in warm_items for j in items]),
        }
        groups["warm users"] = ~groups["cold users"]
        parts = {g: Totals() for g in GROUPS}
        sq = np.zeros(len(users))
        if sm.rates:
            sq = (np.clip(sm.predict(users, items), lo, hi) - b.rating) ** 2
        hit = np.zeros(len(users))
        gain = np.zeros(len(users))
        prank = np.zeros(len(users))
        rel = b.rating >= relevant_at
        if rel.any():
            ru = list(dict.fromkeys(users[e] for e in np.nonzero(rel)[0]))
            row = {u: a for a, u in enumerate(ru)}
            scores = np.asarray(sm.score_all(ru), dtype=np.float32)
            banned = np.zeros(scores.shape, dtype=bool)
            for u, a in row.items():
                banned[a, [col[j] for j in history.get(u, ()) if j in col]] = True
            ev = np.nonzero(rel)[0]
            rows = np.array([row[users[e]] for e in ev])
            cols = np.array([col[items[e]] for e in ev])
            if exclude == "event":  # one row per event: its user's row + the batch so far
                scores, banned = scores[rows], banned[rows]
                earlier: dict[Any, list[int]] = {}
                r_ev = 0
                for e, (u, j) in enumerate(zip(users, items, strict=True)):
                    if rel[e]:
                        banned[r_ev, earlier.get(u, [])] = True
                        r_ev += 1
                    if j in col:
                        earlier.setdefault(u, []).append(col[j])
                rows = np.arange(len(ev))
            ranks, eligible = rank_events(scores, banned, rows, cols)
            hit[ev] = ranks < k
            gain[ev] = np.where(ranks < k, discounts[np.minimum(ranks, k - 1)], 0.0)
            prank[ev] = ranks / np.maximum(eligible - 1, 1)
        for g in GROUPS:
            m = groups.get(g, np.ones(len(users), dtype=bool))
            t = parts[g]
            t.sq_err, t.n = float(sq[m].sum()), int(m.sum())
            t.hits, t.ndcg = float(hit[m].sum()), float(gain[m].sum())
            t.prank = float(prank[m].sum())
            t.n_rel = int((rel & m).sum())
            total[g].add(t)
        seg.add(parts["all"])
        if learn:
            sm.learn(users, items, b.rating)
        known.update(users)
        for u, j in zip(users, items, strict=True):
            history.setdefault(u, set()).add(j)
        if on_batch is not None:
            on_batch(len(users))
        if seg.n >= segment or s + batch_size >= len(stream):
            seg_m = seg.metrics(k, sm.rates)
            seg_m["start"] = seg_start
            res.segments.append(seg_m)
            seg_start += seg.n
            seg = Totals()
    res.groups = {g: total[g].metrics(k, sm.rates) for g in GROUPS}
    res.overall = dict(res.groups["all"])
    n_batches = max(1, -(-len(stream) // batch_size))
    res.overall["update_s"] = sm.update_s - update0
    res.overall["update_ms_per_batch"] = 1e3 * res.overall["update_s"] / n_batches
    res.overall["rejected_batches"] = getattr(model, "rejected", 0)
    return res


def retention(
    model: StreamModel, events: Interactions, history: dict[Any, set[Any]], *, k: int = 10,
    relevant_at: float = 4.0, rating_range: tuple[float, float] = (1.0, 5.0),
) -> dict[str, float]:  # fmt: skip
    """RMSE and HR@k on held-out events (nothing learned): each relevant event's item ranked
    among the items not in ``history`` of its user (it always competes; the held-out events
    do not exclude each other)."""
    res = prequential(model, events, {u: set(v) for u, v in history.items()}, learn=False,
                      batch_size=max(len(events), 1), segment=max(len(events), 1), k=k,
                      relevant_at=relevant_at, rating_range=rating_range,
                      exclude="batch")  # fmt: skip
    return {key: res.overall[key] for key in ("rmse", f"hr@{k}", f"ndcg@{k}", "events")}


def history_of(events: Interactions) -> dict[Any, set[Any]]:
    """user id -> set of item ids, from an event log."""
    h: dict[Any, set[Any]] = defaultdict(set)
    for u, j in zip(events.user.tolist(), events.item.tolist(), strict=True):
        h[u].add(j)
    return dict(h)


@dataclass
class Split:
    """The protocol's split of a time-ordered event log."""

    train: Interactions  # warm-up events the models learn from
    retain: Interactions  # warm-up events kept aside (never trained on)
    stream: Interactions  # the second half, in time order

    @property
    def warm(self) -> Interactions:
        return Interactions.concat([self.train, self.retain])


def split_events(events: Interactions, warm_fraction: float = 0.5, retain_fraction: float = 0.1,
                 seed: int = 0) -> Split:  # fmt: skip
    """First ``warm_fraction`` of the events = warm-up, a random ``retain_fraction`` of it kept
    aside (time order kept within each part); the rest is the stream."""
    n_warm = int(len(events) * warm_fraction)
    rng = np.random.default_rng(seed)
    keep = np.zeros(n_warm, dtype=bool)
    keep[rng.choice(n_warm, size=int(n_warm * retain_fraction), replace=False)] = True
    warm = events.take(slice(0, n_warm))
    return Split(warm.take(~keep), warm.take(keep), events.take(slice(n_warm, None)))


WINDOWS = (50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000)


def tune_window(train: Interactions, item_ids: Sequence[Any], batch_size: int, k: int = 10,
                grid: Sequence[int] = WINDOWS, exclude: str = "event") -> int:  # fmt: skip
    """The recent-popularity window with the best HR@k, prequentially on the last 20% of the
    warm-up's training events after the first 80% (the warm-up only, never the stream)."""
    from .baselines import Popularity

    cut = int(len(train) * 0.8)
    head, tail = train.take(slice(0, cut)), train.take(slice(cut, None))
    scored = []
    for w in grid:
        pop = Popularity(item_ids, window=w)
        pop.fit(head)
        r = prequential(pop, tail, history_of(head), batch_size=batch_size, segment=len(tail), k=k,
                        exclude=exclude)  # fmt: skip
        scored.append((r.overall[f"hr@{k}"], -w))  # ties: the smaller window
    return -max(scored)[1]


@dataclass
class ProtocolResult:
    """Everything one protocol run measured (see ``run_protocol``)."""

    config: dict[str, Any]
    streams: dict[str, StreamResult]
    retention_before: dict[str, dict[str, float]]
    retention_after: dict[str, dict[str, float]]
    seconds: dict[str, float]


def run_protocol(
    events: Interactions,
    item_ids: Sequence[Any],
    texts: Sequence[str],
    *,
    batch_size: int = 100,
    segment: int = 2_500,
    retrain_every: int = 2_500,
    retain_fraction: float = 0.1,
    k: int = 10,
    seed: int = 0,
    encoder: Any = None,
    models: Sequence[str] | None = None,
    on_batch: Callable[[str, int], None] | None = None,
    exclude: str = "event",
) -> ProtocolResult:
    """The lifelong-learning protocol (module doc) over time-ordered ``events`` with every
    baseline in one run. ``models``: a subset of ``MODELS`` (default all). ``encoder``: the
    text encoder every Recommender shares (default all-MiniLM-L6-v2, cached on disk).

    The rating-MF baselines are what a user would run without lrec_fast's learner: static,
    naive fine-tuning (plain SGD per micro-batch, no weight decay) and retraining from scratch,
    all ranking by predicted rating, none with the ranking head, the recency prior or replay
    (``RATING_MF``); "lrec_fast" is ``Recommender()`` with its defaults. ``exclude``: which
    interactions leave the candidates ("event" or "batch", see ``prequential``)."""
    from .baselines import Popularity, RecommenderModel, Retrain

    wanted = list(MODELS if models is None else models)
    _check_exclude(exclude)
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    sp = split_events(events, retain_fraction=retain_fraction, seed=seed)
    t_all = time.perf_counter()
    shared = None

    def make(**kw: Any) -> Recommender:
        nonlocal shared
        rec = Recommender(encoder=shared if shared is not None else encoder, **kw)
        rec.add_items(list(item_ids), list(texts))
        shared = rec.encoder  # one encoder (and its cache) for every model
        return rec

    def fitted(**kw: Any) -> Recommender:
        rec = make(**kw)
        rec.fit(sp.train.user, sp.train.item, sp.train.rating)
        return rec

    seconds: dict[str, float] = {}
    built: dict[str, Any] = {}
    for name in wanted:
        t = time.perf_counter()
        if name == "popularity":
            built[name] = Popularity(item_ids, name=name)
            built[name].fit(sp.train)
        elif name == "recent popularity":
            w = tune_window(sp.train, item_ids, batch_size, k, exclude=exclude)
            built[name] = Popularity(item_ids, window=w, name=f"{name} ({w:,})")
            built[name].fit(sp.train)
        elif name == "static":
            built[name] = RecommenderModel(fitted(**RATING_MF), learn=False,
                                           name=name)  # fmt: skip
        elif name == "naive fine-tune":
            plain = fitted(**RATING_MF | {"weight_decay": 0.0})
            built[name] = RecommenderModel(plain, learn=True, name=name)
        elif name == "retrain":
            label = f"retrain every {retrain_every:,}"
            built[name] = Retrain(lambda: make(**RATING_MF), sp.train,
                                  retrain_every,
                                  name=label)  # fmt: skip
        else:  # "lrec_fast": the Recommender's defaults, learning from every micro-batch
            built[name] = RecommenderModel(fitted(), learn=True, name=name)
        seconds[f"setup {name}"] = time.perf_counter() - t
    hist_train = history_of(sp.train)
    before = {n: retention(m, sp.retain, hist_train, k=k) for n, m in built.items()}
    warm_hist = history_of(sp.warm)
    warm_items = set(sp.warm.item.tolist())
    streams = {}
    for name, m in built.items():
        t = time.perf_counter()
        cb = (lambda n, name=name: on_batch(name, n)) if on_batch else None
        streams[name] = prequential(
            m, sp.stream, {u: set(v) for u, v in warm_hist.items()}, batch_size=batch_size,
            segment=segment, k=k, known_users=set(hist_train), warm_items=warm_items,
            on_batch=cb, exclude=exclude,
        )  # fmt: skip
        seconds[f"stream {name}"] = time.perf_counter() - t
    after = {n: retention(m, sp.retain, hist_train, k=k) for n, m in built.items()}
    seconds["total"] = time.perf_counter() - t_all
    config = {"events": len(events), "train": len(sp.train), "retain": len(sp.retain),
              "stream": len(sp.stream), "batch_size": batch_size, "segment": segment,
              "retrain_every": retrain_every, "k": k, "seed": seed, "exclude": exclude,
              "names": {n: m.name for n, m in built.items()}}  # fmt: skip
    return ProtocolResult(config, streams, before, after, seconds)


# the plain rating-MF recommender of the baselines: no ranking head, prior, replay,
# consolidation, refit, user gain (plain SGD at one rate), neighbourhood corrections or
# residual offsets
RATING_MF: dict[str, Any] = {"rank_by": "rating", "prior_weight": 0.0, "cold_prior_weight": 0.0,
                             "replay_ratio": 0.0, "consolidate_every": 0, "refit_every": 0,
                             "user_gain": 1.0, "knn_weight": 0.0, "uknn_weight": 0.0,
                             "offset_count_weight": 0.0, "offset_item_weight": 0.0}  # fmt: skip
MODELS = ("popularity", "recent popularity", "static", "naive fine-tune", "retrain", "lrec_fast")
