"""The model state: latent tables with lazy-decay scales, biases, global mean, text projection,
id maps; and its checkpoint format (safetensors + JSON, written atomically, never pickled).

Score of user i for item j (DESIGN.md):  y_hat = mu + b_u[i] + b_v[j] + <U[i], V[j]>,
where each of U, V, b_u, b_v is stored as ``scale * raw`` (``scales``, float64 [4]).
The ranking head (``ranking.py``) has its own item tables (context rows C, target rows T and
biases t_b, with row-wise Adagrad accumulators) and each user's last ``history_len`` items.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import fsync_dir
from .kernels.reference import SCALE_ITEM, SCALE_ITEM_BIAS, SCALE_USER, SCALE_USER_BIAS
from .offsets import N_CLASSES
from .raters import Raters, known_csr

FORMAT_VERSION = 2  # 2: the ranking head (ranking.py)
TENSORS_FILE, STATE_FILE = "model.safetensors", "state.json"

Id = int | str
# For work on a state that no answer reads meanwhile (a fork, a model held alone): the lock
# argument of the functions that publish under the model lock (Recommender.feedback).
NO_LOCK = nullcontext()


class Rows:
    """A row table that grows in amortised O(1) (capacity doubling); ``.t`` is the live view."""

    def __init__(self, width: int | None, dtype: torch.dtype = torch.float32) -> None:
        shape = (16, width) if width is not None else (16,)
        self._buf = torch.zeros(shape, dtype=dtype)
        self.n = 0

    @property
    def n(self) -> int:
        return self._n

    @n.setter
    def n(self, n: int) -> None:  # the view is kept: slicing per read cost 2 us, 12x a recommend
        self._n = n
        self._view = self._buf[:n]

    @property
    def t(self) -> torch.Tensor:
        return self._view

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            cap = max(need, 2 * self._buf.shape[0])
            buf = torch.zeros((cap, *self._buf.shape[1:]), dtype=self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : need] = rows.to(self._buf.dtype)
        self.n = need

    def set(self, rows: torch.Tensor) -> None:
        self.n = 0
        self.append(rows)


class IdMap:
    """The caller's ids (int or str) <-> dense row indices, in order of arrival."""

    def __init__(self, ids: Iterable[Id] = ()) -> None:
        self.ids: list[Id] = []
        self.index: dict[Id, int] = {}
        self._array: np.ndarray | None = None
        for i in ids:
            self.add(i)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.index

    def array(self) -> np.ndarray:
        """The ids as a numpy array (int64 when all ids are ints, else object), cached."""
        if self._array is None or len(self._array) != len(self.ids):
            if all(isinstance(i, int) for i in self.ids):
                self._array = np.asarray(self.ids, dtype=np.int64)
            else:
                self._array = np.asarray(self.ids, dtype=object)
        return self._array

    def add(self, key: Id) -> int:
        if key in self.index:
            return self.index[key]
        self._array = None
        self.index[key] = len(self.ids)
        self.ids.append(key)
        return self.index[key]


def proj_slices(dim: int) -> dict[str, slice]:
    """The layout of the text projection's outputs for latent size ``dim``: rating rows and
    bias, ranking target rows and bias, ranking context rows."""
    d = dim
    return {"item_rows": slice(0, d), "item_bias": slice(d, d + 1),
            "tgt_rows": slice(d + 1, 2 * d + 1), "tgt_bias": slice(2 * d + 1, 2 * d + 2),
            "ctx_rows": slice(2 * d + 2, 3 * d + 2)}  # fmt: skip


def rows_csr(rows: Sequence[np.ndarray], dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Per-row arrays as CSR: (indptr int64 [len(rows) + 1], the rows concatenated, ``dtype``)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in rows], out=indptr[1:])
    flat = np.concatenate(rows).astype(dtype, copy=False) if len(rows) else np.zeros(0, dtype)
    return indptr, flat


