"""The user-neighbourhood correction of predicted ratings: "the users whose taste is most like
yours rated this item above what its baseline expected".

The item neighbourhood (``neighbours.py``) reads the user's own ratings of similar items; this
reads other users' ratings of the item itself, from the user's most similar raters. It adds
what neither the factor model nor the item kNN has: the crowd of like-minded users' verdict on
this very item, live (their newest ratings count at once).

Residuals are taken against the item kNN's ridge baseline (``ModelState.knn_mu``,
``knn_bias``: mean and item biases, refreshed at the fit and each refit) and the user's mean
residual, b_u = sum_i (r_ui - mu - b_i) / (n_u + ``uknn_user_reg``):
    e_ui = r_ui - mu - b_i - b_u.
Each user keeps their ``uknn_size`` most similar users (``kernels.user_neighbours``: shrunk
correlation of the residuals over co-rated items, x co / (co + ``uknn_shrink``), positive
only; with ``uknn_max_raters`` > 0, items with more raters are left out: a user's list
costs the sum of their items' rater counts). The lists are
recomputed for every user at the fit and each refit, and after each ``feedback`` call for
its users whose rating count grew by at least max(1, ``uknn_refresh_growth`` x their count
when their list was made) (every call's users at growth 0; each call's users' biases are
updated at once): a light user's list is as fresh as their latest rating, and a heavy
user's, which one more rating barely moves and which costs the most to remake, is remade at
every 1/8 more. The correction of user a's rating of item j (``kernels.user_knn_predict``):
over the first ``uknn_k`` of a's neighbours who rated j,
    ``uknn_weight`` x sum s_av e_vj / (sum s_av + ``uknn_reg``),
added to the predicted rating (``predict``, ``score_all``, ``recommend``'s re-rank and
deployments; never to a training loss). Users without a list (no ratings yet) get none.

Settings picked on the warm-up cuts (``LearnerConfig``'s comment). On MovieLens-100k's stream
(issue 6, M = 100, checked after the choice): RMSE 0.9808 -> 0.9788, the gain from users with
more than 50 ratings (0.9445 -> 0.9407 at 51-200, 0.9469 -> 0.9418 above); a simulation with
the lists refreshed only at the refit (every 5,000 events) had gained 0.0002: the per-call
refresh is what pays.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import kernels
from .kernels.reference import RaterArrays
from .model import NO_LOCK, Rows, rows_csr
from .raters import Raters, known_csr

if TYPE_CHECKING:
    from .model import ModelState
    from .online import LearnerConfig


def enabled(cfg: LearnerConfig) -> bool:
    return cfg.uknn_weight > 0 and cfg.uknn_size > 0 and cfg.uknn_k > 0


def item_base(knn_bias: np.ndarray, knn_mu: float, n_items: int) -> np.ndarray:
    """mu + b_i of the baseline (``knn_bias`` [m], ``knn_mu``), float64 [n_items] (b_i 0 for
    items newer than it)."""
    b = np.zeros(n_items)
    m = min(n_items, len(knn_bias))
    b[:m] = knn_bias[:m]
    return b + knn_mu


def _item_base(state: ModelState) -> np.ndarray:
    return item_base(state.knn_bias.numpy(), float(state.knn_mu), len(state.items))


def user_bases(indptr: np.ndarray, items: np.ndarray, ratings: np.ndarray,
               item_base: np.ndarray, reg: float) -> np.ndarray:  # fmt: skip
    """b_u (float64 [U]) of users whose rated item rows and ratings are a CSR (``indptr``
    [U + 1]): one sum per user, in the CSR's order (so a user's value does not depend on
    which other users are in the call)."""
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    sums = np.bincount(owner, ratings - item_base[items], minlength=len(indptr) - 1)
    den = np.diff(indptr) + reg
    return np.divide(sums, den, out=np.zeros(len(den)), where=den > 0)  # no ratings: 0


def _histories(state: ModelState, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hist = [state.seen.history(a) for a in users.tolist()]
    indptr, items = rows_csr([h[0] for h in hist])
    ratings = np.concatenate([h[1] for h in hist]) if hist else np.zeros(0, np.float32)
    return indptr, items, ratings.astype(np.float32, copy=False)


def _bases(state: ModelState, cfg: LearnerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(mu + b_i float64 [n_items], b_u float64 [n_users]): cached on the state until a
    checkpoint, rollback or recompute drops them; items and users added since get theirs."""
    cached = state.uknn_bases
    base_i = cached[0] if cached is not None else _item_base(state)
    if len(base_i) < len(state.items):
        base_i = _item_base(state)
    have = cached[1] if cached is not None else np.zeros(0)
    if len(have) < len(state.users):
        new = np.arange(len(have), len(state.users))
        have = np.concatenate([have, user_bases(*_histories(state, new), base_i,
                                                cfg.uknn_user_reg)])  # fmt: skip
    state.uknn_bases = (base_i, have)
    return base_i, have


