"""The integer dot of the int8 scan's prefilter (``kernels/int_dot.py``): every instruction
set this machine can run against numpy's int64 dot, the query quantisation's error bound, and
the choice of instruction set."""

from __future__ import annotations

import numpy as np
import pytest

int_dot = pytest.importorskip("lrec_fast.kernels.int_dot")
numba = pytest.importorskip("numba")

HOST_MODES = ["generic"] + [m for m in ("avx2", "avx512") if int_dot.MODE in
                            {"avx2": ("avx2", "avx512"), "avx512": ("avx512",)}[m]]  # fmt: skip


def dot_all(mode: str, dim: int):  # type: ignore[no-untyped-def]
    idot = int_dot.make_idot(mode)

    @numba.njit
    def run(items, q16, out):  # type: ignore[no-untyped-def]
        for j in range(items.shape[0]):
            out[j] = idot(items, j, q16, dim)  # dim: a closure constant, so a literal

    return run


@pytest.mark.parametrize("mode", HOST_MODES)
@pytest.mark.parametrize("dim", [16, 48, 64, 384, 1024])
def test_idot_equals_the_int64_dot(rng, mode, dim):
    n = 37
    items = rng.integers(-128, 128, (n, dim)).astype(np.int8)
    items[0], items[1] = -128, 127  # the extremes: the sums int32 must hold
    quant = int_dot.quantize_query(rng.standard_normal(dim).astype(np.float32))
    q16 = quant.q16.copy()
    if dim <= 512:
        q16[: dim // 2] = -32767  # the largest query the quantiser makes at this size
    out = np.zeros(n, np.int64)
    dot_all(mode, dim)(items, q16, out)
    np.testing.assert_array_equal(out, items.astype(np.int64) @ q16.astype(np.int64))


def test_idot_rejects_unsuitable_dims():
    with pytest.raises(Exception, match="multiple of 16"):
        dot_all("generic", 40)(np.zeros((1, 40), np.int8), np.zeros(40, np.int16),
                               np.zeros(1, np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="mode"):
        int_dot.make_idot("sse")


@pytest.mark.parametrize("dim", [16, 64, 384, 1024])
def test_quantised_query_error_stays_within_its_bound(rng, dim):
    """For rows at the int8 extremes and random ones, the fp32 dot (two summation orders)
    differs from scale * idot by less than the bound the scan's prefilter relies on."""
    levels = min(32767, (2**31 - 1) // (128 * dim))
    for trial in range(20):
        q = (rng.standard_normal(dim) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
        if trial == 0:  # every element rounds by almost half a step, all the same way
            q = (rng.integers(0, levels - 1, dim) + 0.499).astype(np.float32)
            q[0] = levels
        quant = int_dot.quantize_query(q)
        assert np.abs(quant.q16.astype(np.int64)).max() <= levels
        rows = rng.integers(-128, 128, (200, dim)).astype(np.int8)
        rows[0] = np.where(q > 0, 127, -128)  # the largest score this query can get
        rough = float(quant.scale) * (rows.astype(np.int64) @ quant.q16.astype(np.int64))
        f = rows.astype(np.float32)
        for exact in (f @ q, np.array([sum(np.float32(a) * b for a, b in zip(q, r, strict=True))
                                       for r in f[:5]], np.float32)):  # fmt: skip
            err = np.abs(exact.astype(np.float64) - rough[: len(exact)])
            assert (err <= float(quant.bound)).all(), (err.max(), quant.bound)


def test_quantize_query_declines_what_it_cannot_bound():
    assert int_dot.quantize_query(np.zeros(16, np.float32)) is None
    assert int_dot.quantize_query(np.array([1.0, np.nan] * 8, np.float32)) is None
    assert int_dot.quantize_query(np.array([1.0, np.inf] * 8, np.float32)) is None
    big = int_dot.quantize_query(np.full(16, 3e38, np.float32))
    assert big is not None and np.isfinite(big.bound)


def test_instruction_set_follows_numbas_target(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "generic")
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    assert int_dot._target_mode() == "generic"
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512bw")
    want = "avx2" if int_dot.platform.machine().lower() in ("x86_64", "amd64") else "generic"
    assert int_dot._target_mode() == want
