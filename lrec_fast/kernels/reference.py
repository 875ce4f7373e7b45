"""The torch reference kernels: the readable truth every fast backend is tested against.

Tables are stored lazily decayed (DESIGN.md, "Lazy exact decay"): the true table is
``W = s * W_raw`` with one float64 scale ``s`` per table, kept in ``scales``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Order of the four decayed tables in a ``scales`` tensor.
SCALE_USER, SCALE_ITEM, SCALE_USER_BIAS, SCALE_ITEM_BIAS = 0, 1, 2, 3

Exclude = Sequence[Sequence[int] | torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | None


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
        if indptr.numel() != n_queries + 1:
            raise ValueError("CSR exclude: indptr must have B + 1 entries")
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per query by ``query_scale * item_scale * <q, v_j> + item_bias[j]``.

    queries: float [B, d]; items: float [N, d]; item_bias: float [N] or None.
    Returns (scores float32 [B, k], indices int64 [B, k]): rows sorted by score descending,
    ties by lower index; where fewer than k items are eligible the tail is index -1, score -inf.
    """
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(items.shape)} do not match")
    if k < 0:
        raise ValueError("k must be >= 0")
    b, n = queries.shape[0], items.shape[0]
    scores = (queries.float() @ items.float().T) * float(query_scale * item_scale)
    if item_bias is not None:
        scores = scores + item_bias.float()[None, :]
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
) -> float:
    """One decoupled-weight-decay SGD step on a micro-batch of N rating events, in place.

    Loss: L = (1/N) * sum_n (r_n - y_hat_n)^2 (mean squared error over the batch).
    Every row of the four decayed tables (U, V, b_u, b_v) follows exactly
        theta <- theta - lr * dL/dtheta - lr * weight_decay * theta,
    with all gradients taken at the pre-step parameters. Untouched rows only decay; duplicate
    rows sum their gradients (index_add_, deterministic on CPU). mu (a float64 [1] tensor) takes
    the plain gradient step and does not decay. The decay is O(1): each scale is multiplied by
    (1 - lr * weight_decay) and the gradient is applied to touched raw rows divided by the new
    scale. Returns the batch loss before the step.
    """
    n = users.numel()
    if n == 0:
        return 0.0
    s = scales.tolist()
    err = ratings.float() - predict(user_rows, item_rows, user_bias, item_bias, scales, mu,
                                    users, items)  # fmt: skip
    loss = float((err.double() ** 2).mean())
    # dL/dy_hat_n = -2 e_n / N; minus sign folded into "add".
    g = err * (2.0 / n)
    u_true = user_rows[users] * s[SCALE_USER]
    v_true = item_rows[items] * s[SCALE_ITEM]
    keep = 1.0 - lr * weight_decay
    new = [x * keep for x in s]
    user_rows.index_add_(0, users, g[:, None] * v_true, alpha=lr / new[SCALE_USER])
    item_rows.index_add_(0, items, g[:, None] * u_true, alpha=lr / new[SCALE_ITEM])
    user_bias.index_add_(0, users, g, alpha=lr / new[SCALE_USER_BIAS])
    item_bias.index_add_(0, items, g, alpha=lr / new[SCALE_ITEM_BIAS])
    scales.copy_(torch.tensor(new, dtype=torch.float64))
    if learn_mu:
        mu += lr * float(g.double().sum())
    return loss
