"""End-to-end facade latency at MovieLens scale (1,682 items, 943 users, dim 64): what a service
calling recommend() and feedback() sees, including validation, id maps and locking. The
alternative beside it is the bare torch computation a user would write by hand."""

from __future__ import annotations

import pytest
import torch

from lrec_fast import Recommender
from lrec_fast.data import make_stream


@pytest.fixture(scope="module")
def rec():
    ds = make_stream(n_users=943, n_items=1682, n_events=50_000, seed=0)
    r = Recommender(encoder="hashing-384", max_epochs=3)
    r.add_items(ds.item_ids, ds.item_text)
    r.fit(ds.events.user, ds.events.item, ds.events.rating)
    return r


@pytest.mark.parametrize("b", [1, 64])
def test_recommend(benchmark, rec, b):
    users = rec.state.users.ids[:b]
    benchmark.group = f"service recommend B={b} k=10"
    items, _ = benchmark(rec.recommend, users, 10)
    assert items.shape == (b, 10)


@pytest.mark.parametrize("b", [1, 64])
def test_bare_torch_scoring(benchmark, rec, b):
    u, v = rec.state.true_user_rows()[:b].clone(), rec.state.true_item_rows().clone()
    bias = rec.state.true_item_bias().clone()
    benchmark.group = f"service recommend B={b} k=10"
    benchmark(lambda: torch.topk(torch.addmm(bias, u, v.T), 10, dim=1))


@pytest.mark.parametrize("m", [1, 100])
def test_feedback(benchmark, rec, m):
    users = (rec.state.users.ids * 2)[:m]
    items = list(range(m))
    benchmark.group = f"service feedback {m} events"
    benchmark(rec.feedback, users, items, [4.0] * m)
