"""numba CPU kernels, the default backend without a GPU. Same contracts as ``reference.py``.

Scoring never writes the B x N score matrix: for a few queries (B <= FUSED_MAX_B) one fused
pass reads each item row once, computes every query's score and keeps a running top-k per
query and per thread (items split into contiguous parts; a heap with the k-th best at its
root), sorted and merged at the end (one query on an
int8 table: an integer-dot prefilter first, ``int_dot.py``); for many queries, a GEMM
(``gemm.py``) scores a tile of items at a time (cache-sized) and a compiled pass folds the tile
into the running top-k. Ties go to the lower index everywhere: within a part items come in index
order and only a strictly better score displaces the k-th; the merge compares (score, index).

The update is one call per micro-batch: predictions at the pre-step parameters, then each
table's rows reduced over duplicate events in a stable sort order (deterministic, no races),
then the decayed step on the raw rows through the lazy scales.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from .gemm import matmul_nt
from .int_dot import MAX_DIM, STEP, idot, quantize_query
from .prefetch import LINE_BYTES, PREFETCH_BYTES, prefetch_row, prefetch_step
from .reference import (
    SCALE_ITEM,
    SCALE_ITEM_BIAS,
    SCALE_USER,
    SCALE_USER_BIAS,
    Exclude,
    History,
    ItemKnn,
    UserKnn,
    check_csr,
    check_score_args,
    rerank_blend_from,
    steps_from,
)

# Reassociation lets the dot products vectorise; NaN and inf semantics stay IEEE.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
FUSED_MAX_B = 8  # above this the GEMM tiles win: the fused scan's dot products use no BLAS
TILE_BYTES = 1 << 22  # scores of one tile for all queries (4 MB, in L3; 16k items at B=64)
MIN_ITEMS_PER_PART = 1 << 15  # below this a thread costs more than it scans

_LAUNCH = threading.Lock()
_LAYER_SAFE = False  # a launch showed a thread-safe threading layer (tbb, omp)


def _parallel(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for a kernel compiled with ``parallel=True``. numba's workqueue threading
    layer (the one left where neither TBB nor OpenMP loads) ends the process when two threads
    launch parallel kernels at once, as answers and a writer's unlocked work do (``Recommender``),
    so launches take turns until one shows a thread-safe layer."""
    global _LAYER_SAFE
    if _LAYER_SAFE:
        return fn(*args)
    with _LAUNCH:
        out = fn(*args)
        try:
            _LAYER_SAFE = numba.threading_layer() != "workqueue"
        except ValueError:  # (no parallel launch yet: a serial variant ran)
            pass
    return out


# ---------------------------------------------------------------------------------------------
# scoring


@njit(inline="always")
def _excluded(ex_idx: np.ndarray, lo: int, hi: int, j: int) -> bool:
    """Binary search for j in the sorted ex_idx[lo:hi]."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = ex_idx[mid]
        if v == j:
            return True
        if v < j:
            lo = mid + 1
        else:
            hi = mid
    return False


@njit(inline="always")
def _worse(s1: Any, i1: Any, s2: Any, i2: Any) -> bool:
    """(s1, i1) ranks below (s2, i2): a lower score, or the same score and a higher index."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(inline="always")
def _sift_down(ts: np.ndarray, ti: np.ndarray, p: int, n: int) -> None:
    """Restore the heap below position p of ts/ti[:n] (the worst entry at the root)."""
    while True:
        c = 2 * p + 1
        if c >= n:
            return
        if c + 1 < n and _worse(ts[c + 1], ti[c + 1], ts[c], ti[c]):
            c += 1
        if not _worse(ts[c], ti[c], ts[p], ti[p]):
            return
        ts[p], ts[c] = ts[c], ts[p]
        ti[p], ti[c] = ti[c], ti[p]
        p = c


