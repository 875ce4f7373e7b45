"""The torch reference kernels: the readable truth every fast backend is tested against.

Tables are stored lazily decayed (DESIGN.md, "Lazy exact decay"): the true table is
``W = s * W_raw`` with one float64 scale ``s`` per table, kept in ``scales``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Order of the four decayed tables in a ``scales`` tensor.
SCALE_USER, SCALE_ITEM, SCALE_USER_BIAS, SCALE_ITEM_BIAS = 0, 1, 2, 3

Exclude = Sequence[Sequence[int] | torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | None


def check_csr(indptr: Any, n_queries: int, nnz: int) -> None:
    """A CSR ``exclude``'s indptr: B + 1 entries from 0, never decreasing, ending at nnz."""
    ptr = np.asarray(indptr)
    if ptr.shape != (n_queries + 1,):
        raise ValueError("CSR exclude: indptr must have B + 1 entries")
    if ptr[0] != 0 or ptr[-1] != nnz or (np.diff(ptr) < 0).any():
        raise ValueError("CSR exclude: indptr must start at 0, never decrease and end at the "
                         "number of indices")  # fmt: skip


def exclusion_mask(exclude: Exclude, n_queries: int, n_items: int) -> torch.Tensor | None:
    """Bool [B, N], True where item j may not be returned for query b.

    exclude: one sequence of item indices per query (duplicates and out-of-range indices are
    ignored), or CSR form ``(indptr int64 [B+1], indices int64 [nnz])``.
    """
    if exclude is None:
        return None
    mask = torch.zeros(n_queries, n_items, dtype=torch.bool)
    if isinstance(exclude, tuple) and len(exclude) == 2 and isinstance(exclude[0], torch.Tensor):
        indptr, indices = torch.as_tensor(exclude[0]), torch.as_tensor(exclude[1])
        check_csr(indptr, n_queries, indices.numel())
        rows = torch.repeat_interleave(torch.arange(n_queries), indptr.diff())
        cols = indices.to(torch.int64)
    else:
        if len(exclude) != n_queries:
            raise ValueError(f"exclude has {len(exclude)} rows for {n_queries} queries")
        lists = [torch.as_tensor(e, dtype=torch.int64).reshape(-1) for e in exclude]
        rows = torch.repeat_interleave(
            torch.arange(n_queries), torch.tensor([len(x) for x in lists], dtype=torch.int64)
        )
        cols = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.int64)
    ok = (cols >= 0) & (cols < n_items)
    mask[rows[ok], cols[ok]] = True
    return mask


