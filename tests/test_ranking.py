"""The ranking head (lrec_fast.ranking) against a dense torch reference written here: fold-in
queries, the exact and the sampled softmax step with row-wise Adagrad, histories, guard rails
and the all-or-nothing feedback around it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrec_fast import online, ranking
from lrec_fast.model import ModelState
from lrec_fast.online import DivergenceError, LearnerConfig

from .conftest import assert_same_bits, make_state, state_bits


def dense_step(st: ModelState, hist: torch.Tensor, targets: torch.Tensor, lr: float,
               cfg: LearnerConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """The rule on whole tables with autograd: full softmax cross-entropy of the weighted-mean
    history query, then row-wise Adagrad on every row with a non-zero gradient."""
    ctx = st.ctx_rows.t.clone().requires_grad_()
    tgt = st.tgt_rows.t.clone().requires_grad_()
    bias = st.tgt_bias.t.clone().requires_grad_()
    w = cfg.history_decay ** torch.arange(hist.shape[1]).float()
    out = []
    for h in hist:
        m = h >= 0
        out.append((ctx[h[m]] * w[m, None]).sum(0) / w[m].sum() if m.any() else ctx[0] * 0)
    logits = torch.stack(out) @ tgt.T + bias
    torch.nn.functional.cross_entropy(logits, targets).backward()
    new = {}
    for name, p, acc in (("ctx_rows", ctx, st.ctx_acc.t), ("tgt_rows", tgt, st.tgt_acc.t),
                         ("tgt_bias", bias, st.tgt_bias_acc.t)):  # fmt: skip
        g = p.grad
        a = acc + (g.pow(2).mean(1) if g.dim() == 2 else g.pow(2))  # rows without grad: + 0
        step = lr / (a.sqrt() + 1e-8)
        new[name] = p.detach() - (step[:, None] * g if g.dim() == 2 else step * g)
    return new


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_items,dim,batch", [(7, 3, 1), (50, 16, 33), (130, 8, 64)])
@pytest.mark.parametrize("backend", ["torch", None])
def test_exact_step_matches_dense_reference(seed, n_items, dim, batch, backend):
    cfg = LearnerConfig(history_len=5, history_decay=0.7, negatives=1_000)
    st = make_state(n_items, 10, dim, cfg, seed)
    g = torch.Generator().manual_seed(100 + seed)
    hist = torch.randint(0, n_items, (batch, 5), generator=g)
    hist[torch.rand(batch, 5, generator=g) < 0.3] = ranking.PAD  # ragged histories
    hist[0] = ranking.PAD  # an event with no history at all
    hist[-1, :3] = hist[-1, 3]  # duplicates inside one history
    targets = torch.randint(0, n_items, (batch,), generator=g)
    targets[: batch // 2] = targets[0]  # duplicate targets
    want = dense_step(st, hist, targets, 0.05, cfg)
    loss = ranking.step(st, hist, targets, 0.05, cfg, torch.Generator(), backend=backend)
    assert math.isfinite(loss)
    for name, val in want.items():
        torch.testing.assert_close(getattr(st, name).t, val, rtol=1e-5, atol=1e-6)


def test_fold_in_queries():
    cfg = LearnerConfig(history_len=4, history_decay=0.5)
    ctx = torch.randn(6, 3)
    hist = torch.tensor([[2, 5, -1, -1], [-1, -1, -1, -1], [1, 1, 1, 1]])
    q = ranking.fold_in(ctx, hist, ranking.history_weights(cfg.history_decay, cfg.history_len))
    torch.testing.assert_close(q[0], (ctx[2] + 0.5 * ctx[5]) / 1.5)
    torch.testing.assert_close(q[1], torch.zeros(3))
    torch.testing.assert_close(q[2], ctx[1])


def test_histories_in_time_order():
    cfg = LearnerConfig(history_len=3)
    st = make_state(9, 3, 2, cfg, 0)
    users, items = torch.tensor([0, 1, 0, 0, 0]), torch.tensor([4, 5, 6, 7, 8])
    hist = ranking.histories(st, users, items)
    assert hist.tolist() == [[-1, -1, -1], [-1, -1, -1], [4, -1, -1], [6, 4, -1], [7, 6, 4]]
    assert st.user_recent.t.tolist() == [[8, 7, 6], [5, -1, -1], [-1, -1, -1]]


def test_sampled_softmax_touches_only_candidates_and_corrects_log_q():
    cfg = LearnerConfig(history_len=2, negatives=16)
    st = make_state(500, 5, 4, cfg, 1)
    st.item_count.t.copy_(torch.arange(500))
    before = st.tgt_rows.t.clone()
    hist = torch.tensor([[1, 2], [3, -1]])
    targets = torch.tensor([7, 450])
    ranking.step(st, hist, targets, 0.1, cfg, torch.Generator().manual_seed(0))
    changed = (st.tgt_rows.t != before).any(1).nonzero().flatten()
    assert {7, 450} <= set(changed.tolist()) and changed.numel() <= 18
    cand, logq = ranking._candidates(st, targets, cfg, torch.Generator().manual_seed(0))
    q = (torch.arange(500).double() + 1) ** 0.75
    assert logq is not None
    torch.testing.assert_close(logq, torch.log(16 * q[cand] / q.sum()).float())
    assert {7, 450} <= set(cand.tolist()) and bool((cand[1:] > cand[:-1]).all())


def test_divergent_step_is_rolled_back():
    cfg = LearnerConfig(history_len=3)
    st = make_state(20, 4, 4, cfg, 2)
    st.tgt_rows.t[3, 0] = float("inf")
    holder = SimpleNamespace(state=st)
    before = state_bits(holder)
    with pytest.raises(DivergenceError):
        ranking.step(st, torch.tensor([[1, 2, -1]]), torch.tensor([3]), 0.1, cfg,
                     torch.Generator())  # fmt: skip
    assert_same_bits(before, state_bits(holder))


def test_feedback_is_all_or_nothing_when_the_ranking_step_diverges(fitted, monkeypatch):
    before = state_bits(fitted)

    def boom(*args, **kwargs):  # the rating step has already been applied
        raise DivergenceError("injected")

    monkeypatch.setattr(ranking, "step", boom)
    with pytest.raises(DivergenceError):
        fitted.feedback([0, 1, "new-user"], [1, 2, 3], [4.0, 5.0, 1.0])
    assert_same_bits(before, state_bits(fitted))
    assert "new-user" not in fitted.state.users


def test_feedback_personalises_at_once_and_learns(fitted):
    st = fitted.state
    row = st.items.index[5]
    before = st.tgt_rows.t[row].clone(), float(st.tgt_bias.t[row])
    cold = fitted.rank_all(["fresh-user"])[0]
    fitted.feedback(["fresh-user"], [5], [5.0])
    assert not np.allclose(fitted.rank_all(["fresh-user"])[0], cold)
    # no history before that event (a zero query): only the target's bias learns from it
    assert torch.equal(st.tgt_rows.t[row], before[0]) and float(st.tgt_bias.t[row]) > before[1]
    fitted.feedback(["fresh-user"], [5], [5.0])  # now with a history
    assert not torch.equal(st.tgt_rows.t[row], before[0])
    assert st.replay_hist.n > 0


def test_config_validation():
    for bad in (dict(rank_by="pop"), dict(history_len=0), dict(history_decay=0.0),
                dict(negatives=0)):  # fmt: skip
        with pytest.raises(ValueError):
            LearnerConfig(**bad)
    assert online.LearnerConfig().rank_by == "softmax"


def test_proposal_draws_follow_q_and_follow_the_catalogue():
    cfg = LearnerConfig(history_len=2, negatives=8)
    st = make_state(40, 3, 4, cfg, 2)
    st.item_count.t.copy_(torch.arange(40) ** 2)
    p = ranking._proposal(st)
    q = (torch.arange(40).double() ** 2 + 1) ** 0.75
    q /= q.sum()
    torch.testing.assert_close(p.logq, torch.log(q).float())
    freq = torch.bincount(p.draw(200_000, torch.Generator().manual_seed(3)), minlength=40)
    torch.testing.assert_close(freq.double() / 200_000, q, atol=3e-3, rtol=0)
    # stale for a while (counts moved: the cached q is still what is drawn from) ...
    st.item_count.t.zero_()
    assert ranking._proposal(st) is p
    # ... rebuilt when the catalogue grows, so new items can be drawn
    st.add_items(
        [40, 41],
        {k: torch.zeros(2, 4) for k in ("item_rows", "tgt_rows", "ctx_rows")}
        | {"item_bias": torch.zeros(2), "tgt_bias": torch.zeros(2)},
        torch.zeros(2, 4),
    )
    p2 = ranking._proposal(st)
    assert p2 is not p and p2.cdf.numel() == 42
    torch.testing.assert_close(p2.logq, torch.full((42,), -math.log(42)).float())


def test_low_ratings_train_the_rating_model_only(fitted):
    st = fitted.state
    user = fitted.state.users.ids[0]
    item = fitted.item_ids[3]
    rank = {k: getattr(st, k).t.clone() for k in ("ctx_rows", "tgt_rows", "tgt_bias")}
    recent = st.user_recent.t.clone()
    rating_rows = st.item_rows.t.clone()
    fitted.feedback([user], [item], [fitted.config.rank_min_rating - 1.0])
    for k, v in rank.items():
        assert torch.equal(getattr(st, k).t, v), k  # no positive: no ranking step
    assert torch.equal(st.user_recent.t, recent)  # and not in the history
    assert not torch.equal(st.item_rows.t, rating_rows)  # the rating model learned
    fitted.feedback([user], [item], [fitted.config.rank_min_rating])
    assert st.user_recent.t[st.users.index[user], 0] == st.items.index[item]
    assert not torch.equal(st.tgt_rows.t, rank["tgt_rows"])


def test_rank_min_rating_outside_the_range_is_refused():
    from lrec_fast import Recommender

    with pytest.raises(ValueError, match="rank_min_rating"):
        Recommender(rank_min_rating=6.0, encoder="hashing-64")
    Recommender(rank_min_rating=None, encoder="hashing-64")  # implicit feedback: every event
