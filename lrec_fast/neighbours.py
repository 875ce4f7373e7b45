"""The item-neighbourhood correction of predicted ratings: item-based kNN on baseline
residuals (the classic neighbourhood model), blended with the factor model's prediction.

The factor model learns a user's taste through a row that a single stream pass moves a little
per event; a neighbourhood model reads the user's own ratings directly: "you rated these
similar films 1 above what the baseline expected". It is strongest exactly where the stream
is weakest, for users with tens of ratings, and it takes each new rating in at once (the
user's ratings are read when predicting). Recomputed (``recompute``) at the end of the warm-up
fit and of each refit (in the next call for a refit that ends inside ``feedback``: its call
runs that period's consolidation too), from every user's latest rating of each item (of their newest
``knn_history_cap``, which bounds the cost for users with thousands of ratings):

1. a baseline mu + b_u + b_i: the mean, then ``BASELINE_ROUNDS`` alternating ridge solves of
   the item biases (``knn_item_reg``) and user biases (``knn_user_reg``);
2. residuals e = r - baseline, and per item pair the shrunk correlation over co-raters
   (``kernels.item_neighbours``); each item keeps its ``knn_size`` most similar items.

A prediction for a user with ratings (``kernels.knn_predict``) takes the user's bias from all
their ratings now (new ratings count at once; the rating of age a, a ratings ago, weighs
``knn_user_decay`` ** a: a user's taste drifts as they rate), and corrects the baseline by the
residuals of the first ``knn_k`` of the item's neighbours the user rated, each weighted by its
similarity x ``knn_decay`` ** age; the result (clipped to the rating range) is blended in at
a weight that grows with the user's n ratings, w = ``knn_weight`` x n / (n + ``knn_ramp``)
(with a handful of ratings the neighbourhood has little to read):
    predicted = (1 - w) x factor model + w x neighbourhood.
Users with no rating get the factor model's prediction alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import kernels
from .model import rows_csr

if TYPE_CHECKING:
    from .model import ModelState
    from .online import LearnerConfig

BASELINE_ROUNDS = 10
_NONE = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))  # no history


def _rated(state: ModelState, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every known (user row, item row, latest rating) among each user's newest ``cap`` (0:
    all), unknown ratings left out."""
    indptr, items, ratings, ages = state.seen.csr()
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    keep = np.isfinite(ratings) & ((ages < cap) if cap > 0 else True)
    return (torch.from_numpy(users[keep]), torch.from_numpy(items[keep]),
            torch.from_numpy(ratings[keep]).double())  # fmt: skip