class SeenItems:
    """The item rows each user row interacted with, the latest rating of each, and how recent
    it is: a dict per user, ordered oldest to latest rating (membership, growth, recency) and
    sorted arrays per user (item rows int64, ratings float32, ages int64: 0 for the latest
    rating, 1 for the one before, ...), built on first use and dropped when that user's dict
    changes. ``recommend`` excludes the item arrays: concatenating them for 64 users takes
    about 1/20 of the time of iterating the same Python sets (0.29 ms at ~100 items per user);
    the neighbourhood correction reads all three. A rating is NaN where it is unknown
    (checkpoints from before ratings were kept)."""

    def __init__(self, rated: Iterable[dict[int, float]] = (), complete: bool = True) -> None:
        self._rated: list[dict[int, float]] = list(rated)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.complete = complete  # no rating is unknown (NaN)
        self._raters: Raters | None = None  # the transposed index, built on first use

    @classmethod
    def from_csr(cls, indptr: Sequence[int], indices: Sequence[int],
                 ratings: Sequence[float] | None = None,
                 ages: Sequence[int] | None = None) -> SeenItems:  # fmt: skip
        """From ``csr``'s arrays; without ``ages`` (checkpoints from before they were kept) a
        user's ratings take the order of ``indices``."""
        r = [math.nan] * len(indices) if ratings is None else ratings
        rated = []
        for i in range(len(indptr) - 1):
            lo, hi = indptr[i], indptr[i + 1]
            pairs = list(zip(indices[lo:hi], r[lo:hi], strict=True))
            if ages is not None:  # oldest first: the largest age
                if sorted(ages[lo:hi]) != list(range(hi - lo)):
                    raise ValueError(
                        f"user row {i}: the ages of its ratings are not 0..{hi - lo - 1}"
                    )
                by_time = list(pairs)
                for pair, a in zip(pairs, ages[lo:hi], strict=True):
                    by_time[hi - lo - 1 - a] = pair
                pairs = by_time
            rated.append(dict(pairs))
        return cls(rated, complete=all(math.isfinite(x) for x in r))

    def __len__(self) -> int:
        return len(self._rated)

    def __getitem__(self, user: int) -> AbstractSet[int]:
        """User row ``user``'s items (read only: grow it with ``add``)."""
        return self._rated[user].keys()

    def append_users(self, n: int) -> None:
        self._rated.extend({} for _ in range(n))

    def add(self, users: Iterable[int], items: Iterable[int], ratings: Iterable[float]) -> None:
        """Record events (user row, item row, rating), in order: the latest rating counts and
        becomes the user's most recent."""
        users, items, ratings = list(users), list(items), list(ratings)  # (read twice)
        for a, b, r in zip(users, items, ratings, strict=True):
            d = self._rated[a]
            if d and next(reversed(d)) == b and d[b] == r:
                continue  # already the latest, unchanged
            d.pop(b, None)
            d[b] = r
            self._arrays.pop(a, None)
        if self._raters is not None:
            self._raters.add(users, items, ratings)

    def truncate(self, n: int) -> None:
        """Drop user rows n and above."""
        del self._rated[n:]
        for a in [a for a in self._arrays if a >= n]:
            del self._arrays[a]
        if self._raters is not None:
            self._raters.truncate_users(n)

    def _sorted(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arr = self._arrays.get(user)
        if arr is None:
            d = self._rated[user]
            by_time = np.fromiter(d.keys(), np.int64, len(d))
            order = np.argsort(by_time, kind="stable")
            ratings = np.fromiter(d.values(), np.float32, len(d))[order]
            arr = self._arrays[user] = (by_time[order], ratings, len(d) - 1 - order)
        return arr

    def sorted(self, user: int) -> np.ndarray:
        """User row ``user``'s items, sorted int64 [m] (cached; do not modify)."""
        return self._sorted(user)[0]

    def history(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """User row ``user``'s rated items (sorted int64), their latest ratings (float32) and
        the ratings' ages (int64, 0: the latest), in the same order; items whose rating is
        unknown are left out (do not modify)."""
        arr = self._sorted(user)
        if self.complete:
            return arr
        known = np.isfinite(arr[1])
        return arr[0][known], arr[1][known], arr[2][known]

    def raters(self, n_items: int) -> Raters:
        """Who rated each item (the transposed index; known ratings only), with room for item
        rows up to ``n_items``: built on first use, then kept current by ``add``."""
        if self._raters is None:
            indptr, items, ratings, _ = self.csr()
            self._raters = Raters.from_csr(*known_csr(indptr, items, ratings), n_items)
        self._raters.grow(n_items)
        return self._raters

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every user's sorted items, their ratings and ages as (indptr int64 [n_users + 1],
        item rows int64, ratings float32, ages int64)."""
        rows = [self._sorted(a) for a in range(len(self._rated))]
        indptr, items = rows_csr([r[0] for r in rows])
        return (indptr, items, rows_csr([r[1] for r in rows], np.float32)[1],
                rows_csr([r[2] for r in rows])[1])  # fmt: skip


@dataclass
class ModelState:
    """All learned numbers of a Recommender. Row i of the user tables is user ``users.ids[i]``."""

    dim: int
    text_dim: int
    history_len: int = 40
    users: IdMap = field(default_factory=IdMap)
    items: IdMap = field(default_factory=IdMap)
    user_rows: Rows = field(init=False)
    item_rows: Rows = field(init=False)
    user_bias: Rows = field(init=False)
    item_bias: Rows = field(init=False)
    item_text: Rows = field(init=False)  # unit-norm text embeddings, float32 [n_items, text_dim]
    # Per-item number of events learned from, each counted once (the projection is fitted on
    # items with enough of them).
    item_count: Rows = field(init=False)
    # Recency prior: per-item event counts decayed by 2^(-age / halflife) (age in events),
    # stored lazily as recent_scale * item_recent (float64), like the decayed tables.
    item_recent: Rows = field(init=False)
    recent_scale: torch.Tensor = field(default_factory=lambda: torch.ones(1, dtype=torch.float64))
    # Replay reservoir: a uniform sample of the events learned from so far (row indices and
    # ratings), replay_seen = how many events were offered to it (online.reservoir_add).
    replay_users: Rows = field(init=False)
    replay_items: Rows = field(init=False)
    replay_ratings: Rows = field(init=False)
    replay_hist: Rows = field(init=False)  # the ranking history each replayed event saw
    replay_seen: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    scales: torch.Tensor = field(default_factory=lambda: torch.ones(4, dtype=torch.float64))
    mu: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    # Ranking head: context rows C, target rows T, target bias t_b (float32, true values, no
    # decay), their row-wise Adagrad sums; user_recent = each user's last history_len item
    # rows, newest first, -1 = empty (int64 [n_users, history_len]).
    ctx_rows: Rows = field(init=False)
    tgt_rows: Rows = field(init=False)
    tgt_bias: Rows = field(init=False)
    ctx_acc: Rows = field(init=False)
    tgt_acc: Rows = field(init=False)
    tgt_bias_acc: Rows = field(init=False)
    user_recent: Rows = field(init=False)
    # Text projection: [V row | b_v | T row | t_b | C row] ~= proj @ e_j,
    # float32 [3 dim + 2, text_dim] (the layout: ``proj_slices``).
    proj: torch.Tensor = field(init=False)
    proj_fitted: bool = False
    seen: SeenItems = field(default_factory=SeenItems)  # item rows each user interacted with
    # Consolidation window: the newest events learned from (time order; trimmed to the
    # configured size in amortised O(1) per event, see ``remember``), and how many events were
    # learned from since the last consolidation, so a reloaded model keeps its cadence.
    window_users: Rows = field(init=False)
    window_items: Rows = field(init=False)
    window_ratings: Rows = field(init=False)
    window_hist: Rows = field(init=False)
    since_consolidation: torch.Tensor = field(
        default_factory=lambda: torch.zeros(1, dtype=torch.int64)
    )
    # Event log for the refit (consolidation.refit): the newest events learned from (user
    # rows, item rows, ratings; time order, trimmed like the window), and how many events were
    # learned from since the last refit. Append-only between trims, so snapshots leave it out
    # (nothing that can roll back appends to it).
    log_users: Rows = field(init=False)
    log_items: Rows = field(init=False)
    log_ratings: Rows = field(init=False)
    since_refit: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    # Events trimmed off the log's front so far: log row k holds absolute event log_dropped + k.
    log_dropped: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    # The running refit (consolidation.refit_start / refit_advance), spread over feedback
    # calls: [key of its shuffles, absolute log position of its first event, events it covers,
    # events stepped so far, events to step (covered x passes)]; running while stepped < total.
    # refit_stats: [sum of squared errors before, after, events] of its slices so far.
    refit_job: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.int64))
    refit_stats: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    refit_seconds: float = field(default=0.0, compare=False)  # its time (not checkpointed)
    refit_order: Any = field(default=None, repr=False, compare=False)  # (key, pass, n, order)
    # Neighbourhood correction (neighbours.py), as of its last recompute: each item's most
    # similar items (rows int64 [n, size], -1 pad; sims float32), the baseline's item biases
    # (float32 [n]) and mean (float64 [1]); n = the catalogue then (later items: none, bias 0).
    knn_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))
    knn_sims: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    knn_bias: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    knn_mu: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    # 1: a refit ended inside feedback and both neighbourhoods' recompute waits for the next
    # feedback call (not the same call as that period's consolidation); 0: none pending.
    knn_pending: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    # Residual offsets (offsets.py): per user count class and per item row, the sum of the
    # stream's prequential residuals and their count (float64 [N_CLASSES, 2], [n_items, 2]).
    offset_class: torch.Tensor = field(
        default_factory=lambda: torch.zeros(N_CLASSES, 2, dtype=torch.float64)
    )
    offset_item: Rows = field(init=False)
    # User-neighbourhood correction (user_neighbours.py): each user row's most similar users
    # (int64 [n, size], -1 pad; sims float32; n <= n_users: rows past it have none yet), and
    # the baseline's item terms and the users' mean residuals (float64 [n_items], [n_users];
    # derived: rebuilt after a load, rollback or recompute).
    uknn_rows: Rows = field(init=False)
    uknn_sims: Rows = field(init=False)
    uknn_counts: Rows = field(init=False)  # each user's rating count when their list was made
    # The next user row whose list a sweep remakes (user_neighbours.sweep), -1: none running.
    uknn_sweep: torch.Tensor = field(default_factory=lambda: torch.full((1,), -1))
    uknn_bases: Any = field(default=None, repr=False, compare=False)
    # What this process has seen happen (Recommender.stats): not saved, not rolled back.
    counters: Counter[str] = field(default_factory=Counter, repr=False, compare=False)
    # Random source of the learner (row initialisation, sampled negatives, shuffles), saved
    # with the checkpoint so a reloaded model continues exactly as the original would.
    rng: torch.Generator = field(default_factory=torch.Generator, repr=False, compare=False)
    # The ranking head's negative-sampling proposal (ranking.Proposal), rebuilt when the
    # catalogue changes size or after PROPOSAL_REFRESH steps; saved with the rest, since a
    # reloaded model must draw from the same (slightly stale) proposal to continue exactly.
    rank_proposal: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.user_rows = Rows(self.dim)
        self.item_rows = Rows(self.dim)
        self.user_bias = Rows(None)
        self.item_bias = Rows(None)
        self.item_text = Rows(self.text_dim)
        self.item_count = Rows(None, torch.int64)
        self.item_recent = Rows(None, torch.float64)
        self.offset_item = Rows(2, torch.float64)
        self.uknn_rows, self.uknn_sims = Rows(0, torch.int64), Rows(0, torch.float32)
        self.uknn_counts = Rows(None, torch.int64)
        self.replay_users = Rows(None, torch.int64)
        self.replay_items = Rows(None, torch.int64)
        self.replay_ratings = Rows(None, torch.float32)
        self.replay_hist = Rows(self.history_len, torch.int64)
        for name in ("ctx_rows", "tgt_rows"):
            setattr(self, name, Rows(self.dim))
        for name in ("tgt_bias", "ctx_acc", "tgt_acc", "tgt_bias_acc"):
            setattr(self, name, Rows(None))
        self.user_recent = Rows(self.history_len, torch.int64)
        self.window_users = Rows(None, torch.int64)
        self.window_items = Rows(None, torch.int64)
        self.window_ratings = Rows(None, torch.float32)
        self.window_hist = Rows(self.history_len, torch.int64)
        self.log_users = Rows(None, torch.int64)
        self.log_items = Rows(None, torch.int64)
        self.log_ratings = Rows(None, torch.float32)
        self.proj = torch.zeros(3 * self.dim + 2, self.text_dim)

    def proj_slices(self) -> dict[str, slice]:
        """Which output rows of ``proj`` predict what (true values)."""
        return proj_slices(self.dim)

    # -- views of the true (decayed) values -------------------------------------------------
    def true_user_rows(self) -> torch.Tensor:
        return self.user_rows.t * float(self.scales[SCALE_USER])

    def true_item_rows(self) -> torch.Tensor:
        return self.item_rows.t * float(self.scales[SCALE_ITEM])

    def true_user_bias(self) -> torch.Tensor:
        return self.user_bias.t * float(self.scales[SCALE_USER_BIAS])

    def true_item_bias(self) -> torch.Tensor:
        return self.item_bias.t * float(self.scales[SCALE_ITEM_BIAS])

    def recent_counts(self) -> torch.Tensor:
        """Decayed event counts per item, float64 [n_items]."""
        return self.item_recent.t * float(self.recent_scale)

    def fold_scales(self, threshold: float) -> None:
        """Fold a scale back into its raw table once it falls below ``threshold`` (rare, O(Nd)),
        so raw values never grow without bound."""
        tables = {SCALE_USER: self.user_rows, SCALE_ITEM: self.item_rows,
                  SCALE_USER_BIAS: self.user_bias, SCALE_ITEM_BIAS: self.item_bias}  # fmt: skip
        for k, rows in tables.items():
            s = float(self.scales[k])
            if s < threshold:
                rows.t.mul_(s)
                self.scales[k] = 1.0

    def set_items(self, idx: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Overwrite items ``idx`` with TRUE values ``rows`` (keys of ``proj_slices``)."""
        self.item_rows.t[idx] = rows["item_rows"] / float(self.scales[SCALE_ITEM])
        self.item_bias.t[idx] = rows["item_bias"] / float(self.scales[SCALE_ITEM_BIAS])
        for name in ("tgt_rows", "tgt_bias", "ctx_rows"):
            getattr(self, name).t[idx] = rows[name]

    # -- growth --------------------------------------------------------------------------
    def add_users(self, ids: list[Id], rows: torch.Tensor, bias: torch.Tensor) -> None:
        """Append users with the given TRUE rows [n, dim] and biases [n]."""
        for i in ids:
            self.users.add(i)
        self.seen.append_users(len(ids))
        self.user_rows.append(rows / float(self.scales[SCALE_USER]))
        self.user_bias.append(bias / float(self.scales[SCALE_USER_BIAS]))
        self.user_recent.append(torch.full((len(ids), self.history_len), -1, dtype=torch.int64))

    def add_items(self, ids: list[Id], rows: dict[str, torch.Tensor],
                  text_emb: torch.Tensor) -> None:  # fmt: skip
        """Append items with their TRUE starting values ``rows`` (keys of ``proj_slices``:
        [n, dim] rows, [n] biases) and text embeddings [n, text_dim]."""
        for i in ids:
            self.items.add(i)
        n = len(ids)
        self.item_rows.append(rows["item_rows"] / float(self.scales[SCALE_ITEM]))
        self.item_bias.append(rows["item_bias"] / float(self.scales[SCALE_ITEM_BIAS]))
        for name in ("tgt_rows", "tgt_bias", "ctx_rows"):
            getattr(self, name).append(rows[name])
        for name in ("ctx_acc", "tgt_acc", "tgt_bias_acc"):
            getattr(self, name).append(torch.zeros(n))
        self.item_text.append(text_emb)
        self.item_count.append(torch.zeros(n, dtype=torch.int64))
        self.item_recent.append(torch.zeros(n, dtype=torch.float64))
        self.offset_item.append(torch.zeros(n, 2, dtype=torch.float64))

    # -- consolidation window ----------------------------------------------------------------
    WINDOW_TABLES = ("window_users", "window_items", "window_ratings", "window_hist")

    LOG_TABLES = ("log_users", "log_items", "log_ratings")

    def _keep_newest(self, names: tuple[str, ...], events: tuple[torch.Tensor, ...],
                     size: int) -> int:  # fmt: skip
        """Append ``events`` to the tables ``names``, keeping at least the newest ``size`` rows:
        the tables are cut back to ``size`` once they reach twice that (O(1) amortised).
        Returns how many rows were cut off the front."""
        tables = [getattr(self, name) for name in names]
        for table, t in zip(tables, events, strict=True):
            table.append(t)
        if tables[0].n > 2 * size:
            dropped = tables[0].n - size
            for table in tables:
                table.set(table.t[dropped:].clone())
            return dropped
        return 0

    def _newest(self, names: tuple[str, ...], size: int) -> tuple[torch.Tensor, ...]:
        start = max(getattr(self, names[0]).n - size, 0)
        return tuple(getattr(self, name).t[start:] for name in names)

    def remember(self, events: tuple[torch.Tensor, ...], size: int) -> None:
        """Append events (user rows, item rows, ratings, histories; time order) to the
        consolidation window, keeping at least the newest ``size``."""
        self._keep_newest(self.WINDOW_TABLES, events, size)

    def window(self, size: int) -> tuple[torch.Tensor, ...]:
        """The newest ``size`` events of the window (or all it holds): user rows, item rows,
        ratings, histories, time order."""
        return self._newest(self.WINDOW_TABLES, size)

    def log(self, events: tuple[torch.Tensor, ...], size: int) -> None:
        """Append events (user rows, item rows, ratings; time order) to the refit's event log,
        keeping at least the newest ``size``."""
        self.log_dropped += self._keep_newest(self.LOG_TABLES, events, size)

    def logged(self, size: int) -> tuple[torch.Tensor, ...]:
        """The newest ``size`` events of the log: user rows, item rows, ratings."""
        return self._newest(self.LOG_TABLES, size)

    # -- snapshots (rollback) --------------------------------------------------------------
    def tensors(self, seen: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor of the state (live rows only), for checkpoints and snapshots; without
        the seen items' CSR (``seen_*``) unless ``seen``."""
        p = self.rank_proposal
        extra = {} if p is None else {
            "proposal_cdf": p.cdf, "proposal_logq": p.logq,
            "proposal_steps": torch.tensor([p.steps], dtype=torch.int64),
        }  # fmt: skip
        if seen:
            indptr, flat, rated, ages = self.seen.csr()
            extra |= {
                "seen_indptr": torch.from_numpy(indptr), "seen_indices": torch.from_numpy(flat),
                "seen_ratings": torch.from_numpy(rated), "seen_ages": torch.from_numpy(ages),
            }  # fmt: skip
        return {
            "user_rows": self.user_rows.t, "item_rows": self.item_rows.t,
            "user_bias": self.user_bias.t, "item_bias": self.item_bias.t,
            "item_text": self.item_text.t, "item_count": self.item_count.t,
            "item_recent": self.item_recent.t, "recent_scale": self.recent_scale,
            "replay_users": self.replay_users.t, "replay_items": self.replay_items.t,
            "replay_ratings": self.replay_ratings.t, "replay_seen": self.replay_seen,
            "replay_hist": self.replay_hist.t, "ctx_rows": self.ctx_rows.t,
            "tgt_rows": self.tgt_rows.t, "tgt_bias": self.tgt_bias.t, "ctx_acc": self.ctx_acc.t,
            "tgt_acc": self.tgt_acc.t, "tgt_bias_acc": self.tgt_bias_acc.t,
            "user_recent": self.user_recent.t,
            "window_users": self.window_users.t, "window_items": self.window_items.t,
            "window_ratings": self.window_ratings.t, "window_hist": self.window_hist.t,
            "log_users": self.log_users.t, "log_items": self.log_items.t,
            "log_ratings": self.log_ratings.t, "since_refit": self.since_refit,
            "log_dropped": self.log_dropped, "refit_job": self.refit_job,
            "refit_stats": self.refit_stats,
            "since_consolidation": self.since_consolidation, "rng_state": self.rng.get_state(),
            "scales": self.scales, "mu": self.mu, "proj": self.proj,
            "knn_rows": self.knn_rows, "knn_sims": self.knn_sims, "knn_bias": self.knn_bias,
            "knn_mu": self.knn_mu, "knn_pending": self.knn_pending,
            "offset_class": self.offset_class,
            "offset_item": self.offset_item.t, "uknn_rows": self.uknn_rows.t,
            "uknn_sims": self.uknn_sims.t, "uknn_counts": self.uknn_counts.t,
            "uknn_sweep": self.uknn_sweep,
        } | extra  # fmt: skip

    ROW_TABLES = ("user_rows", "item_rows", "user_bias", "item_bias", "item_text", "item_count",
                  "item_recent", "replay_users", "replay_items", "replay_ratings", "replay_hist",
                  "ctx_rows", "tgt_rows", "tgt_bias", "ctx_acc", "tgt_acc", "tgt_bias_acc",
                  "user_recent")  # fmt: skip

    def load_tensors(self, t: dict[str, torch.Tensor], seed: int = 0,
                     seen: SeenItems | None = None) -> None:  # fmt: skip
        """Replace the state's tensors by ``t`` (a checkpoint's or a snapshot's). ``seed``
        seeds the random source when ``t`` has no saved state (older checkpoints); ``seen``:
        the seen items to take as they are instead of ``t``'s CSR."""
        missing = [k for k in (*self.ROW_TABLES, "recent_scale", "replay_seen") if k not in t]
        if missing:
            raise ValueError(f"checkpoint lacks tensors {missing[:4]}")
        if t["user_recent"].shape[1:] != (self.history_len,):
            raise ValueError(f"user histories of length {tuple(t['user_recent'].shape[1:])}, "
                             f"expected {self.history_len}")  # fmt: skip
        for name in self.ROW_TABLES:  # (Rows.set copies)
            getattr(self, name).set(t[name])
        # checkpoints before the window was saved start with an empty one
        for name in self.WINDOW_TABLES:
            if name in t:
                getattr(self, name).set(t[name])
            else:
                getattr(self, name).n = 0
        # snapshots leave the log out (it is kept as it is); checkpoints before it existed
        # start with an empty one (a fresh state's)
        for name in self.LOG_TABLES:
            if name in t:
                getattr(self, name).set(t[name])
        zero = torch.zeros(1, dtype=torch.int64)
        self.since_consolidation = t.get("since_consolidation", zero).clone()
        self.since_refit = t.get("since_refit", self.since_refit).clone()
        if "log_dropped" in t:  # snapshots leave it out, with the log
            self.log_dropped = t["log_dropped"].clone()
        # checkpoints before the refit was spread: none running
        self.refit_job = t.get("refit_job", torch.zeros(5, dtype=torch.int64)).clone()
        self.refit_stats = t.get("refit_stats", torch.zeros(3, dtype=torch.float64)).clone()
        if "rng_state" in t:
            self.rng.set_state(t["rng_state"].clone())
        else:
            self.rng.manual_seed(seed)
        self.rank_proposal = None
        if "proposal_cdf" in t:
            from .ranking import Proposal

            self.rank_proposal = Proposal(t["proposal_cdf"].clone(), t["proposal_logq"].clone(),
                                          int(t["proposal_steps"]))  # fmt: skip
        self.recent_scale = t["recent_scale"].clone()
        self.replay_seen = t["replay_seen"].clone()
        self.scales = t["scales"].clone().to(torch.float64)
        self.mu = t["mu"].clone().to(torch.float64)
        self.proj = t["proj"].clone()
        if seen is not None:  # (a snapshot that kept them by reference)
            self.seen = seen
        else:
            ptr, idx = t["seen_indptr"].tolist(), t["seen_indices"].tolist()
            rated = t["seen_ratings"].tolist() if "seen_ratings" in t else None
            ages = t["seen_ages"].tolist() if "seen_ages" in t else None  # older: none
            self.seen = SeenItems.from_csr(ptr, idx, rated, ages)
        # checkpoints before the neighbourhood correction: none computed
        self.knn_rows = t.get("knn_rows", torch.zeros(0, 0, dtype=torch.int64)).clone()
        self.knn_sims = t.get("knn_sims", torch.zeros(0, 0)).clone()
        self.knn_bias = t.get("knn_bias", torch.zeros(0)).clone()
        self.knn_mu = t.get("knn_mu", torch.zeros(1, dtype=torch.float64)).clone()
        self.knn_pending = t.get("knn_pending", torch.zeros(1, dtype=torch.int64)).clone()
        # checkpoints before the residual offsets: none learned yet
        self.offset_class = t.get(
            "offset_class", torch.zeros(N_CLASSES, 2, dtype=torch.float64)
        ).clone()
        n_items = self.item_rows.n
        self.offset_item.set(t.get("offset_item", torch.zeros(n_items, 2, dtype=torch.float64)))
        # checkpoints before the user-neighbourhood correction: no lists
        rows = t.get("uknn_rows", torch.zeros(0, 0, dtype=torch.int64))
        self.uknn_rows = Rows(rows.shape[1], torch.int64)
        self.uknn_sims = Rows(rows.shape[1], torch.float32)
        self.uknn_rows.set(rows)
        self.uknn_sims.set(t.get("uknn_sims", torch.zeros(0, 0)))
        # (checkpoints before the lazy refresh: 0, so each user's next call refreshes theirs)
        self.uknn_counts = Rows(None, torch.int64)
        self.uknn_counts.set(t.get("uknn_counts", torch.zeros(rows.shape[0], dtype=torch.int64)))
        self.uknn_sweep = t.get("uknn_sweep", torch.full((1,), -1)).clone()
        self.uknn_bases = None

    def snapshot(self, seen: bool = True) -> dict[str, Any]:
        """A deep copy to roll back to (tensors plus id maps). ``seen=False``, for work that
        never records ratings (consolidation, refits, the fit's epochs): the seen items are
        kept by reference, not copied (their CSR was most of a consolidation's snapshot, 31
        of 38 ms at 20,000 users)."""
        return {
            "tensors": {k: v.clone() for k, v in self.tensors(seen).items()
                        if k not in (*self.LOG_TABLES, "log_dropped")},
            "users": list(self.users.ids), "items": list(self.items.ids),
            "proj_fitted": self.proj_fitted, "seen": None if seen else self.seen,
        }  # fmt: skip

    def mark(self) -> tuple[int, int]:
        """Sizes to roll growth back to with ``truncate`` (O(1), unlike ``snapshot``)."""
        return len(self.users), len(self.items)

    def truncate(self, mark: tuple[int, int]) -> None:
        """Drop users and items appended since ``mark``."""
        nu, ni = mark
        for key in self.users.ids[nu:]:
            del self.users.index[key]
        for key in self.items.ids[ni:]:
            del self.items.index[key]
        del self.users.ids[nu:], self.items.ids[ni:]
        self.seen.truncate(nu)
        self.users._array = self.items._array = None
        self.user_rows.n = self.user_bias.n = self.user_recent.n = nu
        self.uknn_rows.n = self.uknn_sims.n = self.uknn_counts.n = min(self.uknn_rows.n, nu)
        if self.uknn_bases is not None:
            self.uknn_bases = (self.uknn_bases[0][:ni], self.uknn_bases[1][:nu])
        for name in ("item_rows", "item_bias", "item_text", "item_count", "item_recent",
                     "offset_item", "ctx_rows", "tgt_rows", "tgt_bias", "ctx_acc", "tgt_acc",
                     "tgt_bias_acc"):  # fmt: skip
            getattr(self, name).n = ni

    def restore(self, snap: dict[str, Any]) -> None:
        self.users, self.items = IdMap(snap["users"]), IdMap(snap["items"])
        self.load_tensors(snap["tensors"], seen=snap["seen"])
        self.proj_fitted = snap["proj_fitted"]

    def fork(self) -> ModelState:
        """A copy for long work that answers must not wait for (a consolidation, a whole refit,
        made while they read this state), published with ``adopt`` in O(1), or dropped to roll
        it back. Copied: all that a ``snapshot(seen=False)`` holds, the counters and the cached
        user-kNN bases; shared, since that work only reads them: the seen items and the event
        log. One copy of the tables (``restore`` of a snapshot makes two)."""
        twin = ModelState(self.dim, self.text_dim, self.history_len)
        twin.users, twin.items = IdMap(self.users.ids), IdMap(self.items.ids)
        shared = (*self.LOG_TABLES, "log_dropped")
        twin.load_tensors({k: v for k, v in self.tensors(seen=False).items() if k not in shared},
                          seen=self.seen)  # fmt: skip
        for name in shared:
            setattr(twin, name, getattr(self, name))
        twin.proj_fitted, twin.refit_seconds = self.proj_fitted, self.refit_seconds
        twin.refit_order, twin.counters = self.refit_order, Counter(self.counters)
        bases = self.uknn_bases
        twin.uknn_bases = None if bases is None else (bases[0].copy(), bases[1].copy())
        return twin

    def adopt(self, twin: ModelState) -> None:
        """Become ``twin`` (a ``fork`` of this state that work has changed): O(1), so the
        state's identity stays what callers hold."""
        self.__dict__.update(twin.__dict__)


def save_state(directory: str | Path, state: ModelState, config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` + ``state.json`` into ``directory`` atomically: everything
    goes to a temp folder beside it (files fsynced), which then replaces ``directory``."""
    from safetensors.torch import save_file

    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tensors = {k: v.contiguous() for k, v in state.tensors().items()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config,
            "dim": state.dim,
            "text_dim": state.text_dim,
            "history_len": state.history_len,
            "users": state.users.ids,
            "items": state.items.ids,
            "proj_fitted": state.proj_fitted,
        }
        (tmp / STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")
        for f in (TENSORS_FILE, STATE_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(directory: str | Path) -> tuple[ModelState, dict[str, Any]]:
    """Read a checkpoint written by ``save_state``; returns (state, config)."""
    from safetensors.torch import load_file

    folder = Path(directory)
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder} is not an lrec_fast checkpoint: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format {meta.get('format_version')} is not supported "
            f"(this lrec_fast reads {FORMAT_VERSION})"
        )
    state = ModelState(
        dim=int(meta["dim"]), text_dim=int(meta["text_dim"]), history_len=int(meta["history_len"])
    )
    seed = int(meta.get("config", {}).get("learner", {}).get("seed", 0))
    state.load_tensors(load_file(str(folder / TENSORS_FILE)), seed)
    state.users, state.items = IdMap(meta["users"]), IdMap(meta["items"])
    state.proj_fitted = bool(meta["proj_fitted"])
    if len(state.users) != state.user_rows.n or len(state.items) != state.item_rows.n:
        raise ValueError(f"{folder}: id maps and tables disagree in size")
    lu, li, lr = state.logged(state.log_users.n)
    if not (
        len(lu) == len(li) == len(lr)
        and (len(lu) == 0 or (0 <= int(lu.min()) and int(lu.max()) < len(state.users)
                              and 0 <= int(li.min()) and int(li.max()) < len(state.items)))
    ):  # fmt: skip
        raise ValueError(f"{folder}: the event log does not fit the tables")
    job = state.refit_job
    if not (
        job.shape == (5,) and int(job.min()) >= 0 and int(job[3]) <= int(job[4])
        and state.refit_stats.shape == (3,) and bool(torch.isfinite(state.refit_stats).all())
        and state.log_dropped.shape == (1,) and int(state.log_dropped) >= 0
    ):  # fmt: skip
        raise ValueError(f"{folder}: the running refit's record is malformed")
    kr = state.knn_rows
    if not (
        kr.dim() == 2 and state.knn_sims.shape == kr.shape and kr.shape[0] <= len(state.items)
        and state.knn_bias.shape == (kr.shape[0],) and state.knn_mu.shape == (1,)
        and state.knn_pending.shape == (1,) and int(state.knn_pending) in (0, 1)
        and (kr.numel() == 0 or (int(kr.min()) >= -1 and int(kr.max()) < kr.shape[0]))
        and bool(torch.isfinite(state.knn_sims).all() and torch.isfinite(state.knn_bias).all())
    ):  # fmt: skip
        raise ValueError(f"{folder}: the item neighbours do not fit the catalogue")
    oc, oi = state.offset_class, state.offset_item.t
    if not (
        oc.shape == (N_CLASSES, 2) and oi.shape == (len(state.items), 2)
        and bool(torch.isfinite(oc).all() and torch.isfinite(oi).all())
        and bool((oc[:, 1] >= 0).all() and (oi[:, 1] >= 0).all())
    ):  # fmt: skip
        raise ValueError(f"{folder}: the residual offsets do not fit the catalogue")
    ur, us, uc = state.uknn_rows.t, state.uknn_sims.t, state.uknn_counts.t
    if not (
        ur.dim() == 2 and us.shape == ur.shape and ur.shape[0] <= len(state.users)
        and uc.shape == (ur.shape[0],) and (uc.numel() == 0 or int(uc.min()) >= 0)
        and state.uknn_sweep.shape == (1,) and -1 <= int(state.uknn_sweep) <= len(state.users)
        and (ur.numel() == 0 or (int(ur.min()) >= -1 and int(ur.max()) < len(state.users)))
        and bool(torch.isfinite(us).all())
    ):  # fmt: skip
        raise ValueError(f"{folder}: the user neighbours do not fit the users")
    return state, meta["config"]
