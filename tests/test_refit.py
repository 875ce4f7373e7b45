"""The refit (the slowest time scale): shuffled passes of the rating head over the event log at
the fit's rates, the log itself, the cadence, checkpoints, and all-or-nothing on errors."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from lrec_fast import Recommender, consolidation, kernels, online
from lrec_fast.consolidation import RANKING_TABLES, RATING_TABLES

from .conftest import assert_same_bits, state_bits
from .test_consolidation import streamed, tables


def events_of(rec: Recommender, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> Counter:
    st = rec.state
    users, items = [st.users.ids[x] for x in u.tolist()], [st.items.ids[x] for x in i.tolist()]
    return Counter(zip(users, items, r.tolist(), strict=True))


class StepSpy:
    """Records a refit's kernel steps: (events with the model's ids, batch size, lr, weight
    decay, the other arguments, keywords). A slice steps a copy of its rows (sorted unique
    rows), so the copy's rows map back through its slice's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rec: Recommender) -> None:
        self.rec, self.raw, self.slices = rec, [], []
        real, real_slice = kernels.mf_sgd_step, consolidation._guarded_slice

        def step(*args, **kw):
            u, i, r, lr, wd = args[6:11]
            self.raw.append((u.clone(), i.clone(), r.clone(), u.numel(), lr, wd, args[11:], kw))
            return real(*args, **kw)

        def slice_(state, users, items, ratings, *rest):
            self.slices.append((len(self.raw), users.unique(), items.unique()))
            return real_slice(state, users, items, ratings, *rest)

        monkeypatch.setattr(kernels, "mf_sgd_step", step)
        monkeypatch.setattr(consolidation, "_guarded_slice", slice_)

    def calls(self) -> list[tuple]:
        out = []
        for c, (u, i, r, *rest) in enumerate(self.raw):
            _, tu, ti = [s for s in self.slices if s[0] <= c][-1]
            out.append((events_of(self.rec, tu[u], ti[i], r), *rest))
        return out


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
    spy = StepSpy(monkeypatch, rec)
    report = rec.refit()
    calls = spy.calls()
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
    assert report.rmse_after < report.rmse_before
    if epochs == 1:  # one slice: its RMSE after it is the log's now (raw predictions)
        assert report.rmse_after == pytest.approx(online.rmse(rec.state, *rec.state.logged(650)))


def test_a_refit_in_slices_is_bit_for_bit_a_whole_one(stream):
    """Stepped 200 events at a time (as feedback spreads it; slices cross the pass boundary),
    a refit makes the same mini-batches, and so the same model, as one run whole."""
    kw = dict(n=300, refit_every=0, refit_log_size=650, refit_epochs=2)
    whole, sliced = streamed(stream, **kw), streamed(stream, **kw)
    report = whole.refit()
    consolidation.refit_start(sliced.state, sliced.config)
    calls = 0
    while (got := sliced._advance_refit(sliced.state, 200)) is None:  # as feedback steps it
        calls += 1
    assert calls == 6 and (got.events, got.epochs) == (report.events, report.epochs) == (650, 2)
    a, b = state_bits(whole), state_bits(sliced)
    del a["t"]["refit_stats"], b["t"]["refit_stats"]  # sums in another order
    assert_same_bits(a, b)


def test_events_trimmed_off_the_log_while_it_runs_are_skipped(stream, monkeypatch):
    rec = streamed(stream, n=200, refit_every=0, refit_log_size=400)
    st = rec.state
    consolidation.refit_start(st, rec.config)
    start, n = int(st.refit_job[1]), int(st.refit_job[2])
    covered = events_of(rec, *st.logged(400))
    for s in range(1700, 2000, 100):  # no refit steps: refit_every 0
        ev = stream.events.take(slice(s, s + 100))
        rec.feedback(ev.user, ev.item, ev.rating)
    kept = max(0, start + n - int(st.log_dropped))
    assert 0 < kept < n  # the log was cut into the refit's events
    spy = StepSpy(monkeypatch, rec)
    report = consolidation.refit_advance(st, math.inf, rec.config, rec.backend)
    assert report is not None and report.events == n and not report.rolled_back
    stepped = sum((c[0] for c in spy.calls()), Counter())
    assert sum(stepped.values()) == kept and not stepped - covered


