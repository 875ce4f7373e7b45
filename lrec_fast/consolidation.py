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

Slower still, a refit runs ``refit_epochs`` shuffled passes of the rating head over the event
log (the newest ``refit_log_size`` events learned from) at the warm-up fit's learning rate and
decay, user gain 1, in mini-batches of ``batch_size``: the stream's single time-ordered pass,
with its user gain, learns fast and drifts; a shuffled pass over everything pulls the rows
back toward what all the data says (less forgetting, better stream RMSE too). Every
``refit_every`` events one starts over the log as it stands, and each later ``feedback`` call
steps its share of it (``refit_budget``: events x its size / refit_every), so it ends as the
next starts and no call stalls on a whole pass; ``Recommender.refit()`` runs one whole, now.
Its state (shuffle key, position, progress) is a few integers in the checkpoint, so a
reloaded model continues it bit for bit. The guard rail checks each slice whole (the steps a
call makes, at most ``REFIT_SLICE_STEPS`` mini-batches), not each mini-batch (8x cheaper: the
kernel step is 1/8 of a guarded one); a slice that diverges is rolled back (its rows, scales
and mu) and the refit stops. There is no validation share that no step has seen, so the pass
count is a setting (picked on the warm-up, ``LearnerConfig``), not early-stopped.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import online, ranking
from .model import NO_LOCK, ModelState
from .online import DivergenceError, LearnerConfig

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


# A guarded slice of a refit takes at most this many mini-batches (an explicit refit's passes
# run in slices of this size): its rows stay unfolded while it runs (the rollback restores
# the scales), and 1,000 decayed steps keep the scales far above the fold threshold.
REFIT_SLICE_STEPS = 1_000


@dataclass
class RefitReport:
    """What one refit did: events of the log it covered, passes it made (the last may be
    partial when rolled back), whether a slice diverged (that slice was rolled back and the
    refit stopped), and the RMSE (raw predictions) of the events each slice stepped, measured
    just before and just after that slice, over all its slices; seconds spent stepping."""

    events: int = 0
    epochs: int = 0
    rolled_back: bool = False
    rmse_before: float = math.nan
    rmse_after: float = math.nan
    seconds: float = 0.0


def refit_start(state: ModelState, cfg: LearnerConfig) -> None:
    """Begin a refit over the newest ``refit_log_size`` logged events (``refit_epochs`` passes),
    replacing one still running; ``refit_advance`` steps it."""
    n = min(state.log_users.n, cfg.refit_log_size)
    start = int(state.log_dropped) + state.log_users.n - n
    job = [int(state.replay_seen), start, n, 0, n * cfg.refit_epochs]
    state.refit_job.copy_(torch.tensor(job, dtype=torch.int64))
    state.refit_stats.zero_()
    state.refit_seconds = 0.0
    state.since_refit.zero_()


def refit_running(state: ModelState) -> bool:
    return int(state.refit_job[3]) < int(state.refit_job[4])


