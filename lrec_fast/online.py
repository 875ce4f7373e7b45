"""The learner: warm-up training with early stopping, guarded online micro-batch steps, and the
closed-form refit of the text projection used for new items.

All steps go through the dispatching fused update (``kernels.mf_sgd_step``), so the update rule
is exactly the one documented there and in the README.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import kernels
from .kernels.reference import predict as reference_predict
from .model import ModelState

log = logging.getLogger(__name__)


MAX_RERANK_DEPTH = 1_024  # score_topk's largest k


@dataclass
class LearnerConfig:
    """Hyper-parameters of the learner (units: lr per step of the mean batch loss)."""

    # Stream (feedback) step. Picked on the MovieLens warm-up (fit on its first 80%, then
    # prequential over the last 20%): lr 0.5 gave RMSE 1.003 there against 1.015 for 1.0 and
    # 1.005 for 0.25; weight decay 0 to 1e-3 moved it by < 0.001, so the smaller decay, which
    # shrinks untouched rows less over a long stream (less forgetting).
    lr: float = 0.5
    weight_decay: float = 1e-4
    # Stream steps (feedback, consolidation) move the user rows user_gain times faster than
    # the rest: one pass over each event, where the warm-up fit takes many. On the warm-up tail
    # (stream RMSE, gain 1 / 5 / 10 / 15 / 20 / 40): 0.9835 / 0.9797 / 0.9769 / 0.9762 / 0.9761
    # / 0.9831; gains on the item rows (0.3-3) or either bias (0.3-3) no better, the bias gains
    # worse (user bias x3: 1.0043); gain 20 in the warm-up fit too: 0.9889.
    user_gain: float = 15.0
    # Warm-up fit (None: the stream's lr / weight_decay) and the scale of the random rows it
    # starts from. On the warm-up tail: lr 1.0 / decay 1e-3 / std 0.1 gave stream RMSE 1.0008;
    # lr 0.5 with decay 2e-3 / 1e-3 / 5e-4 / 3e-4 / 1e-4 / 0 gave 1.0071 / 0.9957 / 0.9868 /
    # 0.9846 / 0.9868 / 0.9901 (lr 0.3 or 1.0 no better); then std 0.05 / 0.02 / 0.01 gave
    # 0.9835 / 0.9823 / 0.9875 (HR@10 0.1007 / 0.0999 / 0.1001), so 0.05.
    fit_lr: float | None = 0.5
    fit_weight_decay: float | None = 3e-4
    batch_size: int = 100  # warm-up mini-batch size
    # Linear scaling: a batch of N events steps with lr_t = lr * min(1, N / lr_batch), so one
    # event never moves the model more than it would inside a batch of lr_batch events.
    lr_batch: int = 100
    max_epochs: int = 40
    patience: int = 3
    validation_fraction: float = 0.1  # the LAST share of the warm-up events (time order)
    init_std: float = 0.05
    fold_threshold: float = 1e-3
    # The text projection's ridge, picked on held-out items of the warm-up: fit on a random
    # 80% of the items it trains on, R^2 of the other 20%'s values from their text (4 splits):
    # 1.0 -> 3.0 lifted it on every slice but b_v (flat), e.g. T rows 0.16-0.27 -> 0.20-0.28,
    # t_b 0.00-0.08 -> 0.04-0.10; 5.0 about the same; 10 and 30 lower.
    proj_ridge: float = 3.0
    proj_min_count: int = 5  # items with at least this many ratings train the projection
    # Guard rail: a step is divergent when values turn non-finite, or when the batch loss
    # AFTER the step exceeds both explode_ratio x the loss before it and the squared width of
    # the rating range (passed to step() as max_loss).
    explode_ratio: float = 10.0
    # Backtracking: a step whose batch loss after it is higher than before is taken back and
    # retried at half the rate, up to step_halvings times (the last try need only pass the
    # guard above). Never triggered on MovieLens (either warm-up cut: no retry, RMSE
    # unchanged). On a synthetic stream with a dominant item (15% of the events, |V|^2 = 40;
    # 20,000 users with heavy ones, 5,000 items, 400,000 events of warm-up) the user gain made
    # the first feedback step overshoot (stream RMSE 0.82 -> 1.21 at once) and 995 of the next
    # 1,000 calls diverge (stream RMSE 3.69); with 4 halvings none did, and the stream RMSE was
    # 0.812 against the static model's 0.835 (6 halvings: the same).
    step_halvings: int = 4
    # mu's gradient sums over the whole batch (step 2 * lr * mean error), so SGD on it
    # oscillates at the lr the tables want; by default mu stays the warm-up mean.
    learn_mu: bool = False
    # Ranking (recommend) adds prior_weight * log(1 + recent count) to each item's score: the
    # count of its events decayed with a half-life of prior_halflife events. Picked on the
    # MovieLens warm-up (prequential on its last 20%): with the ranking head, weights 0.5 / 1 /
    # 2 / 3 gave HR@10 0.0846 / 0.0869 / 0.0881 / 0.0909 there (rating ranking: 0.050 -> 0.079).
    prior_weight: float = 3.0
    prior_halflife: float = 3_000.0
    # Users with no ranking history (unknown, or no event rated >= rank_min_rating yet) have
    # no fold-in query: they rank by the learned item bias plus cold_prior_weight * the same
    # prior (None: prior_weight). Picked on the warm-up tail: with 3.0 for everyone HR@10
    # 0.0956 (cold users 0.1144); cold weights 0.5 / 1 / 1.5 gave 0.0995 / 0.1005 / 0.0991
    # (cold users 0.1322 / 0.1346 / 0.1281), ranked among the items seen before the
    # micro-batch; ramping it up over the first 3 or 10 history items did no better. Ranked
    # among the items seen before each event (evaluate's definition since session 10), 0 /
    # 0.25 / 0.5 / 0.75 / 1 / 2 gave 0.1183 / 0.1209 / 0.1219 / 0.1191 / 0.1183 / 0.1156, and
    # 0.5 beat 1.0 on the warm-up's last 30% and 40% too (0.1167 vs 0.1146, 0.1136 vs 0.1124).
    cold_prior_weight: float | None = 0.5
    # Replay against forgetting: each step mixes round(replay_ratio * N) events drawn uniformly
    # from a reservoir of replay_size past events (warm-up and stream) into its N new ones.
    # Picked on the warm-up alone (its first 80% less 10% held out, then its last 20% streamed):
    # ratio 0 / 0.25 / 0.5 / 1 gave stream RMSE 0.9970 / 0.9966 / 0.9971 / 0.9983 and held-out
    # RMSE 0.9227 -> 0.9200 / 0.9188 / 0.9185 / 0.9185.
    replay_ratio: float = 0.25
    replay_size: int = 10_000
    # Ranking head (ranking.py): recommend orders by it ("softmax"), or by the predicted
    # rating ("rating", the plain rating-MF recommender). Queries fold in the last history_len
    # items (weights history_decay ** age); softmax against every item up to ``negatives``
    # items, sampled softmax beyond; row-wise Adagrad at rank_lr (stream) / rank_fit_lr.
    # On the warm-up tail, rank_lr and rank_fit_lr 0.02-0.2 moved HR@10 by at most 0.002;
    # with rank_min_rating 4, history 10 / 20 / 30 / 40 / 60 (decay 0.8 / 0.9 / 0.93 / 0.95 /
    # 0.97) gave 0.0912 / 0.0938 / 0.0950 / 0.0960 / 0.0962.
    rank_by: str = "softmax"
    # Warm users' (those with a ranking history) first rerank_depth candidates of the ranking
    # head are re-ordered by their ranking score + rerank_weight x the predicted rating (0:
    # off; rank_by "softmax" only): the rating model knows how much a user likes what the
    # head says they will pick. On the warm-up tail (last 20% / 30% / 40%, depth 30), weights
    # 0 / 2 / 3 gave HR@10 0.1221 / 0.1223 / 0.1221, 0.1166 / 0.1185 / 0.1173, 0.1136 / 0.1136 /
    # 0.1136 and NDCG@10 0.0587 / 0.0610 / 0.0608, 0.0569 / 0.0586 / 0.0584, 0.0548 / 0.0561 /
    # 0.0559; weight 1 and 1.5 at 20%: 0.1211 / 0.0596 and 0.1217 / 0.0604 (over all items);
    # depth 20 / 30 / 50 / all at 20%, weight 2: NDCG 0.0611 / 0.0610 / 0.0609 / 0.0609.
    rerank_weight: float = 2.0
    rerank_depth: int = 30
    # Events rated below rank_min_rating are no positives for the ranking head: they train the
    # rating model only and stay out of the user's ranking history (None: every event is a
    # positive, for implicit feedback). On the warm-up tail, None / 3 / 4 / 5 gave HR@10
    # 0.0907 / 0.0916 / 0.0934 / 0.0881.
    rank_min_rating: float | None = 4.0
    history_len: int = 40
    history_decay: float = 0.95
    negatives: int = 2048
    rank_lr: float = 0.05
    rank_fit_lr: float = 0.05
    rank_batch_size: int = 256
    rank_max_epochs: int = 20
    # Consolidation (consolidation.py): every consolidate_every events (0: only when
    # Recommender.consolidate() is called), up to consolidate_epochs replay-mixed passes over
    # the last consolidate_window events, validated on their newest validation_fraction.
    # On the warm-up tail (every / window): off 1.0020, 2,500 / 2,500 1.0009, 2,500 / 5,000
    # 1.0020, 1,000 / 1,000 1.0018, 1,000 / 2,500 1.0008, 500 / 1,000 1.0021 stream RMSE; HR@10
    # moved < 0.0005 (the ranking head's validation loss rose in every pass: rolled back).
    consolidate_every: int = 2_500
    consolidate_window: int = 2_500
    consolidate_epochs: int = 3
    # Refit (consolidation.refit), the slowest time scale: every refit_every events (0: off),
    # refit_epochs shuffled passes of the rating head over the event log (the newest
    # refit_log_size events learned from, warm-up included) at the warm-up fit's lr and decay,
    # user gain 1. The stream's one time-ordered pass at user_gain learns fast but drifts; a
    # shuffled pass over everything re-balances it. Picked on the warm-up alone (fit on its
    # first 40% less 10% held out, stream the rest): off / every 2,500 / 5,000 / 10,000 (one
    # pass) gave stream RMSE 0.9687 / 0.9653 / 0.9660 / 0.9668, held-out RMSE 0.9641 -> 0.9549
    # / 0.9472 / 0.9466 / 0.9497; two passes 0.9653, 0.9461. Fit on 60%: off / 1 / 2 passes
    # 0.9656 / 0.9643 / 0.9640, held-out 0.9414 -> 0.9346 / 0.9299 / 0.9298; on 80% (one
    # refit) 0.9796 / 0.9797 / 0.9798, 0.9337 -> 0.9334 / 0.9317 / 0.9310. Every 5,000, one
    # pass: more costs twice the time for < 0.001 (the update budget is a fifth of retraining's).
    refit_every: int = 5_000
    refit_epochs: int = 1
    refit_log_size: int = 1_000_000
    # Neighbourhood correction (neighbours.py): predicted ratings of users with ratings blend
    # in an item-kNN prediction at knn_weight (0: off); recomputed at the fit and each refit.
    # Picked on the warm-up alone (fit on its first 40% / 60% less 10% held out, the rest
    # streamed at M = 100; size 100, neighbours recomputed every 5,000 events): stream RMSE
    # without 0.9669 / 0.9646; weight 0.2 / 0.3 / 0.35 / 0.4 / 0.5 0.9642 / 0.9636 / 0.9635 /
    # 0.9635 / 0.9640 and 0.9628 / 0.9627 / 0.9629 / 0.9631 / 0.9640; knn_reg 1.0 worse than
    # 0.3 on both (0.9640 / 0.9630 vs 0.9633 / 0.9626, recomputed every 2,500); a weight per
    # user rating count (1-10 / 10-30 / 30-100 / 100-300 / more) did not carry from one cut to
    # the other. Then, with the product: k 20 / 80, shrink 50 / 200, user ridge 2 / 10 all
    # within 0.0003 of the defaults on both cuts; item ridge 25 worse (0.9654 / 0.9645).
    # Recency (same cuts, the product's stream logged): the stream over-predicts heavy users
    # (users with 100-300 ratings by 0.10-0.13 on both cuts), whose later ratings run lower;
    # weighting a user's ratings by knn_user_decay ** age in their bias, with knn_user_reg 1
    # / 2 / 5: decay 0.95 best at 5 (kNN alone on users with ratings 0.9557 -> 0.9517 and
    # 0.9627 -> 0.9594; 0.9 / 0.97 / 0.99 behind), knn_decay 0.99 on the neighbours' weights
    # beat 1.0 and 0.97, and then knn_weight 0.4 beat 0.3 / 0.5: stream RMSE 0.9635 / 0.9627
    # -> 0.9621 / 0.9622. Then, with the residual offsets below: the kNN was worse than the
    # factor model for users with 1-10 ratings on both cuts (1.080 / 1.064 vs 1.049 / 1.014),
    # so a user with n ratings blends it at knn_weight x n / (n + knn_ramp): ramp 5 / 10 / 20
    # at weight 0.5, 10 at 0.55 and 20 at 0.6 gave 0.9582-0.9586 / 0.9601-0.9606 (constant
    # 0.4: 0.9591 / 0.9612); 10 at 0.5 sits in the middle of that flat patch.
    knn_weight: float = 0.5
    knn_ramp: float = 10.0
    knn_size: int = 100  # neighbours kept per item
    knn_k: int = 40  # at most this many of them (the most similar the user rated) per prediction
    knn_shrink: float = 100.0  # similarity x co-raters / (co-raters + knn_shrink)
    knn_reg: float = 0.3  # added to the sum of similarities
    knn_user_reg: float = 5.0  # the baseline's ridge on user biases
    knn_user_decay: float = 0.95  # a rating's weight in the user's bias: this ** its age
    knn_decay: float = 0.99  # ... and, times its similarity, as a neighbour
    # Residual offsets (offsets.py): the stream's prequential residuals by the user's rating
    # count class and by item, added back at these weights and ridges (0 weights: off). On
    # the same two cuts, logged with the product above (stream RMSE 0.9621 / 0.9622): by
    # item alone (ridge 2 / 3 / 5 / 10, weight 0.2-0.35) 0.9597-0.9601 / 0.9612-0.9614; by
    # count class alone (ridge 100-400, weight 0.35-0.75) 0.9612-0.9613 / 0.9621-0.9625; both,
    # class ridge 400 weight 0.5 and item ridge 2 weight 0.2, 0.9590 / 0.9612 (ridge 200 / 400,
    # weight 0.35 / 0.5 / 0.75 and item ridge 2 / 3 / 5 all within 0.0003 of it).
    offset_count_weight: float = 0.5
    offset_count_reg: float = 400.0
    offset_item_weight: float = 0.2
    offset_item_reg: float = 2.0
    knn_item_reg: float = 10.0  # ... and on item biases
    # The recompute reads each user's newest knn_history_cap ratings (0: all): its cost grows
    # with the square of a user's count (MovieLens-100k's largest is 737, so no change here).
    knn_history_cap: int = 1_000
    # User-neighbourhood correction (user_neighbours.py): uknn_weight x the similarity-weighted
    # baseline residuals on the item of the first uknn_k of the user's uknn_size most similar
    # users who rated it, added to predicted ratings (0: off). On the same two cuts, with the
    # product (stream RMSE 0.9584 / 0.9603 without): weight 0.3, size 200, k 20, shrink 25
    # 0.9573 / 0.9592; weight 0.2 / 0.4 0.9573 / 0.9592 and 0.9577 / 0.9596; size 100 / 400
    # 0.9576 / 0.9595 and 0.9573 / 0.9592; k 10 (shrink 50) / 50 0.9574 / 0.9595 and 0.9574 /
    # 0.9593; shrink 50 / 100 0.9572 / 0.9591 both; user ridge 2 0.9574 / 0.9592.
    uknn_weight: float = 0.3
    uknn_size: int = 200
    uknn_k: int = 20
    uknn_shrink: float = 50.0  # similarity x co-rated / (co-rated + uknn_shrink)
    uknn_reg: float = 0.3  # added to the sum of similarities
    uknn_user_reg: float = 5.0  # ridge of the user's mean residual
    # Items with more raters than this are left out of the user similarities (0: none): a
    # user's list costs the sum of their items' rater counts. A speed knob, off by default:
    # on benchmarks/scale_check (20,000 users, an item with 59,012 of 400,000 ratings) 1,000
    # took feedback(100) from 106 to 55 ms (mean) and cost stream RMSE 0.8195 -> 0.8284 (the
    # static model's 0.8232 -> 0.8318): the popular item's ratings still told tastes apart.
    uknn_max_raters: int = 0
    # A feedback call remakes the list of each of its users whose rating count grew by at least
    # max(1, uknn_refresh_growth x the count their list was made at) (0: every call's users).
    # On the warm-up cuts: 1/8 and 1/20 gave 0.9572 / 0.9591 and 0.9572 / 0.9592, like every
    # call (remaking 70% and 80% of them there: MovieLens users are light); on the synthetic
    # stream above, with heavy users (refit and consolidation off, uknn_max_raters 1,000),
    # feedback(100) 41 -> 12 ms; on a 450,000-event variant of scale_check, stream RMSE
    # 0.8312 with every call's users, 0.8311 with 1/8 (and the sweep after refits).
    uknn_refresh_growth: float = 0.125
    # After a refit ends inside feedback, every user's list is remade over the next calls (the
    # sweep: user_neighbours.sweep); False leaves each list to its user's own growth. On the
    # warm-up cuts 0.9572 / 0.9591 with it, 0.9573 / 0.9592 without; on scale_check stream
    # RMSE 0.8195 / 0.8199 and feedback(100) mean 56 / 33 ms (p50 48 / 21): a latency knob.
    uknn_sweep: bool = True
    # ... and in recommend's re-rank too (False: predict only; recommend at B = 64 1.6x faster
    # on bench_service, retention HR@10 85.2% instead of 88.2% on MovieLens at M = 100)
    uknn_rerank: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        from . import neighbours, offsets, user_neighbours

        neighbours.check_config(self)
        offsets.check_config(self)
        user_neighbours.check_config(self)
        if self.rank_by not in ("softmax", "rating"):
            raise ValueError(f"rank_by must be 'softmax' or 'rating', not {self.rank_by!r}")
        if self.history_len < 1 or not 0 < self.history_decay <= 1 or self.negatives < 1:
            raise ValueError("need history_len >= 1, 0 < history_decay <= 1, negatives >= 1")
        if min(self.consolidate_every, self.consolidate_window, self.consolidate_epochs) < 0:
            raise ValueError("consolidate_every, _window and _epochs must be >= 0")
        if min(self.refit_every, self.refit_epochs, self.refit_log_size) < 0:
            raise ValueError("refit_every, refit_epochs and refit_log_size must be >= 0")
        if not (math.isfinite(self.rerank_weight) and self.rerank_weight >= 0):
            raise ValueError(f"rerank_weight must be finite and >= 0, not {self.rerank_weight!r}")
        if not 0 <= self.rerank_depth <= MAX_RERANK_DEPTH:
            raise ValueError(f"rerank_depth must be in [0, {MAX_RERANK_DEPTH}]")
        if self.step_halvings < 0:
            raise ValueError(f"step_halvings must be >= 0, not {self.step_halvings!r}")
        if not (math.isfinite(self.user_gain) and self.user_gain >= 0):
            raise ValueError(f"user_gain must be finite and >= 0, not {self.user_gain!r}")

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass
class FitReport:
    epochs: int
    best_epoch: int
    train_rmse: list[float]
    val_rmse: list[float]
    rejected: int = 0  # mini-batches the guard rail refused
    rank_best_epoch: int = 0  # the ranking head's (ranking.fit)
    rank_val_loss: list[float] = field(default_factory=list)  # its validation cross-entropy


class DivergenceError(RuntimeError):
    """An update produced non-finite values or an exploding loss; it was rolled back."""


def step(
    state: ModelState,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    lr: float,
    weight_decay: float,
    cfg: LearnerConfig,
    backend: str,
    max_loss: float = math.inf,
    undo: list[Callable[[], None]] | None = None,
    user_gain: float = 1.0,
) -> float:
    """One guarded update: on divergence the touched rows, scales and mu are restored (the model
    is unchanged bit for bit) and DivergenceError is raised. Returns the pre-step batch loss.
    ``undo``: where to append a callable that takes a successful step back; with it, the caller
    folds the scales once nothing can be taken back any more (a fold rescales whole tables, which
    restoring the touched rows would not undo).

    ``lr`` is the base rate; the step uses lr_t = lr * min(1, N / cfg.lr_batch), and
    lr_t * user_gain on the user rows' gradient (the kernel's ``gains``). Backtracking: a try
    that raises the batch loss is taken back and retried at half its rate, up to
    ``cfg.step_halvings`` times; the last try need only pass the divergence guard.
    """
    lr = effective_lr(lr, users.numel(), cfg)
    u_idx, i_idx = users.unique(), items.unique()
    saved = (
        state.user_rows.t[u_idx].clone(), state.item_rows.t[i_idx].clone(),
        state.user_bias.t[u_idx].clone(), state.item_bias.t[i_idx].clone(),
        state.scales.clone(), state.mu.clone(),
    )  # fmt: skip

    def restore() -> None:
        state.user_rows.t[u_idx], state.item_rows.t[i_idx] = saved[0], saved[1]
        state.user_bias.t[u_idx], state.item_bias.t[i_idx] = saved[2], saved[3]
        state.scales.copy_(saved[4])
        state.mu.copy_(saved[5])

    last = cfg.step_halvings
    for t in range(last + 1):
        loss = kernels.mf_sgd_step(
            state.user_rows.t, state.item_rows.t, state.user_bias.t, state.item_bias.t,
            state.scales, state.mu, users, items, ratings, lr * 0.5**t, weight_decay,
            cfg.learn_mu, (user_gain, 1.0, 1.0, 1.0), backend=backend,
        )  # fmt: skip
        after = mse(state, users, items, ratings)
        # before the last try, the loss must not rise (a relative 1e-6 for rounding)
        limit = max(cfg.explode_ratio * loss, max_loss) if t == last else loss * (1 + 1e-6)
        ok = (
            math.isfinite(loss) and math.isfinite(after) and after <= limit
            and bool(torch.isfinite(state.user_rows.t[u_idx]).all())
            and bool(torch.isfinite(state.item_rows.t[i_idx]).all())
            and bool(torch.isfinite(state.user_bias.t[u_idx]).all())
            and bool(torch.isfinite(state.item_bias.t[i_idx]).all())
            and math.isfinite(float(state.mu))
        )  # fmt: skip
        if ok:
            break
        restore()
        state.counters["step_halvings"] += t < last
        if t == last:
            state.counters["steps_rejected"] += 1
            raise DivergenceError(
                f"update diverged (batch loss {loss:.3g} -> {after:.3g} at lr {lr * 0.5**t:.3g}"
                f" after {t} halvings); step rolled back"
            )
        log.debug("step raised its batch loss %.4g -> %.4g: retried at half the rate", loss, after)
    state.counters["steps"] += 1
    state.counters["steps_backtracked"] += t > 0
    if undo is not None:
        undo.append(restore)
    else:
        state.fold_scales(cfg.fold_threshold)
    return loss


def count_events(state: ModelState, items: torch.Tensor, cfg: LearnerConfig) -> None:
    """Add learned-from events (time order) to the per-item counts: the plain ones and the
    recency prior's, where event t of n weighs 2^(-(n - 1 - t) / halflife) after older
    counts have decayed by 2^(-n / halflife); O(n) through the lazy scale."""
    state.item_count.t.index_add_(0, items, torch.ones_like(items))
    n = items.numel()
    if n == 0:
        return
    h = cfg.prior_halflife
    scale = float(state.recent_scale) * 2.0 ** (-n / h)
    if scale < 1e-200:  # fold the scale back (rare, O(n_items))
        state.item_recent.t.mul_(scale)
        scale = 1.0
    age = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    state.item_recent.t.index_add_(0, items, torch.exp2(-age / h) / scale)
    state.recent_scale.fill_(scale)


def reservoir_add(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
    hist: torch.Tensor, cfg: LearnerConfig,
) -> None:  # fmt: skip
    """Offer learned-from events (row indices, time order, with the ranking history each saw)
    to the replay reservoir (Vitter's algorithm R: after n offers each one is in it with
    probability size / n). Deterministic: the draws are seeded by (seed, offers so far)."""
    cap, n = cfg.replay_size, users.numel()
    if cap <= 0 or n == 0:
        return
    seen = int(state.replay_seen)
    rng = np.random.default_rng([cfg.seed, seen, 0])
    fill = max(0, min(n, cap - state.replay_users.n))
    if fill:
        state.replay_users.append(users[:fill])
        state.replay_items.append(items[:fill])
        state.replay_ratings.append(ratings[:fill].float())
        state.replay_hist.append(hist[:fill])
    if fill < n:
        offers = np.arange(seen + fill + 1, seen + n + 1)  # 1-based index of each later event
        slot = (rng.random(n - fill) * offers).astype(np.int64)  # uniform in [0, offer)
        take = np.nonzero(slot < cap)[0]  # in time order: a later event overwrites an earlier
        # one write per slot, the latest event's: indexed assignment with repeated indices
        # leaves the winner unspecified (and it can differ between tables, unpairing rows)
        _, last = np.unique(slot[take][::-1], return_index=True)
        take = take[take.size - 1 - last]
        if take.size:
            dst = torch.from_numpy(slot[take])
            src = torch.from_numpy(take + fill)
            state.replay_users.t[dst] = users[src]
            state.replay_items.t[dst] = items[src]
            state.replay_ratings.t[dst] = ratings[src].float()
            state.replay_hist.t[dst] = hist[src]
    state.replay_seen.fill_(seen + n)


def replay_sample(
    state: ModelState, n_new: int, cfg: LearnerConfig, rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """round(replay_ratio * n_new) reservoir events (users, items, ratings, ranking
    histories), drawn with replacement from ``rng``, by default one seeded by (seed, offers
    so far, n_new)."""
    size = state.replay_users.n
    m = round(cfg.replay_ratio * n_new) if size else 0
    if rng is None:
        rng = np.random.default_rng([cfg.seed, int(state.replay_seen), n_new, 1])
    pick = torch.from_numpy(rng.integers(0, max(size, 1), m))
    return (state.replay_users.t[pick], state.replay_items.t[pick],
            state.replay_ratings.t[pick], state.replay_hist.t[pick])  # fmt: skip


def rank_bias(state: ModelState, cfg: LearnerConfig, cold: bool = False) -> torch.Tensor:
    """The per-item term ``recommend`` ranks with, float32 [n_items]: the ranking head's target
    bias (``rank_by="softmax"``) or the true item bias ("rating"), plus
    prior_weight * log(1 + recent count); ``cold``: for users with no ranking history, with
    ``cold_prior_weight`` instead."""
    weight = cfg.prior_weight
    if cold and cfg.cold_prior_weight is not None:
        weight = cfg.cold_prior_weight
    prior = torch.log1p(state.recent_counts()).float() * weight
    base = state.tgt_bias.t if cfg.rank_by == "softmax" else state.true_item_bias()
    return base + prior


def effective_lr(lr: float, n_events: int, cfg: LearnerConfig) -> float:
    """The learning rate one step of ``n_events`` events uses (README, update semantics)."""
    return lr * min(1.0, n_events / cfg.lr_batch) if cfg.lr_batch > 0 else lr


def _predictions(state: ModelState, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return reference_predict(
        state.user_rows.t, state.item_rows.t, state.user_bias.t, state.item_bias.t,
        state.scales, state.mu, users, items,
    )  # fmt: skip


def _mean_sq(p: torch.Tensor, ratings: torch.Tensor, clip: tuple[float, float] | None) -> float:
    if clip is not None:
        p = p.clamp(*clip)
    return float(((p.double() - ratings.double()) ** 2).mean())


def mse(
    state: ModelState,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    clip: tuple[float, float] | None = None,
) -> float:
    """Mean squared error of the current predictions on the events (optionally clipped)."""
    return _mean_sq(_predictions(state, users, items), ratings, clip)


def range_loss(clip: tuple[float, float] | None) -> float:
    """The squared width of the rating range (inf without one): no clipped prediction can be
    further off, so a loss above it is one of the guard rails' signs of divergence."""
    return (clip[1] - clip[0]) ** 2 if clip is not None else math.inf


