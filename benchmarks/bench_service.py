"""End-to-end facade latency at MovieLens scale (1,682 items, 943 users, dim 64): what a service
calling recommend() and feedback() sees, including validation, id maps and locking. Beside each
is its floor: bare torch scoring, and the bare update kernel. A service that is not saturated
calls after idle gaps: those calls are timed too, after 50 ms of sleep each. The slow time
scales (refit, consolidation) are timed beside retraining from scratch.

    pytest benchmarks/bench_service.py --benchmark-enable
    python -m benchmarks.bench_service     # back to back vs after idle, OpenMP wait policies
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from lrec_fast import Recommender, kernels
from lrec_fast.data import make_stream

IDLE_S = 0.05


def movielens_sized() -> Recommender:
    ds = make_stream(n_users=943, n_items=1682, n_events=50_000, seed=0)
    r = Recommender(encoder="hashing-384", max_epochs=3)
    r.add_items(ds.item_ids, ds.item_text)
    r.fit(ds.events.user, ds.events.item, ds.events.rating)
    return r


@pytest.fixture(scope="module")
def rec():
    return movielens_sized()


def switched_off(rec: Recommender, names: list[str]) -> dict[str, float]:
    """Set the config's ``names`` to 0; returns their values to restore."""
    saved = {k: getattr(rec.config, k) for k in names}
    for k in names:
        setattr(rec.config, k, 0.0)
    return saved


@pytest.mark.parametrize("off", ["default", "no-uknn", "mf-only", "no-rerank"])
@pytest.mark.parametrize("b", [1, 64])
def test_recommend(benchmark, rec, b, off):
    """The default (warm users' top 30 re-ranked by the predicted rating, both neighbourhood
    corrections included) beside the re-rank without the user neighbourhood, with the factor
    model's rating alone, and rerank_weight=0."""
    users = rec.state.users.ids[:b]
    benchmark.group = f"service recommend B={b} k=10"
    saved = switched_off(rec, {"default": [], "no-uknn": ["uknn_weight"],
                               "mf-only": ["uknn_weight", "knn_weight"],
                               "no-rerank": ["rerank_weight"]}[off])  # fmt: skip
    try:
        items, _ = benchmark(rec.recommend, users, 10)
    finally:
        for k, v in saved.items():
            setattr(rec.config, k, v)
    assert items.shape == (b, 10)


OFFSETS = ["offset_count_weight", "offset_item_weight"]


@pytest.mark.parametrize("what", ["full", "no-uknn", "knn", "mf-only"])
@pytest.mark.parametrize("n", [1, 100])
def test_predict(benchmark, rec, n, what):
    """predict() of n (user, item) pairs of known users: the default (both neighbourhood
    corrections and the residual offsets), without the user neighbourhood, with the item
    neighbourhood alone, and the factor model alone."""
    ids = rec.state.users.ids
    users, items = [ids[j % len(ids)] for j in range(n)], rec.item_ids[:n]
    benchmark.group = f"service predict n={n}"
    off = {"full": [], "no-uknn": ["uknn_weight"], "knn": [*OFFSETS, "uknn_weight"],
           "mf-only": [*OFFSETS, "uknn_weight", "knn_weight"]}[what]  # fmt: skip
    saved = switched_off(rec, off)
    try:
        benchmark(rec.predict, users, items)
    finally:
        for k, v in saved.items():
            setattr(rec.config, k, v)


@pytest.mark.parametrize("b", [1, 64])
def test_bare_torch_scoring(benchmark, rec, b):
    u, v = rec.state.true_user_rows()[:b].clone(), rec.state.true_item_rows().clone()
    bias = rec.state.true_item_bias().clone()
    benchmark.group = f"service recommend B={b} k=10"
    benchmark(lambda: torch.topk(torch.addmm(bias, u, v.T), 10, dim=1))


