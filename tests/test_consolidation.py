"""Consolidation (the slow time scale): validation on the newest share of the window, per-head
early stopping and rollback, the window itself, the cadence, and all-or-nothing on errors."""

from __future__ import annotations

import pytest
import torch

from lrec_fast import Recommender, consolidation, kernels, online, ranking
from lrec_fast.consolidation import RANKING_TABLES, RATING_TABLES

from .conftest import assert_same_bits, state_bits


def streamed(stream, n: int = 600, **config) -> Recommender:
    rec = Recommender(dim=8, encoder="hashing-64", max_epochs=5, **config)
    rec.add_items(stream.item_ids, stream.item_text)
    ev = stream.events.take(slice(0, 1500))
    rec.fit(ev.user, ev.item, ev.rating)
    for s in range(1500, 1500 + n, 100):
        ev = stream.events.take(slice(s, s + 100))
        rec.feedback(ev.user, ev.item, ev.rating)
    return rec


def tables(rec: Recommender, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: getattr(rec.state, k).t.clone() for k in names}


def test_keeps_the_best_validated_epoch(stream):
    rec = streamed(stream, consolidate_window=500, consolidate_epochs=4)
    report = rec.consolidate()
    assert report.events == 500 and 1 <= report.epochs <= 4
    assert len(report.rating_val) == len(report.rank_val) == report.epochs + 1
    # the kept epoch is the best one, and better than the start, or the start itself
    for vals, kept in ((report.rating_val, report.rating_kept), (report.rank_val,
                                                                  report.rank_kept)):  # fmt: skip
        assert kept == 0 or vals[kept] < vals[0]
        assert vals[kept] <= min(vals) + 1e-4
    # what the model holds now scores what the report says of the kept epoch
    ev = stream.events.take(slice(1500 + 600 - 50, 1500 + 600))  # the validation share
    st = rec.state
    u = torch.tensor([st.users.index[x] for x in ev.user.tolist()])
    i = torch.tensor([st.items.index[x] for x in ev.item.tolist()])
    got = online.rmse(st, u, i, torch.as_tensor(ev.rating, dtype=torch.float32), rec.rating_range)
    assert got == pytest.approx(report.rating_val[report.rating_kept], rel=1e-5)


def test_a_harmful_pass_is_rolled_back(stream, monkeypatch):
    rec = streamed(stream, consolidate_window=400, consolidate_epochs=2)
    before_rating, before_rank = tables(rec, RATING_TABLES), tables(rec, RANKING_TABLES)
    scales, mu = rec.state.scales.clone(), rec.state.mu.clone()
    real_step, real_rank = online.step, ranking.step

    def noisy(state, *args, **kwargs):  # a pass that wrecks every row it is given
        out = real_step(state, *args, **kwargs)
        state.item_rows.t.add_(torch.randn_like(state.item_rows.t) * 5)
        return out

    def noisy_rank(state, *args, **kwargs):
        out = real_rank(state, *args, **kwargs)
        state.tgt_rows.t.add_(torch.randn_like(state.tgt_rows.t) * 5)
        return out

    monkeypatch.setattr(online, "step", noisy)
    monkeypatch.setattr(ranking, "step", noisy_rank)
    report = rec.consolidate()
    assert report.rating_kept == 0 and report.rank_kept == 0
    assert report.rating_val[1] > report.rating_val[0] and report.rank_val[1] > report.rank_val[0]
    rated = rec.state.item_count.t > 0  # never-rated items take the refitted text prior
    for k, v in (before_rating | before_rank).items():
        now = getattr(rec.state, k).t
        if k not in ("user_rows", "user_bias"):
            now, v = now[rated], v[rated]
        assert torch.equal(now, v), k
    assert torch.equal(rec.state.scales, scales) and torch.equal(rec.state.mu, mu)


def test_window_holds_the_newest_events_only(stream):
    rec = streamed(stream, n=300, consolidate_window=250, consolidate_epochs=1)
    # never more than twice the window (amortised trimming), at least the window itself
    assert 250 <= rec.state.window_users.n <= 500
    users, items, ratings, hist = rec.state.window(250)
    ev = stream.events.take(slice(1800 - 250, 1800))
    assert [rec.state.users.ids[x] for x in users.tolist()] == ev.user.tolist()
    assert [rec.state.items.ids[x] for x in items.tolist()] == ev.item.tolist()
    assert ratings.tolist() == ev.rating.tolist() and hist.shape == (250, rec.config.history_len)
    assert rec.consolidate().events == 250