def rmse(state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
         clip: tuple[float, float] | None = None) -> float:  # fmt: skip
    """Root mean squared error of the model's predictions (optionally clipped to the range)."""
    return math.sqrt(mse(state, users, items, ratings, clip)) if users.numel() else math.nan


def fit_rates(cfg: LearnerConfig) -> tuple[float, float]:
    """The warm-up fit's (lr, weight decay); the refit's too."""
    lr = cfg.fit_lr if cfg.fit_lr is not None else cfg.lr
    wd = cfg.fit_weight_decay if cfg.fit_weight_decay is not None else cfg.weight_decay
    return lr, wd


def unguarded_pass(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
    lr: float, wd: float, cfg: LearnerConfig, backend: str,
) -> None:  # fmt: skip
    """Step the events in their order, in mini-batches of ``cfg.batch_size`` at gain 1: the
    fused kernel step alone, without ``step``'s guard or the scale fold (the caller checks the
    whole and folds)."""
    for s in range(0, users.numel(), cfg.batch_size):
        b = slice(s, s + cfg.batch_size)
        kernels.mf_sgd_step(
            state.user_rows.t, state.item_rows.t, state.user_bias.t, state.item_bias.t,
            state.scales, state.mu, users[b], items[b], ratings[b],
            effective_lr(lr, users[b].numel(), cfg), wd, cfg.learn_mu, backend=backend,
        )  # fmt: skip