def refit_budget(state: ModelState, n_events: int, cfg: LearnerConfig) -> int:
    """Events of the running refit that a feedback call of ``n_events`` steps: its share of the
    refit's total, so that it ends by the time the next one starts (refit_every events), in
    whole mini-batches."""
    total = int(state.refit_job[4])
    share = -(-total * n_events // max(cfg.refit_every, 1))
    return -(-share // cfg.batch_size) * cfg.batch_size


def _order(state: ModelState, key: int, epoch: int, n: int, seed: int) -> torch.Tensor:
    """The shuffle of pass ``epoch`` of the refit ``key`` (cached: one per pass)."""
    cached = state.refit_order
    if cached is None or cached[:3] != (key, epoch, n):
        rng = np.random.default_rng([seed, key, 3, epoch])
        cached = state.refit_order = (key, epoch, n, torch.from_numpy(rng.permutation(n)))
    return cached[3]


def _guarded_slice(
    state: ModelState, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
    cfg: LearnerConfig, backend: str, clip: tuple[float, float] | None,
    lock: AbstractContextManager[Any] = NO_LOCK,
) -> tuple[float, float] | None:  # fmt: skip
    """Step the events (time order = step order) in mini-batches at the fit's rates, gain 1,
    with the guard rail on the slice whole: the touched rows, scales and mu finite, and the
    slice's loss after it at most explode_ratio x before or the range's squared width. The
    steps run on a copy of the rows it touches (the rating tables' rows of its users and
    items, the scales and mu), without ``lock``, so that answers need not wait; a sound slice
    is written back and the scales folded under ``lock`` and (MSE before, MSE after)
    returned; on failure (or an error) nothing is written: None (or it raises). The same
    numbers as stepping the tables themselves: each row's step reads only its own row, the
    scales and mu, and the copy keeps the rows' order (sorted unique rows). The caller keeps
    other writers out."""
    tu, u_at = torch.unique(users, return_inverse=True)
    ti, i_at = torch.unique(items, return_inverse=True)
    rows = (("user_rows", tu), ("user_bias", tu), ("item_rows", ti), ("item_bias", ti))
    part = ModelState(state.dim, state.text_dim, state.history_len)
    for name, idx in rows:
        getattr(part, name).set(getattr(state, name).t[idx])
    part.scales, part.mu = state.scales.clone(), state.mu.clone()
    lr, wd = online.fit_rates(cfg)
    before = online.mse(part, u_at, i_at, ratings)
    online.unguarded_pass(part, u_at, i_at, ratings, lr, wd, cfg, backend)
    after = online.mse(part, u_at, i_at, ratings)
    sound = all(bool(torch.isfinite(getattr(part, name).t).all()) for name, _ in rows)
    sound = sound and bool(torch.isfinite(part.scales).all()) and math.isfinite(float(part.mu))
    if not (sound and after <= max(cfg.explode_ratio * before, online.range_loss(clip))):
        return None
    with lock:
        for name, idx in rows:
            getattr(state, name).t[idx] = getattr(part, name).t
        state.scales.copy_(part.scales)
        state.mu.copy_(part.mu)
        state.fold_scales(cfg.fold_threshold)
    return before, after


def refit_advance(
    state: ModelState, budget: float, cfg: LearnerConfig, backend: str,
    clip: tuple[float, float] | None = None, lock: AbstractContextManager[Any] = NO_LOCK,
) -> RefitReport | None:  # fmt: skip
    """Step up to ``budget`` more events of the running refit (see the module doc), in guarded
    slices of at most REFIT_SLICE_STEPS mini-batches within one pass; logged events trimmed
    off the log since it started are skipped. Returns its report when it has ended (all
    passes made, or a slice diverged: that slice rolled back, the refit stopped), else None.
    Each slice steps a copy of its rows and writes them back under ``lock``
    (``_guarded_slice``: answers read meanwhile).
    A refit that covers no event ends at once."""
    key, start, n, done, total = state.refit_job.tolist()
    stats = state.refit_stats
    failed_in = 0  # the pass a diverging slice was in
    while budget > 0 and done < total:
        t0 = time.perf_counter()
        epoch, pos = divmod(done, n)
        bs = cfg.batch_size  # whole mini-batches, so slices step a whole pass's batches
        m = min(n - pos, REFIT_SLICE_STEPS * bs, bs * math.ceil(min(budget, n) / bs))
        at = _order(state, key, epoch, n, cfg.seed)[pos : pos + m] + (
            start - int(state.log_dropped)
        )
        at = at[at >= 0]  # trimmed off the log meanwhile
        if at.numel():
            u, i, r = state.log_users.t[at], state.log_items.t[at], state.log_ratings.t[at]
            result = _guarded_slice(state, u, i, r, cfg, backend, clip, lock)
            if result is None:
                failed_in = epoch + 1
            else:
                k = at.numel()
                stats += torch.tensor([result[0] * k, result[1] * k, k], dtype=torch.float64)
        state.refit_seconds += time.perf_counter() - t0
        budget -= m
        done = total if failed_in else done + m
        state.refit_job[3] = done
    if done < total:
        return None
    sq_before, sq_after, counted = stats.tolist()
    report = RefitReport(events=n, epochs=failed_in or (total // n if n else 0),
                         rolled_back=bool(failed_in), seconds=state.refit_seconds)  # fmt: skip
    if counted:
        report.rmse_before = math.sqrt(sq_before / counted)
        report.rmse_after = math.sqrt(sq_after / counted)
    return report
