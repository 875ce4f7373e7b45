"""feedback's hot path: one decayed SGD step on a micro-batch. Ours (lazy exact decay, O(batch);
numba fused kernel, its row-wise Adagrad mode, and the torch reference) vs torch dense
SGD(weight_decay) on nn.Embedding tables (forward, backward, step), a hand-written exact dense
step (mul_ the whole table, then index_add_), and sparse nn.Embedding + SGD, which cannot decay
at all ("add(sparse, dense) is not supported") and is timed without it.

    pytest benchmarks/bench_update.py --benchmark-enable     # pytest-benchmark tables
    python -m benchmarks.bench_update                        # one table with the ratios
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lrec_fast import kernels

from .conftest import N_ITEMS
from .floors import median_ms

D, LR, WD = 64, 0.5, 1e-3


def batch(n_rows: int, m: int):
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, n_rows, (m,), generator=g)
    items = torch.randint(0, n_rows, (m,), generator=g)
    return users, items, torch.randint(1, 6, (m,), generator=g).float()


@pytest.fixture(scope="module", params=N_ITEMS, ids=lambda n: f"N={n}")
def n_rows(request):
    return request.param


def ours(n_rows: int, m: int, backend: str, adagrad: bool = False) -> Callable[[], object]:
    u = torch.randn(n_rows, D) * 0.1
    v = torch.randn(n_rows, D) * 0.1
    bu, bv = torch.zeros(n_rows), torch.zeros(n_rows)
    scales = torch.ones(4, dtype=torch.float64)
    mu = torch.tensor([3.5], dtype=torch.float64)
    acc = (torch.zeros(n_rows), torch.zeros(n_rows), torch.zeros(n_rows), torch.zeros(n_rows))
    users, items, r = batch(n_rows, m)

    def step() -> None:
        args = (u, v, bu, bv, scales, mu, users, items, r, LR, WD)
        if adagrad:
            kernels.mf_adagrad_step(*args, acc, backend=backend)
        else:
            kernels.mf_sgd_step(*args, backend=backend)
        if float(scales.min()) < 1e-3:  # keep values sane across many rounds (a fold)
            scales.fill_(1.0)

    return step


def embeddings(n_rows: int, sparse: bool) -> list[torch.nn.Embedding]:
    return [torch.nn.Embedding(n_rows, dim, sparse=sparse) for dim in (D, D, 1, 1)]


def torch_step(n_rows: int, m: int, sparse: bool) -> Callable[[], object]:
    emb_u, emb_v, b_u, b_v = embeddings(n_rows, sparse)
    params = [p for e in (emb_u, emb_v, b_u, b_v) for p in e.parameters()]
    opt = torch.optim.SGD(params, lr=LR, weight_decay=0.0 if sparse else WD)
    users, items, r = batch(n_rows, m)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pred = 3.5 + b_u(users)[:, 0] + b_v(items)[:, 0] + (emb_u(users) * emb_v(items)).sum(1)
        torch.mean((r - pred) ** 2).backward()
        opt.step()

    return step


def handwritten_dense(n_rows: int, m: int) -> Callable[[], object]:
    u, v = torch.randn(n_rows, D) * 0.1, torch.randn(n_rows, D) * 0.1
    bu, bv = torch.zeros(n_rows), torch.zeros(n_rows)
    users, items, r = batch(n_rows, m)

    def step() -> None:
        with torch.no_grad():
            e = r - (3.5 + bu[users] + bv[items] + (u[users] * v[items]).sum(1))
            g = e * (2.0 / m)
            gu, gv = g[:, None] * v[items], g[:, None] * u[users]
            for t in (u, v, bu, bv):
                t.mul_(1 - LR * WD)
            u.index_add_(0, users, gu, alpha=LR)
            v.index_add_(0, items, gv, alpha=LR)
            bu.index_add_(0, users, g, alpha=LR)
            bv.index_add_(0, items, g, alpha=LR)

    return step


IMPLS: dict[str, Callable[[int, int], Callable[[], object]]] = {
    "ours (numba)": lambda n, m: ours(n, m, "numba"),
    "ours adagrad (numba)": lambda n, m: ours(n, m, "numba", adagrad=True),
    "ours (torch reference)": lambda n, m: ours(n, m, "torch"),
    "torch SGD(weight_decay) dense": lambda n, m: torch_step(n, m, sparse=False),
    "hand-written dense mul_+index_add_": handwritten_dense,
    "torch sparse SGD (no decay)": lambda n, m: torch_step(n, m, sparse=True),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("m", [64, 1024])
def test_update(benchmark, n_rows, m, impl):
    if "numba" in impl and "numba" not in kernels.available_backends():
        pytest.skip("numba backend unavailable")
    benchmark.group = f"update N={n_rows} batch={m}"
    benchmark(IMPLS[impl](n_rows, m))


def report() -> str:
    lines = ["ms per micro-batch step, d = 64 (median)", "| N | batch | " +
             " | ".join(IMPLS) + " | dense / ours | sparse / ours |",
             "|" + "---|" * (4 + len(IMPLS))]  # fmt: skip
    for n in N_ITEMS:
        for m in (64, 1024):
            ms = {name: median_ms(make(n, m), repeats=15) for name, make in IMPLS.items()}
            mine = ms["ours (numba)"]
            cells = " | ".join(f"{ms[i]:.3f}" for i in IMPLS)
            lines.append(f"| {n:,} | {m} | {cells} | "
                         f"{ms['torch SGD(weight_decay) dense'] / mine:,.0f}x | "
                         f"{ms['torch sparse SGD (no decay)'] / mine:.1f}x |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
