"""The ranking head: what ``recommend`` orders by.

A user's ranking query is folded in from the items they interacted with most recently (no
per-user parameters, so a user is personalised from the first event on, and the answer moves
with every event at once, before any gradient step):

    q_u = sum_l w_l C[h_l] / sum_l w_l,      w_l = history_decay ** l,

over the user's last ``history_len`` item rows h_0 (newest), h_1, ...; no history gives q_u = 0
(then the ranking is the item bias alone, a learned popularity). Score of item j:

    s(u, j) = <q_u, T[j]> + t_b[j]  (+ prior_weight * log(1 + recent count of j), the recency
    prior, added by the caller)

C (context rows), T (target rows) and t_b are trained with softmax cross-entropy of the item
each event names, against every item (exact) when the catalogue has at most ``negatives``
items, else against the batch's items plus ``negatives`` items sampled from the smoothed
popularity q(j) ~ (count_j + 1)^0.75, each logit corrected by -log(negatives * q(j)) (sampled
softmax with the log-Q correction). Steps are row-wise Adagrad (one accumulator per row,
FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): duplicate rows in a batch sum their gradients first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .online import DivergenceError, LearnerConfig

if TYPE_CHECKING:
    from .model import ModelState

PAD = -1  # an empty history slot


def history_weights(decay: float, length: int) -> torch.Tensor:
    """w_l = decay ** l, float32 [length] (``LearnerConfig.history_decay``, ``history_len``)."""
    return decay ** torch.arange(length, dtype=torch.float32)


def fold_in(ctx: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ranking queries [B, d] from histories [B, L] (item rows, PAD = empty, newest first)
    over context rows ``ctx`` [n_items, d]: the weighted mean of the rows (0 for no history)."""
    valid = hist >= 0
    w = weights[None, : hist.shape[1]] * valid
    rows = ctx[hist.clamp_min(0)] * w[..., None]
    return rows.sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def histories(state: ModelState, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The history each event (time order) sees, int64 [n, L], and the users' histories
    advanced past the events (in place)."""
    recent = state.user_recent.t
    out = torch.empty(users.numel(), recent.shape[1], dtype=torch.int64)
    # python loop over events: each one depends on the ones before it of the same user
    rec = recent.numpy()
    for e, (u, j) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        out[e] = torch.from_numpy(rec[u])
        rec[u, 1:] = rec[u, :-1].copy()
        rec[u, 0] = j
    return out


def queries(state: ModelState, users: torch.Tensor, cfg: LearnerConfig) -> torch.Tensor:
    """Ranking queries [B, d] of user rows ``users`` (-1 = unknown: a zero query)."""
    if state.user_recent.n == 0:
        return torch.zeros(users.numel(), state.dim)
    hist = state.user_recent.t[users.clamp_min(0)]
    hist = torch.where(users[:, None] >= 0, hist, PAD)
    return fold_in(state.ctx_rows.t, hist, history_weights(cfg.history_decay, cfg.history_len))


def _candidates(
    state: ModelState, targets: torch.Tensor, cfg: LearnerConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item rows to score against (all of them, or the targets + sampled negatives) and the
    log-Q correction per candidate (None when exact)."""
    n = state.tgt_rows.n
    if n <= cfg.negatives:
        return torch.arange(n), None
    q = (state.item_count.t.double() + 1.0) ** 0.75
    q /= q.sum()
    neg = torch.multinomial(q, cfg.negatives, replacement=True, generator=gen)
    cand = torch.unique(torch.cat([targets, neg]))
    return cand, torch.log(cfg.negatives * q[cand]).float()


def _adagrad(
    table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float,
    eps: float = 1e-8,
) -> None:  # fmt: skip
    """Row-wise Adagrad on unique ``rows``: acc += mean(g^2) per row; row -= lr g / sqrt(acc)."""
    g2 = grad.pow(2).mean(1) if grad.dim() == 2 else grad.pow(2)
    acc[rows] += g2
    step = lr / (acc[rows].sqrt() + eps)
    table[rows] -= step[:, None] * grad if grad.dim() == 2 else step * grad


def step(
    state: ModelState, hist: torch.Tensor, targets: torch.Tensor, lr: float,
    cfg: LearnerConfig, gen: torch.Generator, undo: list[Callable[[], None]] | None = None,
) -> float:  # fmt: skip
    """One guarded softmax step on events (histories [n, L], target item rows [n]); returns the
    batch's mean cross-entropy before the step (nats). Touches only the rows the events name
    (and the sampled candidates). Non-finite loss or rows: the rows are restored and
    DivergenceError raised. ``undo``: where to append a callable that takes the step back."""
    if targets.numel() == 0:
        return math.nan
    cand, logq = _candidates(state, targets, cfg, gen)
    pos = torch.searchsorted(cand, targets)
    ctx_idx, inv = torch.unique(hist.clamp_min(0), return_inverse=True)
    ctx = state.ctx_rows.t[ctx_idx].requires_grad_()
    tgt = state.tgt_rows.t[cand].requires_grad_()
    bias = state.tgt_bias.t[cand].requires_grad_()
    valid = hist >= 0
    weights = history_weights(cfg.history_decay, cfg.history_len)
    rep = fold_in(ctx, torch.where(valid, inv, PAD), weights)  # hist re-indexed into ctx
    logits = rep @ tgt.T + bias
    if logq is not None:
        logits = logits - logq
    loss = F.cross_entropy(logits, pos)
    loss.backward()
    assert ctx.grad is not None and tgt.grad is not None and bias.grad is not None
    used = torch.zeros(ctx_idx.numel(), dtype=torch.bool)
    used[inv[valid]] = True  # padding slots point at row 0 with weight 0: not a use
    c_rows = ctx_idx[used]
    saved = [
        (getattr(state, name).t, rows, getattr(state, name).t[rows].clone())
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

    with torch.no_grad():
        _adagrad(state.ctx_rows.t, state.ctx_acc.t, c_rows, ctx.grad[used], lr)
        _adagrad(state.tgt_rows.t, state.tgt_acc.t, cand, tgt.grad, lr)
        _adagrad(state.tgt_bias.t, state.tgt_bias_acc.t, cand, bias.grad, lr)
    value = float(loss.detach())
    ok = math.isfinite(value) and all(bool(torch.isfinite(t[r]).all()) for t, r, _ in saved)
    if not ok:
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
    gen: torch.Generator,
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
            step(state, hist[b], targets[b], cfg.rank_fit_lr, cfg, gen)
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
        step(state, hist[sl], targets[sl], cfg.rank_fit_lr, cfg, gen)
    return best_epoch, losses
