"""Prequential evaluation against brute force, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lrec_fast import Recommender, __version__
from lrec_fast.cli import main
from lrec_fast.data import Interactions
from lrec_fast.evaluate import history_of, prequential


def ahead(s, pos, i, j):
    """Item i ranks ahead of j: a higher score, or the same score earlier in the catalogue."""
    return s[i] > s[j] or (s[i] == s[j] and pos[i] < pos[j])


def brute_force(model, stream, history, k=10):
    """Score each event against all items the user has not interacted with, one by one."""
    sq, hits, ndcg, n_rel = 0.0, 0.0, 0.0, 0
    items = model.item_ids
    for e in range(len(stream)):
        u, j, r = int(stream.user[e]), int(stream.item[e]), float(stream.rating[e])
        sq += (float(np.clip(model.predict([u], [j])[0], 1, 5)) - r) ** 2
        if r >= 4:
            n_rel += 1
            s = dict(zip(items, model.rank_all([u])[0], strict=True))
            pos = {i: c for c, i in enumerate(items)}
            rank = sum(1 for i in items if i not in history.get(u, set()) and ahead(s, pos, i, j))
            if rank < k:
                hits += 1
                ndcg += 1 / math.log2(rank + 2)
    return math.sqrt(sq / len(stream)), hits / max(n_rel, 1), ndcg / max(n_rel, 1)


def test_static_prequential_matches_brute_force(fitted, stream):
    ev = stream.events.take(slice(1500, 1700))
    warm = stream.events.take(slice(0, 1500))
    res = prequential(fitted, ev, history_of(warm), learn=False, batch_size=1, segment=50)
    # with batch_size=1, history grows event by event: mirror that in the brute force
    hist = history_of(warm)
    sq, hits, ndcg, n_rel = 0.0, 0.0, 0.0, 0
    for e in range(len(ev)):
        one = ev.take(slice(e, e + 1))
        rm, hr, nd = brute_force(fitted, one, hist)
        sq += rm**2
        if one.rating[0] >= 4:
            n_rel += 1
            hits += hr
            ndcg += nd
        hist.setdefault(int(one.user[0]), set()).add(int(one.item[0]))
    assert len(res.segments) == 4
    assert res.overall["rmse"] == pytest.approx(math.sqrt(sq / len(ev)), rel=1e-5)
    assert res.overall["hr@10"] == pytest.approx(hits / n_rel)
    assert res.overall["ndcg@10"] == pytest.approx(ndcg / n_rel, rel=1e-6)


def test_event_exclusion_does_not_depend_on_the_batch_size(fitted, stream):
    """A model that does not learn: with each event's own candidates (``exclude="event"``) the
    ranking metrics are those of event-by-event evaluation at any micro-batch size; with the
    micro-batch's (``"batch"``) more items compete, so HR can only fall."""
    warm, ev = stream.events.take(slice(0, 1500)), stream.events.take(slice(1500, 1900))
    keys = ("hr@10", "ndcg@10", "percentile", "relevant")

    def run(m: int, scope: str) -> dict:
        r = prequential(fitted, ev, history_of(warm), learn=False, batch_size=m, exclude=scope)
        return {key: r.overall[key] for key in keys}

    one = run(1, "event")
    assert one == run(1, "batch") and one["relevant"] > 20
    for m in (7, 100, 400):
        got = run(m, "event")
        for key in keys:
            assert got[key] == pytest.approx(one[key], rel=1e-9), (m, key)
    assert run(400, "batch")["hr@10"] <= one["hr@10"]
    with pytest.raises(ValueError, match="exclude must be one of"):
        run(10, "session")


def test_learning_beats_static_on_synthetic_stream(stream):
    warm, rest = stream.events.take(slice(0, 1500)), stream.events.take(slice(1500, None))
    models = []
    for _ in range(2):
        rec = Recommender(dim=8, encoder="hashing-64", max_epochs=20)
        rec.add_items(stream.item_ids, stream.item_text)
        rec.fit(warm.user, warm.item, warm.rating)
        models.append(rec)
    static = prequential(models[0], rest, history_of(warm), learn=False)
    life = prequential(models[1], rest, history_of(warm), learn=True)
    assert life.overall["rmse"] < static.overall["rmse"]
    assert life.overall["update_ms_per_batch"] > 0


