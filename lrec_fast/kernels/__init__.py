"""The one dispatch point for the hot paths (scoring + top-k, the fused update step).

Backend contract (the same for every hot path):
- ``backend=None`` (or ``"auto"``) takes ``$LREC_BACKEND`` if set, else the best backend this
  machine can run, in the order triton (CUDA) > numba (CPU) > torch;
- a backend named explicitly (argument or ``$LREC_BACKEND``) runs, or raises
  ``BackendUnavailable`` saying why: never a silent fallback;
- ``torch`` (``reference.py``) is always there and is the truth the others are tested against.

Implemented: numba (``cpu.py``) and torch. triton is a registered name that reports itself
unavailable until its kernels land.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

from . import reference

PRIORITY = ("triton", "numba", "torch")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType


def _load(name: str) -> Backend:
    if name == "torch":
        return Backend("torch", reference)
    if name == "numba":
        try:
            from . import cpu
        except ImportError as exc:  # numba missing or broken
            raise BackendUnavailable(f"backend 'numba' cannot be imported: {exc}") from exc
        return Backend("numba", cpu)
    if name == "triton":
        raise BackendUnavailable("backend 'triton' is not implemented in this release yet")
    raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(PRIORITY)}")


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, best first."""
    out = []
    for name in PRIORITY:
        try:
            _load(name)
        except BackendUnavailable:
            continue
        out.append(name)
    return out


def resolve_backend(name: str | None = None) -> Backend:
    """Pick the backend per the contract above."""
    want = name if name not in (None, "auto") else os.environ.get("LREC_BACKEND") or "auto"
    if want == "auto":
        return _load(available_backends()[0])
    return _load(want.strip().lower())


def score_topk(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching ``score_topk``; see ``reference.score_topk`` for the exact semantics."""
    return resolve_backend(backend).module.score_topk(*args, **kwargs)


def mf_sgd_step(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching fused update step; see ``reference.mf_sgd_step`` for the exact semantics."""
    return resolve_backend(backend).module.mf_sgd_step(*args, **kwargs)


def mf_adagrad_step(*args, backend: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    """Dispatching row-wise Adagrad step; see ``reference.mf_adagrad_step``."""
    return resolve_backend(backend).module.mf_adagrad_step(*args, **kwargs)


__all__ = [
    "PRIORITY",
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "mf_adagrad_step",
    "mf_sgd_step",
    "reference",
    "resolve_backend",
    "score_topk",
]
