"""End-to-end facade latency at MovieLens scale (1,682 items, 943 users, dim 64): what a service
calling recommend() and feedback() sees, including validation, id maps and locking. Beside each
is its floor: bare torch scoring, and the bare update kernel."""

from __future__ import annotations

import pytest
import torch

from lrec_fast import Recommender, kernels
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


@pytest.mark.parametrize("m", [1, 100])
def test_bare_kernel_step(benchmark, rec, m):
    """The same step with no validation, id mapping, guard rail or lock: the facade's floor."""
    st = rec.state
    tables = [t.clone() for t in (st.user_rows.t, st.item_rows.t, st.user_bias.t, st.item_bias.t)]
    scales, mu = st.scales.clone(), st.mu.clone()
    users = torch.arange(m) % st.user_rows.n
    items, ratings = torch.arange(m), torch.full((m,), 4.0)
    benchmark.group = f"service feedback {m} events"
    benchmark(kernels.mf_sgd_step, *tables, scales, mu, users, items, ratings, 1.0, 1e-3)
    if float(scales.min()) < 1e-3:
        scales.fill_(1.0)
