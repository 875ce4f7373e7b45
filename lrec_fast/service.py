"""The public facade: a thread-safe Recommender over the model state, the learner and the
dispatching kernels."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import consolidation, kernels, neighbours, offsets, online, ranking, user_neighbours
from .consolidation import ConsolidationReport, RefitReport
from .kernels.reference import SCALE_ITEM, SCALE_ITEM_BIAS, SCALE_USER, SCALE_USER_BIAS
from .model import Id, ModelState, load_state, rows_csr, save_state
from .online import FitReport, LearnerConfig
from .text.encoder import MINILM_NAME, CachedEncoder, TextEncoder, encoder_by_name

log = logging.getLogger(__name__)


def _as_ids(values: Any, name: str) -> list[Id]:
    """Validate caller ids: a 1-D sequence of ints or strs (numpy ints accepted)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of ids (int or str)")
    arr = np.asarray(values) if not isinstance(values, list) else None
    if arr is not None and arr.ndim > 1:
        raise ValueError(f"{name} must be one-dimensional")
    if arr is not None and arr.dtype.kind in "iu":
        return [int(v) for v in arr.tolist()]
    out: list[Id] = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} contains a bool; ids are int or str")
        if isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif isinstance(v, str):
            out.append(v)
        else:
            raise TypeError(f"{name} contains {type(v).__name__} {v!r}; ids are int or str")
    return out


def _as_ratings(values: Any, n: int, lo: float, hi: float) -> torch.Tensor:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise TypeError(f"ratings must be numbers, not {arr.dtype}")
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ratings must be 1-D with {n} entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("ratings contain NaN or infinity")
    if len(arr) and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"ratings must lie in [{lo}, {hi}]; got [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr.astype(np.float32))


def check_k(k: Any) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError("k must be a positive int")


NO_ITEMS = np.zeros(0, dtype=np.int64)  # the exclusions of a query with none