@pytest.mark.parametrize("harm", ["nan", "explode"])
def test_a_divergent_slice_is_rolled_back_and_ends_the_refit(stream, monkeypatch, harm):
    """Two passes over 500 logged events, each its own slice; the second diverges: it is
    rolled back bit for bit and the refit ends, so the model is the one a single pass makes."""
    kw = dict(n=200, refit_every=0, refit_log_size=500)
    rec, once = streamed(stream, **kw, refit_epochs=2), streamed(stream, **kw, refit_epochs=1)
    first = once.refit()
    real, calls = kernels.mf_sgd_step, []

    def second_pass_breaks(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # in the second pass (5 mini-batches each)
            item_rows, items = args[1], args[7]
            if harm == "nan":
                item_rows[items[0], 0] = float("nan")
            else:
                item_rows[items] *= 1e3
        return out

    monkeypatch.setattr(kernels, "mf_sgd_step", second_pass_breaks)
    report = rec.refit()
    assert report.rolled_back and report.epochs == 2 and len(calls) == 10
    assert (report.rmse_before, report.rmse_after) == (first.rmse_before, first.rmse_after)
    for k, v in tables(once, RATING_TABLES).items():
        assert torch.equal(getattr(rec.state, k).t, v), k
    assert torch.equal(rec.state.scales, once.state.scales)
    assert torch.equal(rec.state.mu, once.state.mu)
    assert not consolidation.refit_running(rec.state)


def test_feedback_spreads_each_refit_over_its_calls_until_the_next(stream):
    """Every refit_every (300) streamed events a refit starts over the log as it stands; each
    feedback call (100 events) steps its share (a third), so it has ended as the next starts."""
    rec = streamed(stream, n=0, refit_every=300)
    jobs = []
    for s in range(1500, 2200, 100):
        ev = stream.events.take(slice(s, s + 100))
        rec.feedback(ev.user, ev.item, ev.rating)
        jobs.append(rec.state.refit_job[1:].tolist())  # start, events, stepped, total
    assert jobs[:2] == [[0, 0, 0, 0]] * 2  # none until 300 streamed events
    assert jobs[2:6] == [[0, 1800, 0, 1800], [0, 1800, 600, 1800], [0, 1800, 1200, 1800],
                         [0, 2100, 0, 2100]]  # fmt: skip
    assert jobs[6] == [0, 2100, 700, 2100]
    assert rec.last_refit is not None and (rec.last_refit.events, rec.last_refit.epochs) == (
        1800,
        1,
    )
    assert rec.last_refit.rmse_after < rec.last_refit.rmse_before
    quiet = streamed(stream, n=700, refit_every=0)
    assert quiet.last_refit is None and not consolidation.refit_running(quiet.state)


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
               if not k.startswith(("log_", "refit_")) and k != "since_refit"},
              str(path))  # fmt: skip
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


@pytest.mark.parametrize("flaw", ["log", "job", "stats"])
def test_a_malformed_log_or_refit_record_is_refused(stream, tmp_path, flaw):
    from safetensors.torch import load_file, save_file

    rec = streamed(stream, n=400, refit_every=300)
    rec.save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(path))
    if flaw == "log":
        t["log_items"][3] = rec.n_items  # one past the catalogue
    elif flaw == "job":
        t["refit_job"][3] = t["refit_job"][4] + 1  # stepped more than it has
    else:
        t["refit_stats"][0] = float("nan")
    save_file(t, str(path))
    with pytest.raises(ValueError, match="event log" if flaw == "log" else "refit"):
        Recommender.load(tmp_path / "ck")


@pytest.mark.parametrize("key", ["refit_every", "refit_epochs", "refit_log_size"])
def test_config_is_checked(key):
    with pytest.raises(ValueError, match="refit"):
        Recommender(encoder="hashing-64", **{key: -1})