@pytest.mark.parametrize("off", ["default", "every-list", "no-offsets", "no-uknn"])
@pytest.mark.parametrize("m", [1, 100])
def test_feedback(benchmark, rec, m, off):
    """feedback() as configured, with every user's list remade (uknn_refresh_growth 0: the
    rounds repeat the same events, so by default no list is due after the first), without
    the residual offsets (which first compute what predict would have answered) and without
    the user neighbourhood."""
    users = (rec.state.users.ids * 2)[:m]
    items = list(range(m))
    benchmark.group = f"service feedback {m} events"
    saved = switched_off(rec, {"default": [], "every-list": ["uknn_refresh_growth"],
                               "no-offsets": OFFSETS, "no-uknn": ["uknn_weight"]}[off])  # fmt: skip
    try:
        benchmark(rec.feedback, users, items, [4.0] * m)
    finally:
        for k, v in saved.items():
            setattr(rec.config, k, v)


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


@pytest.mark.parametrize("call", ["recommend", "feedback"])
def test_after_idle(benchmark, rec, call):
    """One call after the process slept IDLE_S: what a lightly loaded service sees."""
    users = rec.state.users.ids
    fn = {"recommend": lambda: rec.recommend(users[:1], 10),
          "feedback": lambda: rec.feedback(users[:1], [0], [4.0])}[call]  # fmt: skip
    benchmark.group = f"service {call} after {IDLE_S * 1e3:.0f} ms idle"
    benchmark.pedantic(fn, setup=lambda: time.sleep(IDLE_S), rounds=15, iterations=1)


@pytest.mark.parametrize("call", ["recommend", "feedback"])
def test_bare_after_idle(benchmark, rec, call):
    """The floors beside test_after_idle: bare torch scoring / the bare update kernel, each
    after the same idle."""
    st = rec.state
    if call == "recommend":
        u, v = st.true_user_rows()[:1].clone(), st.true_item_rows().clone()
        bias = st.true_item_bias().clone()

        def fn() -> object:
            return torch.topk(torch.addmm(bias, u, v.T), 10, dim=1)
    else:
        tables = [t.clone() for t in (st.user_rows.t, st.item_rows.t, st.user_bias.t,
                                      st.item_bias.t)]  # fmt: skip
        scales, mu = st.scales.clone(), st.mu.clone()
        one, four = torch.zeros(1, dtype=torch.int64), torch.full((1,), 4.0)

        def fn() -> object:
            return kernels.mf_sgd_step(*tables, scales, mu, one, one, four, 1.0, 1e-3)

    benchmark.group = f"service {call} after {IDLE_S * 1e3:.0f} ms idle"
    benchmark.pedantic(fn, setup=lambda: time.sleep(IDLE_S), rounds=15, iterations=1)


SLOW = "slow time scales, 50,000 logged events"


@pytest.fixture(scope="module")
def slow_rec():
    return movielens_sized()  # its own model: a refit changes the weights


def test_refit(benchmark, slow_rec):
    """One refit pass over the event log (the fit's 50,000 events), guard and text-prior
    refresh included, beside what a user would do instead: retrain from scratch."""
    benchmark.group = SLOW
    report = benchmark.pedantic(slow_rec.refit, rounds=5, iterations=1)
    assert report.events == 50_000 and not report.rolled_back


