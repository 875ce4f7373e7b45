"""The Recommender facade: behaviour, bad input, rollback, persistence, threads."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from lrec_fast import DivergenceError, Recommender, online
from lrec_fast.kernels.reference import predict as ref_predict
from lrec_fast.model import SeenItems

from .conftest import assert_same_bits, state_bits


def test_fit_recommend_predict(fitted, stream):
    assert fitted.backend == "numba" and fitted.n_items == 80  # the CPU default
    assert int(fitted.state.item_count.t.sum()) == 1500  # each fit event counted once
    items, scores = fitted.recommend([0, 1, 2], k=5)
    assert items.shape == (3, 5) and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    for u, row in zip([0, 1, 2], items, strict=True):
        seen = {fitted.state.items.ids[j] for j in fitted.state.seen[fitted.state.users.index[u]]}
        assert not seen & set(row.tolist())
    # recommend's scores are the ranking head's (fold-in query . target row + target bias)
    # plus the recency prior, plus (a warm user, k <= rerank_depth) rerank_weight x the
    # predicted rating; rank_all orders them the same, shifted by one constant
    st = fitted.state
    cols = [st.items.index[j] for j in items[0].tolist()]
    prior = fitted.config.prior_weight * np.log1p(st.recent_counts().numpy()[cols])
    hist = st.user_recent.t[st.users.index[0]]
    w = fitted.config.history_decay ** torch.arange(hist.numel()).float() * (hist >= 0)
    assert w.sum() > 0
    q = (st.ctx_rows.t[hist.clamp_min(0)] * w[:, None]).sum(0) / w.sum()
    want = st.tgt_rows.t[cols] @ q + st.tgt_bias.t[cols]
    rating = fitted.predict([0] * 5, items[0].tolist())
    want = want.numpy() + prior + fitted.config.rerank_weight * rating
    np.testing.assert_allclose(want, scores[0], rtol=1e-5, atol=1e-5)
    shifted = fitted.rank_all([0])[0][cols]
    np.testing.assert_allclose(shifted - shifted[0], scores[0] - scores[0][0], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    # rank_by="rating": the factor model's predicted ratings plus the prior (the fused scan
    # over the catalogue; the neighbourhood correction is per user and item)
    fitted.config.rank_by = "rating"
    try:
        items, scores = fitted.recommend([0], k=5)
        fitted.config.knn_weight = fitted.config.uknn_weight = 0.0
        p = fitted.predict([0] * 5, items[0].tolist())
        cols = [st.items.index[j] for j in items[0].tolist()]
        prior = fitted.config.prior_weight * np.log1p(st.recent_counts().numpy()[cols])
        np.testing.assert_allclose(p + prior, scores[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fitted.rank_all([0])[0][cols], scores[0], rtol=1e-5, atol=1e-5)
    finally:
        fitted.config.rank_by = "softmax"
    # and agree with the reference predict on the raw state
    st = fitted.state
    ref = ref_predict(st.user_rows.t, st.item_rows.t, st.user_bias.t, st.item_bias.t, st.scales,
                      st.mu, torch.tensor([0, 1]), torch.tensor([3, 4]))  # fmt: skip
    np.testing.assert_allclose(fitted.predict([st.users.ids[0], st.users.ids[1]],
                                              [st.items.ids[3], st.items.ids[4]]), ref.numpy(),
                               rtol=1e-5)  # fmt: skip


def test_feedback_moves_predictions_toward_ratings(fitted):
    before = fitted.predict([5], [7])[0]
    target = 5.0 if before < 3 else 1.0
    for _ in range(5):
        fitted.feedback([5], [7], [target])
    after = fitted.predict([5], [7])[0]
    assert abs(after - target) < abs(before - target)


def test_cold_user_answers(fitted):
    """An unknown user ranks by the item term alone (learned bias + recency prior, with the
    cold weight); after one feedback call the answer is folded in from the items just rated,
    before any other step."""
    items, _scores = fitted.recommend(["nobody"], k=3)
    st = fitted.state
    full = online.rank_bias(st, fitted.config, cold=True)
    assert items[0].tolist() == [st.items.ids[j] for j in torch.argsort(-full, stable=True)[:3]]
    fitted.feedback(["newbie", "newbie"], [1, 2], [5.0, 5.0])
    assert "newbie" in fitted.state.users
    assert st.user_recent.t[st.users.index["newbie"], :3].tolist() == [
        st.items.index[2],
        st.items.index[1],
        -1,
    ]  # newest first
    got = fitted.rank_all(["newbie"])[0]
    assert not np.allclose(got, fitted.rank_all(["nobody"])[0])
    assert not {1, 2} & set(fitted.recommend(["newbie"], k=10)[0][0].tolist())
    # rank_by="rating": an unknown user is the mean known user
    fitted.config.rank_by = "rating"
    try:
        q = st.true_user_rows().mean(0)
        full = st.true_item_rows() @ q + online.rank_bias(st, fitted.config, cold=True)
        items, _ = fitted.recommend(["nobody"], k=3)
        assert items[0].tolist() == [st.items.ids[j] for j in torch.argsort(-full)[:3].tolist()]
    finally:
        fitted.config.rank_by = "softmax"


@pytest.mark.parametrize("rank_by", ["softmax", "rating"])
def test_cold_users_rank_with_the_cold_prior_weight(fitted, rank_by):
    """Users with no ranking history (unknown, or only events below rank_min_rating) get the
    prior with cold_prior_weight, the others with prior_weight, also mixed in one batch; None
    means prior_weight for everyone."""
    fitted.feedback(["grumpy"], [3], [1.0])  # known, but no positive: still cold
    fitted.config.rank_by = rank_by
    st, cfg = fitted.state, fitted.config
    users = [0, "nobody", "grumpy", 1]
    recent = torch.log1p(st.recent_counts()).float()
    assert (recent > 0).any() and cfg.cold_prior_weight != cfg.prior_weight
    for cold_weight in (cfg.cold_prior_weight, 0.25, None):
        cfg.cold_prior_weight = cold_weight
        got = fitted.rank_all(users)
        ids, scores = fitted.recommend(users, k=6)
        cfg.cold_prior_weight = cfg.prior_weight  # the same model with one weight for all
        same = fitted.rank_all(users)
        w = cfg.prior_weight if cold_weight is None else cold_weight
        delta = ((w - cfg.prior_weight) * recent).numpy()
        np.testing.assert_allclose(got[[0, 3]], same[[0, 3]], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[[1, 2]], same[[1, 2]] + delta, rtol=1e-5, atol=1e-5)
        for b, u in enumerate(users):  # recommend = the top of rank_all, batch or alone
            cfg.cold_prior_weight = cold_weight
            one_ids, one_scores = fitted.recommend([u], k=6)
            assert one_ids[0].tolist() == ids[b].tolist()
            np.testing.assert_allclose(one_scores[0], scores[b], rtol=1e-6)
            row = st.users.index.get(u, -1)
            seen = st.seen[row] if row >= 0 else set()
            cols = [st.items.index[j] for j in ids[b].tolist()]
            assert not seen & set(cols)
            np.testing.assert_allclose(got[b][cols], scores[b], rtol=1e-5, atol=1e-5)
            rest = np.delete(got[b], list(seen | set(cols)))
            assert rest.max() <= scores[b].min() + 1e-6
    ids, scores = fitted.recommend([], k=4)  # no query at all
    assert ids.shape == scores.shape == (0, 4) and fitted.rank_all([]).shape == (0, 80)
    cfg.rank_by = "softmax"


def test_recommend_excludes_what_feedback_just_added(fitted):
    """recommend caches each user's sorted seen items: feedback must refresh them, a rejected
    batch and a new user must not leave stale ones."""
    u = fitted.state.users.ids[0]
    top = fitted.recommend([u, u], k=3)[0][0].tolist()  # both rows from one cached array
    fitted.feedback([u, u], top[:2], [5.0, 4.0])
    again = fitted.recommend([u], k=3)[0][0].tolist()
    assert not set(top[:2]) & set(again)
    assert top[2] not in fitted.state.seen[fitted.state.users.index[u]]
    with pytest.raises(ValueError):  # a rating out of range: the whole batch is refused
        fitted.feedback([u, u], [top[2], top[2]], [5.0, 99.0])
    assert fitted.recommend([u], k=3)[0][0].tolist() == again
    fitted.feedback(["newcomer"], [top[2]], [5.0])
    assert top[2] not in fitted.recommend(["newcomer"], k=80)[0][0].tolist()


def test_seen_items_ratings_arrays_and_csr():
    seen = SeenItems()
    seen.append_users(3)
    seen.add([0, 2, 0, 0], [7, 1, 3, 7], [2.0, 4.0, 5.0, 3.0])  # a duplicate: the latest counts
    assert seen.sorted(0).tolist() == [3, 7] and seen.sorted(1).tolist() == []
    assert seen.history(0)[1].tolist() == [5.0, 3.0] and seen.history(0)[1].dtype == np.float32
    assert seen.sorted(0) is seen.sorted(0)  # cached ...
    seen.add([0], [5], [1.0])
    assert seen.sorted(0).tolist() == [3, 5, 7]  # ... until the user's items change
    assert seen.history(0)[2].tolist() == [2, 0, 1]  # ages: 5 the latest, then 7, then 3
    seen.add([0], [3], [4.0])  # a new rating of a known item: now the latest
    assert seen.history(0)[1].tolist() == [4.0, 1.0, 3.0]
    assert seen.history(0)[2].tolist() == [0, 1, 2]
    arrays = seen.history(0)
    seen.add([0], [3], [4.0])  # the latest again, unchanged: nothing moves
    assert seen.history(0) is arrays
    ptr, idx, rated, ages = seen.csr()
    assert ptr.tolist() == [0, 3, 3, 4] and idx.tolist() == [3, 5, 7, 1]
    assert rated.tolist() == [4.0, 1.0, 3.0, 4.0] and ages.tolist() == [0, 1, 2, 0]
    back = SeenItems.from_csr(ptr.tolist(), idx.tolist(), rated.tolist(), ages.tolist())
    assert [set(back[a]) for a in range(3)] == [{3, 5, 7}, set(), {1}]
    assert back.history(0)[1].tolist() == [4.0, 1.0, 3.0]
    assert back.history(0)[2].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="ages"):
        SeenItems.from_csr(ptr.tolist(), idx.tolist(), rated.tolist(), [0, 0, 2, 0])
    assert seen.complete and back.complete
    old = SeenItems.from_csr(ptr.tolist(), idx.tolist())  # checkpoints without ratings
    assert old.history(0)[1].size == 0 and old.sorted(0).tolist() == [3, 5, 7]  # unknown
    assert not old.complete
    seen.truncate(1)
    assert len(seen) == 1 and seen.csr()[1].tolist() == [3, 5, 7]
    seen.append_users(1)
    assert seen.sorted(1).tolist() == []  # no stale array for a re-added row


def test_new_items_from_text(fitted):
    fitted.add_items(["fresh-1"], ["Brand new 1 | space, war"])
    st = fitted.state
    j = st.items.index["fresh-1"]
    expect = st.proj @ st.item_text.t[j]
    got = {"item_rows": st.true_item_rows()[j], "item_bias": st.true_item_bias()[j, None],
           "tgt_rows": st.tgt_rows.t[j], "tgt_bias": st.tgt_bias.t[j, None],
           "ctx_rows": st.ctx_rows.t[j]}  # fmt: skip
    for name, sl in st.proj_slices().items():
        torch.testing.assert_close(got[name], expect[sl], rtol=1e-5, atol=1e-6)
    items, _ = fitted.recommend([0], k=fitted.n_items)
    assert "fresh-1" in items[0].tolist()  # recommendable before anyone rated it
    # unknown items in feedback come with their text
    fitted.feedback([0], ["fresh-2"], [4.0], texts={"fresh-2": "Another | crime"})
    assert "fresh-2" in fitted.state.items


def test_string_ids_and_padding():
    rec = Recommender(dim=4, encoder="hashing-16", max_epochs=2)
    rec.add_items(["a", "b", "c"], ["x", "y", "z"])
    rec.fit(["u1", "u2", "u1"], ["a", "b", "c"], [5, 3, 1])
    items, scores = rec.recommend(["u1"], k=3)
    assert items.tolist() == [["b", "", ""]] and np.isinf(scores[0, 1:]).all()


BAD_FEEDBACK = [
    (([1], [1], [float("nan")]), ValueError, "NaN"),
    (([1], [1], [6.0]), ValueError, r"\[1.0, 5.0\]"),
    (([1], [1], [0.5]), ValueError, "lie in"),
    (([1, 2], [1], [3.0]), ValueError, "differ in length"),
    (([1], [1], [3.0, 4.0]), ValueError, "1 entries"),
    (([], [], []), ValueError, "empty batch"),
    (([1], ["never-seen"], [3.0]), ValueError, "unknown items without text"),
    (([1.5], [1], [3.0]), TypeError, "float"),
    (([True], [1], [3.0]), TypeError, "bool"),
    (([1], [1], ["3"]), TypeError, "numbers"),
    (("u1", [1], [3.0]), TypeError, "sequence"),
    (([[1]], [1], [3.0]), TypeError, "list"),
    ((np.array([[1]]), [1], [3.0]), ValueError, "one-dimensional"),
]


@pytest.mark.parametrize("args,exc,msg", BAD_FEEDBACK)
def test_bad_feedback_changes_nothing(fitted, args, exc, msg):
    before = state_bits(fitted)
    with pytest.raises(exc, match=msg):
        fitted.feedback(*args)
    assert_same_bits(before, state_bits(fitted))


def test_bad_calls_elsewhere_change_nothing(fitted):
    before = state_bits(fitted)
    with pytest.raises(ValueError, match="already in the catalogue"):
        fitted.add_items([1], ["dup"])
    with pytest.raises(ValueError, match="duplicates"):
        fitted.add_items(["n1", "n1"], ["a", "b"])
    with pytest.raises(ValueError, match="one str per item"):
        fitted.add_items(["n1"], ["a", "b"])
    with pytest.raises(TypeError, match="expected str"):
        fitted.add_items(["n1"], [None])
    with pytest.raises(ValueError, match="surrogate"):
        fitted.add_items(["n1"], ["bad \ud800"])
    with pytest.raises(ValueError, match="unknown items"):
        fitted.predict([1], ["nope"])
    with pytest.raises(ValueError, match="k must"):
        fitted.recommend([1], k=0)
    with pytest.raises(ValueError, match="NaN"):
        fitted.fit([1], [1], [np.nan])
    assert_same_bits(before, state_bits(fitted))


def test_divergent_step_is_rolled_back(fitted):
    fitted.config.lr = 5e3  # explodes at every halving (lr x weight_decay stays < 1)
    before = state_bits(fitted)
    with pytest.raises(DivergenceError):
        fitted.feedback([0, 0, "brand-new-user"], [1, 2, 3], [5.0, 1.0, 5.0])
    assert_same_bits(before, state_bits(fitted))


def test_save_load_round_trip_bit_exact(fitted, tmp_path):
    fitted.feedback(["s1"], [3], [4.0])
    fitted.add_items(["str-item"], ["text | war"])
    fitted.save(tmp_path / "ck")
    again = Recommender.load(tmp_path / "ck")
    assert_same_bits(state_bits(fitted), state_bits(again))
    assert again.config == fitted.config and again.state.proj_fitted
    users = [0, 1, "s1", "cold"]
    a, b = fitted.recommend(users, k=7), again.recommend(users, k=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # both keep learning identically
    fitted.feedback([0, 1], [5, 6], [2.0, 4.0])
    again.feedback([0, 1], [5, 6], [2.0, 4.0])
    assert_same_bits(state_bits(fitted), state_bits(again))
    # saving over an existing checkpoint replaces it whole
    again.save(tmp_path / "ck")
    assert_same_bits(state_bits(again), state_bits(Recommender.load(tmp_path / "ck")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers


def test_checkpoint_from_before_the_user_gain_keeps_learning_at_one_rate(fitted, tmp_path):
    fitted.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert meta["config"]["learner"]["user_gain"] == fitted.config.user_gain == 15.0
    del meta["config"]["learner"]["user_gain"]
    (tmp_path / "ck" / "state.json").write_text(json.dumps(meta))
    assert Recommender.load(tmp_path / "ck").config.user_gain == 1.0


def test_load_rejects_foreign_or_future_checkpoints(fitted, tmp_path):
    with pytest.raises(ValueError, match="not an lrec_fast checkpoint"):
        Recommender.load(tmp_path)
    fitted.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "state.json").read_text())
    meta["format_version"] = 999
    (tmp_path / "ck" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 999"):
        Recommender.load(tmp_path / "ck")


def test_user_gain_scales_the_stream_step_on_user_rows_only(stream):
    """fit ignores user_gain; feedback moves user rows gain times as far, the rest the same."""
    recs = []
    for gain in (1.0, 4.0):
        rec = Recommender(dim=4, encoder="hashing-16", max_epochs=2, replay_ratio=0.0,
                          consolidate_every=0, user_gain=gain)  # fmt: skip
        rec.add_items(stream.item_ids, stream.item_text)
        ev = stream.events
        rec.fit(ev.user[:600], ev.item[:600], ev.rating[:600])
        recs.append(rec)
    assert_same_bits(state_bits(recs[0]), state_bits(recs[1]))
    ev = stream.events
    u, i, r = ev.user[:5], ev.item[600:605], np.full(5, 5.0)
    moves = []
    for rec in recs:
        st = rec.state
        rows = torch.tensor([st.users.index[x] for x in u])
        before = st.true_user_rows()[rows].clone()
        keep = 1.0 - online.effective_lr(rec.config.lr, 5, rec.config) * rec.config.weight_decay
        rec.feedback(u, i, r)
        moves.append(st.true_user_rows()[rows] - before * keep)
    torch.testing.assert_close(moves[1], 4.0 * moves[0], rtol=1e-4, atol=1e-7)
    assert float(moves[0].abs().max()) > 0
    torch.testing.assert_close(recs[0].state.true_item_rows(), recs[1].state.true_item_rows())
    torch.testing.assert_close(recs[0].state.true_item_bias(), recs[1].state.true_item_bias())


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="user_gain"):
        Recommender(user_gain=-1.0)
    with pytest.raises(ValueError):
        Recommender(lr=0)
    with pytest.raises(ValueError):
        Recommender(lr=10, weight_decay=0.2)
    with pytest.raises(ValueError):
        Recommender(rating_range=(5, 1))


def test_threads_feedback_and_recommend(fitted, stream):
    ev = stream.events.take(slice(1500, 2300))
    errors: list[BaseException] = []

    def writer(lo: int) -> None:
        try:
            for s in range(lo, lo + 400, 20):
                sl = slice(s, s + 20)
                fitted.feedback(ev.user[sl], ev.item[sl], ev.rating[sl])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                items, scores = fitted.recommend([0, 1, "x"], k=5)
                assert items.shape == (3, 5) and np.isfinite(scores).all()
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(lo,)) for lo in (0, 400)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert int(fitted.state.item_count.t.sum()) == 1500 + 800


def test_fold_scales_keeps_values(fitted):
    st = fitted.state
    st.scales[:] = torch.tensor([5e-4, 0.5, 5e-4, 0.9], dtype=torch.float64)
    before = [st.true_user_rows(), st.true_item_rows(), st.true_user_bias(), st.true_item_bias()]
    st.fold_scales(1e-3)
    assert st.scales.tolist() == [1.0, 0.5, 1.0, 0.9]
    after = [st.true_user_rows(), st.true_item_rows(), st.true_user_bias(), st.true_item_bias()]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


def test_loaded_model_rebuilds_its_encoder(fitted, tmp_path):
    fitted.save(tmp_path / "ck")
    again = Recommender.load(tmp_path / "ck")
    again.add_items(["after-load"], ["Kalo 1 | space"])
    fitted.add_items(["after-load"], ["Kalo 1 | space"])
    assert again.encoder.name == "hashing-64"
    assert_same_bits(state_bits(fitted), state_bits(again))


def test_recency_prior_counts_decay_exactly(stream):
    """Decayed counts equal the brute-force sum of 2^(-age / halflife) over every event learned
    from (fit, then feedback batches), ages counted in events; rejected batches count nothing."""
    h = 50.0
    rec = Recommender(dim=4, encoder="hashing-16", max_epochs=2, prior_halflife=h)
    rec.add_items(stream.item_ids, stream.item_text)
    ev = stream.events
    rec.fit(ev.user[:300], ev.item[:300], ev.rating[:300])
    learned = ev.item[:300].tolist()
    for s in range(300, 420, 40):
        rec.feedback(ev.user[s : s + 40], ev.item[s : s + 40], ev.rating[s : s + 40])
        learned += ev.item[s : s + 40].tolist()
    with pytest.raises(ValueError):
        rec.feedback([1], [ev.item[0]], [float("nan")])
    n = len(learned)
    want = np.zeros(rec.n_items)
    col = rec.state.items.index
    for t, j in enumerate(learned):
        want[col[j]] += 2.0 ** (-(n - 1 - t) / h)
    np.testing.assert_allclose(rec.state.recent_counts().numpy(), want, rtol=1e-9, atol=1e-12)
    # a checkpoint keeps them
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rec.save(d)
        again = Recommender.load(d)
    np.testing.assert_array_equal(again.state.recent_counts().numpy(),
                                  rec.state.recent_counts().numpy())  # fmt: skip


def test_large_batch_is_lr_batch_steps_in_time_order(stream):
    """A call with more than lr_batch events equals feeding its chunks one call at a time
    (known users and items), and returns the events' mean pre-step loss. (The residual
    offsets learn from each call's errors against the answers before it, and a call's users
    get their neighbour lists from the ratings at its end: both off here.)"""
    recs = []
    for _ in range(2):
        rec = Recommender(dim=4, encoder="hashing-16", max_epochs=2, lr_batch=40, replay_ratio=0.0,
                          offset_count_weight=0.0, offset_item_weight=0.0,
                          uknn_weight=0.0)  # fmt: skip
        rec.add_items(stream.item_ids, stream.item_text)
        ev = stream.events
        rec.fit(ev.user[:600], ev.item[:600], ev.rating[:600])
        recs.append(rec)
    known = np.isin(ev.user[600:900], ev.user[:600])
    u, i, r = (
        ev.user[600:900][known][:130],
        ev.item[600:900][known][:130],
        ev.rating[600:900][known][:130],
    )
    loss = recs[0].feedback(u, i, r)
    parts = [
        recs[1].feedback(u[s : s + 40], i[s : s + 40], r[s : s + 40]) for s in range(0, 130, 40)
    ]
    a, b = state_bits(recs[0]), state_bits(recs[1])
    for bits in (a, b):  # the decayed counts agree to rounding (one decay of 130 vs 4 calls)
        bits["t"].pop("item_recent"), bits["t"].pop("recent_scale")  # type: ignore[union-attr]
    assert_same_bits(a, b)
    np.testing.assert_allclose(recs[0].state.recent_counts().numpy(),
                               recs[1].state.recent_counts().numpy(), rtol=1e-12)  # fmt: skip
    sizes = [40, 40, 40, 10]
    assert loss == pytest.approx(sum(p * n for p, n in zip(parts, sizes, strict=True)) / 130)


def test_large_batch_diverging_late_is_rolled_back_whole(fitted):
    fitted.config.lr_batch = 2
    before = state_bits(fitted)
    users = [0, 1, "late-new-user", 2, 3, 4]
    items = [1, 2, 3, 4, 5, 6]
    ratings = [4.0, 3.0, 5.0, 2.0, 5.0, 1.0]
    fitted.config.lr = 1.0
    real_step = online.step
    calls = []

    def step_then_explode(state, *args, **kw):  # the third chunk diverges
        calls.append(1)
        if len(calls) == 3:
            raise DivergenceError("late chunk diverged")
        return real_step(state, *args, **kw)

    import lrec_fast.service as service_mod

    service_mod.online.step, saved = step_then_explode, service_mod.online.step
    try:
        with pytest.raises(DivergenceError, match="late chunk"):
            fitted.feedback(users, items, ratings)
    finally:
        service_mod.online.step = saved
    assert len(calls) == 3
    assert_same_bits(before, state_bits(fitted))
    assert "late-new-user" not in fitted.state.users


def test_replay_reservoir_is_a_uniform_deterministic_sample():
    from lrec_fast.model import ModelState

    cfg = online.LearnerConfig(replay_size=100, replay_ratio=0.25)
    means = []
    for seed in range(5):
        cfg.seed = seed
        runs = []
        for _ in range(2):
            st = ModelState(dim=2, text_dim=2)
            for s in range(0, 10_000, 300):  # ragged calls, time order
                idx = torch.arange(s, min(s + 300, 10_000))
                hist = torch.stack([idx, idx + 2] + [idx * 0 - 1] * (st.history_len - 2), 1)
                online.reservoir_add(st, idx, idx + 1, idx.float() / 10_000, hist, cfg)
            runs.append(st.replay_users.t.clone())
        assert torch.equal(runs[0], runs[1])  # deterministic
        kept = runs[0]
        assert kept.numel() == 100 == kept.unique().numel() and int(st.replay_seen) == 10_000
        assert torch.equal(st.replay_items.t, kept + 1)  # rows stay paired
        assert torch.equal(st.replay_hist.t[:, 1], kept + 2)
        means.append(float(kept.double().mean()))
    # uniform over all 10,000 offers: the mean index is 5,000 +- 290 (std of a mean of 100)
    assert abs(np.mean(means) - 5_000) < 3 * 290 / np.sqrt(5)
    u, i, r, h = online.replay_sample(st, 100, cfg)
    assert u.numel() == 25 and torch.equal(i, u + 1) and torch.equal(h[:, 1], u + 2)
    torch.testing.assert_close(r, u.float() / 10_000)
    empty = ModelState(dim=2, text_dim=2)
    assert online.replay_sample(empty, 100, cfg)[0].numel() == 0


def test_rerank_orders_warm_users_head_candidates_by_predicted_rating(fitted):
    """The head's first rerank_depth candidates, re-ordered by score + weight x predicted
    rating; the rest in the head's order below them; rank_all orders every item the same."""
    st, cfg = fitted.state, fitted.config
    cfg.rerank_depth = 4
    users = [0, 1, 2, "nobody"]
    cfg.rerank_weight = 0.0
    head_ids, head_scores = fitted.recommend(users, k=9)
    cfg.rerank_weight = 2.0
    ids, scores = fitted.recommend(users, k=9)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # still best first
    for b, u in enumerate(users[:3]):
        assert sorted(ids[b, :4].tolist()) == sorted(head_ids[b, :4].tolist())
        assert ids[b, 4:].tolist() == head_ids[b, 4:].tolist()
        rating = fitted.predict([u] * 4, ids[b, :4].tolist())
        head = dict(zip(head_ids[b].tolist(), head_scores[b].tolist(), strict=True))
        want = np.array([head[j] for j in ids[b, :4].tolist()]) + 2.0 * rating
        np.testing.assert_allclose(scores[b, :4], want, rtol=1e-5, atol=1e-5)
        # rank_all: the same order over every unseen item, the first 4 with the same scores
        got = fitted.rank_all([u])[0]
        seen = st.seen.sorted(st.users.index[u])
        got[seen] = -np.inf
        order = np.argsort(-got, kind="stable")[:9]
        assert [st.items.ids[j] for j in order] == ids[b].tolist()
        np.testing.assert_allclose(got[order[:4]], scores[b, :4], rtol=1e-5, atol=1e-5)
    assert ids[:3, :4].tolist() != head_ids[:3, :4].tolist()  # the re-rank did reorder
    # an unknown user has no history: the head's answer as it is
    assert ids[3].tolist() == head_ids[3].tolist()
    np.testing.assert_array_equal(scores[3], head_scores[3])
    # k within the depth: a prefix of the same answer
    ids3, scores3 = fitted.recommend(users, k=3)
    assert ids3.tolist() == ids[:, :3].tolist()
    np.testing.assert_allclose(scores3, scores[:, :3], rtol=1e-6)


