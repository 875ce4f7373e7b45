"""``kernels.rerank_blend``: recommend's re-rank by the rating ``predict`` gives, with both
neighbourhood corrections. The torch reference composes the reference kernels; the numba
backend computes both corrections' terms in one compiled call. Fresh random models, padded
candidate lists, users without ratings or lists, items past the tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrec_fast import kernels
from lrec_fast.kernels import reference as ref
from lrec_fast.neighbours import by_user, history_rows

from .test_backends import rerank_case
from .test_user_neighbours import histories, random_model

N_USERS, N_ITEMS = 24, 60


def model(rng: np.random.Generator) -> tuple[object, ref.ItemKnn, ref.UserKnn]:
    """Seen items (the last 4 users rate nothing), item-kNN tables for the first 50 items
    (-1 and repeats anywhere) and user lists for all but the last 2 users."""
    seen, raters, base_u, base_i = random_model(rng, N_USERS - 4, N_ITEMS, 400)
    seen.append_users(4)
    base_u = torch.cat([base_u, torch.zeros(4, dtype=torch.float64)])
    which = torch.arange(N_USERS - 2)
    rows, sims = kernels.user_neighbours(which, *histories(seen, which), raters, base_u, base_i,
                                         8, 5.0, backend="torch")  # fmt: skip
    table = 50
    item_knn = ref.ItemKnn(
        torch.from_numpy(rng.integers(-1, table, (table, 12))),
        torch.from_numpy(rng.uniform(0, 1, (table, 12)).astype(np.float32)),
        torch.from_numpy(rng.normal(size=table).astype(np.float32)),
        3.5, 5.0, 0.9, 5, 0.3, 0.8, 1.0, 5.0, 0.5, 10.0,
    )  # fmt: skip
    return seen, item_knn, ref.UserKnn(rows, sims, raters, base_u, base_i, 4, 0.3, 0.7)


def case(rng: np.random.Generator, b: int, m: int):
    scores, top, _, tables, scales, mu = rerank_case(rng, b, m, N_ITEMS, integer=False)
    users = torch.from_numpy(rng.integers(0, N_USERS, b))
    if b:
        users[-1] = N_USERS - 1  # no ratings, no list
    users_t = torch.zeros(N_USERS, tables[0].shape[1])
    users_t[: tables[0].shape[0]] = tables[0]
    bias_t = torch.zeros(N_USERS)
    bias_t[: tables[2].shape[0]] = tables[2]
    return scores, top, users, [users_t, tables[1], bias_t, tables[3]], scales, mu


def test_blend_terms_are_the_reference_kernels(rng):
    """The reference's terms: the item-kNN prediction with weight w n / (n + ramp) (0 without
    ratings and for padding) and w_u x the user-kNN correction (0 for padding)."""
    seen, item_knn, user_knn = model(rng)
    _, top, users, *_ = case(rng, 6, 9)
    hist = history_rows(seen.history, users.numpy())
    val, w, add = ref.blend_terms(top, users, 7, hist, item_knn, user_knn)
    assert val.shape == w.shape == add.shape == (6, 7)
    for b in range(6):
        n = int(hist.indptr[b + 1] - hist.indptr[b])
        for c in range(7):
            j = int(top[b, c])
            if j < 0:
                assert w[b, c] == 0 and add[b, c] == 0
                continue
            v, _ = ref.knn_predict(*hist, torch.tensor([b]), torch.tensor([j]), *item_knn[:11])
            assert val[b, c] == v[0]
            assert float(w[b, c]) == pytest.approx(0.5 * n / (n + 10.0) if n else 0.0)
            u = ref.user_knn_predict(users[b : b + 1], torch.tensor([j]), *user_knn[:7])
            assert float(add[b, c]) == pytest.approx(0.7 * float(u[0]))
    assert w[-1].eq(0).all() and add[-1].eq(0).all()  # the user with no ratings and no list
    assert (w > 0).any() and (add != 0).any()
    none = ref.blend_terms(top, users, 7, None, None, None)
    assert all(not t.any() for t in none)


@pytest.mark.parametrize("parts", ["both", "item", "user"])
@pytest.mark.parametrize(("b", "m", "depth"), [(1, 30, 30), (7, 40, 30), (9, 12, 5), (0, 30, 30)])
def test_rerank_blend_numba_matches_reference(rng, parts, b, m, depth):
    seen, item_knn, user_knn = model(rng)
    scores, top, users, tables, scales, mu = case(rng, b, m)
    before = (scores.clone(), top.clone())
    hist = history_rows(seen.history, users.numpy())
    ik = item_knn if parts != "user" else None
    uk = user_knn if parts != "item" else None
    for w in (0.0, 2.0):
        args = (scores, top, users, *tables, scales, mu, w, depth, hist, ik, uk)
        want = kernels.rerank_blend(*args, backend="torch")
        got = kernels.rerank_blend(*args, backend="numba")
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
        for g, t in zip(got[1].tolist(), want[1].tolist(), strict=True):
            # (the factor model's dot products sum in another order: near-ties may swap)
            assert sorted(g[:depth]) == sorted(t[:depth]) and g[depth:] == t[depth:]
        plain = ref.rerank_mf(scores, top, users, *tables, scales, mu, w, depth)
        if w and b > 1:  # the corrections moved the blended scores (not the last user's)
            assert not torch.allclose(want[0], plain[0])
    assert torch.equal(scores, before[0]) and torch.equal(top, before[1])  # inputs untouched


@pytest.mark.parametrize("parts", ["both", "item", "user"])
@pytest.mark.parametrize(("b", "m"), [(1, 1), (5, 30), (9, 3), (0, 4)])
def test_blend_terms_numba_matches_reference(rng, parts, b, m):
    """The terms themselves (what predict adds): padding anywhere, repeated users, items past
    the item-kNN table."""
    seen, item_knn, user_knn = model(rng)
    top = torch.from_numpy(rng.integers(-1, N_ITEMS, (b, m)))
    users = torch.from_numpy(rng.integers(0, N_USERS, b))
    if b > 1:
        users[1] = users[0]
    hist = history_rows(seen.history, users.numpy())
    ik = item_knn if parts != "user" else None
    uk = user_knn if parts != "item" else None
    want = ref.blend_terms(top, users, m, hist, ik, uk)
    got = kernels.blend_terms(top, users, m, hist, ik, uk, backend="numba")
    for g, t in zip(got, want, strict=True):
        assert g.shape == t.shape == (b, m) and g.dtype == torch.float32
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-6)
        assert not g[top < 0].any()
    if b * m >= 20:  # (the parts asked for are there: not zeros on both sides)
        assert (want[1] > 0).any() == (ik is not None) and (want[2] != 0).any() == (uk is not None)


def test_pairs_by_user_round_trip(rng):
    users = rng.integers(-1, 6, 40)
    items = rng.integers(0, 50, 40)
    distinct, top, (row, col) = by_user(users, items)
    assert (distinct[row] == users).all() and (top[row, col] == items).all()
    assert (top >= 0).sum() == 40 and list(distinct) == sorted(set(users.tolist()))
    one, top1, (r1, c1) = by_user(np.full(3, 4), np.array([7, 7, 2]))
    assert r1.tolist() == [0, 0, 0]
    assert one.tolist() == [4] and top1.tolist() == [[7, 7, 2]] and c1.tolist() == [0, 1, 2]
