"""Triton fused update (CUDA; on the CPU under TRITON_INTERPRET=1 for the tests).

Two kernels per micro-batch, no atomics, deterministic:
1. ``_events_kernel``: one program per block of events computes every prediction at the
   pre-step parameters, g_n = 2 (r_n - y_hat_n) / N and the squared error, and keeps the
   pre-step true rows of both sides (the gradient of one table needs the other's old rows).
2. ``_rows_kernel``: one program per distinct row of a table (events sorted stably by row, so
   duplicates form segments in event order, as FBGEMM's "exact" optimisers do) sums the
   segment's gradient and applies the decayed step to the raw row through the lazy scale,
   in SGD or row-wise Adagrad mode.
The scale and mu updates are O(1) and done by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SCALE_ITEM, SCALE_ITEM_BIAS, SCALE_USER, SCALE_USER_BIAS, steps_from


@triton.jit
def _events_kernel(
    u_ptr, v_ptr, bu_ptr, bv_ptr, users_ptr, items_ptr, r_ptr,
    g_ptr, sq_ptr, u_old_ptr, v_old_ptr,
    n, D, mu, s_u, s_v, s_bu, s_bv, two_over_n,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_e = offs_e < n
    users = tl.load(users_ptr + offs_e, mask=in_e, other=0)
    items = tl.load(items_ptr + offs_e, mask=in_e, other=0)
    dot = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = in_e[:, None] & (offs_d < D)[None, :]
        uu = tl.load(u_ptr + users[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        vv = tl.load(v_ptr + items[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        dot += tl.sum(uu * vv, axis=1)
        tl.store(u_old_ptr + offs_e[:, None] * D + offs_d[None, :], uu * s_u, mask=m)
        tl.store(v_old_ptr + offs_e[:, None] * D + offs_d[None, :], vv * s_v, mask=m)
    pred = mu + tl.load(bu_ptr + users, mask=in_e, other=0.0) * s_bu
    pred += tl.load(bv_ptr + items, mask=in_e, other=0.0) * s_bv + dot * (s_u * s_v)
    err = tl.load(r_ptr + offs_e, mask=in_e, other=0.0) - pred
    tl.store(g_ptr + offs_e, err * two_over_n, mask=in_e)
    tl.store(sq_ptr + offs_e, err * err, mask=in_e)


@triton.jit
def _rows_kernel(
    rows_ptr, bias_ptr, acc_rows_ptr, acc_bias_ptr,
    seg_start_ptr, order_ptr, idx_ptr, g_ptr, other_ptr,
    D, a_rows, a_bias, eps,
    ADAGRAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    stop = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(idx_ptr + tl.load(order_ptr + start))
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    grad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbv = tl.zeros((1,), dtype=tl.float32)  # a 1-vector: loop-carried types must not change
    for p in range(start, stop):  # the segment's events, in event order
        e = tl.load(order_ptr + p)
        ge = tl.load(g_ptr + e)
        grad += ge * tl.load(other_ptr + e * D + offs_d, mask=in_d, other=0.0)
        gbv += ge
    gb = tl.sum(gbv, axis=0)
    f_rows = a_rows
    f_bias = a_bias
    if ADAGRAD:
        acc_r = tl.load(acc_rows_ptr + row) + tl.sum(grad * grad, axis=0) / D
        acc_b = tl.load(acc_bias_ptr + row) + gb * gb
        tl.store(acc_rows_ptr + row, acc_r)
        tl.store(acc_bias_ptr + row, acc_b)
        f_rows = a_rows / (tl.sqrt(acc_r) + eps)
        f_bias = a_bias / (tl.sqrt(acc_b) + eps)
    ptr = rows_ptr + row * D + offs_d
    tl.store(ptr, tl.load(ptr, mask=in_d, other=0.0) + grad * f_rows, mask=in_d)
    tl.store(bias_ptr + row, tl.load(bias_ptr + row) + gb * f_bias)


def _step(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scales: torch.Tensor,
    mu: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    lr: float,
    weight_decay: float,
    learn_mu: bool,
    accumulators: tuple[torch.Tensor, ...] | None,
    eps: float,
    factors: list[float],
) -> float:
    """The Triton ``StepImpl`` (see reference.steps_from)."""
    n = users.numel()
    u, v, bu, bv = tables
    d = u.shape[1]
    dev = u.device
    s = scales.tolist()
    g = torch.empty(n, device=dev)
    sq = torch.empty(n, device=dev)
    u_old = torch.empty((n, d), device=dev)
    v_old = torch.empty((n, d), device=dev)
    block_d = min(128, triton.next_power_of_2(d))
    users, items = users.contiguous(), items.contiguous()
    _events_kernel[(triton.cdiv(n, 64),)](
        u, v, bu, bv, users, items, ratings.float().contiguous(), g, sq, u_old, v_old,
        n, d, float(mu), s[SCALE_USER], s[SCALE_ITEM], s[SCALE_USER_BIAS], s[SCALE_ITEM_BIAS],
        2.0 / n, BLOCK_E=64, BLOCK_D=block_d,
    )  # fmt: skip
    new = [x * (1.0 - lr * weight_decay) for x in s]
    acc = accumulators if accumulators is not None else (g, g, g, g)  # unused without Adagrad
    for idx, rows, bias, other, a_rows, a_bias, w_rows, w_bias in (
        (users, u, bu, v_old, acc[0], acc[2], SCALE_USER, SCALE_USER_BIAS),
        (items, v, bv, u_old, acc[1], acc[3], SCALE_ITEM, SCALE_ITEM_BIAS),
    ):
        order = torch.argsort(idx, stable=True)
        _, counts = torch.unique_consecutive(idx[order], return_counts=True)
        seg_start = torch.zeros(len(counts) + 1, dtype=torch.int64, device=dev)
        seg_start[1:] = torch.cumsum(counts, 0)
        _rows_kernel[(len(counts),)](
            rows, bias, a_rows, a_bias, seg_start, order, idx, g, other,
            d, factors[w_rows], factors[w_bias], float(eps),
            ADAGRAD=accumulators is not None, BLOCK_D=block_d,
        )  # fmt: skip
    scales.copy_(torch.tensor(new, dtype=torch.float64))
    if learn_mu:
        mu += lr * float(g.double().sum())
    return float(sq.double().mean())


mf_sgd_step, mf_adagrad_step = steps_from(_step)
