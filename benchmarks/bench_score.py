"""recommend's hot path: score every item, keep the top k. Ours (dispatch, currently the torch
reference) vs torch matmul + topk and numpy argpartition, side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrec_fast import kernels

from .conftest import N_ITEMS


@pytest.fixture(scope="module", params=N_ITEMS, ids=lambda n: f"N={n}")
def table(request):
    g = torch.Generator().manual_seed(0)
    return torch.randn(request.param, 64, generator=g), torch.randn(request.param, generator=g)


@pytest.mark.parametrize("b", [1, 64])
def test_ours(benchmark, table, b):
    v, bias = table
    q = torch.randn(b, 64)
    benchmark.group = f"score N={len(v)} B={b} k=10"
    _, i = benchmark(kernels.score_topk, q, v, 10, item_bias=bias, item_scale=0.9)
    assert i.shape == (b, 10)


@pytest.mark.parametrize("b", [1, 64])
def test_torch_matmul_topk(benchmark, table, b):
    v, bias = table
    q = torch.randn(b, 64)
    benchmark.group = f"score N={len(v)} B={b} k=10"
    benchmark(lambda: torch.topk(torch.addmm(bias, q, v.T, alpha=0.9), 10, dim=1))


@pytest.mark.parametrize("b", [1, 64])
def test_numpy_argpartition(benchmark, table, b):
    v, bias = (t.numpy() for t in table)
    q = np.random.default_rng(0).standard_normal((b, 64), dtype=np.float32)

    def run():
        s = q @ v.T * 0.9 + bias
        part = np.argpartition(-s, 10, axis=1)[:, :10]
        top = np.take_along_axis(s, part, 1)
        return np.take_along_axis(part, np.argsort(-top, 1), 1)

    benchmark.group = f"score N={len(v)} B={b} k=10"
    benchmark(run)
