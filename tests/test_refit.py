"""The refit (the slowest time scale): shuffled passes of the rating head over the event log at
the fit's rates, the log itself, the cadence, checkpoints, and all-or-nothing on errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lrec_fast import Recommender, online
from lrec_fast.consolidation import RANKING_TABLES
from lrec_fast.online import DivergenceError

from .conftest import assert_same_bits, state_bits
from .test_consolidation import streamed, tables


def events_of(rec: Recommender, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> Counter:
    st = rec.state
    users, items = [st.users.ids[x] for x in u.tolist()], [st.items.ids[x] for x in i.tolist()]
    return Counter(zip(users, items, r.tolist(), strict=True))


def test_log_holds_the_newest_events_fit_included(stream):
    rec = streamed(stream, n=300, refit_every=0, refit_log_size=1000)
    st = rec.state
    assert 1000 <= st.log_users.n <= 2000  # amortised trimming, as the window
    u, i, r = st.logged(1000)
    ev = stream.events.take(slice(1800 - 1000, 1800))  # 700 of the fit's, 300 streamed
    assert [st.users.ids[x] for x in u.tolist()] == ev.user.tolist()
    assert [st.items.ids[x] for x in i.tolist()] == ev.item.tolist()
    assert r.tolist() == ev.rating.tolist()
    assert int(st.since_refit) == 300
    assert streamed(stream, n=100, refit_log_size=0).state.log_users.n == 0


@pytest.mark.parametrize("epochs", [1, 2])
def test_each_pass_steps_every_logged_event_once_at_the_fits_rates(stream, monkeypatch, epochs):
    rec = streamed(stream, n=300, refit_every=0, refit_epochs=epochs, refit_log_size=700,
                   fit_lr=0.3, fit_weight_decay=2e-3, user_gain=7.0)  # fmt: skip
    logged = events_of(rec, *rec.state.logged(700))
    assert sum(logged.values()) == 700
    rank_before = tables(rec, RANKING_TABLES)
    calls = []
    real = online.step

    def spy(state, users, items, ratings, lr, wd, cfg, backend, max_loss=None, undo=None,
            user_gain=1.0):  # fmt: skip
        calls.append((events_of(rec, users, items, ratings), users.numel(), lr, wd, user_gain))
        return real(state, users, items, ratings, lr, wd, cfg, backend, max_loss, undo,
                    user_gain)  # fmt: skip

    monkeypatch.setattr(online, "step", spy)
    report = rec.refit()
    assert report.events == 700 and report.epochs == epochs and report.rejected == 0
    assert len(calls) == epochs * 7
    for e in range(epochs):  # shuffled mini-batches of batch_size that cover the log once
        seen = sum((c[0] for c in calls[e * 7 : (e + 1) * 7]), Counter())
        assert seen == logged
    assert {c[1] for c in calls} == {rec.config.batch_size}
    assert {c[2:] for c in calls} == {(0.3, 2e-3, 1.0)}  # the fit's rates, user gain 1
    first = [c[0] for c in calls[:7]]
    assert first != [
        events_of(rec, *(t[s : s + 100] for t in rec.state.logged(700))) for s in range(0, 700, 100)
    ]  # fmt: skip  (shuffled, not time order)
    # the ranking head is not the refit's (never-rated items may take a new text prior)
    rated = rec.state.item_count.t > 0
    for k, v in rank_before.items():
        assert torch.equal(getattr(rec.state, k).t[rated], v[rated]), k
    assert int(rec.state.since_refit) == 0
    assert report.rmse_after == pytest.approx(online.rmse(rec.state, *rec.state.logged(700),
                                                          rec.rating_range))  # fmt: skip


def test_cadence_runs_it_from_feedback(stream, monkeypatch):
    sizes = []
    real = Recommender.refit

    def spy(self):
        sizes.append(int(self.state.since_refit))
        return real(self)

    monkeypatch.setattr(Recommender, "refit", spy)
    streamed(stream, n=700, refit_every=300)
    assert sizes == [300, 300]  # after 300 and 600 streamed events (the fit is not a feedback)
    sizes.clear()
    streamed(stream, n=700, refit_every=0)
    assert sizes == []


def test_a_divergent_mini_batch_is_rejected(stream, monkeypatch):
    rec = streamed(stream, n=200, refit_every=0, refit_log_size=500)
    real, calls = online.step, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DivergenceError("exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "step", second_fails)
    report = rec.refit()
    assert report.rejected == 1 and len(calls) == 5


def test_an_unexpected_error_leaves_the_model_as_it_was(stream, monkeypatch):
    rec = streamed(stream, n=300, refit_every=0)
    bits = state_bits(rec)
    real, calls = online.step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        rec.refit()
    assert_same_bits(state_bits(rec), bits)


def test_a_failed_feedback_logs_nothing(stream, monkeypatch):
    rec = streamed(stream, n=200)
    n, since = rec.state.log_users.n, int(rec.state.since_refit)
    monkeypatch.setattr(online, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    ev = stream.events.take(slice(1700, 1750))
    with pytest.raises(RuntimeError):
        rec.feedback(ev.user, ev.item, ev.rating)
    assert rec.state.log_users.n == n and int(rec.state.since_refit) == since


@pytest.mark.parametrize("cut", [200, 500])
def test_a_reloaded_model_continues_exactly(stream, tmp_path, cut):
    """Saved mid-stream and loaded, a model keeps its log and refit cadence (a refit every 300
    events, on both sides of the cut): it then learns bit for bit what the uninterrupted one
    learns."""
    kw = dict(refit_every=300, refit_log_size=800, negatives=16)
    whole = streamed(stream, n=900, **kw)
    first = streamed(stream, n=cut, **kw)
    first.save(tmp_path / "ck")
    again = Recommender.load(tmp_path / "ck")
    assert_same_bits(state_bits(first), state_bits(again))
    for s in range(1500 + cut, 2400, 100):
        ev = stream.events.take(slice(s, s + 100))
        again.feedback(ev.user, ev.item, ev.rating)
    assert_same_bits(state_bits(whole), state_bits(again))


def test_a_checkpoint_from_before_the_refit_loads_without_it(stream, tmp_path):
    """Written before the refit existed: no log, no count, no refit settings. It loads with an
    empty log and refit_every 0 (it learned without refits, and goes on so)."""
    from safetensors.torch import load_file, save_file

    rec = streamed(stream, n=200)
    rec.save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items()
               if not k.startswith("log_") and k != "since_refit"}, str(path))  # fmt: skip
    meta_p = tmp_path / "ck" / "state.json"
    meta = json.loads(meta_p.read_text())
    for key in ("refit_every", "refit_epochs", "refit_log_size"):
        del meta["config"]["learner"][key]
    meta_p.write_text(json.dumps(meta))
    again = Recommender.load(tmp_path / "ck")
    assert again.state.log_users.n == 0 and int(again.state.since_refit) == 0
    assert again.config.refit_every == 0 and again.refit().events == 0
    ev = stream.events.take(slice(1700, 1800))
    again.feedback(ev.user, ev.item, ev.rating)  # and it keeps learning, and logging
    assert again.state.log_users.n == 100


def test_a_log_that_does_not_fit_the_tables_is_refused(stream, tmp_path):
    from safetensors.torch import load_file, save_file

    rec = streamed(stream, n=100)
    rec.save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(path))
    t["log_items"][3] = rec.n_items  # one past the catalogue
    save_file(t, str(path))
    with pytest.raises(ValueError, match="event log"):
        Recommender.load(tmp_path / "ck")


def test_nothing_logged_changes_nothing():
    rec = Recommender(dim=4, encoder="hashing-64")
    bits = state_bits(rec)
    report = rec.refit()
    assert report.events == 0 and report.epochs == 0
    assert_same_bits(state_bits(rec), bits)


@pytest.mark.parametrize("key", ["refit_every", "refit_epochs", "refit_log_size"])
def test_config_is_checked(key):
    with pytest.raises(ValueError, match="refit"):
        Recommender(encoder="hashing-64", **{key: -1})
