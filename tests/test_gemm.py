"""``kernels/gemm.py``: oneDNN's product (where torch has it) against torch.mm on fresh random
inputs and awkward shapes, and the fallback when the private operator is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrec_fast.kernels import gemm


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (37, 5, 48), (517, 64, 100), (3, 9, 384),
                                           (0, 4, 8), (4, 0, 8), (4, 3, 0)])  # fmt: skip
def test_matmul_nt_equals_torch_mm(rng, m, n, k):
    a = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    got = gemm.matmul_nt(a, b)
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
    # against exact arithmetic, within float32 summation's bound (k * eps * sum |a_i b_i|): two
    # float32 products that sum in different orders differ by 1.5e-5 at k = 384 (1 run in ~50)
    exact = a.double() @ b.double().T
    bound = k * 2.0**-24 * (a.double().abs() @ b.double().abs().T) + 1e-30
    assert bool(((got.double() - exact).abs() <= bound).all())
    torch.testing.assert_close(got, torch.mm(a, b.T), rtol=1e-4, atol=1e-4)


def test_matmul_nt_views_and_extreme_values(rng):
    a = torch.from_numpy(rng.standard_normal((40, 16)).astype(np.float32))
    a[0, 0], a[1, 1], a[2, :] = float("inf"), float("nan"), 1e30
    b = torch.from_numpy(rng.standard_normal((32, 12)).astype(np.float32)).T[:, ::2]  # a view
    want = torch.mm(a, b.T)
    got = gemm.matmul_nt(a, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    with pytest.raises(TypeError, match="float32"):
        gemm.matmul_nt(a.double(), b)


def test_falls_back_to_torch_mm_without_the_operator(monkeypatch, rng):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    gemm._onednn_ok.cache_clear()
    try:
        assert gemm.backend() == "torch.mm"
        a = torch.from_numpy(rng.standard_normal((7, 5)).astype(np.float32))
        torch.testing.assert_close(gemm.matmul_nt(a, a), torch.mm(a, a.T))
    finally:
        gemm._onednn_ok.cache_clear()
