"""feedback's hot path: one decayed SGD step on a micro-batch. Ours (lazy exact decay, O(batch))
vs torch dense SGD(weight_decay) on nn.Embedding tables (forward, backward, step) and a
hand-written exact dense step (mul_ the whole table, then index_add_)."""

from __future__ import annotations

import pytest
import torch

from lrec_fast import kernels

from .conftest import N_ITEMS

D, LR, WD = 64, 0.5, 1e-3


def batch(n_rows: int, m: int):
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, n_rows, (m,), generator=g)
    items = torch.randint(0, n_rows, (m,), generator=g)
    return users, items, torch.randint(1, 6, (m,), generator=g).float()


@pytest.fixture(scope="module", params=N_ITEMS, ids=lambda n: f"N={n}")
def n_rows(request):
    return request.param


@pytest.mark.parametrize("m", [64, 1024])
def test_ours_lazy_decay(benchmark, n_rows, m):
    u = torch.randn(n_rows, D) * 0.1
    v = torch.randn(n_rows, D) * 0.1
    bu, bv = torch.zeros(n_rows), torch.zeros(n_rows)
    scales = torch.ones(4, dtype=torch.float64)
    mu = torch.tensor([3.5], dtype=torch.float64)
    users, items, r = batch(n_rows, m)
    benchmark.group = f"update N={n_rows} batch={m}"
    benchmark(kernels.mf_sgd_step, u, v, bu, bv, scales, mu, users, items, r, LR, WD)
    if float(scales.min()) < 1e-3:  # keep values sane across many rounds
        scales.fill_(1.0)


@pytest.mark.parametrize("m", [64, 1024])
def test_torch_dense_sgd_weight_decay(benchmark, n_rows, m):
    emb_u, emb_v = torch.nn.Embedding(n_rows, D), torch.nn.Embedding(n_rows, D)
    b_u, b_v = torch.nn.Embedding(n_rows, 1), torch.nn.Embedding(n_rows, 1)
    params = [*emb_u.parameters(), *emb_v.parameters(), *b_u.parameters(), *b_v.parameters()]
    opt = torch.optim.SGD(params, lr=LR, weight_decay=WD)
    users, items, r = batch(n_rows, m)

    def step():
        opt.zero_grad(set_to_none=True)
        pred = 3.5 + b_u(users)[:, 0] + b_v(items)[:, 0] + (emb_u(users) * emb_v(items)).sum(1)
        torch.mean((r - pred) ** 2).backward()
        opt.step()

    benchmark.group = f"update N={n_rows} batch={m}"
    benchmark(step)


@pytest.mark.parametrize("m", [64, 1024])
def test_handwritten_dense_exact(benchmark, n_rows, m):
    u, v = torch.randn(n_rows, D) * 0.1, torch.randn(n_rows, D) * 0.1
    bu, bv = torch.zeros(n_rows), torch.zeros(n_rows)
    users, items, r = batch(n_rows, m)

    def step():
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

    benchmark.group = f"update N={n_rows} batch={m}"
    benchmark(step)
