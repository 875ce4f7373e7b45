"""The kernel backend contract."""

from __future__ import annotations

import pytest

from lrec_fast import kernels


def test_auto_and_explicit_backends(monkeypatch):
    monkeypatch.delenv("LREC_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter tests may set it
    assert kernels.resolve_backend(None).name == kernels.available_backends()[0]
    assert kernels.available_backends()[:2] == ["numba", "torch"]  # no triton on this machine
    assert kernels.resolve_backend("torch").name == "torch"
    assert kernels.resolve_backend("NUMBA").name == "numba"
    monkeypatch.setenv("LREC_BACKEND", "torch")
    assert kernels.resolve_backend(None).name == "torch"
    for name in ("triton", "cuda-magic"):
        monkeypatch.setenv("LREC_BACKEND", name)
        with pytest.raises(kernels.BackendUnavailable, match=name):
            kernels.resolve_backend(None)
        with pytest.raises(kernels.BackendUnavailable):
            kernels.resolve_backend(name)
