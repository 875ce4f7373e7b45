"""The one dispatch point for the hot paths (scoring + top-k, the fused update step).

Backend contract (the same for every hot path):
- ``backend=None`` (or ``"auto"``) takes ``$LREC_BACKEND`` if set, else the best backend for
  the tensors' device: triton for CUDA tensors (torch if triton is missing), numba > torch for
  CPU tensors;
- a backend named explicitly (argument or ``$LREC_BACKEND``) runs, or raises
  ``BackendUnavailable`` saying why: never a silent fallback;
- ``torch`` (``reference.py``) is always there and is the truth the others are tested against.

Hot paths: ``score_topk`` (recommend), ``mf_sgd_step`` / ``mf_adagrad_step`` (the rating
update), ``advance_histories`` and ``softmax_step`` (the ranking head's update),
``item_neighbours`` and ``knn_predict`` (the neighbourhood correction of predicted ratings),
``user_neighbours`` and ``user_knn_predict`` (the user-neighbourhood correction),
``user_queries`` (``recommend``'s ranking queries), ``rerank_mf`` and ``rerank_blend`` (its
re-rank by the predicted rating), ``blend_terms`` (both corrections of ``predict``).

Implemented: triton (``triton_score.py``, ``triton_update.py``; runs CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``, which is only for tests and never chosen automatically),
numba (``cpu.py``) and torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch

from . import reference

PRIORITY = ("triton", "numba", "torch")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType | SimpleNamespace


_LOADED: dict[tuple[str, bool, bool], Backend] = {}


def _load(name: str) -> Backend:
    """The backend ``name``, loaded once per (name, TRITON_INTERPRET, CUDA there) and then
    kept: it is resolved on every kernel call."""
    key = (name, os.environ.get("TRITON_INTERPRET") == "1",
           name == "triton" and torch.cuda.is_available())  # fmt: skip
    got = _LOADED.get(key)
    if got is None:
        got = _LOADED[key] = _import(name)
    return got


def _import(name: str) -> Backend:
    if name == "torch":
        return Backend("torch", reference)
    if name == "numba":
        try:
            from . import cpu
        except ImportError as exc:  # numba missing or broken
            raise BackendUnavailable(f"backend 'numba' cannot be imported: {exc}") from exc
        return Backend("numba", cpu)
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not (interpret or torch.cuda.is_available()):
            raise BackendUnavailable(
                "backend 'triton' needs a CUDA device (TRITON_INTERPRET=1 runs it on the CPU, "
                "for tests)"
            )
        try:
            import triton
            import triton.language as tl

            if not hasattr(tl, "topk"):
                raise ImportError(f"triton {triton.__version__} has no tl.topk; upgrade triton")
            from . import triton_score, triton_update
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'triton' cannot be imported: {exc}") from exc
        # the neighbourhood corrections run on CPU tables (neighbours.py, user_neighbours.py):
        # numba's sparse kernels where numba imports (the references are dense, n^2 memory)
        try:
            host: ModuleType | SimpleNamespace = _load("numba").module
        except BackendUnavailable:
            host = reference
        return Backend("triton", SimpleNamespace(
            score_topk=triton_score.score_topk,
            mf_sgd_step=triton_update.mf_sgd_step,
            mf_adagrad_step=triton_update.mf_adagrad_step,
            # the ranking head's step is three GEMMs and row-wise updates: torch's own kernels
            advance_histories=reference.advance_histories,
            softmax_step=reference.softmax_step,
            rerank_mf=reference.rerank_mf,  # 30 candidates per query: no kernel launch pays
            rerank_blend=host.rerank_blend,
            blend_terms=host.blend_terms,
            user_queries=reference.user_queries,  # a gather and a weighted sum: torch's own
            item_neighbours=host.item_neighbours,
            knn_predict=host.knn_predict,
            user_neighbours=host.user_neighbours,
            user_knn_predict=host.user_knn_predict,
        ))  # fmt: skip
    raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(PRIORITY)}")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run tensors on ``device`` here, best first."""
    kind = torch.device(device).type
    names = ("triton", "torch") if kind == "cuda" else ("numba", "torch")
    out = []
    for name in names:
        try:
            _load(name)
        except BackendUnavailable:
            continue
        out.append(name)
    return out


