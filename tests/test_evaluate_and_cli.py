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


def brute_force(model, stream, history, k=10):
    """Score each event against all items the user has not interacted with, one by one."""
    sq, hits, ndcg, n_rel = 0.0, 0.0, 0.0, 0
    items = model.item_ids
    for e in range(len(stream)):
        u, j, r = int(stream.user[e]), int(stream.item[e]), float(stream.rating[e])
        sq += (float(np.clip(model.predict([u], [j])[0], 1, 5)) - r) ** 2
        if r >= 4:
            n_rel += 1
            s = dict(zip(items, model.score_all([u])[0], strict=True))
            rank = sum(1 for i in items if i not in history.get(u, set()) and s[i] > s[j])
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