def test_each_refit_end_is_processed_once(stream, monkeypatch):
    """The call whose share ends a refit also starts the next one: the end's work runs once,
    not again for the refit that already ended; its neighbourhood recompute runs in the next
    call (a refit ends in the call that runs that period's consolidation), pending in the
    checkpoint meanwhile."""
    from lrec_fast import neighbours

    rec = streamed(stream, n=0, refit_every=300, consolidate_every=0)
    calls, ends, pending = [], [], []
    real = neighbours.compute
    monkeypatch.setattr(neighbours, "compute",
                        lambda *a: calls.append(len(ends)) or real(*a))  # fmt: skip
    for c, s in enumerate(range(1500, 2500, 100), start=1):
        ev = stream.events.take(slice(s, s + 100))
        before = rec.last_refit
        ends.append(c)
        rec.feedback(ev.user, ev.item, ev.rating)
        if rec.last_refit is not before:
            pending.append(c)
            assert int(rec.state.knn_pending) == 1
        else:
            assert int(rec.state.knn_pending) == 0
    # ends in the 3rd call (the empty job before any refit), the 6th and the 9th; each
    # recompute in the call after
    assert rec.stats()["refits"] == 3 and pending == [3, 6, 9] and calls == [4, 7, 10]


def test_a_pending_recompute_survives_a_checkpoint(stream, tmp_path):
    """Saved between the call that ended a refit and the next: the loaded model recomputes
    in its next call as the running one does (bit for bit); old checkpoints load with none
    pending, a malformed flag is refused."""
    from .conftest import reloaded, rewritten_checkpoint

    rec = streamed(stream, n=0, refit_every=300, consolidate_every=0)
    for s in range(1500, 1800, 100):  # the 3rd call ends the first (empty) refit
        ev = stream.events.take(slice(s, s + 100))
        rec.feedback(ev.user, ev.item, ev.rating)
    assert int(rec.state.knn_pending) == 1
    again = reloaded(rec, tmp_path / "ck", [0, 1], list(stream.item_ids[:2]))
    ev = stream.events.take(slice(1800, 1900))
    for r in (rec, again):
        r.feedback(ev.user, ev.item, ev.rating)
        assert int(r.state.knn_pending) == 0
    assert_same_bits(state_bits(rec), state_bits(again))
    old = Recommender.load(rewritten_checkpoint(rec, tmp_path / "old",
                                                drop=lambda k: k == "knn_pending"))  # fmt: skip
    assert int(old.state.knn_pending) == 0

    def damage(t: dict[str, torch.Tensor]) -> None:
        t["knn_pending"] = torch.tensor([2])

    with pytest.raises(ValueError, match="item neighbours"):
        Recommender.load(rewritten_checkpoint(rec, tmp_path / "bad", edit=damage))


@pytest.mark.parametrize("case", ["plain", "fold", "diverges"])
def test_a_slice_on_a_copy_of_its_rows_is_bit_for_bit_one_on_the_tables(stream, case):
    """``_guarded_slice`` (the rows copied, stepped while answers read, written back) leaves
    the model as stepping the tables themselves and then guarding does (the reference below):
    the scales' fold included, and nothing changed by a divergent slice."""
    kw = dict(n=200, refit_every=0, fold_threshold=0.999 if case == "fold" else 1e-4)
    if case == "diverges":
        kw |= dict(fit_lr=1000.0, fit_weight_decay=1e-5)
    a, b = streamed(stream, **kw), streamed(stream, **kw)
    u, i, r = a.state.logged(300)
    clip, st, cfg = (1.0, 5.0), a.state, a.config
    untouched = state_bits(a)
    before = online.mse(st, u, i, r)  # the reference: on the tables, then the guard
    online.unguarded_pass(st, u, i, r, *online.fit_rates(cfg), cfg, a.backend)
    after = online.mse(st, u, i, r)
    sound = all(bool(torch.isfinite(getattr(st, k).t).all()) for k in RATING_TABLES)
    if sound and after <= max(cfg.explode_ratio * before, online.range_loss(clip)):
        st.fold_scales(cfg.fold_threshold)
        want, bits = (before, after), state_bits(a)
    else:
        want, bits = None, untouched
    got = consolidation._guarded_slice(b.state, u, i, r, b.config, b.backend, clip)
    assert got == want and (want is None) == (case == "diverges")
    if case == "fold":
        assert bool((b.state.scales == 1.0).any())
    assert_same_bits(state_bits(b), bits)
