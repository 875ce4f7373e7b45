"""The ranking head: what ``recommend`` orders by.

A user's ranking query is folded in from the items they interacted with most recently (no
per-user parameters, so a user is personalised from the first event on, and the answer moves
with every event at once, before any gradient step):

    q_u = sum_l w_l C[h_l] / sum_l w_l,      w_l = history_decay ** l,

over the user's last ``history_len`` item rows h_0 (newest), h_1, ...; no history gives q_u = 0
(then the ranking is the item bias alone, a learned popularity). Score of item j:

    s(u, j) = <q_u, T[j]> + t_b[j]  (+ prior_weight * log(1 + recent count of j), the recency
    prior, added by the caller; with cold_prior_weight for users with no history)

C (context rows), T (target rows) and t_b are trained with softmax cross-entropy of the item
each event names, against every item (exact) when the catalogue has at most ``negatives``
items, else against the batch's items plus ``negatives`` items sampled from the smoothed
popularity q(j) ~ (count_j + 1)^0.75, each logit corrected by -log(negatives * q(j)) (sampled
softmax with the log-Q correction). Steps are row-wise Adagrad (one accumulator per row,
FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): duplicate rows in a batch sum their gradients first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .online import DivergenceError, LearnerConfig

if TYPE_CHECKING:
    from .model import ModelState

PAD = kernels.reference.PAD  # an empty history slot
fold_in = kernels.reference.fold_in


@functools.lru_cache(maxsize=16)
def history_weights(decay: float, length: int) -> torch.Tensor:
    """w_l = decay ** l, float32 [length] (``LearnerConfig.history_decay``, ``history_len``);
    cached, so shared: do not modify."""
    return decay ** torch.arange(length, dtype=torch.float32)


def positives(ratings: torch.Tensor, cfg: LearnerConfig) -> torch.Tensor:
    """Which events the ranking head learns from, bool [n]: rated >= ``cfg.rank_min_rating``."""
    if cfg.rank_min_rating is None:
        return torch.ones(ratings.numel(), dtype=torch.bool)
    return ratings >= cfg.rank_min_rating


def histories(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, backend: str | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The history each event (time order) sees, int64 [n, L], and the users' histories
    advanced past the events (in place); ``kernels.advance_histories``. ``keep`` (bool [n]):
    only those events advance the histories; the others get an empty (PAD) one."""
    recent = state.user_recent.t
    if keep is None:
        return kernels.advance_histories(recent, users, items, backend=backend)
    out = torch.full((users.numel(), recent.shape[1]), PAD, dtype=torch.int64)
    out[keep] = kernels.advance_histories(recent, users[keep], items[keep], backend=backend)
    return out


