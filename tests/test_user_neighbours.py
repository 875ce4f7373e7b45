"""The user-neighbourhood correction: the raters index, its kernels (numba vs the torch
reference, and by hand) and its place in the service (feedback, checkpoints, deployments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrec_fast import Recommender, kernels, user_neighbours
from lrec_fast.model import SeenItems, rows_csr
from lrec_fast.raters import Raters

from .conftest import assert_same_bits, reloaded, rewritten_checkpoint, state_bits
from .test_consolidation import streamed


def contents(r: Raters) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for j in range(len(r)):
        users, ratings = r.rows(j)
        assert (np.diff(users) > 0).all()  # sorted by user row, as the numba kernel reads them
        for a, x in zip(users.tolist(), ratings.tolist(), strict=True):
            assert (a, j) not in out  # one entry per pair
            out[(a, j)] = x
    return out


def test_raters_follow_every_event(rng):
    seen, want = SeenItems(), {}
    seen.append_users(30)
    for step in range(60):
        n = int(rng.integers(0, 25))  # some calls empty
        u, i = rng.integers(0, 30, n), rng.integers(0, 10 + step, n)  # new items keep coming
        r = rng.integers(1, 6, n).astype(float)
        if n and step % 3 == 0:
            u[-1], i[-1] = u[0], i[0]  # the same pair twice in one call: the later counts
        seen.add(u.tolist(), i.tolist(), r.tolist())
        want.update({(int(a), int(b)): float(x) for a, b, x in zip(u, i, r, strict=True)})
        if step == 5:
            seen.raters(0)  # built from the dicts here, then kept current
    got = seen.raters(80)
    assert len(got) == 80 and contents(got) == want
    rebuilt = SeenItems.from_csr(*seen.csr()).raters(80)  # (as after a checkpoint)
    assert contents(rebuilt) == want
    seen.truncate(12)
    assert contents(got) == {k: v for k, v in want.items() if k[0] < 12}


def test_raters_edges():
    r = Raters(3)
    r.add(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    assert contents(r) == {} and r.rows(7)[0].size == 0  # past the end: nobody
    r.add(np.arange(50), np.full(50, 1), np.arange(50) % 5 + 1.0)  # one item, many moves
    r.add(np.array([7]), np.array([1]), np.array([2.5]))  # a re-rating: in place
    got = contents(r)
    assert len(got) == 50 and got[(7, 1)] == 2.5
    assert r.end <= len(r.users)
    seen = SeenItems.from_csr([0, 2, 3], [0, 1, 1], [4.0, math.nan, 3.0])  # unknown: left out
    assert contents(seen.raters(2)) == {(0, 0): 4.0, (1, 1): 3.0}


def random_model(rng, n_users, n_items, n):
    """Seen items of random events, their raters, and random baselines."""
    seen = SeenItems()
    seen.append_users(n_users)
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    seen.add(u.tolist(), i.tolist(), rng.integers(1, 6, n).astype(float).tolist())
    r = seen.raters(n_items)
    raters = tuple(torch.from_numpy(x) for x in (r.start, r.count, r.users, r.ratings))
    base_u = torch.from_numpy(rng.normal(0, 0.3, n_users))
    base_i = torch.from_numpy(rng.normal(3.5, 0.4, n_items))
    return seen, raters, base_u, base_i


def histories(seen, which):
    hist = [seen.history(a) for a in which.tolist()]
    indptr, items = rows_csr([h[0] for h in hist])
    ratings = np.concatenate([h[1] for h in hist]) if hist else np.zeros(0, np.float32)
    return torch.from_numpy(indptr), torch.from_numpy(items), torch.from_numpy(ratings)


@pytest.mark.parametrize("n_users,n_items,n,size", [(40, 37, 500, 10), (70, 5, 90, 100),
                                                    (25, 60, 300, 1), (3, 4, 0, 5)])  # fmt: skip
@pytest.mark.parametrize("shrink", [0.0, 25.0])
@pytest.mark.parametrize("max_raters", [0, 12])  # 12: some items left out, at most sizes
def test_user_neighbours_numba_matches_reference(rng, n_users, n_items, n, size, shrink,
                                                 max_raters):  # fmt: skip
    seen, raters, base_u, base_i = random_model(rng, n_users, n_items, n)
    which = torch.from_numpy(rng.permutation(n_users)[: max(1, n_users // 2)])
    args = (which, *histories(seen, which), raters, base_u, base_i, size, shrink, max_raters)
    want = kernels.user_neighbours(*args, backend="torch")
    got = kernels.user_neighbours(*args, backend="numba")
    assert got[0].shape == (which.numel(), size)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
    assert not (got[0] == which[:, None]).any()  # never oneself
    assert bool((got[1][got[0] >= 0] > 0).all()) and bool((got[1][got[0] < 0] == 0).all())


def test_user_neighbours_by_hand():
    # users 0, 1, 2 rated items 0, 1; user 3 item 0 only. Zero baselines: residual = rating.
    seen = SeenItems.from_csr([0, 2, 4, 6, 7], [0, 1, 0, 1, 0, 1, 0],
                              [1.0, -1.0, 2.0, -2.0, 1.0, 1.0, 3.0])  # fmt: skip
    r = seen.raters(2)
    raters = tuple(torch.from_numpy(x) for x in (r.start, r.count, r.users, r.ratings))
    zero_u, zero_i = torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    which = torch.tensor([0])
    for backend in ("torch", "numba"):
        rows, sims = kernels.user_neighbours(which, *histories(seen, which), raters, zero_u,
                                             zero_i, 3, 2.0, backend=backend)  # fmt: skip
        # user 1: (1*2 + 1*2) / sqrt(2 * 8) * 2 / (2 + 2) = 0.5; user 2: 0 (dropped); user 3:
        # one co-rated item, 3 / sqrt(1 * 9) * 1 / 3 = 1/3
        assert rows.tolist() == [[1, 3, -1]]
        assert sims[0, :2].tolist() == pytest.approx([0.5, 1 / 3])
        # item 0 has 4 raters: over a limit of 3 it is in no co-rated set, leaving item 1
        # (users 1 and 2: -1 * -2 / sqrt(1 * 4) * 1 / 3 = 1/3 and -1 * 1 / ... < 0, dropped)
        rows, sims = kernels.user_neighbours(which, *histories(seen, which), raters, zero_u,
                                             zero_i, 3, 2.0, 3, backend=backend)  # fmt: skip
        assert rows.tolist() == [[1, -1, -1]]
        assert sims[0, 0].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("k,reg", [(1, 0.3), (3, 0.0), (20, 0.3)])
def test_user_knn_predict_numba_matches_reference(rng, k, reg):
    n_users, n_items = 50, 30
    seen, raters, base_u, base_i = random_model(rng, n_users, n_items, 600)
    which = torch.arange(n_users - 4)  # the last users have no list (rows past the table)
    rows, sims = kernels.user_neighbours(which, *histories(seen, which), raters, base_u,
                                         base_i, 8, 5.0, backend="numba")  # fmt: skip
    e = 400
    users = torch.from_numpy(rng.integers(-1, n_users, e))  # -1: unknown
    items = torch.from_numpy(rng.integers(0, n_items + 3, e))  # past the raters: none
    users[:5], items[:5] = users[5], items[5]  # duplicates
    args = (users, items, rows, sims, raters, base_u, base_i, k, reg)
    want = kernels.user_knn_predict(*args, backend="torch")
    got = kernels.user_knn_predict(*args, backend="numba")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (want != 0).float().mean() > 0.3
    assert bool((want[(users < 0) | (users >= n_users - 4) | (items >= n_items)] == 0).all())
    empty = kernels.user_knn_predict(users[:0], items[:0], *args[2:], backend="numba")
    assert empty.shape == (0,)


def test_user_knn_predict_reads_a_crowded_item_by_search(rng):
    """An item with more raters than 2 x list size x log2 of them is read neighbour by
    neighbour (a binary search in its sorted raters): the reference's values, where the k
    neighbours who rated it are found early (a popular item) and where the list runs out."""
    n_users, n_items, size = 400, 6, 8
    seen = SeenItems()
    seen.append_users(n_users)
    u = np.concatenate([rng.permutation(n_users), rng.integers(0, n_users, 300)])
    i = np.concatenate([np.zeros(n_users, np.int64), rng.integers(1, n_items, 300)])
    seen.add(u.tolist(), i.tolist(), rng.integers(1, 6, u.size).astype(float).tolist())
    seen.add([5, 9], [0, 0], [1.0, 5.0])  # re-ratings of the crowded item
    r = seen.raters(n_items)
    assert r.count[0] == n_users and r.count[0] >= 2 * size * 9  # (the search path's bound)
    raters = tuple(torch.from_numpy(x) for x in (r.start, r.count, r.users, r.ratings))
    base_u = torch.from_numpy(rng.normal(0, 0.3, n_users))
    base_i = torch.from_numpy(rng.normal(3.5, 0.4, n_items))
    which = torch.arange(n_users)
    rows, sims = kernels.user_neighbours(which, *histories(seen, which), raters, base_u,
                                         base_i, size, 5.0, backend="numba")  # fmt: skip
    rows[::7, 3:] = -1  # short lists: the walk reaches their end before k
    rows[1, 0] = -1  # a hole
    users = torch.from_numpy(rng.integers(0, n_users, 300))
    items = torch.from_numpy(rng.integers(0, n_items, 300))
    items[:150] = 0
    for k, reg in ((1, 0.3), (3, 0.0), (20, 0.3)):
        args = (users, items, rows, sims, raters, base_u, base_i, k, reg)
        want = kernels.user_knn_predict(*args, backend="torch")
        got = kernels.user_knn_predict(*args, backend="numba")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert (want[:150] != 0).float().mean() > 0.8


def test_user_knn_predict_by_hand():
    # item 0 rated by users 1 (4.0), 2 (2.0) and 3 (5.0); user 0's list: 2 (0.5), 1 (0.25), 3
    # (0.1); item base 3.0, user bases 0.5 / 0 / -1 / 0.
    seen = SeenItems.from_csr([0, 0, 1, 2, 3], [0, 0, 0], [4.0, 2.0, 5.0])
    r = seen.raters(1)
    raters = tuple(torch.from_numpy(x) for x in (r.start, r.count, r.users, r.ratings))
    rows = torch.tensor([[2, 1, 3]])
    sims = torch.tensor([[0.5, 0.25, 0.1]])
    base_u = torch.tensor([0.5, 0.0, -1.0, 0.0], dtype=torch.float64)
    base_i = torch.tensor([3.0], dtype=torch.float64)
    for backend in ("torch", "numba"):
        pair = torch.tensor([0, 0])
        got = kernels.user_knn_predict(pair, pair, rows, sims, raters, base_u, base_i, 2, 0.25,
                                       backend=backend)  # fmt: skip
        # the first two: residuals 2 - 3 + 1 = 0 and 4 - 3 - 0 = 1
        want = (0.5 * 0.0 + 0.25 * 1.0) / (0.5 + 0.25 + 0.25)
        assert got.tolist() == pytest.approx([want, want])


def test_predict_adds_it_and_feedback_refreshes_the_lists(fitted, stream):
    st, cfg = fitted.state, fitted.config
    assert cfg.uknn_weight > 0 and st.uknn_rows.n == 60  # from the fit: every user
    ev = stream.events.take(slice(1500, 1600))
    users, items = list(ev.user[:20]), list(ev.item[:20])
    got = fitted.predict(users, items)
    cfg.uknn_weight = 0.0
    bare = fitted.predict(users, items)
    cfg.uknn_weight = 0.3
    un = user_neighbours.UserNeighbours.of(st, cfg)
    rows = torch.tensor([st.users.index[u] for u in users])
    ii = torch.tensor([st.items.index[j] for j in items])
    c = 0.3 * kernels.user_knn_predict(
        rows,
        ii,
        un.rows,
        un.sims,
        un.raters,
        un.user_base,
        un.item_base,
        cfg.uknn_k,
        cfg.uknn_reg,
        backend="torch",
    )
    assert np.allclose(got, bare + c.numpy(), rtol=1e-5, atol=1e-6) and c.abs().max() > 0
    full = fitted.score_all(users[:5])
    cols = [fitted.item_ids.index(j) for j in items[:5]]
    assert np.allclose(full[range(5), cols], got[:5], rtol=1e-5, atol=1e-6)
    # a feedback call: the lists of its users whose rating count grew by max(1, 1/8 of the
    # count their list was made at) now are what a recompute from every rating gives; its
    # other users' and everyone else's wait. At growth 0, every user of a call is due.
    fitted.config.refit_every = fitted.config.consolidate_every = 0  # nothing else recomputes
    for growth, sl in ((0.125, slice(0, 100)), (0.0, slice(100, 140))):
        cfg.uknn_refresh_growth = growth
        part = ev.take(sl) if sl.start == 0 else stream.events.take(slice(1600, 1640))
        touched = sorted({st.users.index.get(u, -1) for u in part.user} - {-1})
        made = st.uknn_counts.t.clone()
        assert torch.equal(made, torch.tensor([len(st.seen[a]) for a in range(60)]))
        before, made_so_far = st.uknn_rows.t.clone(), fitted.stats()["user_lists_made"]
        fitted.feedback(part.user, part.item, part.rating)
        now = torch.tensor([len(st.seen[a]) for a in range(60)])
        grew = now - made
        due = [a for a in touched if growth == 0 or grew[a] >= max(1.0, growth * float(made[a]))]
        assert 0 < len(due) and (growth == 0) == (len(due) == len(touched))
        assert fitted.stats()["user_lists_made"] == made_so_far + len(due)
        after = st.uknn_rows.t.clone()
        assert torch.equal(st.uknn_counts.t[due], now[due])
        rest = [a for a in range(60) if a not in due]
        assert torch.equal(before[rest], after[rest]) and torch.equal(st.uknn_counts.t[rest],
                                                                        made[rest])  # fmt: skip
        user_neighbours.recompute(st, cfg, "torch")
        assert torch.equal(st.uknn_rows.t[due], after[due])
        assert not torch.equal(before[due], after[due])


def test_a_rating_moves_the_neighbours_prediction_at_once(fitted, stream):
    st, cfg = fitted.state, fitted.config
    cfg.user_gain = cfg.lr = cfg.replay_ratio = cfg.rank_lr = 0.0  # the models learn nothing
    cfg.knn_weight = cfg.offset_count_weight = cfg.offset_item_weight = 0.0
    a = 0
    v = int(st.uknn_rows.t[a, 0])  # user 0's closest neighbour
    j = next(j for j in range(80) if j not in st.seen[a] and j not in st.seen[v])
    u_a, u_v, item = st.users.ids[a], st.users.ids[v], st.items.ids[j]
    before = fitted.predict([u_a], [item])[0]
    fitted.feedback([u_v], [item], [5.0])  # the neighbour loves it
    assert fitted.predict([u_a], [item])[0] > before


def test_checkpoints_keep_it_and_old_ones_load_without_it(fitted, stream, tmp_path):
    ev = stream.events.take(slice(1500, 1700))
    fitted.feedback(ev.user, ev.item, ev.rating)
    users, items = list(stream.user_ids[:8]), list(stream.item_ids[10:18])
    again = reloaded(fitted, tmp_path / "ck", users, items)
    ev = stream.events.take(slice(1700, 1800))  # and both go on alike
    fitted.feedback(ev.user, ev.item, ev.rating)
    again.feedback(ev.user, ev.item, ev.rating)
    assert np.array_equal(again.predict(users, items), fitted.predict(users, items))
    # before the lazy refresh: lists, no counts; each user's next call remakes theirs
    mid = Recommender.load(rewritten_checkpoint(fitted, tmp_path / "mid",
                                                lambda k: k == "uknn_counts"))  # fmt: skip
    assert mid.state.uknn_counts.n == 60 and int(mid.state.uknn_counts.t.max()) == 0
    mid.feedback([users[0]], [items[0]], [4.0])
    a = mid.state.users.index[users[0]]
    assert int(mid.state.uknn_counts.t[a]) == len(mid.state.seen[a])
    old = Recommender.load(rewritten_checkpoint(fitted, tmp_path / "old",
                                                lambda k: k.startswith("uknn_"),
                                                ["uknn_weight"]))  # fmt: skip
    assert old.config.uknn_weight == 0.0 and old.state.uknn_rows.n == 0
    fitted.config.uknn_weight = 0.0
    assert np.array_equal(old.predict(users, items), fitted.predict(users, items))


@pytest.mark.parametrize("flaw", ["row", "shape", "nan", "count", "counts"])
def test_malformed_lists_are_refused(fitted, tmp_path, flaw):
    def damage(t):
        if flaw == "row":
            t["uknn_rows"][2, 0] = 60  # no such user
        elif flaw == "shape":
            t["uknn_sims"] = t["uknn_sims"][:-1]
        elif flaw == "nan":
            t["uknn_sims"][1, 1] = float("nan")
        elif flaw == "count":
            t["uknn_counts"][3] = -1
        else:
            t["uknn_counts"] = t["uknn_counts"][:-1]

    with pytest.raises(ValueError, match="user neighbours"):
        Recommender.load(rewritten_checkpoint(fitted, tmp_path / "ck", edit=damage))


def test_a_rejected_batch_keeps_them(fitted, stream):
    before = state_bits(fitted)
    ev = stream.events.take(slice(1500, 1510))
    with pytest.raises(ValueError):
        fitted.feedback([*ev.user, "new"], [*ev.item, "no-such-item"], [*ev.rating, 3.0])
    assert_same_bits(before, state_bits(fitted))
    assert fitted.state.uknn_rows.n == 60


def test_switched_off_nothing_is_computed(stream):
    rec = Recommender(dim=8, encoder="hashing-64", max_epochs=2, uknn_weight=0.0)
    rec.add_items(stream.item_ids, stream.item_text)
    ev = stream.events.take(slice(0, 600))
    rec.fit(ev.user, ev.item, ev.rating)
    rec.feedback(*(getattr(stream.events.take(slice(600, 700)), f) for f in
                   ("user", "item", "rating")))  # fmt: skip
    assert rec.state.uknn_rows.n == 0
    assert user_neighbours.UserNeighbours.of(rec.state, rec.config) is None


BAD = [{"uknn_weight": 1.5}, {"uknn_weight": -0.1}, {"uknn_size": -1}, {"uknn_k": -2},
       {"uknn_shrink": math.nan}, {"uknn_reg": -1.0}, {"uknn_user_reg": math.inf},
       {"uknn_max_raters": -1}]  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
def test_config_is_checked(bad):
    with pytest.raises(ValueError, match="uknn"):
        Recommender(encoder="hashing-64", **bad)


def test_new_items_and_users_join_the_index(fitted, stream):
    st = fitted.state
    fitted.add_items(["fresh"], ["Brand new | drama"])
    u = stream.user_ids[0]
    assert fitted.predict([u], ["fresh"])[0] == pytest.approx(
        fitted.score_all([u])[0, fitted.item_ids.index("fresh")], rel=1e-6
    )
    un = user_neighbours.UserNeighbours.of(st, fitted.config)
    a = st.users.index[u]
    z = kernels.user_knn_predict(torch.tensor([a]), torch.tensor([80]), *un.args()[:7],
                                 backend="numba")  # fmt: skip
    assert z.item() == 0.0  # no raters yet
    # a newcomer rates it with a known item; a known user rates it too: both land in the index
    fitted.feedback(["newcomer", "newcomer", u], ["fresh", stream.item_ids[3], "fresh"],
                    [5.0, 4.0, 2.0])  # fmt: skip
    new = st.users.index["newcomer"]
    raters = dict(zip(*(x.tolist() for x in st.seen.raters(81).rows(80)), strict=True))
    assert raters == {new: 5.0, a: 2.0}
    assert st.uknn_rows.n == 61 and (st.uknn_rows.t[new] >= 0).any()  # the newcomer's list


def test_raters_without_numba_match(rng, monkeypatch):
    """Without numba the index's insert runs as plain Python: the same contents."""
    from lrec_fast import raters as raters_module

    events = [(rng.integers(0, 20, 30), rng.integers(0, 15, 30), rng.integers(1, 6, 30) * 1.0)
              for _ in range(8)]  # fmt: skip
    fast = Raters(15)
    for u, i, r in events:
        fast.add(u, i, r)
    monkeypatch.setattr(raters_module, "_upsert", raters_module._upsert.py_func)
    slow = Raters(15)
    for u, i, r in events:
        slow.add(u, i, r)
    assert contents(slow) == contents(fast) and len(contents(fast)) > 50


