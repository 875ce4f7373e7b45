"""recommend's hot path: score every item, keep the top k. Ours (numba fused kernel, and an
int8 catalogue) vs torch matmul + topk, numpy argpartition and FAISS IndexFlatIP (bias as an
extra dimension), side by side; every time also as a multiple of the read-bandwidth floor
(bytes of the item table / measured read bandwidth).

    pytest benchmarks/bench_score.py --benchmark-enable     # pytest-benchmark tables
    python -m benchmarks.bench_score                        # one table with the ratios
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch

from lrec_fast import kernels
from lrec_fast.kernels.reference import quantize_rows

from .conftest import N_ITEMS, SMALL
from .floors import (
    READ_PASS_BYTES,
    floor_ms,
    interleaved_ms,
    median_ms,
    read_bandwidth_gbs,
    read_pass,
    round_median,
    round_ratio,
)

DIMS = [64] if SMALL else [64, 384]
BATCHES = [1, 64]
KS = [10, 100]
IMPLS = ["ours", "ours_int8", "torch", "numpy", "faiss"]


@cache
def catalogue(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n + d)
    return torch.randn(n, d, generator=g), torch.randn(n, generator=g)


@cache
def quantised(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(catalogue(n, d)[0])


@cache
def faiss_index(n: int, d: int):  # type: ignore[no-untyped-def]
    import faiss

    v, bias = catalogue(n, d)
    index = faiss.IndexFlatIP(d + 1)
    index.add(torch.cat([v, bias[:, None]], 1).numpy())
    return index


def runner(impl: str, n: int, d: int, b: int, k: int) -> Callable[[], object]:
    v, bias = catalogue(n, d)
    q = torch.randn(b, d, generator=torch.Generator().manual_seed(7))
    if impl == "ours":
        return lambda: kernels.score_topk(q, v, k, item_bias=bias, backend="numba")
    if impl == "ours_int8":
        qv, scale = quantised(n, d)
        return lambda: kernels.score_topk(q, qv, k, item_bias=bias, row_scale=scale,
                                          backend="numba")  # fmt: skip
    if impl == "torch":
        return lambda: torch.topk(torch.addmm(bias, q, v.T), k, dim=1)
    if impl == "numpy":
        qn, vn, bn = q.numpy(), v.numpy(), bias.numpy()

        def numpy_topk() -> np.ndarray:
            s = qn @ vn.T + bn
            part = np.argpartition(-s, k, axis=1)[:, :k]
            top = np.take_along_axis(s, part, 1)
            return np.take_along_axis(part, np.argsort(-top, 1), 1)

        return numpy_topk
    index = faiss_index(n, d)
    qa = torch.cat([q, torch.ones(b, 1)], 1).numpy()
    return lambda: index.search(qa, k)


GRID = list(itertools.product(N_ITEMS, DIMS, BATCHES, KS))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "d", "b", "k"), GRID, ids=lambda x: str(x))
def test_score(benchmark, impl, n, d, b, k):
    if impl == "faiss":
        pytest.importorskip("faiss", reason="pip install faiss-cpu (the bench extra)")
    benchmark.group = f"score N={n} d={d} B={b} k={k}"
    benchmark.extra_info["floor_ms"] = floor_ms(n * d * 4)
    benchmark(runner(impl, n, d, b, k))


def report() -> str:
    """One table: per grid row, every implementation and a read pass over a table-sized array
    timed in interleaved rounds; times are medians over rounds, ratios medians of the
    per-round ratios (so a drift of the machine's speed moves both sides alike)."""
    bw = read_bandwidth_gbs()
    lines = [
        f"read bandwidth {bw:.1f} GB/s (1 GiB pass); ms, median of interleaved rounds "
        "(x the floor: the fp32 table at the bandwidth of a 1 GiB read pass in the same round)",
        "| N | d | B | k | floor | "
        + " | ".join(IMPLS)
        + " | torch/ours | faiss/ours | ours/ours_int8 |",
        "|" + "---|" * (8 + len(IMPLS)),
    ]
    for n, d, b, k in GRID:
        fns = {"floor": read_pass()}
        for impl in IMPLS:
            if impl == "faiss" and "faiss" not in sys.modules:
                try:
                    import faiss  # noqa: F401
                except ImportError:
                    continue
            fns[impl] = runner(impl, n, d, b, k)
        slow = median_ms(fns["numpy"], repeats=1) > 300
        ms = interleaved_ms(fns, rounds=3 if slow else 9)
        ms["floor"] = [t * n * d * 4 / READ_PASS_BYTES for t in ms["floor"]]

        cells = " | ".join(
            f"{round_median(ms, i):.2f} ({round_ratio(ms, i, 'floor'):.1f}x)" for i in IMPLS
        )
        lines.append(
            f"| {n:,} | {d} | {b} | {k} | {round_median(ms, 'floor'):.2f} | {cells} | "
            f"{round_ratio(ms, 'torch', 'ours'):.1f}x | {round_ratio(ms, 'faiss', 'ours'):.1f}x | "
            f"{round_ratio(ms, 'ours', 'ours_int8'):.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