def score_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    item_bias: torch.Tensor | None = None,
    query_scale: float = 1.0,
    item_scale: float = 1.0,
    exclude: Exclude = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per query by ``query_scale * item_scale * row_scale[j] * <q, v_j> + b[j]``.

    queries: float [B, d]; items: [N, d] float32, float16, bfloat16, or int8 with
    ``row_scale`` float32 [N] (a quantised catalogue, see ``quantize_rows``); item_bias: float
    [N] or None. Scores are computed in float32; a NaN score counts as -inf.
    Returns (scores float32 [B, k], indices int64 [B, k]): rows sorted by score descending,
    ties by lower index; where fewer than k items are eligible the tail is index -1, score -inf.
    """
    check_score_args(queries, items, k, item_bias, row_scale)
    b, n = queries.shape[0], items.shape[0]
    table = items.float() if row_scale is None else items.float() * row_scale.float()[:, None]
    scores = (queries.float() @ table.T) * float(query_scale * item_scale)
    if item_bias is not None:
        scores = scores + item_bias.float()[None, :]
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    kk = min(k, n)
    if kk == 0 or b == 0:
        top, idx = torch.zeros(b, 0), torch.zeros(b, 0, dtype=torch.int64)
    else:
        banned = exclusion_mask(exclude, b, n)
        if banned is None:
            banned = torch.zeros(b, n, dtype=torch.bool)
        masked = scores.masked_fill(banned, float("-inf"))
        # Candidates: every item scoring at least the k-th best (ties included), then an exact
        # order on those few by (eligible first, score descending, index ascending).
        kth = torch.topk(masked, kk, dim=1).values[:, -1:]
        m = int((masked >= kth).sum(1).max())
        cand = torch.topk(masked, m, dim=1).indices
        cand = cand.gather(1, torch.argsort(cand, dim=1, stable=True))
        cand = cand.gather(1, torch.argsort(-scores.gather(1, cand), dim=1, stable=True))
        cand = cand.gather(1, torch.argsort(banned.gather(1, cand).to(torch.int8), dim=1,
                                            stable=True))  # fmt: skip
        idx = cand[:, :kk]
        top = scores.gather(1, idx)
        bad = banned.gather(1, idx)
        top = top.masked_fill(bad, float("-inf"))
        idx = idx.masked_fill(bad, -1)
    if kk < k:
        top = torch.cat([top, torch.full((b, k - kk), float("-inf"))], 1)
        idx = torch.cat([idx, torch.full((b, k - kk), -1, dtype=torch.int64)], 1)
    return top, idx


SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def check_score_args(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    item_bias: torch.Tensor | None,
    row_scale: torch.Tensor | None,
) -> None:
    """The argument checks every score_topk backend shares (clear errors, nothing computed)."""
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(items.shape)} do not match")
    if k < 0:
        raise ValueError("k must be >= 0")
    if items.dtype not in SCORE_DTYPES:
        raise ValueError(f"items must be one of {SCORE_DTYPES}, not {items.dtype}")
    if (items.dtype == torch.int8) != (row_scale is not None):
        raise ValueError("int8 items need row_scale (float32 [N]); other dtypes take none")
    n = items.shape[0]
    if item_bias is not None and item_bias.shape != (n,):
        raise ValueError(f"item_bias must have shape ({n},), not {tuple(item_bias.shape)}")
    if row_scale is not None and row_scale.shape != (n,):
        raise ValueError(f"row_scale must have shape ({n},), not {tuple(row_scale.shape)}")


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: (values int8 [N, d], row_scale float32 [N]) with
    table ~= values * row_scale[:, None]; a zero row gets scale 1."""
    t = table.float()
    amax = t.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    values = torch.round(t / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return values, scale


def predict(
    user_rows: torch.Tensor,
    item_rows: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    scales: torch.Tensor,
    mu: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
) -> torch.Tensor:
    """Predicted ratings, float32 [N]: mu + b_u[users] + b_v[items] + <U[users], V[items]>,
    with every table multiplied by its lazy-decay scale."""
    s = scales.tolist()
    dot = (user_rows[users] * item_rows[items]).sum(1) * (s[SCALE_USER] * s[SCALE_ITEM])
    return (
        float(mu) + user_bias[users] * s[SCALE_USER_BIAS] + item_bias[items] * s[SCALE_ITEM_BIAS]
    ) + dot


Gains = tuple[float, float, float, float]
NO_GAINS: Gains = (1.0, 1.0, 1.0, 1.0)


def step_factors(
    scales: torch.Tensor, lr: float, weight_decay: float, gains: Sequence[float]
) -> list[float]:
    """Per table w, what its stored (raw) rows take per unit of gradient in one step:
    lr * gains[w] / s_w', with s_w' = s_w * (1 - lr * weight_decay) the scale after the step.
    Raises ValueError (before anything changes) unless ``gains`` are 4 finite values >= 0 and
    lr * weight_decay < 1."""
    g = [float(x) for x in gains]
    if len(g) != 4 or not all(math.isfinite(x) and x >= 0 for x in g):
        raise ValueError(f"gains must be 4 finite values >= 0 (U, V, b_u, b_v), not {gains!r}")
    keep = 1.0 - lr * weight_decay
    if not keep > 0:
        raise ValueError(f"need lr * weight_decay < 1, not {lr!r} * {weight_decay!r}")
    return [lr * x / (s * keep) for x, s in zip(g, scales.tolist(), strict=True)]


def _prologue(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scales: torch.Tensor,
    mu: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    lr: float,
    weight_decay: float,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, list[float]]:
    """What both optimisers need, all at the pre-step parameters: per-event g_n = 2 (r_n -
    y_hat_n) / N (minus dL/dy_hat_n), the batch MSE, the true rows U[users] and V[items], and
    the decayed scales."""
    s = scales.tolist()
    err = ratings.float() - predict(*tables, scales, mu, users, items)
    u_true = tables[0][users] * s[SCALE_USER]
    v_true = tables[1][items] * s[SCALE_ITEM]
    new = [x * (1.0 - lr * weight_decay) for x in s]
    return err * (2.0 / users.numel()), float((err.double() ** 2).mean()), u_true, v_true, new


def mf_sgd_step(
    user_rows: torch.Tensor,
    item_rows: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    scales: torch.Tensor,
    mu: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    lr: float,
    weight_decay: float,
    learn_mu: bool = True,
    gains: Gains = NO_GAINS,
) -> float:
    """One decoupled-weight-decay SGD step on a micro-batch of N rating events, in place.

    Loss: L = (1/N) * sum_n (r_n - y_hat_n)^2 (mean squared error over the batch).
    Every row of the four decayed tables w (U, V, b_u, b_v) follows exactly
        theta <- theta - lr * gains[w] * dL/dtheta - lr * weight_decay * theta,
    with all gradients taken at the pre-step parameters; ``gains``: a gradient multiplier per
    table, in the order of the scales (the decay is the same for every table). Untouched rows
    only decay; duplicate rows sum their gradients (index_add_, deterministic on CPU). mu (a
    float64 [1] tensor) takes the plain gradient step and does not decay. The decay is O(1):
    each scale is multiplied by (1 - lr * weight_decay) and the gradient is applied to touched
    raw rows divided by the new scale. Returns the batch loss before the step.
    """
    f = step_factors(scales, lr, weight_decay, gains)
    if users.numel() == 0:
        return 0.0
    g, loss, u_true, v_true, new = _prologue(
        (user_rows, item_rows, user_bias, item_bias),
        scales,
        mu,
        users,
        items,
        ratings,
        lr,
        weight_decay,
    )
    user_rows.index_add_(0, users, g[:, None] * v_true, alpha=f[SCALE_USER])
    item_rows.index_add_(0, items, g[:, None] * u_true, alpha=f[SCALE_ITEM])
    user_bias.index_add_(0, users, g, alpha=f[SCALE_USER_BIAS])
    item_bias.index_add_(0, items, g, alpha=f[SCALE_ITEM_BIAS])
    scales.copy_(torch.tensor(new, dtype=torch.float64))
    if learn_mu:
        mu += lr * float(g.double().sum())
    return loss


def mf_adagrad_step(
    user_rows: torch.Tensor,
    item_rows: torch.Tensor,
    user_bias: torch.Tensor,
    item_bias: torch.Tensor,
    scales: torch.Tensor,
    mu: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    lr: float,
    weight_decay: float,
    accumulators: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    eps: float = 1e-8,
    learn_mu: bool = True,
    gains: Gains = NO_GAINS,
) -> float:
    """Row-wise Adagrad with decoupled weight decay (FBGEMM's "rowwise" mode), in place.

    For each touched row r of U and V, with G_r its gradient summed over the batch's duplicate
    events (d values): a_r <- a_r + mean(G_r^2), then
        theta_r <- theta_r - lr * gains[w] * G_r / (sqrt(a_r) + eps) - lr * wd * theta_r
    (wd = weight_decay, w the table);
    biases are rows of one value (a <- a + G^2). Untouched rows only decay (lazily, through the
    scales, as in ``mf_sgd_step``); the accumulators do not decay. accumulators: float32
    (a_user [n_users], a_item [n_items], a_user_bias [n_users], a_item_bias [n_items]), updated
    in place. mu takes the plain SGD step if learn_mu. Returns the batch loss before the step.
    """
    f = step_factors(scales, lr, weight_decay, gains)
    if users.numel() == 0:
        return 0.0
    g, loss, u_true, v_true, new = _prologue(
        (user_rows, item_rows, user_bias, item_bias),
        scales,
        mu,
        users,
        items,
        ratings,
        lr,
        weight_decay,
    )
    a_user, a_item, a_user_bias, a_item_bias = accumulators
    # Sum each row's gradient over its duplicate events, then one Adagrad step per unique row.
    for idx, rows, bias, contrib, a_rows, a_bias, w_rows, w_bias in (
        (users, user_rows, user_bias, g[:, None] * v_true, a_user, a_user_bias,
         SCALE_USER, SCALE_USER_BIAS),
        (items, item_rows, item_bias, g[:, None] * u_true, a_item, a_item_bias,
         SCALE_ITEM, SCALE_ITEM_BIAS),
    ):  # fmt: skip
        uniq, inv = idx.unique(return_inverse=True)
        grad = torch.zeros(len(uniq), rows.shape[1]).index_add_(0, inv, contrib)
        grad_b = torch.zeros(len(uniq)).index_add_(0, inv, g)
        a_rows[uniq] += (grad * grad).mean(1)
        a_bias[uniq] += grad_b * grad_b
        rows[uniq] += grad / (a_rows[uniq].sqrt() + eps)[:, None] * f[w_rows]
        bias[uniq] += grad_b / (a_bias[uniq].sqrt() + eps) * f[w_bias]
    scales.copy_(torch.tensor(new, dtype=torch.float64))
    if learn_mu:
        mu += lr * float(g.double().sum())
    return loss


Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# A backend's one update entry: (tables, scales, mu, users, items, ratings, lr, weight_decay,
# learn_mu, accumulators or None for SGD, eps, factors) -> batch loss, where factors is
# step_factors(scales, lr, weight_decay, gains); never called with an empty batch.
StepImpl = Callable[
    [Tables, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float,
     bool, "Tables | None", float, list[float]],
    float,
]  # fmt: skip


def steps_from(impl: StepImpl) -> tuple[Callable[..., float], Callable[..., float]]:
    """A fast backend's ``mf_sgd_step`` and ``mf_adagrad_step``: the signatures, semantics and
    empty-batch rule of this module's, on top of the backend's one step function."""

    def sgd(
        user_rows: torch.Tensor,
        item_rows: torch.Tensor,
        user_bias: torch.Tensor,
        item_bias: torch.Tensor,
        scales: torch.Tensor,
        mu: torch.Tensor,
        users: torch.Tensor,
        items: torch.Tensor,
        ratings: torch.Tensor,
        lr: float,
        weight_decay: float,
        learn_mu: bool = True,
        gains: Gains = NO_GAINS,
    ) -> float:
        f = step_factors(scales, lr, weight_decay, gains)
        if users.numel() == 0:
            return 0.0
        tables = (user_rows, item_rows, user_bias, item_bias)
        return impl(tables, scales, mu, users, items, ratings, lr, weight_decay, learn_mu,
                    None, 0.0, f)  # fmt: skip

    def adagrad(
        user_rows: torch.Tensor,
        item_rows: torch.Tensor,
        user_bias: torch.Tensor,
        item_bias: torch.Tensor,
        scales: torch.Tensor,
        mu: torch.Tensor,
        users: torch.Tensor,
        items: torch.Tensor,
        ratings: torch.Tensor,
        lr: float,
        weight_decay: float,
        accumulators: Tables,
        eps: float = 1e-8,
        learn_mu: bool = True,
        gains: Gains = NO_GAINS,
    ) -> float:
        f = step_factors(scales, lr, weight_decay, gains)
        if users.numel() == 0:
            return 0.0
        tables = (user_rows, item_rows, user_bias, item_bias)
        return impl(tables, scales, mu, users, items, ratings, lr, weight_decay, learn_mu,
                    accumulators, eps, f)  # fmt: skip

    sgd.__doc__, adagrad.__doc__ = mf_sgd_step.__doc__, mf_adagrad_step.__doc__
    return sgd, adagrad


# ---------------------------------------------------------------------------------------------
# the ranking head (lrec_fast/ranking.py): histories and the softmax step

PAD = -1  # an empty history slot


def advance_histories(
    recent: torch.Tensor, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    """The history each event sees, int64 [n, L], with ``recent`` [n_users, L] (item rows,
    newest first, PAD = empty) advanced past the events in place: event e (time order) sees
    its user's row as it stands after the events before it, then pushes its item in front."""
    out = torch.empty(users.numel(), recent.shape[1], dtype=torch.int64)
    for e, (u, j) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        out[e] = recent[u]
        recent[u] = torch.cat([recent.new_tensor([j]), recent[u, :-1]])
    return out


def fold_in(ctx: torch.Tensor, hist: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Queries [B, d] from histories [B, L] (rows of ``ctx`` [n, d], PAD = empty): the mean of
    the rows weighted by ``weights`` [>= L] (0 for an empty history)."""
    valid = hist >= 0
    w = weights[None, : hist.shape[1]] * valid
    rows = ctx[hist.clamp_min(0)] * w[..., None]
    return rows.sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def user_queries(
    ctx: torch.Tensor, recent: torch.Tensor, users: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``fold_in`` of user rows ``users``' histories (int64 [B]; -1 = unknown: a zero query),
    their rows of ``recent`` [n_users, L]: the ranking queries ``recommend`` scores with,
    float32 [B, d]."""
    if recent.shape[0] == 0:  # no user has a history yet
        return torch.zeros(users.numel(), ctx.shape[1])
    hist = torch.where(users[:, None] >= 0, recent[users.clamp_min(0)], PAD)
    return fold_in(ctx, hist, weights)


def rowwise_adagrad(
    table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float,
    eps: float = 1e-8,
) -> None:  # fmt: skip
    """Row-wise Adagrad on unique ``rows``: acc += mean(g^2) per row (g^2 for a 1-d table);
    row -= lr g / (sqrt(acc) + eps)."""
    g2 = grad.pow(2).mean(1) if grad.dim() == 2 else grad.pow(2)
    acc[rows] += g2
    step = lr / (acc[rows].sqrt() + eps)
    table[rows] -= step[:, None] * grad if grad.dim() == 2 else step * grad


def softmax_step(
    ctx: torch.Tensor, ctx_acc: torch.Tensor, tgt: torch.Tensor, tgt_acc: torch.Tensor,
    tgt_bias: torch.Tensor, tgt_bias_acc: torch.Tensor, hist: torch.Tensor,
    weights: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, logq: torch.Tensor | None,
    lr: float, eps: float = 1e-8,
) -> tuple[float, bool]:  # fmt: skip
    """One row-wise Adagrad step of the ranking head's softmax cross-entropy, in place.

    Events e = 0..n-1 have histories ``hist`` [n, L] (int64 rows of ``ctx``, PAD = -1) and
    target ``cand[pos[e]]``; ``cand`` [C] int64 holds sorted unique rows of ``tgt`` /
    ``tgt_bias`` to score against, ``logq`` [C] float32 their log-Q correction (None: exact).
        q_e = fold_in(ctx, hist_e, weights),
        z_ec = <q_e, tgt[cand_c]> + tgt_bias[cand_c] - logq_c,
        L = mean_e (logsumexp_c z_ec - z_e,pos_e)
    Gradients at the pre-step values, each row's summed over the batch (duplicates included),
    then ``rowwise_adagrad`` on every ctx row a valid history slot names and every candidate.
    Tables float32 [rows, d] or [rows]; accumulators float32 [rows]. Returns (L in nats before
    the step, whether every value written is finite); n > 0.
    """
    ctx_idx, inv = torch.unique(hist.clamp_min(0), return_inverse=True)
    c = ctx[ctx_idx].requires_grad_()
    t = tgt[cand].requires_grad_()
    b = tgt_bias[cand].requires_grad_()
    valid = hist >= 0
    rep = fold_in(c, torch.where(valid, inv, PAD), weights)  # hist re-indexed into c
    logits = rep @ t.T + b
    if logq is not None:
        logits = logits - logq
    loss = F.cross_entropy(logits, pos)
    loss.backward()
    assert c.grad is not None and t.grad is not None and b.grad is not None
    used = torch.zeros(ctx_idx.numel(), dtype=torch.bool)
    used[inv[valid]] = True  # padding slots point at row 0 with weight 0: not a use
    rows = ctx_idx[used]
    with torch.no_grad():
        rowwise_adagrad(ctx, ctx_acc, rows, c.grad[used], lr, eps)
        rowwise_adagrad(tgt, tgt_acc, cand, t.grad, lr, eps)
        rowwise_adagrad(tgt_bias, tgt_bias_acc, cand, b.grad, lr, eps)
    finite = all(
        bool(torch.isfinite(x[r]).all())
        for x, r in ((ctx, rows), (ctx_acc, rows), (tgt, cand), (tgt_acc, cand),
                     (tgt_bias, cand), (tgt_bias_acc, cand))
    )  # fmt: skip
    return float(loss.detach()), finite


def rerank(
    scores: torch.Tensor, top: torch.Tensor, rating: Callable[[torch.Tensor], torch.Tensor],
    weight: float, depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Re-order each query's first ``depth`` candidates (``top``: item rows [B, m], best
    first, -1 = padding; ``scores`` float32 [B, m]) by ranking score + ``weight`` x predicted
    rating (``rating``: item rows [B, depth] -> float32 [B, depth], the query's user), ties by
    the lower item row, padding last; their scores become those sums (``LearnerConfig``'s
    rerank_weight and rerank_depth). The candidates after them keep their order, their scores
    lowered by ``shift`` so that they stay below. Returns new tensors (scores, top, shift
    float32 [B] >= 0)."""
    depth = min(depth, top.shape[1])
    shift = torch.zeros(top.shape[0])
    if weight == 0 or depth == 0 or top.shape[0] == 0:
        return scores, top, shift
    cand = top[:, :depth]
    valid = cand >= 0
    blended = scores[:, :depth] + weight * rating(cand.clamp_min(0))
    blended = torch.where(valid, blended, torch.tensor(-torch.inf))
    tie = torch.where(valid, cand, torch.iinfo(torch.int64).max)  # padding after every item
    by_row = torch.sort(tie, dim=1, stable=True).indices  # ties by the lower item row ...
    by_score = torch.sort(blended.gather(1, by_row), dim=1, descending=True, stable=True)
    order = by_row.gather(1, by_score.indices)  # ... then by the blended score
    scores, top = scores.clone(), top.clone()
    scores[:, :depth] = blended.gather(1, order)
    top[:, :depth] = cand.gather(1, order)
    if top.shape[1] > depth:  # the best of the rest goes 1 below the worst re-ranked
        low = torch.where(valid, blended, torch.tensor(torch.inf)).min(1).values
        nxt = scores[:, depth]
        gap = torch.where((top[:, depth] >= 0) & valid.any(1), nxt - low + 1.0, 0.0)
        shift = gap.clamp_min(0.0)
        scores[:, depth:] -= shift[:, None]
    return scores, top, shift


def rerank_mf(
    scores: torch.Tensor, top: torch.Tensor, users: torch.Tensor, user_rows: torch.Tensor,
    item_rows: torch.Tensor, user_bias: torch.Tensor, item_bias: torch.Tensor,
    scales: torch.Tensor, mu: torch.Tensor, weight: float, depth: int,
    knn: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``rerank`` with the biased factorisation's predicted rating (``predict``) of query b's
    user row ``users[b]`` (int64 [B]): what ``recommend`` re-ranks with. ``knn`` = (values,
    weights[, added]), float32 [B, depth] each for the first min(depth, m) candidates: the
    item-neighbourhood predictions, blended in as (1 - w) x rating + w x value where w > 0,
    then the amounts added (the user-neighbourhood correction). Returns new tensors (scores,
    top, shift)."""

    def rating(items: torch.Tensor) -> torch.Tensor:
        flat_users = users[:, None].expand_as(items).reshape(-1)
        r = predict(user_rows, item_rows, user_bias, item_bias, scales, mu, flat_users,
                    items.reshape(-1)).view(items.shape)  # fmt: skip
        if knn is not None:
            r = torch.where(knn[1] > 0, (1 - knn[1]) * r + knn[1] * knn[0], r)
            if len(knn) > 2:
                r = r + knn[2]
        return r

    return rerank(scores, top, rating, weight, depth)


# ---------------------------------------------------------------------------------------------
# the item-neighbourhood correction (lrec_fast/neighbours.py)


def item_neighbours(
    users: torch.Tensor, items: torch.Tensor, residuals: torch.Tensor, n_items: int, size: int,
    shrink: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each item's ``size`` most similar items. Events: user rows, item rows (int64 [E], each
    (user, item) pair at most once) and their baseline residuals e (float64 [E]). For items
    i != j with co-raters C (users who rated both):
        sim(i, j) = sum_C e_i e_j / sqrt(sum_C e_i^2 * sum_C e_j^2) * |C| / (|C| + shrink)
    (0 where a sum of squares is 0), rounded to float32. Keeps the positive ones, most similar
    first, ties by the lower item row; returns (rows int64 [n_items, size], padded with -1;
    sims float32, 0 pad).
    Dense here (n_items^2 memory): the readable truth the compiled kernel is tested against."""
    n_users = int(users.max()) + 1 if users.numel() else 0
    x = torch.zeros(n_users, n_items, dtype=torch.float64)
    b = torch.zeros(n_users, n_items, dtype=torch.float64)
    x[users, items] = residuals.double()
    b[users, items] = 1.0
    num, count, sq = x.T @ x, b.T @ b, (x * x).T @ b  # sq[i, j]: sum over C of e_i^2
    den = torch.sqrt(sq * sq.T)
    sim = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0) * count / (count + shrink)
    return _most_similar(sim.fill_diagonal_(0.0), size)


def _most_similar(sim: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``sim`` (float64 [M, n]; 0 where none): the ``size`` largest positive
    entries' columns and values, as float32 (ordered in float32: equal sums tie), most
    similar first, ties by the lower column; -1 / 0 pad."""
    sim = sim.float()
    order = torch.sort(-sim, dim=1, stable=True).indices[:, :size]
    top = torch.gather(sim, 1, order)
    keep = top > 0
    rows = torch.full((sim.shape[0], size), -1, dtype=torch.int64)
    sims = torch.zeros(sim.shape[0], size, dtype=torch.float32)
    w = order.shape[1]
    rows[:, :w] = torch.where(keep, order, -1)
    sims[:, :w] = torch.where(keep, top, 0.0)
    return rows, sims


# Who rated each item (``lrec_fast.raters.Raters``): item j's raters are
# users[start[j] : start[j] + count[j]], with their ratings, sorted by user row (the references
# take any order; numba's user_knn_predict binary-searches the items with many raters).
RaterArrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _rater_events(raters: RaterArrays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user rows, item rows, ratings float64) of every entry of ``raters``."""
    start, count, users, ratings = raters
    items = torch.repeat_interleave(torch.arange(start.numel()), count)
    first = torch.repeat_interleave(start - torch.cumsum(count, 0) + count, count)
    idx = first + torch.arange(items.numel())
    return users[idx], items, ratings[idx].double()


def user_neighbours(
    which: torch.Tensor, hist_indptr: torch.Tensor, hist_items: torch.Tensor,
    hist_ratings: torch.Tensor, raters: RaterArrays, user_base: torch.Tensor,
    item_base: torch.Tensor, size: int, shrink: float, max_raters: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The ``size`` most similar users of each user row ``which[m]`` (int64 [M]), whose rated
    item rows and ratings are ``hist_items[hist_indptr[m]:hist_indptr[m+1]]`` (the same entries
    ``raters`` holds for that user). Residuals e = r - item_base[i] - user_base[u] (float64
    [n_items], [n_users]); for users a != v with co-rated items C:
        sim(a, v) = sum_C e_a e_v / sqrt(sum_C e_a^2 * sum_C e_v^2) * |C| / (|C| + shrink),
    the positive ones kept as ``item_neighbours`` keeps them: (rows int64 [M, size], -1 pad;
    sims float32, 0 pad). Items with more than ``max_raters`` raters (0: no limit) are in no C.
    Dense here (M x n_items and n_users x n_items)."""
    n_users, n_items = user_base.numel(), item_base.numel()
    m = which.numel()
    mine = torch.repeat_interleave(torch.arange(m), torch.diff(hist_indptr))
    counted = torch.ones(n_items, dtype=torch.float64)  # 0: an item left out of C
    if max_raters > 0:
        counted[: raters[1].numel()] = (raters[1] <= max_raters).double()
    xa = torch.zeros(m, n_items, dtype=torch.float64)
    xa[mine, hist_items] = hist_ratings.double() - item_base[hist_items] - user_base[which[mine]]
    ba = torch.zeros(m, n_items, dtype=torch.float64)
    ba[mine, hist_items] = 1.0
    xa, ba = xa * counted, ba * counted
    users, items, ratings = _rater_events(raters)
    x = torch.zeros(n_users, n_items, dtype=torch.float64)
    x[users, items] = ratings - item_base[items] - user_base[users]
    b = torch.zeros(n_users, n_items, dtype=torch.float64)
    b[users, items] = 1.0
    num, count = xa @ x.T, ba @ b.T
    den = torch.sqrt(((xa * xa) @ b.T) * (ba @ (x * x).T))
    sim = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0) * count / (count + shrink)
    sim[torch.arange(m), which] = 0.0
    return _most_similar(sim, size)


def user_knn_predict(
    users: torch.Tensor, items: torch.Tensor, nbr_rows: torch.Tensor, nbr_sims: torch.Tensor,
    raters: RaterArrays, user_base: torch.Tensor, item_base: torch.Tensor, k: int, reg: float,
) -> torch.Tensor:  # fmt: skip
    """The user-kNN correction of events (user row ``users[e]``, -1: unknown; item row
    ``items[e]``): over N = the first k of the user's neighbours (``nbr_rows[a]``, most similar
    first; none past the table's end) that rated the item, with v's residual on it
    e_v = r_v - item_base[j] - user_base[v],
        sum_N s_av e_v / (sum_N s_av + reg)   (0 where N is empty),
    float32 [E]."""
    out = torch.zeros(items.numel(), dtype=torch.float32)
    start, count, r_users, r_ratings = raters
    for e in range(items.numel()):
        a, j = int(users[e]), int(items[e])
        if not (0 <= a < nbr_rows.shape[0] and j < start.numel()):
            continue
        lo = int(start[j])
        who, rated = r_users[lo : lo + int(count[j])], r_ratings[lo : lo + int(count[j])]
        nbrs = nbr_rows[a]
        pick = torch.nonzero((nbrs >= 0) & torch.isin(nbrs, who)).flatten()[:k]
        if pick.numel() == 0:
            continue
        v = nbrs[pick]
        where = (who[None, :] == v[:, None]).long().argmax(1)
        resid = rated[where].double() - item_base[j] - user_base[v]
        s = nbr_sims[a, pick].double()
        den = float(s.sum()) + reg
        out[e] = float((s * resid).sum()) / den if den > 0 else 0.0
    return out


def knn_predict(
    indptr: torch.Tensor, hist_items: torch.Tensor, hist_ratings: torch.Tensor,
    hist_ages: torch.Tensor, slots: torch.Tensor, items: torch.Tensor, nbr_rows: torch.Tensor,
    nbr_sims: torch.Tensor, item_bias: torch.Tensor, mu: float, user_reg: float,
    user_decay: float, k: int, reg: float, decay: float, lo: float, hi: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Item-kNN predicted ratings of events (history ``slots[e]``, item row ``items[e]``).
    History s: sorted item rows ``hist_items[indptr[s]:indptr[s+1]]`` with their ratings and
    ages (0: the user's latest rating, 1 the one before, ...). With b_h = ``item_bias[h]`` (0
    past its end), recency weights w_h = user_decay ** age_h and the user's bias from their
    history, b_a = sum_h w_h (r_h - mu - b_h) / (sum_h w_h + user_reg), the prediction is
        clip(mu + b_a + b_j + sum_N c_h (r_h - mu - b_a - b_h) / (sum_N c_h + reg), lo, hi),
    c_h = s_jh decay ** age_h, over N = the first k of item j's neighbours (``nbr_rows[j]``,
    most similar first; none past the table's end) that the user rated. Returns (float32 [E],
    has [E] bool: False for an empty history, whose value is 0)."""
    out = torch.zeros(items.numel(), dtype=torch.float32)
    has = torch.zeros(items.numel(), dtype=torch.bool)
    n_b = item_bias.numel()

    def bias(rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows.numel(), dtype=torch.float64)
        inside = rows < n_b
        out[inside] = item_bias.double()[rows[inside]]
        return out

    for e in range(items.numel()):
        s, j = int(slots[e]), int(items[e])
        lo_s, hi_s = int(indptr[s]), int(indptr[s + 1])
        h = hist_items[lo_s:hi_s]
        if h.numel() == 0:
            continue
        r = hist_ratings[lo_s:hi_s].double()
        age = hist_ages[lo_s:hi_s].double()
        w = torch.pow(torch.tensor(user_decay, dtype=torch.float64), age)
        b_a = float((w * (r - mu - bias(h))).sum()) / (float(w.sum()) + user_reg)
        num = den = 0.0
        if j < nbr_rows.shape[0]:
            nbrs, sims = nbr_rows[j], nbr_sims[j].double()
            rated = (nbrs >= 0) & torch.isin(nbrs, h)
            pick = torch.nonzero(rated).flatten()[:k]
            where = torch.searchsorted(h, nbrs[pick])
            c = sims[pick] * torch.pow(torch.tensor(decay, dtype=torch.float64), age[where])
            num = float((c * (r[where] - mu - b_a - bias(nbrs[pick]))).sum())
            den = float(c.sum())
        b_j = float(bias(torch.tensor([j]))[0])
        corr = num / (den + reg) if den + reg > 0 else 0.0  # none rated, at reg 0: none
        out[e] = min(max(mu + b_a + b_j + corr, lo), hi)
        has[e] = True
    return out, has


# ---------------------------------------------------------------------------------------------
# the re-rank with both neighbourhood corrections (what ``recommend`` re-ranks by)


class History(NamedTuple):
    """Rating histories as a CSR, one row per query: row b's sorted item rows
    ``items[indptr[b]:indptr[b + 1]]`` (int64), their latest ratings (float32, all known) and
    ages (int64, 0: the latest)."""

    indptr: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    ages: torch.Tensor


class ItemKnn(NamedTuple):
    """The item-neighbourhood blend (``lrec_fast.neighbours``): ``knn_predict``'s tables and
    settings, and the blend weight ``weight`` x n / (n + ``ramp``) of a user with n ratings."""

    rows: torch.Tensor
    sims: torch.Tensor
    bias: torch.Tensor
    mu: float
    user_reg: float
    user_decay: float
    k: int
    reg: float
    decay: float
    lo: float
    hi: float
    weight: float
    ramp: float


class UserKnn(NamedTuple):
    """The user-neighbourhood correction (``lrec_fast.user_neighbours``): ``user_knn_predict``'s
    tables and settings, the correction added at ``weight``."""

    rows: torch.Tensor
    sims: torch.Tensor
    raters: RaterArrays
    user_base: torch.Tensor
    item_base: torch.Tensor
    k: int
    reg: float
    weight: float


def blend_terms(
    top: torch.Tensor, users: torch.Tensor, depth: int, hist: History | None,
    item_knn: ItemKnn | None, user_knn: UserKnn | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``rerank_mf``'s ``knn`` for the first min(``depth``, m) candidates of ``top`` [B, m]
    (query b: user row ``users[b]``, history row b of ``hist``): the item-kNN predictions,
    their blend weights (0 for a user without ratings) and the weighted user-kNN corrections,
    float32 [B, depth] each, all three 0 for padding (-1); zeros for a part that is None."""
    cand = top[:, :depth]
    b, m = cand.shape
    valid = cand >= 0
    flat = cand.clamp_min(0).reshape(-1)
    val, w, add = torch.zeros(b, m), torch.zeros(b, m), torch.zeros(b, m)
    if item_knn is not None and hist is not None and flat.numel():
        slots = torch.arange(b).repeat_interleave(m)
        v, _ = knn_predict(*hist[:4], slots, flat, item_knn.rows, item_knn.sims, item_knn.bias,
                           item_knn.mu, item_knn.user_reg, item_knn.user_decay, item_knn.k,
                           item_knn.reg, item_knn.decay, item_knn.lo, item_knn.hi)  # fmt: skip
        n = (hist.indptr[1:] - hist.indptr[:-1])[slots].float()
        nw = item_knn.weight * n / (n + item_knn.ramp).clamp_min(1e-12)
        val = torch.where(valid, v.view(b, m), 0.0)
        w = torch.where(valid & (n > 0).view(b, m), nw.view(b, m), 0.0)
    if user_knn is not None and flat.numel():
        c = user_knn_predict(users.repeat_interleave(m), flat, user_knn.rows, user_knn.sims,
                             user_knn.raters, user_knn.user_base, user_knn.item_base, user_knn.k,
                             user_knn.reg)  # fmt: skip
        add = torch.where(valid, user_knn.weight * c.view(b, m), 0.0)
    return val, w, add


def rerank_blend_from(
    terms: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rerank: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A backend's ``rerank_blend`` from its ``blend_terms`` and ``rerank_mf``."""

    def rerank_blend(
        scores: torch.Tensor, top: torch.Tensor, users: torch.Tensor, user_rows: torch.Tensor,
        item_rows: torch.Tensor, user_bias: torch.Tensor, item_bias: torch.Tensor,
        scales: torch.Tensor, mu: torch.Tensor, weight: float, depth: int,
        hist: History | None, item_knn: ItemKnn | None, user_knn: UserKnn | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``rerank_mf`` by the rating ``predict`` gives (offsets aside): the factor model's,
        blended with the item-kNN prediction and plus the user-kNN correction
        (``blend_terms``; either may be None). Returns new tensors (scores, top, shift)."""
        depth = min(depth, top.shape[1])
        knn = None
        if weight and depth and top.shape[0] and (item_knn is not None or user_knn is not None):
            knn = terms(top, users, depth, hist, item_knn, user_knn)
        return rerank(scores, top, users, user_rows, item_rows, user_bias, item_bias, scales,
                      mu, weight, depth, knn)  # fmt: skip

    return rerank_blend


rerank_blend = rerank_blend_from(blend_terms, rerank_mf)