def test_rerank_with_fewer_eligible_items_than_the_depth(stream):
    rec = Recommender(dim=4, encoder="hashing-16", max_epochs=2, rerank_depth=30)
    items = list(stream.item_ids[:12])
    rec.add_items(items, stream.item_text[:12])
    rec.fit([0] * 8 + [1] * 2, items[:8] + items[:2], [5.0] * 10)
    ids, scores = rec.recommend([0, 1], k=6)
    assert ids[0, 4:].tolist() == [-1, -1] and np.isneginf(scores[0, 4:]).all()
    assert (ids[0, :4] >= 0).all() and np.all(np.diff(scores[0, :4]) <= 1e-6)
    assert (ids[1] >= 0).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"rerank_weight": -1.0},
        {"rerank_weight": float("nan")},
        {"rerank_depth": -1},
        {"rerank_depth": 5000},
    ],
)
def test_rerank_settings_are_checked(kw):
    with pytest.raises(ValueError, match="rerank"):
        Recommender(**kw)


def test_recommend_keeps_its_item_terms_only_until_the_model_changes(fitted, stream):
    """The per-item terms recommend ranks with are kept between calls: after every mutating
    call and every change of their settings they are the freshly computed ones again."""
    rec, st = fitted, fitted.state

    def check() -> torch.Tensor:
        rec.recommend([0, 1, "nobody"], k=5)  # (both groups: warm users and a cold one)
        for cold in (False, True):
            fresh = online.rank_bias(st, rec.config, cold=cold)
            assert torch.equal(rec._item_term(cold), fresh)
        return rec._item_term(False).clone()

    first = check()
    assert rec._item_term(False) is rec._item_term(False)  # kept, not recomputed
    ev = stream.events.take(slice(1500, 1600))
    rec.feedback(ev.user, ev.item, ev.rating)
    assert not torch.equal(check(), first)
    rec.consolidate()
    check()
    rec.refit()
    check()
    rec.add_items(["brand new"], ["A Film (2026) | Drama"])
    assert check().shape == (81,)
    rec.config.prior_weight *= 2
    check()
    rec.config.rank_by = "rating"
    try:
        check()
    finally:
        rec.config.rank_by = "softmax"
    with pytest.raises(ValueError):
        rec.feedback([0], ["no such item"], [4.0])  # a rejected call: still fresh after it
    check()