SLOW_SCALES = {  # each every 300 events: on both sides of the cuts below
    "consolidation": dict(consolidate_every=300, consolidate_window=250, consolidate_epochs=2),
    "refit": dict(refit_every=300, refit_log_size=800, consolidate_every=0),
}


@pytest.mark.parametrize("slow", list(SLOW_SCALES))
@pytest.mark.parametrize("cut", [200, 700])
def test_a_reloaded_model_continues_exactly(stream, tmp_path, cut, slow):
    """Saved mid-stream and loaded, a model keeps its consolidation window, event log, their
    cadences and its random state: it then learns bit for bit what the uninterrupted one
    learns (negatives are sampled, 16 of 80 items)."""
    kw = SLOW_SCALES[slow] | {"negatives": 16}
    whole = streamed(stream, n=900, **kw)
    first = streamed(stream, n=cut, **kw)
    first.save(tmp_path / "ck")
    again = Recommender.load(tmp_path / "ck")
    assert_same_bits(state_bits(first), state_bits(again))
    for s in range(1500 + cut, 2400, 100):
        ev = stream.events.take(slice(s, s + 100))
        again.feedback(ev.user, ev.item, ev.rating)
    assert_same_bits(state_bits(whole), state_bits(again))


@pytest.mark.parametrize("slow", ["consolidate", "refit"])
def test_nothing_to_learn_from_changes_nothing(slow):
    rec = Recommender(dim=4, encoder="hashing-64")
    bits = state_bits(rec)
    report = getattr(rec, slow)()
    assert report.events == 0 and report.epochs == 0
    assert_same_bits(state_bits(rec), bits)


def test_cadence_runs_it_from_feedback(stream, monkeypatch):
    calls = []
    real = consolidation.consolidate

    def spy(*args, **kwargs):
        calls.append(args[1].numel())
        return real(*args, **kwargs)

    monkeypatch.setattr(consolidation, "consolidate", spy)
    streamed(stream, n=500, consolidate_every=200, consolidate_window=300, consolidate_epochs=1)
    # the fit (1,500 events) is not a feedback; then after 200 and 400 streamed events
    assert calls == [300, 300]


def fail_on_third_call(monkeypatch, owner: object, name: str) -> None:
    """Make ``owner.name`` raise RuntimeError("boom") on its third call (an unexpected error
    halfway through)."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("slow", ["consolidate", "refit"])
def test_an_unexpected_error_leaves_the_model_as_it_was(stream, monkeypatch, slow):
    rec = streamed(stream, n=300, consolidate_window=300, refit_every=0)
    bits = state_bits(rec)
    if slow == "consolidate":
        fail_on_third_call(monkeypatch, ranking, "step")
    else:
        fail_on_third_call(monkeypatch, kernels, "mf_sgd_step")
    with pytest.raises(RuntimeError, match="boom"):
        getattr(rec, slow)()
    assert_same_bits(state_bits(rec), bits)


def test_config_is_checked():
    with pytest.raises(ValueError, match="consolidate"):
        Recommender(consolidate_every=-1, encoder="hashing-64")


def test_a_checkpoint_without_window_or_random_state_still_loads(stream, tmp_path):
    """Checkpoints written before the window, cadence, random state and proposal were saved:
    they load with an empty window, a zero count and the configured seed."""
    from safetensors.torch import load_file, save_file

    rec = streamed(stream, n=300, consolidate_window=250, negatives=16, seed=5)
    rec.save(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    old = {k: v for k, v in load_file(str(path)).items()
           if not k.startswith(("window_", "proposal_")) and k not in ("since_consolidation",
                                                                         "rng_state")}  # fmt: skip
    save_file(old, str(path))
    again = Recommender.load(tmp_path / "ck")
    assert again.state.window_users.n == 0 and int(again.state.since_consolidation) == 0
    assert again.state.rank_proposal is None
    assert torch.equal(again.state.rng.get_state(), torch.Generator().manual_seed(5).get_state())
    ev = stream.events.take(slice(1800, 1900))
    again.feedback(ev.user, ev.item, ev.rating)  # and it keeps learning
    assert again.state.window_users.n == 100


def test_a_failed_feedback_puts_the_random_state_back(stream, monkeypatch):
    """The ranking step drew its negatives (16 of 80 items), then the call failed: the model,
    random state included, is bit for bit as before, so it continues as if never called."""
    rec = streamed(stream, n=200, negatives=16)
    bits = state_bits(rec)
    real = ranking.step

    def drawn_then_failed(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(ranking, "step", drawn_then_failed)
    ev = stream.events.take(slice(1700, 1750))
    with pytest.raises(RuntimeError, match="boom"):
        rec.feedback(ev.user, ev.item, ev.rating)
    assert_same_bits(state_bits(rec), bits)
