"""The refit (the slowest time scale): shuffled passes of the rating head over the event log at
the fit's rates, the log itself, the cadence, checkpoints, and all-or-nothing on errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lrec_fast import Recommender, kernels, online
from lrec_fast.consolidation import RANKING_TABLES, RATING_TABLES

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
    rec = streamed(stream, n=300, refit_every=0, refit_epochs=epochs, refit_log_size=650,
                   fit_lr=0.3, fit_weight_decay=2e-3, user_gain=7.0)  # fmt: skip
    logged = events_of(rec, *rec.state.logged(650))
    assert sum(logged.values()) == 650
    rank_before = tables(rec, RANKING_TABLES)
    calls = []
    real = kernels.mf_sgd_step

    def spy(u_rows, i_rows, u_bias, i_bias, scales, mu, users, items, ratings, lr, wd, *rest,
            **kw):  # fmt: skip
        calls.append((events_of(rec, users, items, ratings), users.numel(), lr, wd, rest, kw))
        return real(u_rows, i_rows, u_bias, i_bias, scales, mu, users, items, ratings, lr, wd,
                    *rest, **kw)  # fmt: skip

    monkeypatch.setattr(kernels, "mf_sgd_step", spy)
    report = rec.refit()
    assert report.events == 650 and report.epochs == epochs and not report.rolled_back
    assert len(calls) == epochs * 7
    for e in range(epochs):  # shuffled mini-batches of batch_size that cover the log once
        seen = sum((c[0] for c in calls[e * 7 : (e + 1) * 7]), Counter())
        assert seen == logged
        assert [c[1] for c in calls[e * 7 : (e + 1) * 7]] == [100] * 6 + [50]
        # the fit's rates, linearly scaled for the short last batch; every gain 1
        assert [c[2:4] for c in calls[e * 7 : (e + 1) * 7]] == [(0.3, 2e-3)] * 6 + [(0.15, 2e-3)]
    assert all(c[4] in ((False,), ()) and c[5] == {"backend": rec.backend} for c in calls)
    first = [c[0] for c in calls[:7]]
    assert first != [
        events_of(rec, *(t[s : s + 100] for t in rec.state.logged(650))) for s in range(0, 650, 100)
    ]  # fmt: skip  (shuffled, not time order)
    # the ranking head is not the refit's (never-rated items may take a new text prior)
    rated = rec.state.item_count.t > 0
    for k, v in rank_before.items():
        assert torch.equal(getattr(rec.state, k).t[rated], v[rated]), k
    assert int(rec.state.since_refit) == 0
    assert report.rmse_after == pytest.approx(online.rmse(rec.state, *rec.state.logged(650),
                                                          rec.rating_range))  # fmt: skip


@pytest.mark.parametrize("harm", ["nan", "explode"])
def test_a_divergent_pass_rolls_the_refit_back(stream, monkeypatch, harm):
    rec = streamed(stream, n=200, refit_every=0, refit_log_size=500, refit_epochs=2)
    before = tables(rec, RATING_TABLES)
    scales, mu = rec.state.scales.clone(), rec.state.mu.clone()
    real, calls = kernels.mf_sgd_step, []

    def second_pass_breaks(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # in the second pass
            if harm == "nan":
                args[1][3, 0] = float("nan")
            else:
                args[1].mul_(1e3)
        return out

    monkeypatch.setattr(kernels, "mf_sgd_step", second_pass_breaks)
    report = rec.refit()
    assert report.rolled_back and report.epochs == 2
    assert report.rmse_after == pytest.approx(report.rmse_before)
    rated = rec.state.item_count.t > 0  # never-rated items take the refitted text prior
    for k, v in before.items():
        now = getattr(rec.state, k).t
        if k in ("item_rows", "item_bias"):
            now, v = now[rated], v[rated]
        assert torch.equal(now, v), k
    assert torch.equal(rec.state.scales, scales) and torch.equal(rec.state.mu, mu)


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


def test_a_failed_feedback_logs_nothing(stream, monkeypatch):
    rec = streamed(stream, n=200)
    n, since = rec.state.log_users.n, int(rec.state.since_refit)
    monkeypatch.setattr(online, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    ev = stream.events.take(slice(1700, 1750))
    with pytest.raises(RuntimeError):
        rec.feedback(ev.user, ev.item, ev.rating)
    assert rec.state.log_users.n == n and int(rec.state.since_refit) == since


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


@pytest.mark.parametrize("key", ["refit_every", "refit_epochs", "refit_log_size"])
def test_config_is_checked(key):
    with pytest.raises(ValueError, match="refit"):
        Recommender(encoder="hashing-64", **{key: -1})
