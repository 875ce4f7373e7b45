"""The slow time scale: consolidation of what the stream taught, with validation and rollback.

``feedback`` takes one step per micro-batch (the fast time scale). Every so often (explicitly
with ``Recommender.consolidate()``, or every ``consolidate_every`` events) a consolidation:

1. splits the window of the most recent ``consolidate_window`` events (time order) into a
   training part and its newest ``validation_fraction`` share, which the passes below never
   train on;
2. measures both heads on that share before it starts: the rating head's RMSE and the ranking
   head's exact softmax cross-entropy (positives only);
3. runs up to ``consolidate_epochs`` shuffled passes over the training part in mini-batches of
   ``batch_size``, each mixed with ``replay_ratio`` x as many events drawn from the replay
   reservoir (against forgetting), at the stream learning rates; a divergent mini-batch is
   rejected (counted) and changes nothing;
4. keeps, per head, the weights of its best validation epoch, stopping when neither head has
   improved for ``patience`` epochs; a head that never beat its starting value is rolled back
   to the weights it had before the consolidation (the last good snapshot);
5. refits the text projection and gives never-rated items their new text prior.

The two heads own disjoint tables, so each is validated, kept or rolled back on its own.

The validation share has been learned from already (``feedback`` trained on every event as it
arrived), so it measures fit more than generalisation; README, "Update semantics".

Slower still (every ``refit_every`` events, or ``Recommender.refit()``), ``refit`` runs
``refit_epochs`` shuffled passes of the rating head over the event log (the newest
``refit_log_size`` events learned from) at the warm-up fit's learning rate and decay, user
gain 1, in mini-batches of ``batch_size``: the stream's single time-ordered pass, with its
user gain, learns fast and drifts; a shuffled pass over everything pulls the rows back toward
what all the data says (less forgetting, better stream RMSE too). The guard rail checks each
pass whole, not each mini-batch (8x cheaper: the kernel step is 1/8 of a guarded one); a pass
that diverges rolls the refit back. There is no validation share that no step has seen, so
the pass count is a setting (picked on the warm-up, ``LearnerConfig``), not early-stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import online, ranking
from .online import DivergenceError, LearnerConfig

if TYPE_CHECKING:
    from .model import ModelState

RATING_TABLES = ("user_rows", "item_rows", "user_bias", "item_bias")
RANKING_TABLES = ("ctx_rows", "tgt_rows", "tgt_bias", "ctx_acc", "tgt_acc", "tgt_bias_acc")


@dataclass
class ConsolidationReport:
    """What one consolidation did. ``*_val``: the validation value before (index 0) and after
    each epoch (RMSE; cross-entropy in nats, NaN without positives); ``*_kept``: the epoch whose
    weights were kept (0 = rolled back to the weights before the consolidation)."""

    events: int = 0  # events in the window (training part + validation share)
    epochs: int = 0
    rating_val: list[float] = field(default_factory=list)
    rank_val: list[float] = field(default_factory=list)
    rating_kept: int = 0
    rank_kept: int = 0
    rejected: int = 0  # mini-batch steps the guard rails refused
    seconds: float = 0.0


def _save(state: ModelState, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {name: getattr(state, name).t.clone() for name in names}
    if names == RATING_TABLES:  # the rows are stored through the lazy scales
        out["scales"], out["mu"] = state.scales.clone(), state.mu.clone()
    return out


def _load(state: ModelState, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        if name in ("scales", "mu"):
            getattr(state, name).copy_(value)
        else:
            getattr(state, name).t.copy_(value)


class _Best:
    """The best validation value of one head so far, its epoch and weights."""

    def __init__(self, state: ModelState, names: tuple[str, ...], value: float) -> None:
        self.state, self.names = state, names
        self.value, self.epoch, self.since = value, 0, 0
        self.weights = _save(state, names)

    def offer(self, value: float, epoch: int) -> None:
        if value < self.value - 1e-4 or (math.isnan(self.value) and not math.isnan(value)):
            self.value, self.epoch, self.since = value, epoch, 0
            self.weights = _save(self.state, self.names)
        else:
            self.since += 1

    def restore(self) -> None:
        _load(self.state, self.weights)


def consolidate(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
    hist: torch.Tensor, cfg: LearnerConfig, backend: str, gen: torch.Generator,
    clip: tuple[float, float] | None = None,
) -> ConsolidationReport:  # fmt: skip
    """Consolidate on the window of recent events (row indices [n], ratings [n], the ranking
    history each saw [n, L], time order); see the module doc. In place; returns the report.
    Needs at least two events (else it does nothing)."""
    t0 = time.perf_counter()
    n = users.numel()
    report = ConsolidationReport(events=n)
    n_val = max(1, int(n * cfg.validation_fraction))
    n_tr = n - n_val
    if n < 2 or n_tr < 1:
        return report
    softmax = cfg.rank_by == "softmax"
    pos = ranking.positives(ratings, cfg)
    val = slice(n_tr, n)
    v_pos = pos[val]
    max_loss = online.range_loss(clip)

    def rating_val() -> float:
        return online.rmse(state, users[val], items[val], ratings[val], clip)

    def rank_val() -> float:
        if not softmax or not bool(v_pos.any()):
            return math.nan
        return ranking.loss_of(state, hist[val][v_pos], items[val][v_pos], cfg)

    best_rating = _Best(state, RATING_TABLES, rating_val())
    best_rank = _Best(state, RANKING_TABLES, rank_val())
    report.rating_val.append(best_rating.value)
    report.rank_val.append(best_rank.value)
    rng = np.random.default_rng([cfg.seed, int(state.replay_seen), 2])
    for epoch in range(1, cfg.consolidate_epochs + 1):
        order = torch.from_numpy(rng.permutation(n_tr))
        for s in range(0, n_tr, cfg.batch_size):
            b = order[s : s + cfg.batch_size]
            ru, ri, rr, rh = online.replay_sample(state, b.numel(), cfg, rng)
            u, i, r = (
                torch.cat([users[b], ru]),
                torch.cat([items[b], ri]),
                torch.cat([ratings[b], rr]),
            )
            try:
                online.step(state, u, i, r, cfg.lr, cfg.weight_decay, cfg, backend, max_loss,
                            user_gain=cfg.user_gain)  # fmt: skip
            except DivergenceError:
                report.rejected += 1
            if softmax:
                h = torch.cat([hist[b], rh])
                keep = ranking.positives(r, cfg)
                try:
                    ranking.step(state, h[keep], i[keep], cfg.rank_lr, cfg, gen, backend=backend)
                except DivergenceError:
                    report.rejected += 1
        report.epochs = epoch
        report.rating_val.append(rating_val())
        report.rank_val.append(rank_val())
        best_rating.offer(report.rating_val[-1], epoch)
        best_rank.offer(report.rank_val[-1], epoch)
        if min(best_rating.since, best_rank.since if softmax else cfg.patience) >= cfg.patience:
            break
    best_rating.restore()
    best_rank.restore()
    report.rating_kept, report.rank_kept = best_rating.epoch, best_rank.epoch
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class RefitReport:
    """What one refit did: events in the log it passed over, passes made, whether a pass
    diverged and the refit was rolled back whole, and the log's RMSE (clipped predictions)
    before and after (the same when rolled back)."""

    events: int = 0
    epochs: int = 0
    rolled_back: bool = False
    rmse_before: float = math.nan
    rmse_after: float = math.nan
    seconds: float = 0.0


def refit(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
    cfg: LearnerConfig, backend: str, clip: tuple[float, float] | None = None,
) -> RefitReport:  # fmt: skip
    """Shuffled passes of the rating head over logged events (row indices [n], ratings [n]);
    see the module doc. The steps are the kernel's alone; the guard rail checks each pass
    whole (every rating table and mu finite, the log's loss after it at most explode_ratio x
    the loss before the refit or the squared width of the range): a pass that fails it rolls
    the refit back to the weights before it. In place; returns the report."""
    t0 = time.perf_counter()
    n = users.numel()
    report = RefitReport(events=n)
    if n == 0 or cfg.refit_epochs == 0:
        return report
    lr, wd = online.fit_rates(cfg)
    loss, report.rmse_before = online.mse_and_rmse(state, users, items, ratings, clip)
    limit = max(cfg.explode_ratio * loss, online.range_loss(clip))
    before = _save(state, RATING_TABLES)
    rng = np.random.default_rng([cfg.seed, int(state.replay_seen), 3])
    for epoch in range(1, cfg.refit_epochs + 1):
        order = torch.from_numpy(rng.permutation(n))
        online.unguarded_pass(state, users, items, ratings, order, lr, wd, cfg, backend)
        report.epochs = epoch
        loss, report.rmse_after = online.mse_and_rmse(state, users, items, ratings, clip)
        sound = all(bool(torch.isfinite(getattr(state, k).t).all()) for k in RATING_TABLES)
        if not (sound and math.isfinite(float(state.mu)) and loss <= limit):
            _load(state, before)
            report.rolled_back, report.rmse_after = True, report.rmse_before
            break
    report.seconds = time.perf_counter() - t0
    return report
