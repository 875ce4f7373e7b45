"""Triton scoring + top-k (CUDA; on the CPU under TRITON_INTERPRET=1 for the tests).

Stage 1 (``_scan_kernel``), a persistent grid: each program owns a block of queries and walks
every n_prog-th tile of items. Per tile it computes the scores in registers (``tl.dot`` for
16+ queries, broadcast FMAs for one or two), applies scale, bias, NaN -> -inf and the
exclusion bitmask, packs them into int64 keys and merges them into a running top-k per query,
but only when some key beats that query's current k-th best: after the first tiles almost
every tile is skipped, so the scan runs at the speed of reading the table (and of the dot).
Each program writes its k best keys: [B, n_prog, k] candidates, never the B x N scores.
Stage 2 (``_merge_kernel``), one program per query: the best k of the candidates, decoded
into scores and indices in place of the output.

Key = (order-preserving int32 of the score) << 32 | (2^32 - 1 - index): a larger key is a
higher score, and among equal scores the lower index, which is exactly the reference order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import Exclude, check_score_args


@triton.jit
def _keys(score, offs_n):
    """Packed int64 keys of float32 scores (NaN -> -inf, -0 -> +0) and item indices."""
    score = tl.where(score != score, float("-inf"), score) + 0.0
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    return (ordered << 32) | (4294967295 - offs_n.to(tl.int64))[None, :]


@triton.jit
def _merge(best, keys, K_SEL: tl.constexpr):
    """The best K_SEL of running [R, K_SEL] and keys [R, M] (each row on its own)."""
    top = tl.topk(keys, K_SEL, dim=1)
    both = tl.reshape(tl.join(best, top), (best.shape[0], 2 * K_SEL))
    return tl.topk(both, K_SEL, dim=1)


@triton.jit
def _scan_kernel(
    q_ptr, v_ptr, bias_ptr, rs_ptr, mask_ptr, cand_ptr,
    B, N, D, alpha, n_words, n_tiles, n_prog,
    stride_q, stride_v,
    HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_SEL: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    in_b = offs_b < B
    best = tl.full((BLOCK_B, K_SEL), -9223372036854775808, tl.int64)
    for t in range(pid, n_tiles, n_prog):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
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
            if USE_DOT:
                acc += tl.dot(q, tl.trans(v), input_precision=PRECISION)
            else:  # one or two queries: CUDA-core FMAs, no 16-row padding of the dot
                acc += tl.sum(q[:, None, :] * v[None, :, :], axis=2)
        if HAS_RS:
            acc = acc * tl.load(rs_ptr + offs_n, mask=in_n, other=1.0)[None, :]
        score = acc * alpha
        if HAS_BIAS:
            score = score + tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
        key = _keys(score, offs_n)
        ok = in_b[:, None] & in_n[None, :]
        if HAS_MASK:
            words = tl.load(
                mask_ptr + offs_b[:, None] * n_words + (offs_n // 32)[None, :], mask=ok, other=0
            )
            ok = ok & (((words >> (offs_n % 32)[None, :]) & 1) == 0)
        key = tl.where(ok, key, -9223372036854775808)
        kth = tl.min(best, axis=1)  # each query's current k-th best key
        if tl.max(tl.max((key > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            best = _merge(best, key, K_SEL)
    cols = tl.arange(0, K_SEL)
    dst = cand_ptr + (offs_b[:, None] * n_prog + pid) * K_SEL + cols[None, :]
    tl.store(dst, best, mask=in_b[:, None])


@triton.jit
def _merge_kernel(
    cand_ptr, out_s_ptr, out_i_ptr, n_cand, K, KK,
    K_SEL: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    best = tl.full((1, K_SEL), -9223372036854775808, tl.int64)
    for c0 in range(0, n_cand, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        x = tl.load(cand_ptr + row * n_cand + offs, mask=offs < n_cand, other=-(2**63))
        best = _merge(best, x[None, :], K_SEL)
    ordered = (best >> 32).to(tl.int32)
    score = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    idx = 4294967295 - (best & 4294967295)
    cols = tl.arange(0, K_SEL)[None, :]
    keep = (cols < KK) & (best != -9223372036854775808)
    tl.store(out_s_ptr + row * K + cols, tl.where(keep, score, float("-inf")), mask=cols < K)
    tl.store(out_i_ptr + row * K + cols, tl.where(keep, idx, -1), mask=cols < K)


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


@dataclass(frozen=True)
class ScoreConfig:
    """One launch shape of the scan (``gpu_check.py`` times the alternatives).

    block_b queries x block_n items per tile; ``use_dot`` takes ``tl.dot`` (block_b >= 16) with
    ``precision`` "ieee" (fp32 FMAs) or "tf32x3" (tensor cores, fp32-level error), else
    broadcast FMAs; ``progs_per_sm`` sizes the persistent grid.
    """

    block_b: int
    block_n: int
    block_d: int = 64
    use_dot: bool = True
    precision: str = "ieee"
    num_warps: int = 4
    progs_per_sm: int = 4


def default_config(b: int, n: int, d: int, k: int) -> ScoreConfig:
    """The launch shape for a call (from H100 timings: benchmarks/results/GPU_NOTES.md)."""
    k_sel = triton.next_power_of_2(max(1, min(k, n)))
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    if b <= 2 or k_sel > 128:  # one query per program: no dot padding, keys stay in registers
        bn = max(512, 2 * k_sel)
        return ScoreConfig(1, bn, min(block_d, 32 if bn <= 512 else 16), use_dot=False,
                           num_warps=4 if bn <= 512 else 8)  # fmt: skip
    # tf32x3 (three TF32 tensor-core products, fp32-level error) ran 1.7-2x faster than fp32
    # FMAs for 64 queries; 8k scores per program keep acc + keys in registers
    bn = max(128, 2 * k_sel)
    bb = max(16, min(triton.next_power_of_2(b), 64, 8192 // bn))
    return ScoreConfig(bb, bn, block_d, precision="tf32x3")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 2  # the interpreter: a few programs, so the tests still cross program boundaries


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
    config: ScoreConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.score_topk`` in two Triton kernels; tensors stay on their device.

    ``config`` overrides the launch shape (for tuning; every shape gives the same result).
    """
    check_score_args(queries, items, k, item_bias, row_scale)
    b, n = queries.shape[0], items.shape[0]
    dev = items.device
    kk = min(k, n)
    if b == 0 or kk == 0:
        return (torch.full((b, k), float("-inf"), device=dev),
                torch.full((b, k), -1, dtype=torch.int64, device=dev))  # fmt: skip
    cfg = config or default_config(b, n, items.shape[1], k)
    alpha = query_scale * item_scale
    cand = scan_candidates(queries, items, kk, item_bias, alpha, exclude, row_scale, cfg)
    k_sel = cand.shape[2]
    if k > k_sel:  # only when k > N: the columns past the last item are never written
        out_s = torch.full((b, k), float("-inf"), device=dev)
        out_i = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    else:
        out_s = torch.empty((b, k), device=dev)
        out_i = torch.empty((b, k), dtype=torch.int64, device=dev)
    n_cand = cand.shape[1] * k_sel
    _merge_kernel[(b,)](
        cand, out_s, out_i, n_cand, k, kk,
        K_SEL=k_sel, CHUNK=max(2 * k_sel, min(4096, triton.next_power_of_2(n_cand))),
    )  # fmt: skip
    return out_s, out_i