def baseline(
    users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, n_users: int, n_items: int,
    cfg: LearnerConfig,
) -> tuple[float, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(mu, user biases float64 [n_users], item biases float64 [n_items]) of the ridge baseline
    (module doc, step 1)."""
    mu = float(ratings.mean()) if ratings.numel() else 0.0
    n_u = torch.zeros(n_users, dtype=torch.float64).index_add_(0, users, torch.ones_like(ratings))
    n_i = torch.zeros(n_items, dtype=torch.float64).index_add_(0, items, torch.ones_like(ratings))
    b_u, b_i = torch.zeros(n_users, dtype=torch.float64), torch.zeros(n_items, dtype=torch.float64)
    for _ in range(BASELINE_ROUNDS):
        b_i = torch.zeros_like(b_i).index_add_(0, items, ratings - mu - b_u[users])
        b_i /= (n_i + cfg.knn_item_reg).clamp_min(1e-12)  # an unrated item: 0, also at ridge 0
        b_u = torch.zeros_like(b_u).index_add_(0, users, ratings - mu - b_i[items])
        b_u /= (n_u + cfg.knn_user_reg).clamp_min(1e-12)
    return mu, b_u, b_i


def recompute(state: ModelState, cfg: LearnerConfig, backend: str) -> None:
    """Recompute the baseline and every item's neighbours from the users' ratings (module doc);
    the baseline alone when only the user-neighbourhood correction reads it, nothing when both
    are off or no rating is known."""
    install(state, compute(state, cfg, backend))


def compute(state: ModelState, cfg: LearnerConfig, backend: str) -> dict[str, torch.Tensor]:
    """``recompute``'s new tables (``ModelState.knn_*``; {} when it keeps the old ones),
    without changing the state: answers may read it meanwhile (``Recommender.feedback``)."""
    if cfg.knn_weight == 0 and cfg.uknn_weight == 0:
        return {}
    users, items, ratings = _rated(state, cfg.knn_history_cap)
    if ratings.numel() == 0:
        return {}
    n_items = len(state.items)
    mu, b_u, b_i = baseline(users, items, ratings, len(state.users), n_items, cfg)
    out = {"knn_bias": b_i.float(), "knn_mu": torch.tensor([mu], dtype=torch.float64)}
    if cfg.knn_weight > 0:
        residuals = ratings - mu - b_u[users] - b_i[items]
        out["knn_rows"], out["knn_sims"] = kernels.item_neighbours(
            users, items, residuals, n_items, cfg.knn_size, cfg.knn_shrink, backend=backend
        )
    return out


def install(state: ModelState, tables: dict[str, torch.Tensor]) -> None:
    """Put ``compute``'s tables in the state."""
    for name, t in tables.items():
        setattr(state, name, t)


History = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Neighbours:
    """What a neighbourhood prediction reads besides the user's ratings: the tables of the
    last recompute (``ModelState.knn_*``) and the settings (``LearnerConfig.knn_*``)."""

    rows: torch.Tensor
    sims: torch.Tensor
    bias: torch.Tensor
    mu: float
    weight: float
    user_reg: float
    user_decay: float
    k: int
    reg: float
    decay: float
    ramp: float

    @classmethod
    def of(cls, state: ModelState, cfg: LearnerConfig) -> Neighbours | None:
        """The model's, or None when the correction is off or has not been computed."""
        if cfg.knn_weight == 0 or state.knn_rows.shape[0] == 0:
            return None
        return cls(state.knn_rows, state.knn_sims, state.knn_bias, float(state.knn_mu),
                   cfg.knn_weight, cfg.knn_user_reg, cfg.knn_user_decay, cfg.knn_k, cfg.knn_reg,
                   cfg.knn_decay, cfg.knn_ramp)  # fmt: skip

    def args(self, clip: tuple[float, float]) -> kernels.reference.ItemKnn:
        """What ``kernels.blend_terms`` and ``rerank_blend`` take of it (``clip``: the rating
        range)."""
        return kernels.reference.ItemKnn(self.rows, self.sims, self.bias, self.mu,
                                         self.user_reg, self.user_decay, self.k, self.reg,
                                         self.decay, clip[0], clip[1], self.weight,
                                         self.ramp)  # fmt: skip


def history_rows(history: History, users: np.ndarray) -> kernels.reference.History:
    """The histories of user rows ``users`` (int64 [S]; -1: unknown, an empty row) as the
    kernels' CSR, one row per entry."""
    hist = [history(a) if a >= 0 else _NONE for a in users.tolist()]
    indptr, flat_items = rows_csr([h[0] for h in hist])
    ratings = np.concatenate([h[1] for h in hist]) if hist else _NONE[1]
    ages = np.concatenate([h[2] for h in hist]) if hist else _NONE[2]
    return kernels.reference.History(
        torch.from_numpy(indptr), torch.from_numpy(flat_items),
        torch.from_numpy(ratings.astype(np.float32, copy=False)),
        torch.from_numpy(ages.astype(np.int64, copy=False)),
    )  # fmt: skip


def by_user(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Pairs (user row, item row) [E] laid out as ``blend_terms`` takes them: (distinct users
    [D], candidates [D, m] with -1 padding, each pair's (row, column))."""
    if users.size and (users == users[0]).all():  # one user: no sort
        return users[:1], items.reshape(1, -1), (np.zeros(users.size, np.int64),
                                                 np.arange(users.size))  # fmt: skip
    distinct, slot = np.unique(users, return_inverse=True)
    slot = slot.reshape(-1)
    order = np.argsort(slot, kind="stable")
    first = np.searchsorted(slot[order], np.arange(len(distinct)))
    col = np.empty(users.size, np.int64)
    col[order] = np.arange(users.size) - first[slot[order]]
    top = np.full((len(distinct), int(col.max()) + 1 if col.size else 0), -1, np.int64)
    top[slot, col] = items
    return distinct, top, (slot, col)


def corrected(
    nb: Neighbours | None, un: kernels.reference.UserKnn | None, history: History,
    users: torch.Tensor, items: torch.Tensor, predicted: torch.Tensor,
    clip: tuple[float, float], backend: str | None,
) -> torch.Tensor:  # fmt: skip
    """The factor model's ``predicted`` ratings (float32 [E]) of user rows ``users`` (-1:
    unknown) and item rows ``items``, the item-neighbourhood prediction blended in where the
    user has ratings (module doc) and the user-neighbourhood correction added
    (``kernels.blend_terms``, both in one call); ``predicted`` itself without either.
    ``history(a)``: user row a's rated item rows (sorted int64), their ratings (float32, all
    known) and ages (int64, 0: the latest)."""
    if (nb is None and un is None) or items.numel() == 0:
        return predicted
    distinct, top, at = by_user(users.numpy(), items.numpy())
    hist = history_rows(history, distinct) if nb is not None else None
    val, w, add = kernels.blend_terms(torch.from_numpy(top), torch.from_numpy(distinct),
                                      top.shape[1], hist, nb.args(clip) if nb else None, un,
                                      backend=backend)  # fmt: skip
    v, ww, a = val.numpy()[at], w.numpy()[at], add.numpy()[at]  # (numpy: a few values)
    p = predicted.numpy()
    return torch.from_numpy(np.where(ww > 0, (1 - ww) * p + ww * v, p) + a)


def check_config(cfg: LearnerConfig) -> None:
    """ValueError unless the correction's settings are usable."""
    reals = (cfg.knn_weight, cfg.knn_shrink, cfg.knn_reg, cfg.knn_user_reg, cfg.knn_item_reg)
    if not all(math.isfinite(x) and x >= 0 for x in reals) or cfg.knn_weight > 1:
        raise ValueError("knn_weight must be in [0, 1]; knn_shrink, knn_reg, knn_user_reg and "
                         "knn_item_reg finite and >= 0")  # fmt: skip
    if not (math.isfinite(cfg.knn_ramp) and cfg.knn_ramp >= 0):
        raise ValueError(f"knn_ramp must be finite and >= 0, not {cfg.knn_ramp!r}")
    if not all(0 < x <= 1 for x in (cfg.knn_user_decay, cfg.knn_decay)):
        raise ValueError("knn_user_decay and knn_decay must be in (0, 1]")
    if cfg.knn_size < 0 or cfg.knn_k < 0 or cfg.knn_history_cap < 0:
        raise ValueError("knn_size, knn_k and knn_history_cap must be >= 0")