def test_empty_stream():
    rec = Recommender(dim=4, encoder="hashing-16")
    rec.add_items([1], ["a"])
    empty = Interactions(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float32,
                                                          np.int64)))  # fmt: skip
    res = prequential(rec, empty, {})
    assert res.segments == [] and res.overall["events"] == 0


def test_cli_version_and_info(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends available: numba, torch; selected: numba" in out
    assert "many-query tiles on " in out and "int8 dot " in out
    assert "tokeniser: " in out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The main job on MovieLens-100k (hashing encoder here to keep the suite fast)."""
    assert main(["demo", "--out", str(tmp_path), "--encoder", "hashing-384", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("static", "lifelong"):
        assert set(report[name]) == {"rmse", "hr@10", "ndcg@10"}
    assert report["lifelong"]["rmse"] < report["static"]["rmse"]
    assert report["lifelong"]["hr@10"] > report["static"]["hr@10"]
    assert report["lifelong"]["ndcg@10"] > report["static"]["ndcg@10"]
    assert len(report["segments"]["lifelong"]) == 20
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "overall" in out and "demo-user" in out


def test_split_keeps_retention_out_of_training(stream):
    from lrec_fast.evaluate import split_events

    ev = stream.events
    sp = split_events(ev, retain_fraction=0.1, seed=3)
    assert len(sp.train) + len(sp.retain) == len(ev) // 2 and len(sp.retain) == len(ev) // 20
    assert len(sp.stream) == len(ev) - len(ev) // 2
    assert np.all(np.diff(sp.train.timestamp) >= 0) and np.all(np.diff(sp.retain.timestamp) >= 0)
    key = lambda e: set(zip(e.user.tolist(), e.item.tolist(), e.timestamp.tolist(), strict=True))  # noqa: E731
    assert not key(sp.train) & key(sp.retain)
    again = split_events(ev, retain_fraction=0.1, seed=3)
    assert np.array_equal(again.retain.timestamp, sp.retain.timestamp)


def test_popularity_baselines_against_counting(stream):
    from lrec_fast.baselines import Popularity

    ev = stream.events.take(slice(0, 700))
    items = stream.item_ids.tolist()
    for window in (None, 50):
        pop = Popularity(items, window=window)
        pop.fit(ev.take(slice(0, 400)))
        for s in range(400, 700, 37):  # ragged micro-batches
            b = ev.take(slice(s, min(s + 37, 700)))
            pop.learn(b.user.tolist(), b.item.tolist(), b.rating)
        last = ev.item.tolist()[-window:] if window else ev.item.tolist()
        want = np.array([last.count(j) for j in items], dtype=np.float32)
        np.testing.assert_array_equal(pop.score_all([1, 2])[1], want)
    # a constant score earns nothing from ties: the true item ranks after every earlier item
    from lrec_fast.evaluate import rank_events

    ranks, eligible = rank_events(np.zeros((1, 5)), np.zeros((1, 5), bool), np.zeros(3, int),
                                  np.array([0, 2, 4]))  # fmt: skip
    assert ranks.tolist() == [0, 2, 4] and eligible.tolist() == [5, 5, 5]
    # NaN never scores a hit: a NaN true item ranks last, NaN rivals rank below numbers
    nan = np.float32("nan")
    sc = np.array([[nan, nan, nan, nan, nan], [nan, 1.0, nan, 0.5, nan]], dtype=np.float32)
    ranks, _ = rank_events(sc, np.zeros((2, 5), bool), np.array([0, 1, 1, 1]),
                           np.array([0, 0, 1, 3]))  # fmt: skip
    assert ranks.tolist() == [4, 4, 0, 1]
    assert np.isnan(pop.predict([1], [items[0]])).all()


def test_groups_and_percentile_against_brute_force(fitted, stream):
    """Cold/warm users, new items and percentile rank, event by event (batch_size 1)."""
    from lrec_fast.evaluate import prequential

    warm = stream.events.take(slice(0, 1500))
    ev = stream.events.take(slice(1500, 1800))
    known, warm_items = set(warm.user.tolist()[:60]), set(warm.item.tolist()[:700])
    res = prequential(fitted, ev, history_of(warm), learn=False, batch_size=1, segment=100,
                      known_users=known, warm_items=warm_items)  # fmt: skip
    hist, seen = history_of(warm), set(known)
    cold = new = 0
    pr, n_rel = [], 0
    items = fitted.item_ids
    for e in range(len(ev)):
        u, j, r = int(ev.user[e]), int(ev.item[e]), float(ev.rating[e])
        cold += u not in seen
        new += j not in warm_items
        if r >= 4:
            n_rel += 1
            s = dict(zip(items, fitted.rank_all([u])[0], strict=True))
            eligible = [i for i in items if i == j or i not in hist.get(u, set())]
            pos = {i: c for c, i in enumerate(items)}
            rank = sum(1 for i in eligible if ahead(s, pos, i, j))
            pr.append(rank / (len(eligible) - 1))
        seen.add(u)
        hist.setdefault(u, set()).add(j)
    assert res.groups["cold users"]["events"] == cold > 0
    assert res.groups["warm users"]["events"] == len(ev) - cold
    assert res.groups["new items"]["events"] == new
    assert res.overall["relevant"] == n_rel
    assert res.overall["percentile"] == pytest.approx(np.mean(pr), rel=1e-6)


def test_protocol_uses_the_warm_up_only_for_tuning_and_never_trains_on_retention(
    stream, monkeypatch
):
    from lrec_fast import evaluate as E
    from lrec_fast.evaluate import MODELS, run_protocol, split_events

    sp = split_events(stream.events, seed=0)
    banned = set(zip(sp.retain.user.tolist(), sp.retain.item.tolist(), strict=True))
    trained: list[tuple[int, int]] = []
    fit, feedback = Recommender.fit, Recommender.feedback

    def spy_fit(self, users, items, ratings):
        trained.extend(zip(np.asarray(users).tolist(), np.asarray(items).tolist(), strict=True))
        return fit(self, users, items, ratings)

    def spy_feedback(self, users, items, ratings, **kw):
        trained.extend(zip(list(users), list(items), strict=True))
        return feedback(self, users, items, ratings, **kw)

    tuned_on = []
    tune = E.tune_window
    monkeypatch.setattr(
        E, "tune_window", lambda ev, *a, **k: tuned_on.append(len(ev)) or tune(ev, *a, **k)
    )
    monkeypatch.setattr(Recommender, "fit", spy_fit)
    monkeypatch.setattr(Recommender, "feedback", spy_feedback)
    res = run_protocol(stream.events, stream.item_ids.tolist(), stream.item_text, batch_size=50,
                       segment=500, retrain_every=500, encoder="hashing-64", seed=0)  # fmt: skip
    assert set(res.streams) == set(MODELS)
    assert tuned_on == [len(sp.train)]
    # a (user, item) pair of the retention set is only ever trained on if it recurs in the
    # stream or the training part; the retention events themselves never are
    allowed = {(u, j) for part in (sp.train, sp.stream)
               for u, j in zip(part.user.tolist(), part.item.tolist(), strict=True)}  # fmt: skip
    assert not (set(trained) & banned) - allowed
    for name in MODELS:
        assert res.retention_before[name]["events"] == len(sp.retain)
    assert np.isnan(res.streams["popularity"].overall["rmse"])
    assert res.streams["retrain"].overall["update_s"] > 0


@pytest.mark.slow
def test_cli_evaluate(tmp_path, capsys):
    args = ["evaluate", "--out", str(tmp_path), "--encoder", "hashing-384", "--quiet",
            "--batch-size", "1000", "--models", "popularity,recent popularity,static"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"popularity", "recent popularity", "static"}
    st = report["models"]["static"]
    assert st["retention_before"] == st["retention_after"]  # static: nothing changes
    n_seg = len(report["segments"]["static"])
    assert n_seg == 17  # 50,000 events in batches of 1,000: segments close at >= 2,500
    assert (tmp_path / "segments.csv").read_text().count("\n") == 1 + 3 * n_seg
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    assert "recent popularity (" in capsys.readouterr().out
    assert report["config"]["exclude"] == "event"
    # --exclude batch: the same popularity model, more candidates per event: HR can only fall
    narrow = tmp_path / "batch"
    assert main([*args[:2], str(narrow), *args[3:-1], "popularity", "--exclude", "batch"]) == 0
    other = json.loads((narrow / "report.json").read_text())
    assert other["config"]["exclude"] == "batch"
    hr_event = report["models"]["popularity"]["overall"]["hr@10"]
    assert other["models"]["popularity"]["overall"]["hr@10"] < hr_event
    assert "before the micro-batch" in capsys.readouterr().out