def scan_candidates(
    queries: torch.Tensor,
    items: torch.Tensor,
    kk: int,
    item_bias: torch.Tensor | None,
    alpha: float,
    exclude: Exclude,
    row_scale: torch.Tensor | None,
    cfg: ScoreConfig,
) -> torch.Tensor:
    """Stage 1: int64 keys [B, n_prog, K_SEL], each program's best per query (K_SEL = kk
    rounded up to a power of two; -2^63, below every real key, where it saw fewer)."""
    b, n = queries.shape[0], items.shape[0]
    d = items.shape[1]
    k_sel = triton.next_power_of_2(kk)
    if cfg.block_n < k_sel or (cfg.use_dot and cfg.block_b < 16):
        raise ValueError(f"config {cfg} cannot serve k={kk}")
    n_tiles = triton.cdiv(n, cfg.block_n)
    b_groups = triton.cdiv(b, cfg.block_b)
    n_prog = min(n_tiles, max(1, cfg.progs_per_sm * _sm_count(items.device) // b_groups))
    q = queries.contiguous()
    v = items.contiguous()
    mask = exclusion_bitmask(exclude, b, n, v.device) if exclude is not None else None
    cand = torch.empty((b, n_prog, k_sel), dtype=torch.int64, device=v.device)
    _scan_kernel[(b_groups, n_prog)](
        q, v,
        item_bias.contiguous().float() if item_bias is not None else q,  # q: never read
        row_scale.contiguous().float() if row_scale is not None else q,
        mask if mask is not None else q,
        cand, b, n, d, float(alpha),
        mask.shape[1] if mask is not None else 0, n_tiles, n_prog,
        q.stride(0), v.stride(0),
        HAS_BIAS=item_bias is not None, HAS_RS=row_scale is not None,
        HAS_MASK=mask is not None,
        BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, K_SEL=k_sel,
        USE_DOT=cfg.use_dot, PRECISION=cfg.precision, num_warps=cfg.num_warps,
    )  # fmt: skip
    return cand