def seen_csr(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query item rows to exclude (int64 arrays) as the (indptr, indices) int64 CSR
    score_topk takes."""
    indptr, flat = rows_csr(rows)
    return torch.from_numpy(indptr), torch.from_numpy(flat)


def ranked_topk(
    q: torch.Tensor, rows: torch.Tensor, k: int, item_terms: tuple[torch.Tensor, torch.Tensor],
    cold: torch.Tensor, exclude: Sequence[np.ndarray], backend: str | None = None,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``kernels.score_topk`` of queries [B, d] against ``rows``, each query with the item term
    [n_items] of its group: ``item_terms[0]`` for users with a ranking history, ``[1]`` for
    the cold ones (bool [B]); at most one kernel call per group. ``exclude``: item rows per
    query. Returns (scores float32 [B, k], rows int64 [B, k])."""
    n_cold = int(cold.sum())
    if n_cold in (0, q.shape[0]):  # one group: no gather, no scatter
        return kernels.score_topk(q, rows, k, item_bias=item_terms[n_cold > 0],
                                  exclude=seen_csr(exclude), backend=backend, **kw)  # fmt: skip
    out_s = torch.full((q.shape[0], k), -torch.inf)
    out_i = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    for flag, term in zip((False, True), item_terms, strict=True):
        sel = torch.nonzero(cold == flag).flatten()
        excl = seen_csr([exclude[j] for j in sel.tolist()])
        s, i = kernels.score_topk(q[sel], rows, k, item_bias=term, exclude=excl,
                                  backend=backend, **kw)  # fmt: skip
        out_s[sel], out_i[sel] = s, i
    return out_s, out_i


Reorder = Callable[[torch.Tensor, torch.Tensor, list[int]], tuple[torch.Tensor, torch.Tensor]]


def served_topk(
    q: torch.Tensor, rows: torch.Tensor, k: int, item_terms: tuple[torch.Tensor, torch.Tensor],
    cold: torch.Tensor, exclude: Sequence[np.ndarray], offset: torch.Tensor,
    rerank: tuple[Reorder, int] | None, backend: str | None = None, **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """What ``recommend`` returns, as row indices: ``ranked_topk`` plus the per-query
    ``offset`` [B], then, where ``rerank`` = (reorder, depth) is given, the warm queries'
    (``~cold``) first ``depth`` candidates re-ranked: ``reorder(scores, top, query
    positions)`` is ``reference.rerank`` with their users' ratings (the kernel keeps
    max(k, depth) for them). Returns (scores float32 [B, k], rows int64 [B, k])."""
    warm = torch.nonzero(~cold).flatten() if rerank is not None else None
    if warm is None or warm.numel() == 0:
        scores, top = ranked_topk(q, rows, k, item_terms, cold, exclude, backend, **kw)
        return scores + offset[:, None], top
    reorder, depth = rerank  # type: ignore[misc]
    scores, top = ranked_topk(q, rows, max(k, depth), item_terms, cold, exclude, backend, **kw)
    scores = scores + offset[:, None]
    if warm.numel() == q.shape[0]:  # every query warm: no gather, no scatter
        scores, top = reorder(scores, top, warm.tolist())
    else:
        scores[warm], top[warm] = reorder(scores[warm], top[warm], warm.tolist())
    return scores[:, :k], top[:, :k]


def external_ids(top: torch.Tensor, item_ids: np.ndarray) -> np.ndarray:
    """Row indices [B, k] (-1 = none) -> the caller's item ids (-1, or "" for string ids)."""
    pad: Any = -1 if item_ids.dtype != object else ""
    out = np.full(top.shape, pad, dtype=item_ids.dtype)
    t = top.numpy()
    out[t >= 0] = item_ids[t[t >= 0]]
    return out


class _Publish:
    """The model lock, for a write to the state that answers read; the cached item terms are
    dropped on the way out (answers may have cached them meanwhile). Reusable, reentrant."""

    def __init__(self, rec: Recommender) -> None:
        self.rec = rec

    def __enter__(self) -> None:
        self.rec._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.rec._terms = None
        self.rec._lock.release()


class Recommender:
    """Text-aware biased factorisation that keeps learning from feedback.

    ``Recommender()`` uses the project's tuned defaults. ``backend`` picks the kernel backend
    (None = best available, or ``$LREC_BACKEND``); ``encoder`` is a TextEncoder, an encoder name
    ("all-MiniLM-L6-v2", "hashing-384"), or None for all-MiniLM-L6-v2 (loaded on first use,
    embeddings cached on disk). Ratings must lie in ``rating_range``. All public methods are
    thread-safe; every mutating call validates its whole input first, so a rejected call leaves
    the model bit-for-bit unchanged.
    """

    def __init__(
        self,
        dim: int = 64,
        lr: float = LearnerConfig.lr,
        weight_decay: float = LearnerConfig.weight_decay,
        backend: str | None = None,
        *,
        encoder: TextEncoder | str | None = None,
        rating_range: tuple[float, float] = (1.0, 5.0),
        cache_dir: str | Path | None = None,
        **learner: Any,
    ) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        if not (lr > 0 and weight_decay >= 0 and lr * weight_decay < 1):
            raise ValueError("need lr > 0, weight_decay >= 0 and lr * weight_decay < 1")
        if not rating_range[0] < rating_range[1]:
            raise ValueError("rating_range must be (low, high) with low < high")
        self.config = LearnerConfig(lr=lr, weight_decay=weight_decay, **learner)
        low = self.config.rank_min_rating
        if low is not None and not low <= rating_range[1]:
            raise ValueError(
                f"rank_min_rating {low} is above the rating range {rating_range}: no event "
                "could train the ranking head (None: every event)"
            )
        self._backend = kernels.resolve_backend(backend)
        self._encoder_spec = encoder if encoder is not None else MINILM_NAME
        self._encoder: TextEncoder | None = None
        self._cache_dir = cache_dir
        self.rating_range = (float(rating_range[0]), float(rating_range[1]))
        text_dim = encoder.dim if isinstance(encoder, TextEncoder) else self._text_dim_of(encoder)
        self.state = ModelState(dim=dim, text_dim=text_dim, history_len=self.config.history_len)
        self.state.rng.manual_seed(self.config.seed)
        # Two locks: the model lock (answers, and every write to the state they read) and the
        # writers' lock (one mutating call at a time). A mutator's long parts run holding only
        # the second: they read the state, or work on a fork of it, and publish under the first.
        self._lock = threading.RLock()
        self._writing = threading.RLock()
        self._publish = _Publish(self)
        self.last_refit: RefitReport | None = None  # the latest ended refit's report
        self._terms: tuple[Any, tuple[Any, ...], list[torch.Tensor | None]] | None = None
        log.info("Recommender: backend %s, dim %d", self._backend.name, dim)

    @staticmethod
    def _text_dim_of(name: str | None) -> int:
        if name is None or name == MINILM_NAME:
            return 384
        return encoder_by_name(name).dim

    # -- introspection ----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The kernel backend that runs."""
        return self._backend.name

    def stats(self) -> dict[str, int]:
        """Counters of what this process has seen the model do since it was built or loaded
        (not saved; for monitoring): ``feedback_calls`` learned, ``feedback_rejected`` (rolled
        back: a divergent step or an error while learning), ``events_learned``; rating
        ``steps`` taken (stream, fit, consolidation), ``steps_backtracked`` (taken after at least
        one halving), ``step_halvings``, ``steps_rejected`` (every try failed);
        ``consolidations``, ``refits`` ended, ``user_lists_made``. A rising share of
        backtracked or rejected steps says the stream is pushing the learning rates too hard."""
        keys = ("feedback_calls", "feedback_rejected", "events_learned", "steps",
                "steps_backtracked", "step_halvings", "steps_rejected", "consolidations",
                "refits", "user_lists_made")  # fmt: skip
        with self._lock:
            return {k: int(self.state.counters[k]) for k in keys}

    @property
    def n_users(self) -> int:
        return len(self.state.users)

    @property
    def n_items(self) -> int:
        return len(self.state.items)

    @property
    def item_ids(self) -> list[Id]:
        return list(self.state.items.ids)

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            with self._lock:  # (once: calls encode ahead of the lock too)
                if self._encoder is None:
                    spec = self._encoder_spec
                    enc = encoder_by_name(spec) if isinstance(spec, str) else spec
                    self._encoder = (CachedEncoder(enc, self._cache_dir)
                                     if enc.name == MINILM_NAME else enc)  # fmt: skip
        return self._encoder

    # -- catalogue ---------------------------------------------------------------------------
    def add_items(self, item_ids: Sequence[Id] | np.ndarray, texts: Sequence[str]) -> None:
        """Add new items; each starts from its text (row and bias = P e_j once P is fitted,
        small random rows before the first fit)."""
        ids = _as_ids(item_ids, "item_ids")
        if isinstance(texts, str) or len(texts) != len(ids):
            raise ValueError("texts must be a sequence with one str per item id")
        if len(set(ids)) != len(ids):
            raise ValueError("item_ids contains duplicates")

        def check_new() -> None:
            known = [i for i in ids if i in self.state.items]
            if known:
                raise ValueError(f"items already in the catalogue: {known[:5]}")

        check_new()
        emb = torch.from_numpy(self.encoder.encode(list(texts)))  # validates the texts
        with self._writing, self._lock:
            check_new()  # (again: another call may have added them meanwhile)
            self._terms = None  # the item terms change
            self._append_items(ids, emb)

    def _append_items(self, ids: list[Id], emb: torch.Tensor) -> None:
        if self.state.proj_fitted:
            rows = online.text_prior(self.state, emb)
        else:
            n, d, std = len(ids), self.state.dim, self.config.init_std
            rows = {k: torch.randn(n, d, generator=self.state.rng) * std
                    for k in ("item_rows", "tgt_rows", "ctx_rows")}  # fmt: skip
            rows |= {"item_bias": torch.zeros(n), "tgt_bias": torch.zeros(n)}
        self.state.add_items(ids, rows, emb)

    def _append_users(self, ids: list[Id]) -> None:
        """New users start at the mean known user (the cold-start answer), or small random
        rows when there are none yet."""
        n = len(ids)
        if self.n_users:
            rows = self.state.true_user_rows().mean(0, keepdim=True).expand(n, -1).clone()
            bias = self.state.true_user_bias().mean().expand(n).clone()
        else:
            rows = torch.randn(n, self.state.dim, generator=self.state.rng) * self.config.init_std
            bias = torch.zeros(n)
        self.state.add_users(ids, rows, bias)

    # -- learning ----------------------------------------------------------------------------
    def _prepare(
        self, users: Any, items: Any, ratings: Any, texts: Mapping[Id, str] | None
    ) -> tuple[list[Id], list[Id], torch.Tensor, list[Id]]:
        u, i = _as_ids(users, "users"), _as_ids(items, "items")
        if len(u) != len(i):
            raise ValueError(f"users ({len(u)}) and items ({len(i)}) differ in length")
        r = _as_ratings(ratings, len(u), *self.rating_range)
        if not u:
            raise ValueError("empty batch")
        new_items = list(dict.fromkeys(j for j in i if j not in self.state.items))
        missing = [j for j in new_items if texts is None or j not in texts]
        if missing:
            raise ValueError(f"unknown items without text: {missing[:5]} (add_items first)")
        return u, i, r, new_items

    def _encode_ahead(self, items: Any, texts: Mapping[Id, str] | None) -> dict[Id, np.ndarray]:
        """The text embeddings of the call's items not in the catalogue, encoded before the
        lock is taken: the encoder takes 26 ms for one title on 2 cores, and answers would wait
        for it. Empty on any problem: the call then validates and encodes under the lock and
        reports what is wrong in the usual order. An item that becomes new meanwhile (a
        concurrent call that added it was rolled back) is encoded under the lock."""
        if not texts:
            return {}
        try:
            catalogue = self.state.items  # (read unlocked: only which ids it holds)
            new = list(dict.fromkeys(j for j in _as_ids(items, "items") if j not in catalogue))
            new = [j for j in new if j in texts]
            if not new:
                return {}
            return dict(zip(new, self.encoder.encode([texts[j] for j in new]), strict=True))
        except Exception:  # (reported by the locked path, in order)
            return {}

    def _user_rows(self, u: list[Id]) -> torch.Tensor:
        """The rows of users ``u`` (int64), unknown users appended first."""
        new_users = list(dict.fromkeys(x for x in u if x not in self.state.users))
        if new_users:
            self._append_users(new_users)
        return torch.tensor([self.state.users.index[x] for x in u], dtype=torch.int64)

    def _item_rows(self, i: list[Id]) -> torch.Tensor:
        """The rows of catalogue items ``i`` (int64)."""
        return torch.tensor([self.state.items.index[x] for x in i], dtype=torch.int64)

    def fit(self, users: Any, items: Any, ratings: Any) -> FitReport:
        """Warm-up training on events given in time order (see ``online.fit``: early stopping on
        the most recent 10%). Items must be in the catalogue; users are added. Items that no
        event touched then take their text prior from the refitted projection. Runs under the
        model lock (answers wait for it)."""
        with self._writing, self._lock:
            self._terms = None  # the item terms change
            u, i, r, _ = self._prepare(users, items, ratings, None)
            snap = self.state.snapshot(seen=False)
            try:
                if self.n_users == 0:
                    self.state.mu.fill_(float(r.double().mean()))
                ui, ii = self._user_rows(u), self._item_rows(i)
                report = online.fit(self.state, ui, ii, r, self.config, self.backend,
                                    self.rating_range)  # fmt: skip
                keep = ranking.positives(r, self.config)
                hist = ranking.histories(self.state, ui, ii, self.backend, keep)
                if self.config.rank_by == "softmax":
                    report.rank_best_epoch, report.rank_val_loss = ranking.fit(
                        self.state, hist[keep], ii[keep], self.config, self.state.rng, self.backend
                    )
                online.reservoir_add(self.state, ui, ii, r, hist, self.config)
                self.state.remember((ui, ii, r, hist), self.config.consolidate_window)
                self._refresh_text_priors(self.state)
            except BaseException:
                self.state.restore(snap)
                raise
            self.state.seen.add(ui.tolist(), ii.tolist(), r.tolist())
            self.state.log((ui, ii, r), self.config.refit_log_size)
            self._recompute_neighbours(self.state)
            log.info("fit: %d epochs, best %d", report.epochs, report.best_epoch)
            return report

    def _recompute_neighbours(self, st: ModelState, spread: bool = False) -> None:
        """Both neighbourhood corrections of ``st`` from every rating (the fit's and each
        refit's end). With ``spread`` (``feedback``, holding the writers' lock only): the item
        lists and the baseline are computed while answers read, then published, and the user
        lists are remade over the next calls (a sweep)."""
        tables = neighbours.compute(st, self.config, self.backend)
        with self._publish:
            st.knn_pending.zero_()
            neighbours.install(st, tables)
            if spread:
                user_neighbours.start_sweep(st, self.config)
        if not spread:
            user_neighbours.recompute(st, self.config, self.backend, self._publish)

    def _refresh_text_priors(self, st: ModelState) -> None:
        if online.refit_projection(st, self.config):
            cold = torch.nonzero(st.item_count.t == 0).flatten()
            if cold.numel():
                prior = online.text_prior(st, st.item_text.t[cold])
                st.set_items(cold, prior)

    def feedback(
        self, users: Any, items: Any, ratings: Any, *, texts: Mapping[Id, str] | None = None
    ) -> float:
        """Learn from one micro-batch of events now: one fused decayed SGD step per
        ``lr_batch`` events, in time order (README, "Update semantics"). Unknown users are
        added; unknown items need their text in ``texts``. The batch is applied whole or not at
        all. Returns the batch's MSE before learning (each chunk's, before its own step)."""
        early = self._encode_ahead(items, texts)
        with self._writing:
            with self._lock:
                loss, ui = self._learn(users, items, ratings, texts, early)
            # the long parts: answers read the state meanwhile (README, "Readers")
            st, cfg = self.state, self.config
            if int(st.knn_pending):  # a refit ended in an earlier call
                self._recompute_neighbours(st, spread=True)
            user_neighbours.refresh(st, cfg, ui, self.backend, lock=self._publish)  # these users'
            user_neighbours.sweep(st, cfg, len(ui), self.backend, lock=self._publish)  # a sweep's
            if 0 < cfg.consolidate_every <= int(st.since_consolidation):
                self.consolidate()
            ended = None
            if cfg.refit_every > 0 and consolidation.refit_running(st):
                budget = consolidation.refit_budget(st, len(ui), cfg)
                ended = self._advance_refit(st, budget, spread=True)
            if 0 < cfg.refit_every <= int(st.since_refit):
                if ended is None:  # (normally it has ended already: its end is not redone)
                    self._advance_refit(st, math.inf, spread=True)
                consolidation.refit_start(st, cfg)  # (nothing that answers read)
            return loss

    def _learn(self, users: Any, items: Any, ratings: Any, texts: Mapping[Id, str] | None,
               early: dict[Id, np.ndarray]) -> tuple[float, torch.Tensor]:  # fmt: skip
        """``feedback``'s part under the model lock: validate, learn, record. Returns the
        loss and the events' user rows (int64 [n])."""
        self._terms = None  # the item terms change
        u, i, r, new_items = self._prepare(users, items, ratings, texts)
        emb = None
        if new_items:
            assert texts is not None
            late = [j for j in new_items if j not in early]  # (rare: see _encode_ahead)
            if late:
                early |= zip(late, self.encoder.encode([texts[j] for j in late]), strict=True)
            emb = torch.from_numpy(np.stack([early[j] for j in new_items]))
        cfg, st = self.config, self.state
        n = len(u)
        chunk = cfg.lr_batch if 0 < cfg.lr_batch < n else n
        # one chunk: each step can take itself back (undo); several need a whole snapshot
        mark, snap = st.mark(), (st.snapshot() if chunk < n else None)
        # the random state goes back with the rest (sampled negatives draw from it)
        rng_state = st.rng.get_state()
        undo: list[Any] = [lambda: st.rng.set_state(rng_state)]
        try:
            if emb is not None:
                self._append_items(new_items, emb)
            ii = self._item_rows(i)
            if offsets.enabled(cfg):  # what predict said before this batch (users as
                served, idx = self._served(u, ii)  # they were): its errors
                counts = self._counts(idx)
            ui = self._user_rows(u)
            touched = ui.unique()
            recent = st.user_recent.t[touched].clone()
            undo.append(lambda: st.user_recent.t.index_copy_(0, touched, recent))
            hist = ranking.histories(st, ui, ii, self.backend, ranking.positives(r, cfg))
            sq = 0.0
            for s in range(0, n, chunk):
                sl = slice(s, s + chunk)
                cu, ci, cr, ch = ui[sl], ii[sl], r[sl], hist[sl]
                ru, ri, rr, rh = online.replay_sample(st, len(cu), cfg)
                # the step's own loss covers the replayed events too: the new ones' apart
                new_loss = online.mse(st, cu, ci, cr) if ru.numel() else None
                loss = online.step(st, torch.cat([cu, ru]), torch.cat([ci, ri]),
                                   torch.cat([cr, rr]), cfg.lr, cfg.weight_decay, cfg,
                                   self.backend, online.range_loss(self.rating_range), undo,
                                   cfg.user_gain)  # fmt: skip
                if cfg.rank_by == "softmax":
                    pos = ranking.positives(torch.cat([cr, rr]), cfg)
                    ranking.step(st, torch.cat([ch, rh])[pos], torch.cat([ci, ri])[pos],
                                 cfg.rank_lr, cfg, st.rng, undo, self.backend)  # fmt: skip
                sq += (loss if new_loss is None else new_loss) * len(cu)
            loss = sq / n
        except BaseException:
            if snap is not None:
                st.restore(snap)
            else:
                for fn in reversed(undo):
                    fn()
                st.truncate(mark)
            st.counters["feedback_rejected"] += 1
            raise
        st.fold_scales(cfg.fold_threshold)  # (not before: an undo cannot take a fold back)
        st.counters["feedback_calls"] += 1
        st.counters["events_learned"] += n
        if offsets.enabled(cfg):
            offsets.learn(st, cfg, counts, ii, r, served, self.rating_range)
        online.count_events(st, ii, cfg)
        online.reservoir_add(st, ui, ii, r, hist, cfg)
        st.remember((ui, ii, r, hist), cfg.consolidate_window)
        st.since_consolidation += n
        st.log((ui, ii, r), cfg.refit_log_size)
        st.since_refit += n
        st.seen.add(ui.tolist(), ii.tolist(), r.tolist())
        return loss, ui

    def _advance_refit(self, st: ModelState, budget: float,
                       spread: bool = False) -> RefitReport | None:  # fmt: skip
        """Step the running refit of ``st`` by ``budget`` events; at its end the text priors
        and both neighbourhoods' recomputes. With ``spread`` (inside ``feedback``) the
        recomputes wait for the next feedback call (``knn_pending``; a refit ends in the call
        that runs that period's consolidation, and one call doing both was the longest) and
        remake the user lists over the calls after it."""
        report = consolidation.refit_advance(st, budget, self.config, self.backend,
                                             self.rating_range, self._publish)  # fmt: skip
        if report is not None:
            with self._publish:
                self._refresh_text_priors(st)
                if spread:
                    st.knn_pending.fill_(1)
                st.counters["refits"] += 1
            if not spread:
                self._recompute_neighbours(st)
            self.last_refit = report  # (once it all ran: refit() may still fail before)
            log.info("refit: %s", report)
        return report

    def _on_fork(self, work: Callable[[ModelState], Any]) -> Any:
        """``work(fork)`` on a fork of the state while answers read the state itself (writers
        wait), then the fork published in O(1); on an error the state is as it was."""
        with self._writing:
            fork = self.state.fork()
            out = work(fork)
            with self._publish:
                self.state.adopt(fork)
            return out

    def consolidate(self) -> ConsolidationReport:
        """Consolidate now on the newest ``consolidate_window`` events learned from (warm-up
        included; checkpoints keep them): replay-mixed passes, validation on the newest share,
        early stopping, per-head rollback to the weights before it if validation does not
        improve, then the text projection refitted (``lrec_fast.consolidation``). Works on a
        fork of the model: answers go on meanwhile from the model as it was, and see the
        consolidated one once it ends; all or nothing on an unexpected error."""

        def work(st: ModelState) -> ConsolidationReport:
            cap = self.config.consolidate_window
            u, i, r, h = st.window(cap)  # views: nothing appends while it runs
            st.since_consolidation.zero_()
            if cap < 2 or u.numel() < 2:
                return ConsolidationReport(events=u.numel())
            report = consolidation.consolidate(st, u, i, r, h, self.config, self.backend,
                                               st.rng, self.rating_range)  # fmt: skip
            self._refresh_text_priors(st)
            st.counters["consolidations"] += 1
            log.info("consolidation: %s", report)
            return report

        return self._on_fork(work)

    def refit(self) -> RefitReport:
        """Refit the rating head now, whole: ``refit_epochs`` shuffled passes over the event log
        (the newest ``refit_log_size`` events learned from, warm-up included; checkpoints keep
        it) at the warm-up fit's learning rate and decay, then the text projection refitted
        and both neighbourhoods recomputed (``lrec_fast.consolidation``). A refit that
        ``feedback`` spreads over its calls and has not ended is replaced. Works on a fork, as
        ``consolidate`` (about 0.12 s per 100,000 logged events on the 2-core CPU machine,
        README); all or nothing on an unexpected error."""

        def work(st: ModelState) -> RefitReport:
            consolidation.refit_start(st, self.config)
            report = self._advance_refit(st, math.inf)
            assert report is not None
            return report

        return self._on_fork(work)

    # -- answering ---------------------------------------------------------------------------
    def _queries(self, user_ids: list[Id]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """TRUE user rows [B, d] and biases [B]; unknown users get the mean known user."""
        st = self.state
        idx = [st.users.index.get(x, -1) for x in user_ids]
        t = torch.tensor(idx, dtype=torch.int64)
        known = t >= 0
        q = st.user_rows.t[t.clamp_min(0)] * float(st.scales[SCALE_USER]) if st.user_rows.n \
            else torch.zeros(len(idx), st.dim)  # fmt: skip
        b = st.user_bias.t[t.clamp_min(0)] * float(st.scales[SCALE_USER_BIAS]) if st.user_rows.n \
            else torch.zeros(len(idx))  # fmt: skip
        if not bool(known.all()) and st.user_rows.n:
            q = torch.where(known[:, None], q, st.true_user_rows().mean(0))
            b = torch.where(known, b, st.true_user_bias().mean())
        return q, b, idx

    def score_all(self, user_ids: Sequence[Id] | np.ndarray) -> np.ndarray:
        """Predicted ratings of every catalogue item, float32 [B, n_items] (columns in
        ``item_ids`` order). For evaluation; serving uses ``recommend``."""
        ids = _as_ids(user_ids, "user_ids")
        with self._lock:
            q, b, idx = self._queries(ids)
            v = self.state.true_item_rows()
            s = q @ v.T + self.state.true_item_bias()[None, :] + b[:, None] + float(self.state.mu)
            n = v.shape[0]
            users = torch.tensor(idx, dtype=torch.int64).repeat_interleave(n)
            items = torch.arange(n).repeat(len(idx))
            p = self._blended(users, items, s.reshape(-1))
            p += offsets.total(self.state, self.config, self._counts(idx).repeat_interleave(n),
                               items)  # fmt: skip
            return p.view(s.shape).numpy()

    def _counts(self, idx: list[int]) -> torch.Tensor:
        """How many items each user row in ``idx`` (-1: unknown) has rated, int64 [B]."""
        seen = self.state.seen
        return torch.tensor([len(seen[a]) if a >= 0 else 0 for a in idx], dtype=torch.int64)

    def _served(self, u: list[Id], ii: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The predicted ratings (float32 [E], residual offsets left out) of users ``u`` and
        item rows ``ii``, and the users' rows (-1: unknown)."""
        q, b, idx = self._queries(u)
        st = self.state
        v = st.item_rows.t[ii] * float(st.scales[SCALE_ITEM])  # the rows asked for only
        bv = st.item_bias.t[ii] * float(st.scales[SCALE_ITEM_BIAS])
        p = (q * v).sum(1) + bv + b + float(st.mu)
        return self._blended(torch.tensor(idx, dtype=torch.int64), ii, p), idx

    def _blended(self, users: torch.Tensor, items: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The factor model's ratings ``p`` [E] with the item-neighbourhood correction blended
        in and the user-neighbourhood correction added."""
        nb = neighbours.Neighbours.of(self.state, self.config)
        un = user_neighbours.UserNeighbours.of(self.state, self.config)
        return neighbours.corrected(nb, un.args() if un else None, self.state.seen.history,
                                    users, items, p, self.rating_range, self.backend)  # fmt: skip

    def _ranking(self, ids: list[Id]) -> tuple[torch.Tensor, torch.Tensor, float,
                                               tuple[torch.Tensor, torch.Tensor], torch.Tensor,
                                               torch.Tensor, list[int]]:  # fmt: skip
        """What ``recommend`` scores with: queries [B, d], raw item rows, their scale, the item
        terms [n_items] (users with a ranking history, cold users), per-query offsets [B],
        which queries are cold (bool [B]) and the user rows (-1 = unknown)."""
        st, cfg = self.state, self.config
        idx = [st.users.index.get(x, -1) for x in ids]
        users = torch.tensor(idx, dtype=torch.int64)
        cold = ranking.cold_users(st.user_recent.t, users)
        n_cold = int(cold.sum())
        terms = (self._item_term(False) if n_cold < len(ids) or not ids else torch.empty(0),
                 self._item_term(True) if n_cold else torch.empty(0))  # fmt: skip
        if cfg.rank_by == "softmax":
            q = ranking.queries(st, users, cfg, self.backend)
            return q, st.tgt_rows.t, 1.0, terms, torch.zeros(len(ids)), cold, idx
        q, b, idx = self._queries(ids)
        return (q, st.item_rows.t, float(st.scales[SCALE_ITEM]), terms, b + float(st.mu), cold,
                idx)  # fmt: skip

    def _item_term(self, cold: bool) -> torch.Tensor:
        """``online.rank_bias`` (float32 [n_items]; do not modify), kept until the next
        mutating call or settings change: a few passes over the catalogue per recommend
        otherwise (1.7 ms at 1M items)."""
        st, cfg = self.state, self.config
        key = (len(st.items), cfg.rank_by, cfg.prior_weight, cfg.cold_prior_weight)
        if self._terms is None or self._terms[0] is not st or self._terms[1] != key:
            self._terms = (st, key, [None, None])
        kept = self._terms[2]
        term = kept[cold]
        if term is None:
            term = kept[cold] = online.rank_bias(st, cfg, cold=cold)
        return term

    def rank_all(self, user_ids: Sequence[Id] | np.ndarray) -> np.ndarray:
        """The ranking scores ``recommend`` orders by, float32 [B, n_items]: the ranking head's
        score (``rank_by="softmax"``, the default) or the predicted rating ("rating"), plus the
        recency prior (``LearnerConfig.prior_weight``; ``cold_prior_weight`` for users with no
        ranking history)."""
        ids = _as_ids(user_ids, "user_ids")
        with self._lock:
            q, v, scale, terms, offset, cold, idx = self._ranking(ids)
            out = (q @ v.T) * scale + offset[:, None]
            for flag, term in zip((False, True), terms, strict=True):
                if term.numel():  # built only where the batch has such a query
                    out[cold == flag] += term
            cfg = self.config
            if ranking.reranks(cfg.rank_by, cfg.rerank_weight, cfg.rerank_depth) and bool(
                (~cold).any()
            ):
                self._rerank_all(out, ~cold, idx)
            return out.numpy()

    def _rerank_all(self, out: torch.Tensor, warm: torch.Tensor, idx: list[int]) -> None:
        """``rank_all``'s scores [B, n_items] in place, for the ``warm`` queries: as
        ``recommend`` (seen items excluded) re-ranks and shifts them, every item not re-ranked
        lowered by the same shift."""
        st = self.state
        sel = torch.nonzero(warm).flatten()
        users = torch.tensor(idx, dtype=torch.int64)[sel]
        rows = out[sel].clone()
        for a, u in enumerate(users.tolist()):
            rows[a, torch.from_numpy(st.seen.sorted(u))] = -torch.inf
        # a stable sort: ties to the lower item row, the kernels' candidates exactly
        top_s, top = torch.sort(rows, dim=1, descending=True, stable=True)
        top = torch.where(top_s > -torch.inf, top, -1)
        new_s, new_top, shift = self._reordered(top_s, top, users)
        cfg = self.config
        depth = min(cfg.rerank_depth, out.shape[1])
        for a, r in enumerate(sel.tolist()):
            out[r] -= shift[a]
            ok = new_top[a, :depth] >= 0
            out[r, new_top[a, :depth][ok]] = new_s[a, :depth][ok]

    def recommend(
        self, user_ids: Sequence[Id] | np.ndarray, k: int = 10, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per user: (item ids [B, k], ranking scores float32 [B, k]), best first,
        ties by catalogue order. The ranking score is what ``rank_all`` gives. Unknown users
        get the cold-start answer. Where fewer than k items are eligible, the tail holds id -1
        (or "" for string ids) and score -inf."""
        ids = _as_ids(user_ids, "user_ids")
        check_k(k)
        with self._lock:
            st = self.state
            q, v, scale, terms, offset, cold, idx = self._ranking(ids)
            seen = [st.seen.sorted(i) if (exclude_seen and i >= 0) else NO_ITEMS for i in idx]
            scores, top = served_topk(q, v, int(k), terms, cold, seen, offset,
                                      self._rerank(idx), self.backend,
                                      item_scale=scale)  # fmt: skip
            return external_ids(top, st.items.array()), scores.numpy().astype(np.float32)

    def _rerank(self, idx: list[int]) -> tuple[Reorder, int] | None:
        """``served_topk``'s re-rank for queries of user rows ``idx`` (``kernels.rerank_mf``
        on the model's backend), or None when off."""
        cfg = self.config
        if not ranking.reranks(cfg.rank_by, cfg.rerank_weight, cfg.rerank_depth):
            return None

        def reorder(
            scores: torch.Tensor, top: torch.Tensor, pos: list[int]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            users = torch.tensor([idx[p] for p in pos], dtype=torch.int64)
            return self._reordered(scores, top, users)[:2]

        return reorder, cfg.rerank_depth

    def _reordered(
        self, scores: torch.Tensor, top: torch.Tensor, users: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``kernels.rerank_blend`` of candidates [B, m] for user rows [B] with this model's
        tables and settings: (scores, top, shift)."""
        st, cfg = self.state, self.config
        hist, item_knn, user_knn = None, None, None
        if cfg.rerank_weight:  # re-rank by the rating predict() gives (offsets aside)
            nb = neighbours.Neighbours.of(st, cfg)
            if nb is not None:
                item_knn = nb.args(self.rating_range)
                hist = neighbours.history_rows(st.seen.history, users.numpy())
            un = user_neighbours.UserNeighbours.of(st, cfg) if cfg.uknn_rerank else None
            user_knn = un.args() if un is not None else None
        return kernels.rerank_blend(scores, top, users, st.user_rows.t, st.item_rows.t,
                                    st.user_bias.t, st.item_bias.t, st.scales, st.mu,
                                    cfg.rerank_weight, cfg.rerank_depth, hist, item_knn,
                                    user_knn, backend=self.backend)  # fmt: skip

    def predict(
        self, user_ids: Sequence[Id] | np.ndarray, item_ids: Sequence[Id] | np.ndarray
    ) -> np.ndarray:
        """Predicted ratings, float32 [N] (not clipped). Unknown users get the cold-start
        prediction; unknown items raise ValueError."""
        u, i = _as_ids(user_ids, "user_ids"), _as_ids(item_ids, "item_ids")
        if len(u) != len(i):
            raise ValueError("user_ids and item_ids differ in length")
        with self._lock:
            missing = [j for j in i if j not in self.state.items]
            if missing:
                raise ValueError(f"unknown items: {missing[:5]}")
            ii = self._item_rows(i)
            p, idx = self._served(u, ii)
            p += offsets.total(self.state, self.config, self._counts(idx), ii)
            return p.numpy().astype(np.float32)

    # -- persistence -------------------------------------------------------------------------
    def _config_dict(self) -> dict[str, Any]:
        enc = self._encoder_spec
        return {
            "learner": self.config.as_dict(),
            "encoder": enc if isinstance(enc, str) else enc.name,
            "rating_range": list(self.rating_range),
        }

    def save(self, directory: str | Path) -> None:
        """Write a checkpoint (safetensors + JSON) atomically; see ``model.save_state``. Holds
        the writers' lock only: answers go on meanwhile (the state cannot change)."""
        with self._writing:
            save_state(directory, self.state, self._config_dict())

    @classmethod
    def load(
        cls, directory: str | Path, backend: str | None = None, cache_dir: str | Path | None = None
    ) -> Recommender:
        """Load a checkpoint written by ``save`` (no pickle anywhere)."""
        state, cfg = load_state(directory)
        learner = dict(cfg["learner"])
        # written before the user gain existed: it learned at one rate, and goes on so
        learner.setdefault("user_gain", 1.0)
        learner.setdefault("refit_every", 0)  # ... and before the refit: none, as it was
        learner.setdefault("knn_weight", 0.0)  # ... and before the neighbourhood correction
        learner.setdefault("knn_user_decay", 1.0)  # ... and before its recency weights
        learner.setdefault("knn_decay", 1.0)
        learner.setdefault("knn_ramp", 0.0)
        learner.setdefault("offset_count_weight", 0.0)  # ... and before the residual offsets
        learner.setdefault("offset_item_weight", 0.0)
        learner.setdefault("uknn_weight", 0.0)  # ... and before the user neighbourhood
        lr, wd = learner.pop("lr"), learner.pop("weight_decay")
        rec = cls(state.dim, lr, wd, backend, encoder=cfg["encoder"],
                  rating_range=tuple(cfg["rating_range"]), cache_dir=cache_dir,
                  **learner)  # fmt: skip
        if rec.state.text_dim != state.text_dim:
            raise ValueError("checkpoint text_dim does not match its encoder")
        rec.state = state
        return rec

    def __repr__(self) -> str:
        return (f"Recommender(users={self.n_users}, items={self.n_items}, dim={self.state.dim}, "
                f"backend={self.backend!r})")  # fmt: skip


__all__ = ["Recommender"]