def resolve_backend(name: str | None = None, device: str | torch.device = "cpu") -> Backend:
    """Pick the backend per the contract above (``device``: where the tensors live)."""
    want = name if name not in (None, "auto") else os.environ.get("LREC_BACKEND") or "auto"
    if want == "auto":
        return _load(available_backends(device)[0])
    return _load(want.strip().lower())


def score_topk(queries, items, k, *, backend=None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching ``score_topk``; see ``reference.score_topk`` for the exact semantics."""
    impl = resolve_backend(backend, items.device).module
    return impl.score_topk(queries, items, k, **kwargs)


def mf_sgd_step(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching fused update step; see ``reference.mf_sgd_step`` for the exact semantics."""
    return resolve_backend(backend, args[0].device).module.mf_sgd_step(*args, **kwargs)


def mf_adagrad_step(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching row-wise Adagrad step; see ``reference.mf_adagrad_step``."""
    return resolve_backend(backend, args[0].device).module.mf_adagrad_step(*args, **kwargs)


def advance_histories(recent, users, items, *, backend=None):  # type: ignore[no-untyped-def]
    """Dispatching ``advance_histories``; see ``reference.advance_histories``."""
    return resolve_backend(backend, recent.device).module.advance_histories(recent, users, items)


def softmax_step(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching ranking-head step; see ``reference.softmax_step`` for the exact semantics."""
    return resolve_backend(backend, args[0].device).module.softmax_step(*args, **kwargs)


def rerank_mf(scores, top, users, user_rows, *args, backend=None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching re-rank of ``recommend``'s candidates by the predicted rating; see
    ``reference.rerank_mf`` (and ``reference.rerank``) for the exact semantics."""
    impl = resolve_backend(backend, user_rows.device).module
    return impl.rerank_mf(scores, top, users, user_rows, *args, **kwargs)


def user_queries(ctx, recent, users, weights, *, backend=None):  # type: ignore[no-untyped-def]
    """Dispatching ranking queries of users; see ``reference.user_queries``."""
    return resolve_backend(backend, ctx.device).module.user_queries(ctx, recent, users, weights)


def rerank_blend(scores, top, users, user_rows, *args, backend=None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching re-rank by the rating ``predict`` gives, both neighbourhood corrections
    included; see ``reference.rerank_blend``."""
    impl = resolve_backend(backend, user_rows.device).module
    return impl.rerank_blend(scores, top, users, user_rows, *args, **kwargs)


def blend_terms(top, users, depth, hist, item_knn, user_knn, *, backend=None):  # type: ignore[no-untyped-def]
    """Dispatching neighbourhood terms of candidates; see ``reference.blend_terms``."""
    impl = resolve_backend(backend, top.device).module
    return impl.blend_terms(top, users, depth, hist, item_knn, user_knn)


def item_neighbours(users, items, residuals, n_items, size, shrink, *, backend=None):  # type: ignore[no-untyped-def]
    """Dispatching ``item_neighbours``; see ``reference.item_neighbours``."""
    impl = resolve_backend(backend, users.device).module
    return impl.item_neighbours(users, items, residuals, n_items, size, shrink)


def knn_predict(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching item-kNN prediction; see ``reference.knn_predict``."""
    return resolve_backend(backend, args[0].device).module.knn_predict(*args, **kwargs)


def user_neighbours(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching user-neighbour lists; see ``reference.user_neighbours``."""
    return resolve_backend(backend, args[0].device).module.user_neighbours(*args, **kwargs)


def user_knn_predict(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching user-kNN correction; see ``reference.user_knn_predict``."""
    return resolve_backend(backend, args[0].device).module.user_knn_predict(*args, **kwargs)


__all__ = [
    "PRIORITY",
    "Backend",
    "BackendUnavailable",
    "advance_histories",
    "available_backends",
    "blend_terms",
    "item_neighbours",
    "knn_predict",
    "mf_adagrad_step",
    "mf_sgd_step",
    "reference",
    "rerank_blend",
    "rerank_mf",
    "resolve_backend",
    "score_topk",
    "softmax_step",
    "user_knn_predict",
    "user_neighbours",
    "user_queries",
]
