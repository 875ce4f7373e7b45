"""The neighbourhood correction: its two kernels (numba against the torch reference, the
reference against the definition), the baseline, and the blend behind Recommender.predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrec_fast import Recommender, kernels, neighbours

from .conftest import reloaded, rewritten_checkpoint


def rated_pairs(rng: np.random.Generator, n_users: int, n_items: int, n: int):
    """Random distinct (user, item) pairs with residuals; the last item row is never rated."""
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, max(n_items - 1, 1), n)
    key = np.unique(u * n_items + i)
    users, items = torch.from_numpy(key // n_items), torch.from_numpy(key % n_items)
    return users, items, torch.from_numpy(rng.normal(size=users.numel()))


def definition(users, items, residuals, n_items, size, shrink):
    """item_neighbours written out pair by pair."""
    e = {(int(a), int(b)): float(x) for a, b, x in zip(users, items, residuals, strict=True)}
    raters = {j: {a for (a, b) in e if b == j} for j in range(n_items)}
    rows, sims = [], []
    for i in range(n_items):
        cand = []
        for j in range(n_items):
            common = raters[i] & raters[j]
            if j == i or not common:
                continue
            num = sum(e[a, i] * e[a, j] for a in common)
            den = math.sqrt(sum(e[a, i] ** 2 for a in common) * sum(e[a, j] ** 2 for a in common))
            s = float(np.float32(num / den * len(common) / (len(common) + shrink))) if den else 0
            if s > 0:  # (in float32: one co-rater gives 1 / (1 + shrink) exactly, a tie)
                cand.append((-s, j))
        cand.sort()
        rows.append([j for _, j in cand[:size]] + [-1] * (size - min(size, len(cand))))
        sims.append([-s for s, _ in cand[:size]] + [0.0] * (size - min(size, len(cand))))
    return rows, sims


@pytest.mark.parametrize("size", [1, 4, 30])
@pytest.mark.parametrize("shrink", [0.0, 10.0])
def test_item_neighbours_reference_is_its_definition(rng, size, shrink):
    users, items, res = rated_pairs(rng, 9, 11, 60)
    rows, sims = kernels.item_neighbours(users, items, res, 11, size, shrink, backend="torch")
    want_rows, want_sims = definition(users, items, res, 11, size, shrink)
    assert rows.tolist() == want_rows
    assert np.allclose(sims.numpy(), want_sims, rtol=1e-6, atol=1e-7)
    assert rows[10].tolist() == [-1] * size  # never rated: no neighbours


@pytest.mark.parametrize("n_users,n_items,n,size", [(40, 37, 400, 10), (5, 70, 90, 100),
                                                    (60, 3, 100, 2), (1, 5, 3, 4)])  # fmt: skip
def test_item_neighbours_numba_matches_reference(rng, n_users, n_items, n, size):
    users, items, res = rated_pairs(rng, n_users, n_items, n)
    want = kernels.item_neighbours(users, items, res, n_items, size, 5.0, backend="torch")
    got = kernels.item_neighbours(users, items, res, n_items, size, 5.0, backend="numba")
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_item_neighbours_edges(backend):
    # items 1 and 2 have the same raters and residuals: tied with item 0, the lower row first
    users = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    items = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    res = torch.tensor([1.0, 2.0, 2.0, -1.0, -0.5, -0.5, 3.0], dtype=torch.float64)
    rows, sims = kernels.item_neighbours(users, items, res, 5, 3, 0.0, backend=backend)
    assert rows[0].tolist() == [1, 2, -1] and sims[0, 0] == sims[0, 1] > 0
    assert rows[3].tolist() == [-1] * 3 and rows[4].tolist() == [-1] * 3  # alone / unrated
    # one user rated ten items: every pair ties at 1 / (1 + shrink); the cut keeps the lowest
    items = torch.arange(10)
    res = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    rows, sims = kernels.item_neighbours(torch.zeros(10, dtype=torch.int64), items, res, 10, 3,
                                         1.0, backend=backend)  # fmt: skip
    assert rows[0].tolist() == [1, 2, 3] and rows[5].tolist() == [0, 1, 2]
    assert torch.all(sims == 0.5)
    empty = torch.zeros(0, dtype=torch.int64)
    rows, sims = kernels.item_neighbours(empty, empty, torch.zeros(0, dtype=torch.float64), 4,
                                         2, 1.0, backend=backend)  # fmt: skip
    assert rows.tolist() == [[-1, -1]] * 4 and not sims.any()


def random_histories(rng: np.random.Generator, n_users: int, n_items: int):
    sizes = rng.integers(0, 12, n_users)
    sizes[0] = 0  # an empty history
    hist = [np.sort(rng.choice(n_items, min(s, n_items), replace=False)) for s in sizes]
    indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(h) for h in hist])]))
    items = torch.from_numpy(np.concatenate(hist).astype(np.int64))
    ratings = torch.from_numpy(rng.integers(1, 6, items.numel()).astype(np.float32))
    ages = torch.from_numpy(
        np.concatenate([rng.permutation(len(h)) for h in hist]).astype(np.int64)
    )
    return indptr, items, ratings, ages


@pytest.mark.parametrize("k,reg", [(0, 0.3), (1, 0.3), (3, 0.0), (40, 0.3)])
@pytest.mark.parametrize("user_decay,decay", [(1.0, 1.0), (0.9, 0.8), (1e-3, 1.0)])
def test_knn_predict_numba_matches_reference(rng, k, reg, user_decay, decay):
    n_items, table = 30, 26  # items 26-29 came after the neighbours were computed
    indptr, hist, ratings, ages = random_histories(rng, 12, n_items)
    nbr = torch.from_numpy(rng.integers(-1, table, (table, 15)))  # -1 anywhere, repeats too
    sims = torch.from_numpy(rng.uniform(0, 1, (table, 15)).astype(np.float32))
    sims[3] = 1e6  # extreme weights: the result still clipped to the range
    bias = torch.from_numpy(rng.normal(size=table).astype(np.float32))
    slots = torch.from_numpy(rng.integers(0, 12, 200))
    items = torch.from_numpy(rng.integers(0, n_items, 200))
    args = (indptr, hist, ratings, ages, slots, items, nbr, sims, bias, 3.5, 5.0, user_decay, k,
            reg, decay, 1.0, 5.0)  # fmt: skip
    want, want_has = kernels.knn_predict(*args, backend="torch")
    got, got_has = kernels.knn_predict(*args, backend="numba")
    assert torch.equal(got_has, want_has)
    assert torch.equal(want_has, indptr[slots + 1] > indptr[slots])  # empty history: none
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert bool(((want >= 1) & (want <= 5))[want_has].all()) and not want[~want_has].any()
    assert bool(torch.isfinite(got).all())  # also at reg 0 where no neighbour was rated
    empty = torch.zeros(0, dtype=torch.int64)
    out, has = kernels.knn_predict(indptr, hist, ratings, ages, empty, empty, *args[6:],
                                   backend="numba")  # fmt: skip
    assert out.numel() == 0 and has.numel() == 0


def test_knn_predict_reference_by_hand():
    # one user rated item 3 (2 stars), then item 1 (5 stars); item 0's neighbours: 3, 2, 1
    indptr, hist, ratings = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([5.0, 2.0])
    ages = torch.tensor([0, 1])  # item 1 is the latest rating
    nbr = torch.tensor([[3, 2, 1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    sims = torch.tensor([[0.5, 0.9, 0.25], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    bias = torch.tensor([0.5, 1.0, -1.0, -0.5])
    mu, user_reg, reg = 3.0, 2.0, 0.25
    for user_decay, decay in ((1.0, 1.0), (0.5, 0.8)):
        w = (1.0, user_decay)  # item 1's rating, item 3's (one rating older)
        b_a = (w[0] * (5 - 3 - 1.0) + w[1] * (2 - 3 + 0.5)) / (sum(w) + user_reg)
        first = (0.5 * decay, 2 - 3 - b_a + 0.5)  # item 3: one rating old
        for k, used in ((1, [first]), (3, [first, (0.25, 5 - 3 - b_a - 1.0)])):
            out, has = kernels.knn_predict(indptr, hist, ratings, ages, torch.tensor([0]),
                                           torch.tensor([0]), nbr, sims, bias, mu, user_reg,
                                           user_decay, k, reg, decay, 1.0, 5.0,
                                           backend="torch")  # fmt: skip
            corr = sum(s * x for s, x in used) / (sum(s for s, _ in used) + reg)
            assert has.tolist() == [True]
            assert out.item() == pytest.approx(mu + b_a + 0.5 + corr, rel=1e-6)


def test_baseline_at_ridge_zero_leaves_unrated_items_and_users_at_zero():
    rec = Recommender(encoder="hashing-64", knn_user_reg=0.0, knn_item_reg=0.0)
    users, items = torch.tensor([0, 1]), torch.tensor([0, 0])
    ratings = torch.tensor([4.0, 2.0], dtype=torch.float64)
    mu, b_u, b_i = neighbours.baseline(users, items, ratings, 3, 2, rec.config)
    assert mu == 3.0 and torch.isfinite(b_u).all() and torch.isfinite(b_i).all()
    assert b_u[2] == 0 and b_i[1] == 0


def test_baseline_is_the_ridge_solution():
    users = torch.tensor([0, 0, 1, 1, 2])
    items = torch.tensor([0, 1, 0, 1, 1])
    ratings = torch.tensor([5.0, 3.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    rec = Recommender(encoder="hashing-64", knn_user_reg=1e12, knn_item_reg=2.0)
    mu, b_u, b_i = neighbours.baseline(users, items, ratings, 3, 3, rec.config)
    assert mu == 3.0 and b_u.abs().max() < 1e-9  # a huge user ridge: no user biases
    assert b_i.tolist() == pytest.approx([(2 + 1) / (2 + 2), (0 - 1 - 2) / (3 + 2), 0.0])


def test_predict_blends_the_neighbourhood_in_for_users_with_ratings(fitted, stream):
    st, cfg = fitted.state, fitted.config
    assert (cfg.knn_weight, cfg.knn_ramp) == (0.5, 10.0)
    cfg.uknn_weight = 0.0  # the item neighbourhood alone (test_user_neighbours: the other)
    assert st.knn_rows.shape == (80, cfg.knn_size)  # from the fit
    users = [stream.user_ids[0], stream.user_ids[5], "newcomer"]
    items = [stream.item_ids[3], stream.item_ids[40], stream.item_ids[7]]
    got = fitted.predict(users, items)
    cfg.knn_weight = 0.0
    mf = torch.from_numpy(fitted.predict(users, items))
    cfg.knn_weight = 0.5
    rows = torch.tensor([st.users.index[u] for u in users[:2]] + [-1])
    ii = torch.tensor([st.items.index[i] for i in items])
    indptr, hist, rated, ages = (torch.from_numpy(x) for x in st.seen.csr())
    assert ages.unique().numel() > 1  # the fixture's users rated in turn: recency counts
    knn, has = kernels.knn_predict(indptr, hist, rated, ages, rows.clamp_min(0), ii,
                                   st.knn_rows, st.knn_sims, st.knn_bias, float(st.knn_mu),
                                   cfg.knn_user_reg, cfg.knn_user_decay, cfg.knn_k, cfg.knn_reg,
                                   cfg.knn_decay, 1.0, 5.0, backend="torch")  # fmt: skip
    assert has[:2].all()
    n = (indptr[rows.clamp_min(0) + 1] - indptr[rows.clamp_min(0)]).double()
    w = (0.5 * n / (n + 10)).float()  # the user's n ratings: weight 0.5 n / (n + 10)
    assert 0.2 < float(w[0]) < 0.5
    want = (1 - w) * mf + w * knn
    assert np.allclose(got[:2], want[:2].numpy(), rtol=1e-5)
    assert got[2] == mf[2].item()  # no ratings: the factor model alone
    assert not np.allclose(got[:2], mf[:2].numpy())
    all_scores = fitted.score_all(users)  # the same ratings for every item
    cols = [fitted.item_ids.index(i) for i in items]
    assert np.allclose(all_scores[range(3), cols], got, rtol=1e-5)


def test_a_new_rating_moves_the_prediction_at_once(fitted, stream):
    fitted.config.user_gain = fitted.config.lr = 0.0  # the factor model learns nothing
    fitted.config.replay_ratio = 0.0
    u, target = stream.user_ids[2], fitted.state.knn_rows[4].tolist()
    j = next(
        x for x in target if x >= 0 and x not in fitted.state.seen[fitted.state.users.index[u]]
    )
    before = fitted.predict([u], [stream.item_ids[4]])[0]
    fitted.feedback([u], [fitted.item_ids[j]], [5.0])  # a neighbour of item 4, top marks
    assert fitted.predict([u], [stream.item_ids[4]])[0] > before


def test_checkpoints_keep_it_and_old_ones_load_without_it(fitted, stream, tmp_path):
    users, items = list(stream.user_ids[:5]), list(stream.item_ids[10:15])
    reloaded(fitted, tmp_path / "ck", users, items)
    drop = ("seen_ratings", "seen_ages")
    old = Recommender.load(
        rewritten_checkpoint(  # (from before the user neighbourhood too)
            fitted,
            tmp_path / "old",
            lambda k: k.startswith(("knn_", "uknn_")) or k in drop,
            ["knn_weight", "uknn_weight"],
        )
    )
    assert old.config.knn_weight == 0.0 and old.state.knn_rows.numel() == 0
    assert old.state.seen.history(0)[1].size == 0  # every rating unknown: none to read
    # what the old model predicts: the factor model's ratings
    fitted.config.knn_weight = fitted.config.uknn_weight = 0.0
    assert np.array_equal(old.predict(users, items), fitted.predict(users, items))
    # switched on later: the unknown (NaN) ratings are left out, the new ones count
    old.config.knn_weight = 0.4
    ev = stream.events.take(slice(1500, 1600))
    old.feedback(ev.user, ev.item, ev.rating)
    neighbours.recompute(old.state, old.config, old.backend)
    st = old.state
    assert st.knn_rows.shape[0] == 80 and not st.seen.complete
    quiet = next(u for u in stream.user_ids if u not in set(ev.user.tolist()))
    rows = torch.tensor([st.users.index[u] for u in (ev.user[0], quiet)])
    nb = neighbours.Neighbours.of(st, old.config)
    got = neighbours.corrected(nb, None, st.seen.history, rows, torch.tensor([3, 3]),
                               torch.zeros(2), (1.0, 5.0), "numba")  # fmt: skip
    assert got[0] > 0 and got[1] == 0  # a user with known ratings blends; one without: as is
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("flaw", ["row", "shape", "nan"])
def test_malformed_neighbours_are_refused(fitted, tmp_path, flaw):
    def damage(t):
        if flaw == "row":
            t["knn_rows"][2, 0] = 80  # past the catalogue
        elif flaw == "shape":
            t["knn_bias"] = t["knn_bias"][:-1]
        else:
            t["knn_sims"][1, 1] = float("nan")

    with pytest.raises(ValueError, match="neighbours"):
        Recommender.load(rewritten_checkpoint(fitted, tmp_path / "ck", edit=damage))


def test_checkpoints_before_recency_and_ramp_load_without_them(fitted, stream, tmp_path):
    settings = ["knn_user_decay", "knn_decay", "knn_ramp"]
    old = Recommender.load(
        rewritten_checkpoint(fitted, tmp_path / "ck", lambda k: k == "seen_ages", settings)
    )
    assert (old.config.knn_user_decay, old.config.knn_decay, old.config.knn_ramp) == (1, 1, 0)
    fitted.config.knn_user_decay = fitted.config.knn_decay = 1.0  # every rating alike
    fitted.config.knn_ramp = 0.0  # ... and the one weight for all
    users, items = list(stream.user_ids[:5]), list(stream.item_ids[10:15])
    assert np.allclose(old.predict(users, items), fitted.predict(users, items), rtol=1e-6)


def test_malformed_ages_are_refused(fitted, tmp_path):
    def damage(t):
        t["seen_ages"][0] = t["seen_ages"][1]  # two ratings of the same age

    with pytest.raises(ValueError, match="ages"):
        Recommender.load(rewritten_checkpoint(fitted, tmp_path / "ck", edit=damage))


BAD = [{"knn_weight": 1.5}, {"knn_weight": -0.1}, {"knn_size": -1}, {"knn_k": -2},
       {"knn_shrink": math.nan}, {"knn_reg": -1.0}, {"knn_user_decay": 0.0},
       {"knn_decay": 1.5}, {"knn_decay": math.nan}, {"knn_ramp": -1.0},
       {"knn_history_cap": -1}]  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
def test_config_is_checked(bad):
    with pytest.raises(ValueError, match="knn"):
        Recommender(encoder="hashing-64", **bad)


def test_recompute_reads_each_users_newest_ratings_only(fitted):
    st, cfg = fitted.state, fitted.config
    cfg.knn_history_cap = 3
    neighbours.recompute(st, cfg, "numba")
    indptr, items, ratings, ages = st.seen.csr()
    users = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    keep = ages < 3
    assert 0 < keep.sum() < len(keep)  # the fixture's users rated more than 3 items
    u, i = torch.from_numpy(users[keep]), torch.from_numpy(items[keep])
    r = torch.from_numpy(ratings[keep]).double()
    mu, b_u, b_i = neighbours.baseline(u, i, r, len(st.users), len(st.items), cfg)
    rows, sims = kernels.item_neighbours(u, i, r - mu - b_u[u] - b_i[i], len(st.items),
                                         cfg.knn_size, cfg.knn_shrink, backend="numba")  # fmt: skip
    assert float(st.knn_mu) == mu and torch.equal(st.knn_bias, b_i.float())
    assert torch.equal(st.knn_rows, rows) and torch.equal(st.knn_sims, sims)