def fit(
    state: ModelState,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    cfg: LearnerConfig,
    backend: str,
    clip: tuple[float, float] | None = None,
) -> FitReport:
    """Warm-up training: shuffled mini-batch epochs on the first (1 - validation_fraction) of the
    events (given in time order), early stopping on the RMSE of the last share, and the weights
    of the best epoch restored. Then one pass of the validation events themselves, so the most
    recent data is learned too."""
    lr, wd = fit_rates(cfg)
    max_loss = range_loss(clip)
    n = users.numel()
    n_val = int(n * cfg.validation_fraction) if n >= 20 else 0
    n_tr = n - n_val
    rng = np.random.default_rng(cfg.seed)
    best, best_val, best_epoch, since = state.snapshot(seen=False), math.inf, 0, 0
    report = FitReport(0, 0, [], [])
    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.from_numpy(rng.permutation(n_tr))
        for s in range(0, n_tr, cfg.batch_size):
            b = order[s : s + cfg.batch_size]
            try:
                step(state, users[b], items[b], ratings[b], lr, wd, cfg, backend, max_loss)
            except DivergenceError:
                report.rejected += 1
        report.epochs = epoch
        report.train_rmse.append(rmse(state, users[:n_tr], items[:n_tr], ratings[:n_tr], clip))
        if n_val == 0:
            best, best_epoch = state.snapshot(seen=False), epoch
            continue
        val = rmse(state, users[n_tr:], items[n_tr:], ratings[n_tr:], clip)
        report.val_rmse.append(val)
        log.info("epoch %d: train rmse %.4f, val rmse %.4f", epoch, report.train_rmse[-1], val)
        if val < best_val - 1e-4:
            best, best_val, best_epoch, since = state.snapshot(seen=False), val, epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    state.restore(best)
    report.best_epoch = best_epoch
    count_events(state, items, cfg)  # each event once, however many epochs saw it
    for s in range(n_tr, n, cfg.batch_size):
        sl = slice(s, min(s + cfg.batch_size, n))
        try:
            step(state, users[sl], items[sl], ratings[sl], lr, wd, cfg, backend, max_loss)
        except DivergenceError:
            report.rejected += 1
    return report