def test_consolidate(benchmark, slow_rec):
    benchmark.group = SLOW
    benchmark.pedantic(slow_rec.consolidate, rounds=5, iterations=1)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_item_neighbours(benchmark, slow_rec, backend):
    """The neighbourhood correction's recompute (at each refit): every item's 100 nearest by
    residual correlation over 50,000 ratings; numba (sparse walk) beside the dense torch
    reference (two n_items^2 GEMMs: what a user would write)."""
    from lrec_fast import neighbours

    st, cfg = slow_rec.state, slow_rec.config
    users, items, ratings = neighbours._rated(st, cfg.knn_history_cap)
    mu, b_u, b_i = neighbours.baseline(users, items, ratings, len(st.users), len(st.items), cfg)
    res = ratings - mu - b_u[users] - b_i[items]
    benchmark.group = SLOW
    benchmark.pedantic(kernels.item_neighbours, (users, items, res, len(st.items), cfg.knn_size,
                                                 cfg.knn_shrink), {"backend": backend},
                       rounds=3, iterations=1)  # fmt: skip


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_user_neighbours(benchmark, slow_rec, backend):
    """The user neighbourhood's recompute (at each refit): every user's 200 nearest over
    50,000 ratings; numba (a walk over the raters index) beside the dense torch reference."""
    from lrec_fast import user_neighbours

    st, cfg = slow_rec.state, slow_rec.config
    users = torch.arange(len(st.users))
    un = user_neighbours.UserNeighbours.of(st, cfg)
    assert un is not None
    hist = user_neighbours._histories(st, users.numpy())
    benchmark.group = SLOW
    benchmark.pedantic(kernels.user_neighbours, (users, *(torch.from_numpy(x) for x in hist),
                                                 un.raters, un.user_base, un.item_base,
                                                 cfg.uknn_size, cfg.uknn_shrink,
                                                 cfg.uknn_max_raters),
                       {"backend": backend}, rounds=3, iterations=1)  # fmt: skip


def test_retrain_from_scratch(benchmark):
    """A fresh rating model fitted on the same 50,000 events (early stopping, as the
    evaluation's retraining baseline), the alternative to a refit."""
    from lrec_fast.evaluate import RATING_MF

    ds = make_stream(n_users=943, n_items=1682, n_events=50_000, seed=0)

    def retrain() -> Recommender:
        r = Recommender(encoder="hashing-384", **RATING_MF)
        r.add_items(ds.item_ids, ds.item_text)
        r.fit(ds.events.user, ds.events.item, ds.events.rating)
        return r

    benchmark.group = SLOW
    benchmark.pedantic(retrain, rounds=2, iterations=1)


def _child() -> None:
    """Print median ms of recommend / feedback (1 user / 1 event), back to back and after
    IDLE_S idle, in this process's OpenMP setting."""
    r = movielens_sized()
    users = r.state.users.ids
    calls = {"recommend": lambda i: r.recommend([users[i % 900]], 10),
             "feedback": lambda i: r.feedback([users[i % 900]], [i % 1600], [4.0])}  # fmt: skip
    out = []
    for fn in calls.values():
        for gap in (0.0, IDLE_S):
            fn(0)
            ts = []
            for i in range(40 if gap else 400):
                time.sleep(gap)
                t = time.perf_counter()
                fn(i)
                ts.append((time.perf_counter() - t) * 1e3)
            out.append(f"{statistics.median(ts):.3f}")
    print(" ".join(out))


def report() -> str:
    """Each OpenMP setting in its own process (the runtimes read it once, at load)."""
    lines = [
        f"| OpenMP setting | recommend B=1 | after {IDLE_S * 1e3:.0f} ms idle "
        f"| feedback 1 event | after {IDLE_S * 1e3:.0f} ms idle |",
        "|---|---|---|---|---|",
    ]
    for label, var in (
        ("GOMP_SPINCOUNT=3000 (lrec_fast's default)", "GOMP_SPINCOUNT=3000"),
        ("OMP_WAIT_POLICY=PASSIVE", "OMP_WAIT_POLICY=PASSIVE"),
        ("libgomp's default (neither set)", None),
    ):
        env = {k: v for k, v in os.environ.items()
               if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}  # fmt: skip
        if var:
            key, value = var.split("=")
            env[key] = value
        # torch first: lrec_fast then leaves the variables as given here
        code = "import torch; from benchmarks.bench_service import _child; _child()"
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        cells = res.stdout.split()[-4:]
        lines.append(f"| {label} | " + " | ".join(f"{c} ms" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
