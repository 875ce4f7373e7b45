"""Triton scoring + top-k (CUDA; on the CPU under TRITON_INTERPRET=1 for the tests).

Stage 1, one program per (block of queries, tile of items): scores by ``tl.dot`` (IEEE fp32
accumulation, no TF32), scale, bias, NaN -> -inf and the exclusion bitmask applied in
registers, then each query's tile is sorted on a packed int64 key and its best k are stored.
Only [B, tiles, k] keys reach memory, never the B x N scores. Stage 2 (torch) picks the best k
of the candidates with ``torch.topk`` on the same keys.

Key = (order-preserving int32 of the score) << 32 | (2^32 - 1 - index): a larger key is a
higher score, and among equal scores the lower index, which is exactly the reference order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import Exclude, check_score_args

KEY_NONE = -(2**63)  # excluded or out-of-range items: below every real key


@triton.jit
def _tile_topk_kernel(
    q_ptr, v_ptr, bias_ptr, rs_ptr, mask_ptr, out_ptr,
    B, N, D, alpha, n_words, n_tiles,
    stride_q, stride_v,
    HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_b = offs_b < B
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        in_d = d0 + offs_d < D
        q = tl.load(
            q_ptr + offs_b[:, None] * stride_q + d0 + offs_d[None, :],
            mask=in_b[:, None] & in_d[None, :],
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + offs_n[:, None] * stride_v + d0 + offs_d[None, :],
            mask=in_n[:, None] & in_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(q, tl.trans(v), input_precision="ieee")
    if HAS_RS:
        acc = acc * tl.load(rs_ptr + offs_n, mask=in_n, other=1.0)[None, :]
    score = acc * alpha
    if HAS_BIAS:
        score = score + tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    score = tl.where(score != score, float("-inf"), score) + 0.0  # NaN -> -inf, -0 -> +0
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    low = 4294967295 - offs_n.to(tl.int64)
    key = (ordered << 32) | low[None, :]
    ok = in_b[:, None] & in_n[None, :]
    if HAS_MASK:
        words = tl.load(
            mask_ptr + offs_b[:, None] * n_words + (offs_n // 32)[None, :], mask=ok, other=0
        )
        ok = ok & (((words >> (offs_n % 32)[None, :]) & 1) == 0)
    key = tl.where(ok, key, -9223372036854775808)
    key = tl.sort(key, dim=1, descending=True)
    cols = tl.arange(0, BLOCK_N)
    dst = out_ptr + (offs_b[:, None] * n_tiles + pid_t) * K + cols[None, :]
    tl.store(dst, key, mask=in_b[:, None] & (cols[None, :] < K))


def exclusion_bitmask(exclude: Exclude, b: int, n: int, device: torch.device) -> torch.Tensor:
    """Exclusions as bits: int32 [B, ceil(N / 32)], bit j % 32 of word j // 32 set if banned."""
    from .cpu import exclusion_csr  # plain numpy, shared with the CPU backend

    ptr, idx = exclusion_csr(exclude, b)
    rows = torch.repeat_interleave(torch.arange(b), torch.from_numpy(ptr).diff())
    cols = torch.from_numpy(idx)
    ok = (cols >= 0) & (cols < n)
    rows, cols = rows[ok], cols[ok]
    n_words = (n + 31) // 32
    flat = torch.zeros(b * n_words * 32, dtype=torch.bool)
    flat[rows * n_words * 32 + cols] = True
    bits = flat.view(b * n_words, 32).to(torch.int64) << torch.arange(32)
    words = bits.sum(1)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.view(b, n_words).to(device)


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed keys -> (scores float32, indices int64); KEY_NONE -> (-inf, -1)."""
    none = keys == KEY_NONE
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(none, float("-inf"))
    idx = (4294967295 - (keys & 0xFFFFFFFF)).masked_fill(none, -1)
    return scores, idx


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
    """``reference.score_topk`` in two Triton/torch stages; tensors stay on their device."""
    check_score_args(queries, items, k, item_bias, row_scale)
    b, n = queries.shape[0], items.shape[0]
    dev = items.device
    out_s = torch.full((b, k), float("-inf"), device=dev)
    out_i = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    if b == 0 or k == 0 or n == 0:
        return out_s, out_i
    d = items.shape[1]
    kk = min(k, n)
    block_n = max(128, triton.next_power_of_2(kk))
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    block_b = 16  # tl.dot's smallest tile; idle rows cost nothing on a memory-bound scan
    n_tiles = triton.cdiv(n, block_n)
    q = queries.contiguous()
    v = items.contiguous()
    mask = exclusion_bitmask(exclude, b, n, dev) if exclude is not None else None
    cand = torch.empty((b, n_tiles, kk), dtype=torch.int64, device=dev)
    dummy = torch.zeros(1, device=dev)
    grid = (triton.cdiv(b, block_b), n_tiles)
    _tile_topk_kernel[grid](
        q, v,
        item_bias.contiguous().float() if item_bias is not None else dummy,
        row_scale.contiguous().float() if row_scale is not None else dummy,
        mask if mask is not None else dummy,
        cand, b, n, d, float(query_scale * item_scale),
        mask.shape[1] if mask is not None else 0, n_tiles,
        q.stride(0), v.stride(0),
        HAS_BIAS=item_bias is not None, HAS_RS=row_scale is not None,
        HAS_MASK=mask is not None,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, K=kk,
    )  # fmt: skip
    best = torch.topk(cand.view(b, -1), kk, dim=1).values  # sorted, keys are unique
    scores, idx = decode(best)
    out_s[:, :kk] = scores
    out_i[:, :kk] = idx
    return out_s, out_i