def queries(state: ModelState, users: torch.Tensor, cfg: LearnerConfig,
            backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """Ranking queries [B, d] of user rows ``users`` (-1 = unknown: a zero query)."""
    if state.user_recent.n == 0:
        return torch.zeros(users.numel(), state.dim)
    return kernels.user_queries(state.ctx_rows.t, state.user_recent.t, users,
                                history_weights(cfg.history_decay, cfg.history_len),
                                backend=backend)  # fmt: skip


def cold_users(recent: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """Which users have no ranking history, bool [B]: unknown (-1) or every slot of their row of
    ``recent`` (the histories, int64 [n_users, L]) empty."""
    if recent.shape[0] == 0:
        return torch.ones(users.numel(), dtype=torch.bool)
    u = users.numpy()  # (numpy: a recommend's few users are too few for torch's per-op cost)
    return torch.from_numpy((u < 0) | (recent.numpy()[np.maximum(u, 0)] < 0).all(1))


def reranks(rank_by: str, weight: float, depth: int) -> bool:
    """Whether ``recommend`` re-ranks warm users' candidates (``rerank``) with these settings."""
    return rank_by == "softmax" and weight > 0 and depth > 0


PROPOSAL_REFRESH = 1_000  # ranking steps between rebuilds of the sampling proposal


@dataclass
class Proposal:
    """Smoothed popularity q(j) ~ (count_j + 1)^0.75 as drawn from: cumulative float64 [n]
    (inverse-CDF sampling, O(log n) per draw) and log q(j) float32 [n]. Rebuilding it is O(n),
    so it is reused for PROPOSAL_REFRESH steps: a slightly stale q is still an exact proposal,
    since the correction uses the q that was drawn from."""

    cdf: torch.Tensor
    logq: torch.Tensor
    steps: int = 0

    def draw(self, m: int, gen: torch.Generator) -> torch.Tensor:
        """m item rows drawn from q with replacement, int64 [m]."""
        u = torch.rand(m, generator=gen, dtype=torch.float64) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp_max_(self.cdf.numel() - 1)


def _proposal(state: ModelState) -> Proposal:
    p = state.rank_proposal
    if p is None or p.cdf.numel() != state.tgt_rows.n or p.steps >= PROPOSAL_REFRESH:
        q = (state.item_count.t.double() + 1.0) ** 0.75
        q /= q.sum()
        p = state.rank_proposal = Proposal(torch.cumsum(q, 0), torch.log(q).float())
    p.steps += 1
    return p


def _candidates(
    state: ModelState, targets: torch.Tensor, cfg: LearnerConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item rows to score against (all of them, or the targets + sampled negatives, sorted and
    unique) and the log-Q correction log(negatives * q(j)) per candidate (None when exact)."""
    n = state.tgt_rows.n
    if n <= cfg.negatives:
        return torch.arange(n), None
    p = _proposal(state)
    cand = torch.unique(torch.cat([targets, p.draw(cfg.negatives, gen)]))
    return cand, p.logq[cand] + math.log(cfg.negatives)


def step(
    state: ModelState, hist: torch.Tensor, targets: torch.Tensor, lr: float,
    cfg: LearnerConfig, gen: torch.Generator, undo: list[Callable[[], None]] | None = None,
    backend: str | None = None,
) -> float:  # fmt: skip
    """One guarded softmax step on events (histories [n, L], target item rows [n]); returns the
    batch's mean cross-entropy before the step (nats). Touches only the rows the events name
    (and the sampled candidates); ``kernels.softmax_step``. Non-finite loss or rows: the rows
    are restored and DivergenceError raised. ``undo``: where to append a callable that takes
    the step back."""
    if targets.numel() == 0:
        return math.nan
    # drawing may rebuild the proposal or advance its step count: both go back on restore
    proposal = state.rank_proposal
    proposal_steps = proposal.steps if proposal is not None else 0
    cand, logq = _candidates(state, targets, cfg, gen)
    c_rows = torch.unique(hist[hist >= 0])
    saved = [
        (getattr(state, name).t, rows, getattr(state, name).t[rows])
        for name, rows in (
            ("ctx_rows", c_rows),
            ("ctx_acc", c_rows),
            ("tgt_rows", cand),
            ("tgt_acc", cand),
            ("tgt_bias", cand),
            ("tgt_bias_acc", cand),
        )
    ]

    def restore() -> None:
        for table, rows, values in saved:
            table[rows] = values
        state.rank_proposal = proposal
        if proposal is not None:
            proposal.steps = proposal_steps

    value, finite = kernels.softmax_step(
        state.ctx_rows.t, state.ctx_acc.t, state.tgt_rows.t, state.tgt_acc.t, state.tgt_bias.t,
        state.tgt_bias_acc.t, hist, history_weights(cfg.history_decay, cfg.history_len),
        torch.searchsorted(cand, targets), cand, logq, lr, backend=backend,
    )  # fmt: skip
    if not (finite and math.isfinite(value)):
        restore()
        raise DivergenceError(f"ranking step diverged (loss {value:.3g}); step rolled back")
    if undo is not None:
        undo.append(restore)
    return value


def loss_of(state: ModelState, hist: torch.Tensor, targets: torch.Tensor,
            cfg: LearnerConfig) -> float:  # fmt: skip
    """Exact mean softmax cross-entropy of events over the whole catalogue (validation)."""
    if targets.numel() == 0:
        return math.nan
    with torch.no_grad():
        rep = fold_in(state.ctx_rows.t, hist, history_weights(cfg.history_decay, cfg.history_len))
        logits = rep @ state.tgt_rows.t.T + state.tgt_bias.t
        return float(F.cross_entropy(logits, targets))


def fit(
    state: ModelState, hist: torch.Tensor, targets: torch.Tensor, cfg: LearnerConfig,
    gen: torch.Generator, backend: str | None = None,
) -> tuple[int, list[float]]:  # fmt: skip
    """Warm-up training of the head on events (time order, with their histories): shuffled
    epochs on the first (1 - validation_fraction), early stopping on the exact cross-entropy of
    the last share (best epoch restored), then one pass of that share. Returns (best epoch,
    validation losses)."""
    n = targets.numel()
    n_val = int(n * cfg.validation_fraction) if n >= 20 else 0
    n_tr = n - n_val
    rng = np.random.default_rng([cfg.seed, 7])
    names = ("ctx_rows", "tgt_rows", "tgt_bias", "ctx_acc", "tgt_acc", "tgt_bias_acc")
    best = {k: getattr(state, k).t.clone() for k in names}
    best_val, best_epoch, since, losses = math.inf, 0, 0, []
    for epoch in range(1, cfg.rank_max_epochs + 1):
        order = torch.from_numpy(rng.permutation(n_tr))
        for s in range(0, n_tr, cfg.rank_batch_size):
            b = order[s : s + cfg.rank_batch_size]
            step(state, hist[b], targets[b], cfg.rank_fit_lr, cfg, gen, backend=backend)
        if n_val == 0:
            best_epoch = epoch
            continue
        val = loss_of(state, hist[n_tr:], targets[n_tr:], cfg)
        losses.append(val)
        if val < best_val - 1e-4:
            best = {k: getattr(state, k).t.clone() for k in names}
            best_val, best_epoch, since = val, epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    if n_val:
        for k in names:
            getattr(state, k).t.copy_(best[k])
    for s in range(n_tr, n, cfg.rank_batch_size):
        sl = slice(s, min(s + cfg.rank_batch_size, n))
        step(state, hist[sl], targets[sl], cfg.rank_fit_lr, cfg, gen, backend=backend)
    return best_epoch, losses