def test_a_refit_end_in_feedback_remakes_the_lists_over_the_next_calls(stream, tmp_path):
    """A refit that ends inside feedback leaves the recompute to the next call, which
    recomputes the baseline and starts remaking every user's list: ceil(60 users x 100
    events / refit_every 300) = 20 user rows a call, that call's too, each slice as a
    recompute at that moment makes it; a checkpoint resumes the sweep; refit() remakes them
    whole, now."""
    rec = streamed(stream, n=0, refit_every=300, consolidate_every=0)
    st, cfg = rec.state, rec.config
    assert int(st.uknn_sweep) == -1  # the fit recomputed every list itself
    seen_slices = []
    for s in range(1500, 2500, 100):
        ev = stream.events.take(slice(s, s + 100))
        pos, ended, pending = int(st.uknn_sweep), rec.last_refit, int(st.knn_pending)
        lists = st.uknn_rows.t.clone()
        rec.feedback(ev.user, ev.item, ev.rating)
        callers = {st.users.index[u] for u in ev.user}
        start = 0 if pending else pos  # (a pending recompute starts a sweep first)
        if start >= 0:
            end = min(60, start + 20)
            seen_slices.append((start, end))
            made = st.uknn_rows.t.clone(), st.uknn_sims.t.clone()
            user_neighbours.refresh(st, cfg, torch.arange(start, end), "numba", every=True)
            assert torch.equal(made[0], st.uknn_rows.t) and torch.equal(made[1], st.uknn_sims.t)
            callers |= set(range(start, end))
        others = [a for a in range(60) if a not in callers]
        assert torch.equal(st.uknn_rows.t[others], lists[others])  # nobody else's list moved
        assert int(st.uknn_sweep) == (-1 if start < 0 or start + 20 >= 60 else start + 20)
        assert int(st.knn_pending) == (rec.last_refit is not ended)
    assert (0, 20) in seen_slices and (40, 60) in seen_slices
    if int(st.uknn_sweep) < 0:  # (mid-sweep for the checkpoint below)
        rec.state.uknn_sweep.fill_(20)
    again = reloaded(rec, tmp_path / "ck", [0, 1], list(stream.item_ids[:2]))
    ev = stream.events.take(slice(2500, 2600))
    for r in (rec, again):
        r.feedback(ev.user, ev.item, ev.rating)
    assert_same_bits(state_bits(rec), state_bits(again))
    rec.refit()
    assert int(st.uknn_sweep) == -1
    made = st.uknn_rows.t.clone()
    user_neighbours.recompute(st, cfg, "numba")
    assert torch.equal(made, st.uknn_rows.t)