def _arrays(r: Raters) -> RaterArrays:
    return (torch.from_numpy(r.start), torch.from_numpy(r.count), torch.from_numpy(r.users),
            torch.from_numpy(r.ratings))  # fmt: skip


def _raters(state: ModelState) -> RaterArrays:
    return _arrays(state.seen.raters(len(state.items)))


def _store(state: ModelState, size: int, users: np.ndarray, rows: torch.Tensor,
           sims: torch.Tensor, counts: np.ndarray) -> None:  # fmt: skip
    if state.uknn_rows.t.shape[1] != size:  # (first lists, or a new size): start empty
        state.uknn_rows, state.uknn_sims = Rows(size, torch.int64), Rows(size, torch.float32)
        state.uknn_counts = Rows(None, torch.int64)
    need = int(users.max()) + 1 - state.uknn_rows.n
    if need > 0:
        state.uknn_rows.append(torch.full((need, size), -1, dtype=torch.int64))
        state.uknn_sims.append(torch.zeros(need, size))
        state.uknn_counts.append(torch.zeros(need, dtype=torch.int64))
    state.uknn_rows.t.numpy()[users] = rows.numpy()  # (numpy: a third of torch's indexing cost)
    state.uknn_sims.t.numpy()[users] = sims.numpy()
    state.uknn_counts.t.numpy()[users] = counts


def _due(state: ModelState, cfg: LearnerConfig, users: np.ndarray,
         counts: np.ndarray) -> np.ndarray:  # fmt: skip
    """Which of ``users`` (rating counts now: ``counts``) need a new list: those whose count
    grew by at least max(1, ``uknn_refresh_growth`` x their count when it was last made)."""
    made = state.uknn_counts.t.numpy()
    last = np.zeros(len(users), np.int64)  # (0 for users past the table: no list yet)
    inside = users < len(made)
    last[inside] = made[users[inside]]
    return counts - last >= np.maximum(1.0, cfg.uknn_refresh_growth * last)


def refresh(state: ModelState, cfg: LearnerConfig, users: torch.Tensor,
            backend: str | None, every: bool = False,
            lock: AbstractContextManager[Any] = NO_LOCK) -> None:  # fmt: skip
    """After user rows ``users``' new ratings are recorded (``seen``): their b_u now, and the
    neighbour lists of those due (``_due``; all of them with ``every`` or a growth of 0).
    Nothing when the correction is off. ``lock`` is held while the state is read and written,
    not while the lists are computed (``Recommender.feedback``: answers read meanwhile; the
    caller must keep other writers out)."""
    if not enabled(cfg) or users.numel() == 0:
        return
    with lock:
        which = np.unique(users.numpy())
        stale = state.uknn_bases is not None  # cached before these users' new ratings
        base_i, base_u = _bases(state, cfg)
        indptr, items, ratings = _histories(state, which)
        if stale:  # (a cache built just now has them already: the recompute's case)
            base_u[which] = user_bases(indptr, items, ratings, base_i, cfg.uknn_user_reg)
        counts = np.diff(indptr)
        if not every and cfg.uknn_refresh_growth > 0:
            due = _due(state, cfg, which, counts)
            if not due.all():  # the due users' rows of the CSR
                keep = np.repeat(due, counts)
                which, counts, items, ratings = which[due], counts[due], items[keep], ratings[keep]
                indptr = np.concatenate([[0], np.cumsum(counts)])
        if which.size == 0:
            return
        raters = _raters(state)  # (grown to the catalogue here: readers grow it too)
    rows, sims = kernels.user_neighbours(
        torch.from_numpy(which), torch.from_numpy(indptr), torch.from_numpy(items),
        torch.from_numpy(ratings), raters, torch.from_numpy(base_u),
        torch.from_numpy(base_i), cfg.uknn_size, cfg.uknn_shrink, cfg.uknn_max_raters,
        backend=backend,
    )  # fmt: skip
    with lock:
        _store(state, cfg.uknn_size, which, rows, sims, counts)
        state.counters["user_lists_made"] += len(which)


def recompute(state: ModelState, cfg: LearnerConfig, backend: str | None,
              lock: AbstractContextManager[Any] = NO_LOCK) -> None:  # fmt: skip
    """Every user's b_u and neighbour list (after the baseline's recompute), now (``lock``:
    as ``refresh``'s)."""
    with lock:
        state.uknn_bases = None
        state.uknn_sweep.fill_(-1)
    if len(state.users):
        refresh(state, cfg, torch.arange(len(state.users)), backend, every=True, lock=lock)


def start_sweep(state: ModelState, cfg: LearnerConfig) -> None:
    """After the baseline's recompute at a refit's end inside ``feedback``: every user's b_u
    from the new baseline at once (dropped here, rebuilt on first use), and, with
    ``uknn_sweep``, their lists over the next calls (``sweep``), not in one stall (1-2 s at
    20,000 users); without, each list waits for its user's growth (``refresh``)."""
    state.uknn_bases = None
    state.uknn_sweep.fill_(0 if cfg.uknn_sweep else -1)