@njit(inline="always")
def _heap_offer(
    ts: np.ndarray, ti: np.ndarray, cnt: int, k: int, sc: float | np.floating, j: int
) -> int:
    """Add (sc, j) to a running top-k list of cnt entries; returns the new count. Filling, an
    entry is appended (O(1)) and the full list made a heap with its worst entry at ts[0], the
    k-th best the scans filter against; then a better entry replaces the root (O(log k), where
    a sorted list shifts O(k) entries: the whole call 2x slower at k = 1,024, 1M x 64, B = 64).
    The caller has checked that a full list's root is worse. ``_heap_sort`` orders a list for
    the merge."""
    if cnt < k:
        ts[cnt] = sc
        ti[cnt] = j
        cnt += 1
        if cnt == k:
            for p in range(k // 2 - 1, -1, -1):
                _sift_down(ts, ti, p, k)
        return cnt
    ts[0] = sc
    ti[0] = j
    _sift_down(ts, ti, 0, k)
    return k


@njit(inline="always")
def _heap_sort(ts: np.ndarray, ti: np.ndarray, cnt: int, k: int) -> None:
    """A list of ``_heap_offer`` (cnt entries) sorted in place, best first: by score
    descending, ties by the lower index."""
    if cnt < k:  # still filling: not a heap yet
        for p in range(cnt // 2 - 1, -1, -1):
            _sift_down(ts, ti, p, cnt)
    for end in range(cnt - 1, 0, -1):  # the worst left moves to the back
        ts[0], ts[end] = ts[end], ts[0]
        ti[0], ti[end] = ti[end], ti[0]
        _sift_down(ts, ti, 0, end)


@njit(cache=True)
def _consider(
    sc: float | np.floating,
    j: int,
    ex_idx: np.ndarray,
    e_lo: int,
    e_hi: int,
    k: int,
    ts: np.ndarray,
    ti: np.ndarray,
    cnt: int,
) -> int:
    """The scan's slow path, out of line, on a running top-k list (``_heap_offer``)."""
    if sc != sc:
        sc = -np.inf
    if cnt == k and not _worse(ts[0], ti[0], sc, j):
        return cnt
    if e_hi > e_lo and _excluded(ex_idx, e_lo, e_hi, j):
        return cnt
    return _heap_offer(ts, ti, cnt, k, sc, j)


@njit(inline="always")
def _row_dot(q0: np.ndarray, items: np.ndarray, j: int) -> np.float32:
    """<q0, items[j]> in fp32 (the scans' exact score before its scale and bias)."""
    acc = np.float32(0.0)
    for t in range(items.shape[1]):
        acc += q0[t] * np.float32(items[j, t])
    return acc


def _scan_one_py(
    q: np.ndarray,
    items: np.ndarray,
    row_scale: np.ndarray,
    bias: np.ndarray,
    alpha: np.float32,
    ex_ptr: np.ndarray,
    ex_idx: np.ndarray,
    k: int,
    ts: np.ndarray,
    ti: np.ndarray,
    tn: np.ndarray,
) -> None:
    """Fused scan for one query (q [1, d]): contiguous parts of the item table in parallel,
    each row read once; the hot path is one compare against the part's k-th best. fp32 rows
    are prefetched ``PREFETCH_BYTES`` ahead (``prefetch.py``). Its own function, not a branch of
    ``_scan_py``: sharing one body with the many-query loop cost 1.1-1.2x at 1M x 64, and the
    query stays in registers (1.5x faster than the general loop).

    (Scores are not staged in a buffer: measured no faster than the compare per row.)"""
    n_parts = tn.shape[0]
    n, d = items.shape
    line = prefetch_step(items)  # a compile-time constant per dtype; 0: no prefetch
    ahead = PREFETCH_BYTES // max(1, d * items.itemsize)  # rows
    q0 = q[0]
    e_lo, e_hi = ex_ptr[0], ex_ptr[1]
    for part in prange(n_parts):
        lo = part * n // n_parts
        hi = (part + 1) * n // n_parts
        cnt = tn[part, 0]
        lim0 = np.float32(np.inf)  # unused until the list is full
        for j in range(lo, hi):
            if line:
                jp = min(j + ahead, hi - 1)
                for c in range(0, d, line):
                    prefetch_row(items, jp, c)
            sc = _row_dot(q0, items, j) * (alpha * row_scale[j]) + bias[j]
            if cnt == k and not sc > lim0:
                continue
            cnt = _consider(sc, j, ex_idx, e_lo, e_hi, k, ts[part, 0], ti[part, 0], cnt)
            if cnt == k:
                lim0 = ts[part, 0, 0]
        tn[part, 0] = cnt


def _scan_one_int8_py(
    q: np.ndarray,
    q16: np.ndarray,
    q_scale: np.float32,
    q_bound: np.float32,
    items: np.ndarray,
    row_scale: np.ndarray,
    bias: np.ndarray,
    alpha: np.float32,
    ex_ptr: np.ndarray,
    ex_idx: np.ndarray,
    k: int,
    ts: np.ndarray,
    ti: np.ndarray,
    tn: np.ndarray,
) -> None:
    """``_scan_one_py`` for an int8 table whose row length suits ``int_dot.idot``, compiled
    once per row length (the global ``DIM``; ``_int8_scan``). Each row is first scored with the
    integer dot of the quantised query (``q16``, ``q_scale``); a row whose score plus the error
    bound (``q_bound``, see ``int_dot.QueryQuant``) cannot beat the part's k-th best is
    skipped, any other is scored exactly as ``_scan_one_py`` does. So the lists, and the
    results, are the exact scan's. Rows are prefetched ``PREFETCH_BYTES`` ahead (here it pays:
    the dot no longer bounds the loop). 1.2-1.3x faster than the exact scan at 1M x 64. (Its
    per-row tail is ``_scan_one_py``'s, written out: an inlined shared helper timed 1.1x slower
    in both.)"""
    n_parts = tn.shape[0]
    n = items.shape[0]
    ahead = PREFETCH_BYTES // DIM  # rows
    q0 = q[0]
    e_lo, e_hi = ex_ptr[0], ex_ptr[1]
    for part in prange(n_parts):
        lo = part * n // n_parts
        hi = (part + 1) * n // n_parts
        cnt = tn[part, 0]
        lim0 = np.float32(np.inf)  # unused until the list is full
        for j in range(lo, hi):
            jp = min(j + ahead, hi - 1)
            for c in range(0, DIM, LINE_BYTES):
                prefetch_row(items, jp, c)
            mult = alpha * row_scale[j]
            b = bias[j]
            if cnt == k:
                rough = np.float32(idot(items, j, q16, DIM)) * (q_scale * mult) + b
                # NaN (a non-finite scale or bias) falls through to the exact score
                if rough + (abs(mult) * q_bound + np.float32(4 * 2.0**-24) * abs(b)) <= lim0:
                    continue
            sc = _row_dot(q0, items, j) * mult + b
            if cnt == k and not sc > lim0:
                continue
            cnt = _consider(sc, j, ex_idx, e_lo, e_hi, k, ts[part, 0], ti[part, 0], cnt)
            if cnt == k:
                lim0 = ts[part, 0, 0]
        tn[part, 0] = cnt


def _scan_py(
    q: np.ndarray,
    items: np.ndarray,
    row_scale: np.ndarray,
    bias: np.ndarray,
    alpha: np.float32,
    ex_ptr: np.ndarray,
    ex_idx: np.ndarray,
    k: int,
    ts: np.ndarray,
    ti: np.ndarray,
    tn: np.ndarray,
) -> None:
    """``_scan_one_py`` for a few queries (q [B, d]): each row read once and scored for every
    query, with a running top-k per query and part. (Prefetching here measured no faster.)"""
    n_parts, nb = tn.shape
    n, d = items.shape
    for part in prange(n_parts):
        lo = part * n // n_parts
        hi = (part + 1) * n // n_parts
        lim = np.full(nb, -np.inf, np.float32)
        for j in range(lo, hi):
            mult = alpha * row_scale[j]
            add = bias[j]
            for b in range(nb):
                acc = np.float32(0.0)
                for t in range(d):
                    acc += q[b, t] * np.float32(items[j, t])
                sc = acc * mult + add
                cnt = tn[part, b]
                if cnt == k and not sc > lim[b]:
                    continue
                cnt = _consider(sc, j, ex_idx, ex_ptr[b], ex_ptr[b + 1], k, ts[part, b],
                                ti[part, b], cnt)  # fmt: skip
                tn[part, b] = cnt
                if cnt == k:
                    lim[b] = ts[part, b, 0]


def _cached_variant(fn: Callable[..., None], parallel: bool, dim: int | None = None) -> Any:
    """``fn`` compiled with ``parallel``, cached on disk under its own name. numba's cache
    is keyed by the function's name and bytecode, not by its compile options: a parallel and
    a serial dispatcher of one function share entries, and each process could load the other's
    code (a serial scan where a parallel one was asked for: 1.4-1.7x slower). ``dim``, if
    given, is the global ``DIM`` of that variant: a compile-time constant."""
    suffix = ("_par" if parallel else "_ser") + (f"_d{dim}" if dim is not None else "")
    scope = fn.__globals__ if dim is None else {**fn.__globals__, "DIM": dim}
    clone = types.FunctionType(fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__,
                               fn.__closure__)  # fmt: skip
    clone.__qualname__ = fn.__qualname__ + suffix
    return njit(parallel=parallel, cache=True, fastmath=FASTMATH)(clone)


# (one query or several) x (parallel parts or one serial part, for small tables)
_SCANS = {
    (one, par): _cached_variant(_scan_one_py if one else _scan_py, par)
    for one in (True, False)
    for par in (True, False)
}
_SCANS_INT8: dict[tuple[int, bool], Any] = {}
DIM = 0  # set per variant of _scan_one_int8_py


def _int8_scan(dim: int, parallel: bool) -> Any:
    """The integer-prefiltered one-query int8 scan for rows of ``dim`` elements."""
    key = (dim, bool(parallel))
    if key not in _SCANS_INT8:
        _SCANS_INT8[key] = _cached_variant(_scan_one_int8_py, bool(parallel), dim)
    return _SCANS_INT8[key]


@njit(cache=True, fastmath=FASTMATH)
def _fold(
    raw: np.ndarray,
    j0: int,
    row_scale: np.ndarray,
    use_rs: bool,
    bias: np.ndarray,
    use_bias: bool,
    alpha: np.float32,
    ex_ptr: np.ndarray,
    ex_idx: np.ndarray,
    k: int,
    ts: np.ndarray,
    ti: np.ndarray,
    tn: np.ndarray,
    lim: np.ndarray,
) -> None:
    """Fold a tile of raw dot products [T, B] (items j0 .. j0+T-1, one row per item: the
    GEMM's fast layout) into the running top-k lists. Per item, one vectorised test of
    all B scores against the lists' k-th best ``lim`` [B] (NaN while a list is not full, so
    that everything, NaN included, takes the exact path then); the exact path is out of line,
    as in the fused scan."""
    width, nb = raw.shape
    sc = np.empty(nb, np.float32)
    for jj in range(width):
        j = j0 + jj
        mult = alpha * row_scale[j] if use_rs else alpha
        add = bias[j] if use_bias else np.float32(0.0)
        hit = False
        for b in range(nb):
            sc[b] = raw[jj, b] * mult + add
            hit |= not sc[b] <= lim[b]
        if not hit:
            continue
        for b in range(nb):
            if sc[b] <= lim[b]:
                continue
            cnt = _consider(sc[b], j, ex_idx, ex_ptr[b], ex_ptr[b + 1], k, ts[b], ti[b], tn[b])
            tn[b] = cnt
            if cnt == k:
                lim[b] = ts[b, 0]


@njit(cache=True)
def _merge(
    ts: np.ndarray, ti: np.ndarray, tn: np.ndarray, k: int, out_s: np.ndarray, out_i: np.ndarray
) -> None:
    """The per-part running lists [P, B, k] (``_heap_offer``) sorted, then k-way merged by
    (score desc, index asc) into out_s / out_i [B, >= k]."""
    n_parts, nb = tn.shape
    for p in range(n_parts):
        for b in range(nb):
            _heap_sort(ts[p, b], ti[p, b], tn[p, b], k)
    pos = np.zeros(n_parts, np.int64)
    for b in range(nb):
        pos[:] = 0
        for r in range(k):
            best = -1
            bs = np.float32(0.0)
            bi = 0
            for p in range(n_parts):
                if pos[p] < tn[p, b]:
                    s = ts[p, b, pos[p]]
                    i = ti[p, b, pos[p]]
                    if best < 0 or s > bs or (s == bs and i < bi):
                        best, bs, bi = p, s, i
            if best < 0:
                break
            out_s[b, r] = bs
            out_i[b, r] = bi
            pos[best] += 1


@njit(cache=True)
def _sorted_rows(ptr: np.ndarray, idx: np.ndarray) -> bool:
    """Whether every CSR row is ascending with no negative index: then no sort is needed."""
    for b in range(ptr.size - 1):
        for e in range(ptr[b], ptr[b + 1]):
            if idx[e] < 0 or (e > ptr[b] and idx[e] < idx[e - 1]):
                return False
    return True


def exclusion_csr(exclude: Exclude, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Exclusions as CSR (indptr int64 [B+1], indices int64) sorted within each row."""
    if exclude is None:
        return np.zeros(n_queries + 1, np.int64), np.zeros(0, np.int64)
    if isinstance(exclude, tuple) and len(exclude) == 2 and isinstance(exclude[0], torch.Tensor):
        ptr = np.asarray(exclude[0], dtype=np.int64)
        idx = np.asarray(exclude[1], dtype=np.int64)
        check_csr(ptr, n_queries, idx.size)
    else:
        if len(exclude) != n_queries:
            raise ValueError(f"exclude has {len(exclude)} rows for {n_queries} queries")
        rows = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
        ptr = np.zeros(n_queries + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=ptr[1:])
        idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if idx.size and not _sorted_rows(ptr, idx):  # the facade's seen lists are (B = 64: 0.19 ->
        # 0.02 ms); else one int64 sort of (row, index) keys, 5x faster than lexsort
        row_of = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(ptr))
        keep = idx >= 0  # negative indices can never match an item
        row_of, idx = row_of[keep], idx[keep]
        span = int(idx.max()) + 1 if idx.size else 1
        idx = np.sort(row_of * span + idx) % span
        ptr = np.zeros(n_queries + 1, np.int64)
        np.cumsum(np.bincount(row_of, minlength=n_queries), out=ptr[1:])
    return ptr, idx


def _as(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy array of ``t`` in ``dtype``, a view when it already is one (the
    common case; a recommend converts about 40 tensors, so the checks come first)."""
    if t.dtype != dtype or t.requires_grad:
        t = t.detach().to(dtype)
    a = t.numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _f32(t: torch.Tensor) -> np.ndarray:
    return _as(t, torch.float32)


def _f64(t: torch.Tensor) -> np.ndarray:
    return _as(t, torch.float64)


def _i64(t: torch.Tensor) -> np.ndarray:
    return _as(t, torch.int64)


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
    """``reference.score_topk`` on the CPU without the B x N score matrix."""
    check_score_args(queries, items, k, item_bias, row_scale)
    nb, n = queries.shape[0], items.shape[0]
    out_s = np.full((nb, k), -np.inf, np.float32)
    out_i = np.full((nb, k), -1, np.int64)
    if nb == 0 or k == 0 or n == 0:
        return torch.from_numpy(out_s), torch.from_numpy(out_i)
    q = _f32(queries)
    ex_ptr, ex_idx = exclusion_csr(exclude, nb)
    alpha = np.float32(query_scale * item_scale)
    use_bias = item_bias is not None
    bias = _f32(item_bias) if item_bias is not None else np.zeros(1, np.float32)
    use_rs = row_scale is not None
    rs = _f32(row_scale) if row_scale is not None else np.ones(1, np.float32)
    kk = min(k, n)
    threads = numba.get_num_threads()
    if nb <= FUSED_MAX_B and items.dtype in (torch.float32, torch.int8):
        table = items.detach().contiguous().numpy()
        n_parts = max(1, min(4 * threads, n // MIN_ITEMS_PER_PART))
        ps = np.full((n_parts, nb, kk), -np.inf, np.float32)  # per-part lists, then merged
        pi = np.full((n_parts, nb, kk), -1, np.int64)
        pn = np.zeros((n_parts, nb), np.int64)
        # absent scales/biases as stride-0 views: the scan's loop has no branch
        rs_n = rs if use_rs else np.broadcast_to(np.float32(1.0), (n,))
        bias_n = bias if use_bias else np.broadcast_to(np.float32(0.0), (n,))
        d = table.shape[1]
        quant = None
        if nb == 1 and table.dtype == np.int8 and d % STEP == 0 and d <= MAX_DIM:
            quant = quantize_query(q[0])
        if quant is not None:
            _parallel(_int8_scan(d, n_parts > 1), q, quant.q16, quant.scale, quant.bound, table,
                      rs_n, bias_n, alpha, ex_ptr, ex_idx, kk, ps, pi, pn)  # fmt: skip
        else:
            scan = _SCANS[nb == 1, n_parts > 1]
            _parallel(scan, q, table, rs_n, bias_n, alpha, ex_ptr, ex_idx, kk, ps, pi, pn)
        _merge(ps, pi, pn, kk, out_s, out_i)
    else:
        ts = np.full((nb, kk), -np.inf, np.float32)
        ti = np.full((nb, kk), -1, np.int64)
        tn = np.zeros(nb, np.int64)
        lim = np.full(nb, np.nan, np.float32)
        tile = max(256, TILE_BYTES // (4 * nb))
        convert = items.dtype != torch.float32
        if convert:  # fp32 copies of a tile's rows, into one buffer reused across tiles
            # (a fresh 25 MB tensor per tile at d = 384 cost 2.4x the whole call in page faults)
            tile = max(256, min(tile, TILE_BYTES // (4 * items.shape[1])))
            conv = torch.empty(min(tile, n), items.shape[1])
        qq = torch.from_numpy(q)
        for j0 in range(0, n, tile):
            # torch's GEMM (oneDNN's where it has it: gemm.py), not numpy's: callers run torch
            # ops around this call, and torch's OpenMP pool and OpenBLAS's threads spin against
            # each other when they alternate (measured 8x slower in the Recommender facade);
            # the fold runs on this thread. items @ q.T, not q @ items.T: the tile's scores
            # item-major, 2.2x faster with MKL here (1M x 64 by 64 queries). A partial tile
            # goes to torch.mm: oneDNN compiles code per new shape (about 0.4 ms), and a
            # growing catalogue would bring a new last-tile shape with each item added.
            rows = items[j0 : j0 + tile]
            if convert:
                rows = conv[: rows.shape[0]].copy_(rows)
            full = rows.shape[0] == tile
            raw = (matmul_nt(rows, qq) if full else torch.mm(rows, qq.T)).numpy()
            _fold(raw, j0, rs, use_rs, bias, use_bias, alpha, ex_ptr, ex_idx, kk, ts, ti, tn,
                  lim)  # fmt: skip
        _merge(ts[None], ti[None], tn[None], kk, out_s, out_i)  # one part: sorts the lists
    return torch.from_numpy(out_s), torch.from_numpy(out_i)


# ---------------------------------------------------------------------------------------------
# the re-rank of recommend's head candidates by the predicted rating


@njit(inline="always")
def _goes_before(bl: np.ndarray, cand: np.ndarray, x: int, y: int) -> bool:
    """Whether candidate x sorts before y: items before padding (-1), then the blended score
    descending, then the lower item row."""
    if cand[y] < 0:
        return cand[x] >= 0
    if cand[x] < 0:
        return False
    return bl[x] > bl[y] or (bl[x] == bl[y] and cand[x] < cand[y])


@njit(cache=True, fastmath=FASTMATH)
def _rerank_rows(
    scores: np.ndarray, top: np.ndarray, users: np.ndarray, urows: np.ndarray,
    irows: np.ndarray, ubias: np.ndarray, ibias: np.ndarray, s_dot: np.float32,
    s_bu: np.float32, s_bv: np.float32, mu: np.float32, weight: np.float32, depth: int,
    shift: np.ndarray, knn_val: np.ndarray, knn_w: np.ndarray, knn_add: np.ndarray,
) -> None:  # fmt: skip
    """``reference.rerank_mf`` in place on scores [B, m] / top [B, m]: per query, the blended
    score of its first ``depth`` candidates (one dot product each, the neighbourhood prediction
    blended in at ``knn_w`` [B, depth] where > 0, then ``knn_add`` added), an insertion sort of
    them (depth is small: 30 by default), and the shift of the rest."""
    nb, m = top.shape
    d = urows.shape[1]
    bl = np.empty(depth, np.float32)
    cand = np.empty(depth, np.int64)
    order = np.empty(depth, np.int64)
    for b in range(nb):
        u = users[b]
        low = np.float32(np.inf)
        any_valid = False
        for c in range(depth):
            j = top[b, c]
            cand[c] = j
            order[c] = c
            if j < 0:
                bl[c] = -np.inf
                continue
            acc = np.float32(0.0)
            for t in range(d):
                acc += urows[u, t] * irows[j, t]
            pred = (mu + ubias[u] * s_bu + ibias[j] * s_bv) + acc * s_dot
            w = knn_w[b, c]
            if w > 0:
                pred = (np.float32(1.0) - w) * pred + w * knn_val[b, c]
            pred += knn_add[b, c]
            bl[c] = scores[b, c] + weight * pred
            low = min(low, bl[c])
            any_valid = True
        for c in range(1, depth):
            p = c
            while p > 0 and _goes_before(bl, cand, order[p], order[p - 1]):
                order[p], order[p - 1] = order[p - 1], order[p]
                p -= 1
        for c in range(depth):
            scores[b, c] = bl[order[c]]
            top[b, c] = cand[order[c]]
        if m > depth and any_valid and top[b, depth] >= 0:
            gap = (scores[b, depth] - low) + np.float32(1.0)
            if gap > 0:
                shift[b] = gap
                for c in range(depth, m):
                    scores[b, c] -= gap


def rerank_mf(
    scores: torch.Tensor, top: torch.Tensor, users: torch.Tensor, user_rows: torch.Tensor,
    item_rows: torch.Tensor, user_bias: torch.Tensor, item_bias: torch.Tensor,
    scales: torch.Tensor, mu: torch.Tensor, weight: float, depth: int,
    knn: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reference.rerank_mf`` in one compiled pass (no per-call torch sorts or gathers)."""
    depth = min(depth, top.shape[1])
    shift = torch.zeros(top.shape[0])
    if weight == 0 or depth == 0 or top.shape[0] == 0:
        return scores, top, shift
    none = np.zeros((top.shape[0], depth), np.float32)
    knn_val, knn_w, knn_add = none, none, none
    if knn is not None:
        knn_val, knn_w = _f32(knn[0]), _f32(knn[1])
        knn_add = _f32(knn[2]) if len(knn) > 2 else none
    out_s = scores.detach().float().numpy().copy()
    out_t = top.numpy().astype(np.int64, copy=True)
    sc = scales.tolist()
    _rerank_rows(out_s, out_t, users.numpy().astype(np.int64, copy=False), _f32(user_rows),
                 _f32(item_rows), _f32(user_bias), _f32(item_bias),
                 np.float32(sc[SCALE_USER] * sc[SCALE_ITEM]), np.float32(sc[SCALE_USER_BIAS]),
                 np.float32(sc[SCALE_ITEM_BIAS]), np.float32(float(mu)), np.float32(weight),
                 depth, shift.numpy(), knn_val, knn_w, knn_add)  # fmt: skip
    return torch.from_numpy(out_s), torch.from_numpy(out_t), shift


# ---------------------------------------------------------------------------------------------
# the fused update


@njit(cache=True)
def _step(
    U: np.ndarray,
    V: np.ndarray,
    bu: np.ndarray,
    bv: np.ndarray,
    scales: np.ndarray,
    mu: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    lr: float,
    wd: float,
    learn_mu: bool,
    adagrad: bool,
    acc_u: np.ndarray,
    acc_v: np.ndarray,
    acc_bu: np.ndarray,
    acc_bv: np.ndarray,
    eps: float,
    factors: np.ndarray,
) -> float:
    n = users.size
    d = U.shape[1]
    s_u, s_v = scales[SCALE_USER], scales[SCALE_ITEM]
    s_bu, s_bv = scales[SCALE_USER_BIAS], scales[SCALE_ITEM_BIAS]
    uv = np.float32(s_u * s_v)
    g = np.empty(n, np.float32)
    u_true = np.empty((n, d), np.float32)
    v_true = np.empty((n, d), np.float32)
    loss = 0.0
    g_sum = 0.0
    two_over_n = np.float32(2.0 / n)
    for e in range(n):
        u, i = users[e], items[e]
        dot = np.float32(0.0)
        for t in range(d):
            dot += U[u, t] * V[i, t]
        pred = np.float32(mu[0]) + bu[u] * np.float32(s_bu) + bv[i] * np.float32(s_bv) + dot * uv
        err = np.float32(ratings[e]) - pred
        loss += float(err) * float(err)
        g[e] = err * two_over_n
        g_sum += float(g[e])
        for t in range(d):
            u_true[e, t] = U[u, t] * np.float32(s_u)
            v_true[e, t] = V[i, t] * np.float32(s_v)
    keep = 1.0 - lr * wd
    new = np.empty(4)
    for w in range(4):
        new[w] = scales[w] * keep
    grad = np.empty(d, np.float32)
    # users take v_true, items take u_true; one pass per table over its rows in sorted order
    for side in range(2):
        idx = users if side == 0 else items
        rows = U if side == 0 else V
        bias = bu if side == 0 else bv
        other = v_true if side == 0 else u_true
        a_rows = acc_u if side == 0 else acc_v
        a_bias = acc_bu if side == 0 else acc_bv
        a_r = np.float32(factors[SCALE_USER if side == 0 else SCALE_ITEM])
        a_b = np.float32(factors[SCALE_USER_BIAS if side == 0 else SCALE_ITEM_BIAS])
        order = np.argsort(idx, kind="mergesort")  # stable: duplicates in event order
        p = 0
        while p < n:
            r = idx[order[p]]
            grad[:] = 0.0
            gb = np.float32(0.0)
            q = p
            while q < n and idx[order[q]] == r:
                e = order[q]
                for t in range(d):
                    grad[t] += g[e] * other[e, t]
                gb += g[e]
                q += 1
            if adagrad:
                sq = np.float32(0.0)
                for t in range(d):
                    sq += grad[t] * grad[t]
                a_rows[r] += sq / np.float32(d)
                a_bias[r] += gb * gb
                f_r = a_r / (np.sqrt(a_rows[r]) + np.float32(eps))
                f_b = a_b / (np.sqrt(a_bias[r]) + np.float32(eps))
            else:
                f_r, f_b = a_r, a_b
            for t in range(d):
                rows[r, t] += grad[t] * f_r
            bias[r] += gb * f_b
            p = q
    for w in range(4):
        scales[w] = new[w]
    if learn_mu:
        mu[0] += lr * g_sum
    return loss / n


_NO_ACC = np.zeros(1, np.float32)


def _cpu_arrays(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the numba backend needs contiguous CPU tensors")


def _run_step(
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
    """The numba ``StepImpl`` (see reference.steps_from)."""
    _cpu_arrays(*tables, scales, mu, *(accumulators or ()))
    acc = [a.numpy() for a in accumulators] if accumulators else [_NO_ACC] * 4
    u, v, bu, bv = (t.numpy() for t in tables)
    loss = _step(u, v, bu, bv, scales.numpy(), mu.numpy(), users.numpy(), items.numpy(),
                 ratings.float().numpy(), float(lr), float(weight_decay), bool(learn_mu),
                 accumulators is not None, acc[0], acc[1], acc[2], acc[3], float(eps),
                 np.asarray(factors, dtype=np.float64))  # fmt: skip
    return float(loss)


mf_sgd_step, mf_adagrad_step = steps_from(_run_step)


# ---------------------------------------------------------------------------------------------
# the ranking head: histories and the softmax step (contracts in reference.py)


@njit(cache=True)
def _advance(recent: np.ndarray, users: np.ndarray, items: np.ndarray, out: np.ndarray) -> None:
    length = recent.shape[1]
    for e in range(users.size):
        u = users[e]
        for s in range(length):
            out[e, s] = recent[u, s]
        for s in range(length - 1, 0, -1):
            recent[u, s] = recent[u, s - 1]
        recent[u, 0] = items[e]


def advance_histories(
    recent: torch.Tensor, users: torch.Tensor, items: torch.Tensor
) -> torch.Tensor:
    _cpu_arrays(recent)
    out = torch.empty(users.numel(), recent.shape[1], dtype=torch.int64)
    _advance(recent.numpy(), users.long().contiguous().numpy(),
             items.long().contiguous().numpy(), out.numpy())  # fmt: skip
    return out


@njit(cache=True)
def _user_queries(ctx: np.ndarray, recent: np.ndarray, users: np.ndarray, weights: np.ndarray,
                  out: np.ndarray) -> None:  # fmt: skip
    """``reference.user_queries`` into ``out`` (zeros): the weighted rows summed slot by slot,
    then divided by the weights' sum, as the reference does."""
    length, d = recent.shape[1], ctx.shape[1]
    for b in range(users.shape[0]):
        u = users[b]
        if u < 0:
            continue
        total = np.float32(0.0)
        for s in range(length):
            r = recent[u, s]
            if r >= 0:
                w = weights[s]
                total += w
                for t in range(d):
                    out[b, t] += w * ctx[r, t]
        total = max(total, np.float32(1e-12))
        for t in range(d):
            out[b, t] /= total


def user_queries(
    ctx: torch.Tensor, recent: torch.Tensor, users: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``reference.user_queries`` in one compiled pass (a recommend's dozen torch ops cost 45
    us at B = 1)."""
    out = np.zeros((users.numel(), ctx.shape[1]), np.float32)
    if out.size and recent.shape[0]:
        _user_queries(_f32(ctx), _i64(recent), _i64(users), _f32(weights), out)
    return torch.from_numpy(out)


@njit(cache=True, fastmath=FASTMATH)
def _fold_coef(ctx: np.ndarray, hist: np.ndarray, weights: np.ndarray, rep: np.ndarray,
               coef: np.ndarray) -> None:  # fmt: skip
    """rep[e] = sum_l coef[e, l] ctx[hist[e, l]], coef = the normalised weights (0 on PAD)."""
    n, length = hist.shape
    d = ctx.shape[1]
    for e in range(n):
        total = np.float32(0.0)
        for s in range(length):
            if hist[e, s] >= 0:
                total += weights[s]
        inv = np.float32(1.0) / max(total, np.float32(1e-12))
        for t in range(d):
            rep[e, t] = 0.0
        for s in range(length):
            r = hist[e, s]
            if r < 0:
                coef[e, s] = 0.0
                continue
            c = weights[s] * inv
            coef[e, s] = c
            for t in range(d):
                rep[e, t] += c * ctx[r, t]


@njit(inline="always", fastmath=FASTMATH)
def _adagrad_row(table: np.ndarray, acc: np.ndarray, r: int, grad: np.ndarray, lr: float,
                 eps: float) -> bool:  # fmt: skip
    """Row-wise Adagrad on one row; True when what it wrote is finite."""
    d = grad.size
    sq = np.float32(0.0)
    for t in range(d):
        sq += grad[t] * grad[t]
    acc[r] += sq / np.float32(d)
    f = np.float32(lr) / (np.sqrt(acc[r]) + np.float32(eps))
    ok = np.isfinite(acc[r])
    for t in range(d):
        table[r, t] -= f * grad[t]
        ok &= np.isfinite(table[r, t])
    return ok


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _targets_apply(tgt: np.ndarray, tgt_acc: np.ndarray, tb: np.ndarray, tb_acc: np.ndarray,
                   cand: np.ndarray, grad_t: np.ndarray, grad_b: np.ndarray, lr: float,
                   eps: float) -> bool:  # fmt: skip
    """Row-wise Adagrad on the candidates' target rows and biases (unique rows: no races)."""
    ok = np.ones(cand.size, np.bool_)
    for c in prange(cand.size):
        r = cand[c]
        good = _adagrad_row(tgt, tgt_acc, r, grad_t[c], lr, eps)
        g = grad_b[c]
        tb_acc[r] += g * g
        tb[r] -= np.float32(lr) / (np.sqrt(tb_acc[r]) + np.float32(eps)) * g
        ok[c] = good and np.isfinite(tb[r]) and np.isfinite(tb_acc[r])
    return bool(ok.all())


@njit(cache=True, fastmath=FASTMATH)
def _context_apply(ctx: np.ndarray, ctx_acc: np.ndarray, hist: np.ndarray, coef: np.ndarray,
                   grad_rep: np.ndarray, lr: float, eps: float) -> bool:  # fmt: skip
    """Row-wise Adagrad on the context rows: every valid slot's share of its event's gradient,
    summed per row in a stable sorted order (deterministic), then one step per row."""
    ok = True
    length = hist.shape[1]
    flat = hist.ravel()
    order = np.argsort(flat, kind="mergesort")
    d = ctx.shape[1]
    grad = np.empty(d, np.float32)
    p = 0
    while p < flat.size and flat[order[p]] < 0:
        p += 1
    while p < flat.size:
        r = flat[order[p]]
        grad[:] = 0.0
        while p < flat.size and flat[order[p]] == r:
            e, s = divmod(order[p], length)
            for t in range(d):
                grad[t] += coef[e, s] * grad_rep[e, t]
            p += 1
        ok &= _adagrad_row(ctx, ctx_acc, r, grad, lr, eps)
    return ok


def softmax_step(
    ctx: torch.Tensor, ctx_acc: torch.Tensor, tgt: torch.Tensor, tgt_acc: torch.Tensor,
    tgt_bias: torch.Tensor, tgt_bias_acc: torch.Tensor, hist: torch.Tensor,
    weights: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, logq: torch.Tensor | None,
    lr: float, eps: float = 1e-8,
) -> tuple[float, bool]:  # fmt: skip
    """Same contract as ``reference.softmax_step``: the gradients by hand (the three products
    in torch's GEMM, the rest compiled), no autograd graph."""
    _cpu_arrays(ctx, ctx_acc, tgt, tgt_acc, tgt_bias, tgt_bias_acc)
    hist = hist.contiguous()
    n, d = hist.shape[0], ctx.shape[1]
    rep = torch.empty(n, d)
    coef = torch.empty(hist.shape)
    _fold_coef(ctx.numpy(), hist.numpy(), weights.contiguous().numpy(), rep.numpy(), coef.numpy())
    exact = cand.numel() == tgt.shape[0]  # cand is sorted and unique: all rows, in order
    t_c = tgt if exact else tgt[cand]
    z = torch.addmm(tgt_bias if exact else tgt_bias[cand], rep, t_c.T)
    if logq is not None:
        z -= logq
    grad_z = torch.log_softmax(z, 1)
    ar = torch.arange(n)
    loss = -float(grad_z[ar, pos].double().mean())
    grad_z.exp_()
    grad_z[ar, pos] -= 1.0
    grad_z *= 1.0 / n
    grad_t = grad_z.T @ rep
    grad_b = grad_z.sum(0)
    grad_rep = grad_z @ t_c
    lr, eps = float(lr), float(eps)
    ok = _parallel(
        _targets_apply,
        tgt.numpy(),
        tgt_acc.numpy(),
        tgt_bias.numpy(),
        tgt_bias_acc.numpy(),
        cand.contiguous().numpy(),
        grad_t.numpy(),
        grad_b.numpy(),
        lr,
        eps,
    )
    ok &= _context_apply(ctx.numpy(), ctx_acc.numpy(), hist.numpy(), coef.numpy(),
                         grad_rep.numpy(), lr, eps)  # fmt: skip
    return loss, bool(ok)


__all__ = [
    "advance_histories",
    "exclusion_csr",
    "mf_adagrad_step",
    "mf_sgd_step",
    "score_topk",
    "softmax_step",
    "user_queries",
]


# ---------------------------------------------------------------------------------------------
# the item-neighbourhood correction


@njit(inline="always")
def _best_sorted(s: np.ndarray, j: np.ndarray, n: int, size: int) -> int:
    """The best ``size`` of entries 0..n-1 (similarity ``s``, row ``j``) moved to the front
    and sorted best first, ties by the lower row; returns how many that is. A heap of the best
    so far (``_heap_offer``'s), so a candidate is mostly one comparison with its root: a
    quickselect of all the similarities took as long as the walk that made them."""
    m = min(n, size)
    for p in range(m // 2 - 1, -1, -1):
        _sift_down(s, j, p, m)
    for t in range(m, n):
        if _worse(s[0], j[0], s[t], j[t]):
            s[0], j[0] = s[t], j[t]
            _sift_down(s, j, 0, m)
    _heap_sort(s, j, m, m)
    return m


@njit(cache=True, parallel=True)
def _neighbour_rows(
    which: np.ndarray, a_lo: np.ndarray, a_hi: np.ndarray, a_minor: np.ndarray,
    a_val: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray, b_major: np.ndarray,
    b_val: np.ndarray, off_major: np.ndarray, off_minor: np.ndarray, shrink: float,
    parts: int, out_rows: np.ndarray, out_sims: np.ndarray,
) -> None:  # fmt: skip
    """The most similar majors (items for the item kNN, users for the user kNN) of each major
    m = ``which[r]`` into row r of the outputs. A: m's entries ``a_lo[r]:a_hi[r]`` (minor,
    value); B: minor x's entries ``b_lo[x]:b_hi[x]`` (major, value); an entry's residual is
    value - off_major[major] - off_minor[minor]. Per m (rows split into ``parts`` contiguous
    parts, one buffer set each): walk its minors' majors once, summing the co-rated products
    into dense buffers (only the touched entries are read back and reset), then keep the
    positive similarities, sorted."""
    n_rows, n_major = which.shape[0], off_major.shape[0]
    for p in prange(parts):
        # per major j, at 4j..4j+3: [sum e_i e_j, sum e_i^2, sum e_j^2, co-rated]. Flat and
        # indexed by hand, and `touched` written without a branch: a row view per entry
        # (``acc[j]``) and the branch made this walk 7x slower (16 against 2.3 ns an entry).
        acc = np.zeros(4 * n_major)
        touched = np.empty(n_major + 1, np.int64)
        cand_s, cand_j = np.empty(n_major, np.float32), np.empty(n_major, np.int64)
        for r in range(p * n_rows // parts, (p + 1) * n_rows // parts):
            i = which[r]
            nt = 0
            for q in range(a_lo[r], a_hi[r]):
                x = a_minor[q]
                ox = off_minor[x]
                ei = a_val[q] - off_major[i] - ox
                ei2 = ei * ei
                for t in range(b_lo[x], b_hi[x]):
                    j = b_major[t]
                    ej = b_val[t] - ox - off_major[j]
                    o = 4 * j
                    co = acc[o + 3]
                    touched[nt] = j  # kept only when j is new (the count was 0)
                    nt += co == 0.0
                    acc[o] += ei * ej
                    acc[o + 1] += ei2
                    acc[o + 2] += ej * ej
                    acc[o + 3] = co + 1.0
            nc = 0
            for t in range(nt):  # branch-free too: half the sims are <= 0, unpredictably
                j = touched[t]
                o = 4 * j
                ab, co = acc[o + 1] * acc[o + 2], acc[o + 3]
                sim = np.float32(acc[o] / np.sqrt(ab) * co / (co + shrink) if ab > 0 else 0.0)
                cand_s[nc], cand_j[nc] = sim, j
                nc += (sim > 0) & (j != i)
                acc[o] = 0.0
                acc[o + 1] = 0.0
                acc[o + 2] = 0.0
                acc[o + 3] = 0.0
            for t in range(_best_sorted(cand_s, cand_j, nc, out_rows.shape[1])):
                out_rows[r, t] = cand_j[t]
                out_sims[r, t] = cand_s[t]


def _csr(
    major: np.ndarray, minor: np.ndarray, values: np.ndarray, n: int
) -> tuple[np.ndarray, ...]:
    order = np.argsort(major, kind="stable")
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(major, minlength=n), out=ptr[1:])
    return ptr, minor[order], values[order]


def item_neighbours(
    users: torch.Tensor, items: torch.Tensor, residuals: torch.Tensor, n_items: int, size: int,
    shrink: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reference.item_neighbours`` without the dense matrices: O(sum over users of their
    items squared) time, a few n_items buffers per thread."""
    u, i = users.numpy().astype(np.int64), items.numpy().astype(np.int64)
    e = residuals.double().numpy()
    n_users = int(u.max()) + 1 if u.size else 0
    i_ptr, i_users, i_res = _csr(i, u, e, n_items)
    u_ptr, u_items, u_res = _csr(u, i, e, n_users)
    rows = np.full((n_items, size), -1, np.int64)
    sims = np.zeros((n_items, size), np.float32)
    if n_items and size:
        parts = min(n_items, 4 * numba.get_num_threads())
        _parallel(_neighbour_rows, np.arange(n_items), i_ptr[:-1], i_ptr[1:], i_users, i_res,
                  u_ptr[:-1], u_ptr[1:], u_items, u_res, np.zeros(n_items), np.zeros(n_users),
                  float(shrink), parts, rows, sims)  # fmt: skip
    return torch.from_numpy(rows), torch.from_numpy(sims)


@njit(inline="always")
def _run_end(keys: np.ndarray, order: np.ndarray, e0: int) -> int:
    """The end of the run of equal ``keys[order[e]]`` that starts at e0 (events grouped by
    key through a stable sort)."""
    e1 = e0
    while e1 < order.shape[0] and keys[order[e1]] == keys[order[e0]]:
        e1 += 1
    return e1


@njit(cache=True)
def _knn_rows(
    indptr: np.ndarray, hist_items: np.ndarray, hist_ratings: np.ndarray, hist_ages: np.ndarray,
    slots: np.ndarray, items: np.ndarray, nbr_rows: np.ndarray, nbr_sims: np.ndarray,
    item_bias: np.ndarray, mu: float, user_reg: float, user_w: np.ndarray, k: int, reg: float,
    nbr_w: np.ndarray, lo: float, hi: float, where: np.ndarray, out: np.ndarray,
    has: np.ndarray,
) -> None:  # fmt: skip
    """Events grouped by history: each history's items are marked in ``where`` (item row ->
    position, -1 elsewhere; left all -1 again), so each neighbour is one lookup. Serial on
    purpose: a call is a few thousand events at most (a re-rank's B x 30), where waking a
    thread team costs more than the work. ``user_w[a]`` / ``nbr_w[a]``: the decays to the power
    a (a table: a pow per rating cost more than the rest of the kernel)."""
    n_b = item_bias.shape[0]
    order = np.argsort(slots, kind="mergesort")
    e0 = 0
    while e0 < order.shape[0]:
        s = slots[order[e0]]
        e1 = _run_end(slots, order, e0)
        a0, a1 = indptr[s], indptr[s + 1]
        if a1 > a0:
            total = weight = 0.0
            for t in range(a0, a1):
                h = hist_items[t]
                where[h] = t
                w = user_w[hist_ages[t]]
                b_h = np.float64(item_bias[h]) if h < n_b else 0.0
                total += w * (np.float64(hist_ratings[t]) - mu - b_h)
                weight += w
            b_a = total / (weight + user_reg)
            for q in range(e0, e1):
                e, j = order[q], items[order[q]]
                num = den = 0.0
                used = 0
                if j < nbr_rows.shape[0]:
                    for t in range(nbr_rows.shape[1]):
                        h = nbr_rows[j, t]
                        if used == k:
                            break
                        if h < 0 or where[h] < 0:
                            continue
                        p = where[h]
                        sim = np.float64(nbr_sims[j, t]) * nbr_w[hist_ages[p]]
                        b_h = np.float64(item_bias[h]) if h < n_b else 0.0
                        num += sim * (np.float64(hist_ratings[p]) - mu - b_a - b_h)
                        den += sim
                        used += 1
                b_j = np.float64(item_bias[j]) if j < n_b else 0.0
                corr = num / (den + reg) if den + reg > 0 else 0.0
                out[e] = min(max(mu + b_a + b_j + corr, lo), hi)
                has[e] = True
            for t in range(a0, a1):
                where[hist_items[t]] = -1
        e0 = e1


_scratch = threading.local()  # per thread: Recommenders and deployments may run side by side


def _positions(n: int) -> np.ndarray:
    """A scratch array of at least n int64, all -1 (``_knn_rows`` leaves it so)."""
    buf = getattr(_scratch, "where", None)
    if buf is None or buf.shape[0] < n:
        buf = _scratch.where = np.full(max(n, 1_024), -1, np.int64)
    return buf


def _decay_powers(decay: float, ages: np.ndarray) -> np.ndarray:
    """decay ** a for a = 0..max(ages), float64 (``_knn_rows``' tables)."""
    top = int(ages.max()) + 1 if ages.size else 1
    return np.power(float(decay), np.arange(top, dtype=np.float64))


def knn_predict(
    indptr: torch.Tensor, hist_items: torch.Tensor, hist_ratings: torch.Tensor,
    hist_ages: torch.Tensor, slots: torch.Tensor, items: torch.Tensor, nbr_rows: torch.Tensor,
    nbr_sims: torch.Tensor, item_bias: torch.Tensor, mu: float, user_reg: float,
    user_decay: float, k: int, reg: float, decay: float, lo: float, hi: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reference.knn_predict``, one compiled pass over the events."""
    n = items.numel()
    out, has = np.zeros(n, np.float32), np.zeros(n, np.bool_)
    if n:
        h = _i64(hist_items)
        where = _positions(max(nbr_rows.shape[0], int(h.max()) + 1 if h.size else 0))
        ages = _i64(hist_ages)
        _knn_rows(_i64(indptr), h, _f32(hist_ratings), ages, _i64(slots), _i64(items),
                  _i64(nbr_rows), _f32(nbr_sims), _f32(item_bias), float(mu), float(user_reg),
                  _decay_powers(user_decay, ages), int(k), float(reg),
                  _decay_powers(decay, ages), float(lo), float(hi), where, out,
                  has)  # fmt: skip
    return torch.from_numpy(out), torch.from_numpy(has)


def _rater_arrays(raters: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    start, count, users, ratings = raters
    return _i64(start), _i64(count), _i64(users), _f32(ratings)


def user_neighbours(
    which: torch.Tensor, hist_indptr: torch.Tensor, hist_items: torch.Tensor,
    hist_ratings: torch.Tensor, raters: tuple[torch.Tensor, ...], user_base: torch.Tensor,
    item_base: torch.Tensor, size: int, shrink: float, max_raters: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reference.user_neighbours`` without the dense matrices: O(sum over the users' items
    of the item's raters) time, an item over ``max_raters`` raters walked as if it had none.
    One n_users buffer set per thread, so at most as many parts as threads (a feedback call
    refreshes a few dozen users)."""
    m = which.numel()
    rows = np.full((m, size), -1, np.int64)
    sims = np.zeros((m, size), np.float32)
    if m and size:
        start, count, users, ratings = _rater_arrays(raters)
        if max_raters > 0:
            count = np.where(count > max_raters, 0, count)
        ptr = _i64(hist_indptr)
        _parallel(_neighbour_rows, _i64(which), ptr[:-1], ptr[1:], _i64(hist_items),
                  _f32(hist_ratings), start, start + count, users, ratings, _f64(user_base),
                  _f64(item_base), float(shrink), min(m, numba.get_num_threads()), rows,
                  sims)  # fmt: skip
    return torch.from_numpy(rows), torch.from_numpy(sims)


@njit(inline="always")
def _search_min(size: int, n: int) -> int:
    """The rater count from which ``_by_search`` reads an item of n raters: 2 x size x the
    binary search's steps, so that walking a whole list of ``size`` costs at most half the
    scan."""
    steps = 1
    while (1 << steps) <= n:
        steps += 1
    return 2 * size * steps


@njit(inline="always")
def _by_search(nbrs: np.ndarray, sims: np.ndarray, r_users: np.ndarray, r_ratings: np.ndarray,
               user_base: np.ndarray, base_j: float, k: int, reg: float) -> float:  # fmt: skip
    """``_user_knn_rows``' value for one event, the other way round: the user's neighbours
    (``nbrs``, most similar first, -1: none) in order, each binary-searched in the item's
    raters (``r_users``, ascending), until k of them rated it."""
    num = den = 0.0
    used = 0
    for t in range(nbrs.shape[0]):
        v = nbrs[t]
        if used == k:
            break
        if v < 0:
            continue
        p = np.searchsorted(r_users, v)
        if p < r_users.shape[0] and r_users[p] == v:
            s = np.float64(sims[t])
            num += s * (np.float64(r_ratings[p]) - base_j - user_base[v])
            den += s
            used += 1
    den += reg
    return num / den if den > 0 else 0.0


@njit(cache=True)
def _user_knn_rows(
    users: np.ndarray, items: np.ndarray, nbr_rows: np.ndarray, nbr_sims: np.ndarray,
    start: np.ndarray, count: np.ndarray, r_users: np.ndarray, r_ratings: np.ndarray,
    user_base: np.ndarray, item_base: np.ndarray, k: int, reg: float, where: np.ndarray,
    out: np.ndarray,
) -> None:  # fmt: skip
    """Events grouped by user: the user's neighbours are marked in ``where`` (user row -> rank,
    -1 elsewhere; left all -1 again), so each rater of an item is one lookup; the hits are
    flagged by rank and the first k read off in rank order (no sort: a popular item's raters
    hit most of the list). An item with so many raters that a binary search for every
    neighbour costs less than half the scan (its raters are sorted by user row) is read the
    other way: the neighbours in rank order, each looked up, until k have rated it (59,000
    raters of one item: a 120 us scan per event before). Serial, as ``_knn_rows``."""
    size = nbr_rows.shape[1]
    resid = np.empty(size)
    hits = np.empty(size, np.int64)
    hit = np.zeros(size, np.bool_)
    order = np.argsort(users, kind="mergesort")
    e0 = 0
    while e0 < order.shape[0]:
        a = users[order[e0]]
        e1 = _run_end(users, order, e0)
        if 0 <= a < nbr_rows.shape[0]:
            for t in range(size):
                v = nbr_rows[a, t]
                if v >= 0:
                    where[v] = t
            for q in range(e0, e1):
                e, j = order[q], items[order[q]]
                if j >= start.shape[0]:
                    continue
                lo, n_r = start[j], count[j]
                if n_r >= _search_min(size, n_r):
                    out[e] = _by_search(nbr_rows[a], nbr_sims[a], r_users[lo : lo + n_r],
                                        r_ratings[lo : lo + n_r], user_base, item_base[j], k,
                                        reg)  # fmt: skip
                    continue
                nh = 0
                for t in range(start[j], start[j] + count[j]):
                    v = r_users[t]
                    rank = where[v]
                    if rank >= 0:
                        hits[nh] = rank
                        hit[rank] = True
                        resid[rank] = np.float64(r_ratings[t]) - item_base[j] - user_base[v]
                        nh += 1
                num = den = 0.0
                used = t = 0
                while used < min(nh, k):  # the first k hits, most similar first
                    if hit[t]:
                        s = np.float64(nbr_sims[a, t])
                        num += s * resid[t]
                        den += s
                        used += 1
                    t += 1
                for t in range(nh):
                    hit[hits[t]] = False
                den += reg
                out[e] = num / den if den > 0 else 0.0
            for t in range(size):
                v = nbr_rows[a, t]
                if v >= 0:
                    where[v] = -1
        e0 = e1


def user_knn_predict(
    users: torch.Tensor, items: torch.Tensor, nbr_rows: torch.Tensor, nbr_sims: torch.Tensor,
    raters: tuple[torch.Tensor, ...], user_base: torch.Tensor, item_base: torch.Tensor, k: int,
    reg: float,
) -> torch.Tensor:  # fmt: skip
    """``reference.user_knn_predict``, one compiled pass over the events."""
    out = np.zeros(items.numel(), np.float32)
    if out.size:
        start, count, r_users, r_ratings = _rater_arrays(raters)
        _user_knn_rows(_i64(users), _i64(items), _i64(nbr_rows), _f32(nbr_sims), start, count,
                       r_users, r_ratings, _f64(user_base), _f64(item_base), int(k), float(reg),
                       _positions(user_base.numel()), out)  # fmt: skip
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# the re-rank with both neighbourhood corrections


@njit(cache=True)
def _blend_terms(
    cand: np.ndarray, users: np.ndarray, indptr: np.ndarray, h_items: np.ndarray,
    h_ratings: np.ndarray, h_ages: np.ndarray, use_item: bool, k_rows: np.ndarray,
    k_sims: np.ndarray, k_bias: np.ndarray, k_mu: float, k_user_reg: float, user_w: np.ndarray,
    k_k: int, k_reg: float, nbr_w: np.ndarray, lo: float, hi: float, k_weight: float,
    ramp: float, use_user: bool, u_rows: np.ndarray, u_sims: np.ndarray, start: np.ndarray,
    count: np.ndarray, r_users: np.ndarray, r_ratings: np.ndarray, user_base: np.ndarray,
    item_base: np.ndarray, u_k: int, u_reg: float, u_weight: float, where: np.ndarray,
    val: np.ndarray, w: np.ndarray, add: np.ndarray,
) -> None:  # fmt: skip
    """``reference.blend_terms`` into val, w, add [B, m] (zeros): ``_knn_rows`` and
    ``_user_knn_rows`` over the candidate events (padding left out) in one compiled call."""
    b, m = cand.shape
    n_ev = 0
    for q in range(b):
        for c in range(m):
            n_ev += cand[q, c] >= 0
    flat = np.empty(n_ev, np.int64)
    slots = np.empty(n_ev, np.int64)
    pos = np.empty(n_ev, np.int64)  # the event's place, q * m + c
    e = 0
    for q in range(b):
        for c in range(m):
            if cand[q, c] >= 0:
                flat[e], slots[e], pos[e] = cand[q, c], q, q * m + c
                e += 1
    if use_item:
        out = np.zeros(n_ev, np.float32)
        has = np.zeros(n_ev, np.bool_)
        _knn_rows(indptr, h_items, h_ratings, h_ages, slots, flat, k_rows, k_sims, k_bias, k_mu,
                  k_user_reg, user_w, k_k, k_reg, nbr_w, lo, hi, where, out, has)  # fmt: skip
        for e in range(n_ev):
            q, c = pos[e] // m, pos[e] % m
            val[q, c] = out[e]
            n = np.float32(indptr[q + 1] - indptr[q])
            if n > 0:  # float32 throughout, as the reference
                w[q, c] = np.float32(k_weight) * n / max(n + np.float32(ramp), np.float32(1e-12))
    if use_user:
        users_e = np.empty(n_ev, np.int64)
        for e in range(n_ev):
            users_e[e] = users[slots[e]]
        corr = np.zeros(n_ev, np.float32)
        _user_knn_rows(users_e, flat, u_rows, u_sims, start, count, r_users, r_ratings,
                       user_base, item_base, u_k, u_reg, where, corr)  # fmt: skip
        for e in range(n_ev):
            add[pos[e] // m, pos[e] % m] = np.float32(u_weight) * corr[e]


def blend_terms(
    top: torch.Tensor, users: torch.Tensor, depth: int, hist: History | None,
    item_knn: ItemKnn | None, user_knn: UserKnn | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``reference.blend_terms`` in one compiled call."""
    cand = np.ascontiguousarray(_i64(top)[:, :depth])
    nb, m = cand.shape
    val, w, add = (np.zeros((nb, m), np.float32) for _ in range(3))
    if item_knn is None or hist is None:
        item_knn = hist = None
    if cand.size and (item_knn is not None or user_knn is not None):
        zi, zf, zd = np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros(1)
        need = 1
        # an absent part: empty tables and settings the kernel never reads
        h: tuple[np.ndarray, ...] = (np.zeros(nb + 1, np.int64), zi, zf, zi)
        ik: tuple[Any, ...] = (np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), zf,
                               0.0, 0.0, zd, 0, 0.0, zd, 0.0, 0.0, 0.0, 0.0)  # fmt: skip
        if item_knn is not None and hist is not None:
            h = (_i64(hist.indptr), _i64(hist.items), _f32(hist.ratings), _i64(hist.ages))
            k = item_knn
            ik = (_i64(k.rows), _f32(k.sims), _f32(k.bias), float(k.mu), float(k.user_reg),
                  _decay_powers(k.user_decay, h[3]), int(k.k), float(k.reg),
                  _decay_powers(k.decay, h[3]), float(k.lo), float(k.hi), float(k.weight),
                  float(k.ramp))  # fmt: skip
            need = max(ik[0].shape[0], int(h[1].max()) + 1 if h[1].size else 0)
        uk: tuple[Any, ...] = (np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), zi,
                               zi, zi, zf, zd, zd, 0, 0.0, 0.0)  # fmt: skip
        if user_knn is not None:
            k2 = user_knn
            uk = (_i64(k2.rows), _f32(k2.sims), *_rater_arrays(k2.raters), _f64(k2.user_base),
                  _f64(k2.item_base), int(k2.k), float(k2.reg), float(k2.weight))  # fmt: skip
            need = max(need, uk[6].shape[0])
        args = (cand, _i64(users), *h, item_knn is not None, *ik, user_knn is not None, *uk,
                _positions(need), val, w, add)  # fmt: skip
        _blend_terms(*args)
    return torch.from_numpy(val), torch.from_numpy(w), torch.from_numpy(add)


# both corrections' terms in one compiled call, then rerank_mf (a recommend's glue between
# three kernel calls cost more than the kernels)
rerank_blend = rerank_blend_from(blend_terms, rerank_mf)