def refit_projection(state: ModelState, cfg: LearnerConfig) -> bool:
    """Ridge regression from text embeddings E to every learned item value
    [V | b_v | T | t_b | C] (``ModelState.proj_slices``) over items with at least
    ``proj_min_count`` ratings: P = Y^T E (E^T E + ridge I)^-1. Returns False (P unchanged) when
    fewer than two such items exist."""
    counts = state.item_count.t
    train = torch.nonzero(counts >= cfg.proj_min_count).flatten()
    if train.numel() < 2:
        return False
    e = state.item_text.t[train].double()
    y = torch.cat([state.true_item_rows()[train], state.true_item_bias()[train, None],
                   state.tgt_rows.t[train], state.tgt_bias.t[train, None],
                   state.ctx_rows.t[train]], 1)  # fmt: skip
    gram = e.T @ e + cfg.proj_ridge * torch.eye(e.shape[1], dtype=torch.float64)
    state.proj = torch.linalg.solve(gram, e.T @ y.double()).T.float().contiguous()
    state.proj_fitted = True
    return True


def text_prior(state: ModelState, emb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every TRUE item value (keys of ``ModelState.proj_slices``: rows [n, dim], biases [n])
    predicted from embeddings [n, text_dim] by P."""
    out = emb.float() @ state.proj.T
    return {k: out[:, sl].squeeze(1) if sl.stop - sl.start == 1 else out[:, sl].contiguous()
            for k, sl in state.proj_slices().items()}  # fmt: skip
