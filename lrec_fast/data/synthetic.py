"""Synthetic catalogues and event streams for tests and scale benchmarks.

Items belong to latent topics that also name them in their text, so the text carries signal
(the cold-start path can learn from it). Users drift over time and items keep arriving after the
stream has started.
"""

from __future__ import annotations

import numpy as np

from .types import Interactions, RatingsDataset

TOPIC_WORDS = (
    "space", "romance", "crime", "war", "comedy", "horror", "western", "music", "family",
    "mystery", "history", "sport", "fantasy", "documentary", "animation", "thriller",
)  # fmt: skip
_SYLLABLES = ("ka", "lo", "mi", "ra", "te", "zu", "no", "vi", "sha", "por", "den", "gal")


def make_catalogue(
    n_items: int, n_topics: int = 8, seed: int = 0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Item ids 0..n_items-1, texts "name | topic, topic", topic weights [n_items, n_topics]."""
    if not 1 <= n_topics <= len(TOPIC_WORDS):
        raise ValueError(f"n_topics must be in 1..{len(TOPIC_WORDS)}")
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_topics, 0.3), size=n_items).astype(np.float32)
    texts = []
    for j in range(n_items):
        name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 5))).capitalize()
        top = np.argsort(-weights[j])[:2]
        topics = [TOPIC_WORDS[t] for t in top if weights[j, t] > 0.2] or [TOPIC_WORDS[top[0]]]
        texts.append(f"{name} {j} | {', '.join(topics)}")
    return np.arange(n_items, dtype=np.int64), texts, weights


def make_stream(
    n_users: int = 200,
    n_items: int = 300,
    n_events: int = 5_000,
    dim: int = 8,
    n_topics: int = 8,
    drift: float = 0.5,
    late_item_fraction: float = 0.2,
    noise: float = 0.3,
    seed: int = 0,
) -> RatingsDataset:
    """A time-ordered stream of ratings in 1..5.

    drift: how far (in units of the taste norm) each user's taste moves over the stream.
    late_item_fraction: share of items that first appear in the second half of the stream;
    no event touches an item before its arrival time (``extra["item_arrival"]``, seconds).
    """
    if min(n_users, n_items, n_events, dim) < 1:
        raise ValueError("n_users, n_items, n_events and dim must be positive")
    rng = np.random.default_rng(seed)
    item_ids, texts, topics = make_catalogue(n_items, n_topics, seed)
    topic_vecs = rng.normal(0, 1 / np.sqrt(dim), size=(n_topics, dim))
    item_vec = topics @ topic_vecs * 2.0 + rng.normal(0, 0.1, size=(n_items, dim))
    item_bias = rng.normal(0, 0.3, size=n_items)
    user_vec = rng.normal(0, 1, size=(n_users, dim))
    user_dir = rng.normal(0, 1, size=(n_users, dim))
    user_bias = rng.normal(0, 0.3, size=n_users)

    horizon = 1_000_000
    ts = np.sort(rng.integers(0, horizon, size=n_events))
    arrival = np.zeros(n_items, dtype=np.int64)
    n_late = round(late_item_fraction * n_items)
    late = rng.choice(n_items, size=n_late, replace=False)
    arrival[late] = rng.integers(horizon // 2, horizon, size=n_late)
    by_arrival = np.argsort(arrival, kind="stable")
    popularity = rng.pareto(1.5, size=n_items) + 1.0
    cum = np.cumsum(popularity[by_arrival])
    n_arrived = np.searchsorted(arrival[by_arrival], ts, side="right")
    pick = np.searchsorted(cum, rng.random(n_events) * cum[n_arrived - 1], side="right")
    item = by_arrival[np.minimum(pick, n_arrived - 1)]

    activity = rng.pareto(1.2, size=n_users) + 1.0
    user = rng.choice(n_users, size=n_events, p=activity / activity.sum())
    frac = (ts / horizon)[:, None]
    taste = user_vec[user] + drift * frac * user_dir[user]
    raw = 3.5 + user_bias[user] + item_bias[item] + np.sum(taste * item_vec[item], axis=1)
    rating = np.clip(np.rint(raw + rng.normal(0, noise, n_events)), 1, 5).astype(np.float32)
    events = Interactions(user.astype(np.int64), item_ids[item], rating, ts.astype(np.int64))
    return RatingsDataset(
        name=f"synthetic-{n_users}x{n_items}",
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=item_ids,
        item_text=texts,
        events=events,
        extra={"item_arrival": arrival},
    )