def test_feedback_encodes_new_items_before_taking_the_lock(fitted):
    """A new item's text is encoded before feedback takes the model's lock (answers do not
    wait for the encoder); the same embedding as encoding it under the lock, and bad text
    is still reported by the call, which changes nothing."""
    from lrec_fast.text.encoder import HashingEncoder

    rec = fitted
    calls: list[bool] = []
    real = HashingEncoder(64)

    class Spy:
        name, dim = real.name, real.dim

        def encode(self, texts):
            got: list[bool] = []

            def probe() -> None:  # can another thread take the model's lock right now?
                ok = rec._lock.acquire(blocking=False)
                got.append(ok)
                if ok:
                    rec._lock.release()

            t = threading.Thread(target=probe)
            t.start()
            t.join()
            calls.append(got[0])
            return real.encode(texts)

    rec._encoder = Spy()
    rec.feedback([0, 1], ["fresh", 3], [4.0, 2.0], texts={"fresh": "A Fresh Film (2026) | Drama"})
    assert calls == [True]  # once, unlocked
    row = rec.state.items.index["fresh"]
    want = real.encode(["A Fresh Film (2026) | Drama"])[0]
    np.testing.assert_array_equal(rec.state.item_text.t[row].numpy(), want)
    bits = state_bits(rec)
    with pytest.raises(TypeError):
        rec.feedback([0], ["other"], [4.0], texts={"other": 5})  # type: ignore[dict-item]
    assert_same_bits(state_bits(rec), bits)