def test_without_the_sweep_a_refit_end_leaves_other_users_lists(stream):
    """uknn_sweep=False: a refit's end inside feedback recomputes the baseline (every b_u) but
    starts no sweep: each call remakes only its own due users' lists."""
    rec = streamed(stream, n=0, refit_every=300, consolidate_every=0, uknn_sweep=False)
    st = rec.state
    ends = 0
    for s in range(1500, 2300, 100):
        ev = stream.events.take(slice(s, s + 100))
        ended, lists = rec.last_refit, st.uknn_rows.t.clone()
        bases, pending = st.uknn_bases, int(st.knn_pending)
        rec.feedback(ev.user, ev.item, ev.rating)
        ends += rec.last_refit is not ended
        assert int(st.uknn_sweep) == -1
        others = [a for a in range(60) if a not in {st.users.index[u] for u in ev.user}]
        assert torch.equal(st.uknn_rows.t[others], lists[others])
        if pending:  # the baseline moved in this call: the user biases were rebuilt
            assert st.uknn_bases is not None and st.uknn_bases is not bases
    assert ends >= 2
    with pytest.raises(ValueError, match="uknn_sweep"):
        Recommender(uknn_sweep=1, encoder="hashing-64")


def test_the_rater_limit_reaches_the_kernel(fitted):
    """uknn_max_raters set: the lists are the reference kernel's with that limit, and differ
    from the unlimited ones (some items here have more raters than it)."""
    st, cfg = fitted.state, fitted.config
    which = torch.arange(len(st.users))
    base_i, base_u = user_neighbours._bases(st, cfg)
    args = (
        which,
        *histories(st.seen, which),
        user_neighbours._raters(st),
        torch.from_numpy(base_u),
        torch.from_numpy(base_i),
        cfg.uknn_size,
        cfg.uknn_shrink,
    )
    unlimited = st.uknn_rows.t.clone()
    assert torch.equal(unlimited, kernels.user_neighbours(*args, backend="torch")[0])
    cfg.uknn_max_raters = 20
    assert int(st.seen.raters(len(st.items)).count.max()) > 20
    user_neighbours.recompute(st, cfg, fitted.backend)
    want = kernels.user_neighbours(*args, 20, backend="torch")[0]
    assert torch.equal(st.uknn_rows.t, want) and not torch.equal(want, unlimited)
