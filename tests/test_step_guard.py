"""The guarded rating step (online.step): backtracking at half the rate when a step raises its
batch loss, rollback when every try fails, and scale folds only once nothing can be taken back.
The expected results are built here from the torch reference kernel on copies of the state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrec_fast import DivergenceError, Recommender, online, ranking
from lrec_fast.kernels import reference
from lrec_fast.online import LearnerConfig

from .conftest import assert_same_bits, make_state, state_bits

TABLES = ("user_rows", "item_rows", "user_bias", "item_bias")


def tables(st) -> list[torch.Tensor]:
    return [getattr(st, k).t.clone() for k in TABLES] + [st.scales.clone(), st.mu.clone()]


def reference_try(st, users, items, ratings, lr, cfg, gain) -> tuple[list[torch.Tensor], float,
                                                                     float]:  # fmt: skip
    """One plain step on copies of ``st``'s tables: (the tables after it, loss before, after)."""
    t = tables(st)
    loss = reference.mf_sgd_step(*t, users, items, ratings, lr, cfg.weight_decay, cfg.learn_mu,
                                 (gain, 1.0, 1.0, 1.0))  # fmt: skip
    after = float(((ratings - reference.predict(*t, users, items)) ** 2).double().mean())
    return t, loss, after


def overshooting(rng: np.random.Generator, dim: int) -> tuple:
    """A state with one item far larger than the rest, and a batch where one user rates it
    three times: at gain 15 the user row's step overshoots (checked by the tests)."""
    cfg = LearnerConfig(user_gain=15.0, lr=0.5, lr_batch=5)
    st = make_state(12, 6, dim, cfg, int(rng.integers(1 << 30)))
    st.item_rows.t.mul_(0.3 / math.sqrt(dim))  # |V|^2 about 0.09
    st.item_rows.t[0] = math.sqrt(2.0 / dim)  # |V|^2 = 2
    st.mu.fill_(3.0)
    n = int(rng.integers(5, 9))
    users = torch.from_numpy(rng.integers(1, 6, n))
    items = torch.from_numpy(rng.integers(1, 12, n))
    users[:3], items[:3] = 0, 0  # (duplicates of one pair)
    ratings = torch.from_numpy(rng.integers(1, 6, n).astype(np.float32))
    ratings[:3] = 5.0
    return cfg, st, users, items, ratings


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dim", [4, 16])
def test_a_step_that_raises_the_loss_is_retried_at_half_the_rate(rng, backend, dim):
    cfg, st, users, items, ratings = overshooting(rng, dim)
    lr = online.effective_lr(cfg.lr, users.numel(), cfg)
    tries = [reference_try(st, users, items, ratings, lr * 0.5**t, cfg, cfg.user_gain)
             for t in range(cfg.step_halvings + 1)]  # fmt: skip
    assert tries[0][2] > tries[0][1]  # the plain step overshoots: the case under test
    first = next(t for t, (_, loss, after) in enumerate(tries) if after <= loss)
    assert first >= 1
    loss = online.step(st, users, items, ratings, cfg.lr, cfg.weight_decay, cfg, backend,
                       user_gain=cfg.user_gain)  # fmt: skip
    assert loss == pytest.approx(tries[0][1], rel=1e-5)
    for got, want in zip(tables(st), tries[first][0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert online.mse(st, users, items, ratings) <= loss


def test_without_halvings_the_step_is_taken_as_the_guard_allows(rng):
    cfg, st, users, items, ratings = overshooting(rng, 8)
    cfg.step_halvings, cfg.explode_ratio = 0, 1e9
    lr = online.effective_lr(cfg.lr, users.numel(), cfg)
    want, loss, after = reference_try(st, users, items, ratings, lr, cfg, cfg.user_gain)
    assert after > loss
    online.step(st, users, items, ratings, cfg.lr, cfg.weight_decay, cfg, "numba",
                user_gain=cfg.user_gain)  # fmt: skip
    for got, w in zip(tables(st), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_every_try_failing_rolls_back_bit_for_bit(rng):
    cfg, st, users, items, ratings = overshooting(rng, 8)
    cfg.lr = 5e3  # even 1/16 of it explodes (lr x weight_decay < 1)
    before = tables(st)
    with pytest.raises(DivergenceError, match="after 4 halvings"):
        online.step(st, users, items, ratings, cfg.lr, cfg.weight_decay, cfg, "numba",
                    max_loss=online.range_loss((1.0, 5.0)), user_gain=cfg.user_gain)  # fmt: skip
    for a, b in zip(before, tables(st), strict=True):
        assert torch.equal(a, b)


def test_step_halvings_is_checked():
    with pytest.raises(ValueError, match="step_halvings"):
        LearnerConfig(step_halvings=-1)


def test_feedback_learns_past_a_dominant_item(fitted, tmp_path):
    """The failure this guards against, end to end: one item far larger than the rest (a
    catalogue's blockbuster) and a user who rates it in a burst, at the stream's user gain."""
    st = fitted.state
    j = st.items.index[3]
    st.item_rows.t[j] *= 4.0 / float(st.true_item_rows()[j].norm())  # |V| = 4
    fitted.config.replay_ratio = 0.0
    fitted.save(tmp_path / "ck")
    users, items, ratings = [0] * 4 + [1, 2], [3] * 4 + [5, 6], [5.0] * 4 + [2.0, 4.0]
    rows = (torch.tensor([st.users.index[u] for u in users]), torch.tensor([j] * 4 + [
        st.items.index[5], st.items.index[6]]), torch.tensor(ratings))  # fmt: skip
    losses, stats = [], []
    for halvings in (0, 4):
        rec = Recommender.load(tmp_path / "ck")
        assert set(rec.stats().values()) == {0}  # counters start with the process
        rec.config.step_halvings = halvings
        before = online.mse(rec.state, *rows)
        try:
            rec.feedback(users, items, ratings)
            losses.append(online.mse(rec.state, *rows) / before)
        except DivergenceError:
            losses.append(math.inf)
        stats.append(rec.stats())
    assert losses[0] > 1 and losses[1] < 1  # the plain step overshoots, the halved one learns
    plain, halved = stats
    if math.isinf(losses[0]):
        assert (plain["feedback_rejected"], plain["steps_rejected"], plain["steps"]) == (1, 1, 0)
    else:
        assert (plain["feedback_calls"], plain["steps"], plain["steps_backtracked"]) == (1, 1, 0)
    assert (halved["feedback_calls"], halved["events_learned"], halved["feedback_rejected"]) == (
        1, 6, 0)  # fmt: skip
    assert halved["steps"] == halved["steps_backtracked"] == 1 <= halved["step_halvings"] <= 4


def at_the_fold(rec: Recommender, threshold: float = 1e-3) -> None:
    """Every scale just above the fold threshold (true values kept): the next step folds."""
    st = rec.state
    s = threshold * (1 + 1e-7)
    for k, name in enumerate(TABLES):
        getattr(st, name).t.mul_(float(st.scales[k]) / s)
        st.scales[k] = s


def test_a_rejected_call_takes_back_a_fold_too(fitted, monkeypatch):
    """The rating step passes and would fold the scales; the ranking step then fails: the call
    must leave every table as it was (a fold inside the step would rescale whole tables that
    the rollback restores row by row)."""
    at_the_fold(fitted)
    before = state_bits(fitted)

    def boom(*args, **kwargs):
        raise DivergenceError("injected")

    monkeypatch.setattr(ranking, "step", boom)
    with pytest.raises(DivergenceError, match="injected"):
        fitted.feedback([0, 1], [1, 2], [4.0, 5.0])
    assert_same_bits(before, state_bits(fitted))


def test_a_call_that_passes_folds_at_its_end(fitted, stream):
    other = Recommender(dim=8, encoder="hashing-64", max_epochs=5, fold_threshold=0.0)
    other.add_items(stream.item_ids, stream.item_text)
    ev = stream.events.take(slice(0, 1500))
    other.fit(ev.user, ev.item, ev.rating)
    for rec in (fitted, other):
        at_the_fold(rec)
        rec.feedback([0, 1, 2], [1, 2, 3], [4.0, 5.0, 1.0])
    assert fitted.state.scales.tolist() == [1.0] * 4  # folded
    assert float(other.state.scales.max()) < 1e-3  # never folds
    for name in ("true_user_rows", "true_item_rows", "true_user_bias", "true_item_bias"):
        torch.testing.assert_close(getattr(fitted.state, name)(), getattr(other.state, name)())