def sweep(state: ModelState, cfg: LearnerConfig, n_events: int, backend: str | None,
          lock: AbstractContextManager[Any] = NO_LOCK) -> None:  # fmt: skip
    """A ``feedback`` call's share of a running sweep: the lists of the next ceil(n_users x
    ``n_events`` / ``refit_every``) user rows, so that it ends by the next refit's start
    (``lock``: as ``refresh``'s)."""
    with lock:
        pos, n = int(state.uknn_sweep), len(state.users)
    if pos < 0:
        return
    end = min(n, pos + -(-n * n_events // max(cfg.refit_every, 1)))
    if end > pos:
        refresh(state, cfg, torch.arange(pos, end), backend, every=True, lock=lock)
    with lock:
        state.uknn_sweep.fill_(end if end < n else -1)


@dataclass(frozen=True)
class UserNeighbours:
    """What the correction reads: the neighbour lists, who rated what, the baseline and the
    settings."""

    rows: torch.Tensor  # int64 [n, size], -1 pad
    sims: torch.Tensor  # float32 [n, size]
    raters: RaterArrays
    user_base: torch.Tensor  # float64 [n_users]
    item_base: torch.Tensor  # float64 [n_items]
    weight: float
    k: int
    reg: float

    @classmethod
    def of(cls, state: ModelState, cfg: LearnerConfig) -> UserNeighbours | None:
        """The model's, or None when the correction is off or no list was computed."""
        if not enabled(cfg) or state.uknn_rows.n == 0:
            return None
        base_i, base_u = _bases(state, cfg)
        return cls(state.uknn_rows.t, state.uknn_sims.t, _raters(state),
                   torch.from_numpy(base_u), torch.from_numpy(base_i), cfg.uknn_weight,
                   cfg.uknn_k, cfg.uknn_reg)  # fmt: skip

    @classmethod
    def from_tables(
        cls, rows: np.ndarray, sims: np.ndarray, indptr: np.ndarray, items: np.ndarray,
        ratings: np.ndarray, knn_bias: np.ndarray, knn_mu: float, n_items: int,
        settings: dict[str, Any] | None,
    ) -> UserNeighbours | None:  # fmt: skip
        """A deployment's, from its exported tables: the lists, every user's rated items as a
        CSR (ratings NaN where unknown), the baseline and the manifest's settings; None when
        off or nothing was exported (exported before the correction existed)."""
        if not settings or not settings["weight"] or not len(rows):
            return None
        ptr, it, rt = known_csr(indptr, items, ratings)
        rt = rt.astype(np.float32, copy=False)
        base_i = item_base(knn_bias, knn_mu, n_items)
        base_u = user_bases(ptr, it, rt, base_i, float(settings["user_reg"]))
        return cls(torch.from_numpy(rows), torch.from_numpy(sims),
                   _arrays(Raters.from_csr(ptr, it, rt, n_items)), torch.from_numpy(base_u),
                   torch.from_numpy(base_i), float(settings["weight"]), int(settings["k"]),
                   float(settings["reg"]))  # fmt: skip

    def args(self) -> kernels.reference.UserKnn:
        """What ``kernels.blend_terms`` and ``rerank_blend`` take of it."""
        return kernels.reference.UserKnn(self.rows, self.sims, self.raters, self.user_base,
                                         self.item_base, self.k, self.reg,
                                         self.weight)  # fmt: skip


def settings(cfg: LearnerConfig) -> dict[str, Any]:
    """What a deployment's manifest keeps of the settings (``UserNeighbours.from_tables``)."""
    return {
        "weight": cfg.uknn_weight if enabled(cfg) else 0.0,
        "k": cfg.uknn_k,
        "reg": cfg.uknn_reg,
        "user_reg": cfg.uknn_user_reg,
        "rerank": cfg.uknn_rerank,
    }


def check_config(cfg: LearnerConfig) -> None:
    """ValueError unless the correction's settings are usable."""
    reals = (cfg.uknn_weight, cfg.uknn_shrink, cfg.uknn_reg, cfg.uknn_user_reg,
             cfg.uknn_refresh_growth)  # fmt: skip
    if not all(math.isfinite(x) and x >= 0 for x in reals) or cfg.uknn_weight > 1:
        raise ValueError("uknn_weight must be in [0, 1]; uknn_shrink, uknn_reg, uknn_user_reg "
                         "and uknn_refresh_growth finite and >= 0")  # fmt: skip
    if not isinstance(cfg.uknn_sweep, bool):
        raise ValueError(f"uknn_sweep must be True or False, not {cfg.uknn_sweep!r}")
    if cfg.uknn_size < 0 or cfg.uknn_k < 0 or cfg.uknn_max_raters < 0:
        raise ValueError("uknn_size, uknn_k and uknn_max_raters must be >= 0")
