"""The Triton kernels against the torch reference, run on the CPU by Triton's interpreter
(TRITON_INTERPRET=1) at small sizes: tiles that do not divide N, k beyond the eligible, ties,
exclusions, extreme values, duplicates and empty batches. benchmarks/gpu_check.py runs the same
comparisons compiled on a GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lrec_fast.kernels import _load
from lrec_fast.kernels import reference as ref

# Without a GPU, Triton must be in interpreter mode before it is first imported (at collection,
# so for the rest of this process; the backend is still never chosen automatically on a CPU).
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed")


@pytest.fixture(scope="module")
def tk():
    """The Triton backend and the device its tensors live on."""
    return _load("triton").module, ("cuda" if CUDA else "cpu")


def on(dev: str, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(dev) for t in ts]


# The interpreter runs each program in numpy (seconds per call): dtypes on one small shape,
# the awkward shapes in fp32.
CASES = [("float32", 1, 1, 16, 1), ("float32", 17, 257, 16, 200), ("float32", 2, 1000, 64, 5)]
CASES += [(dt, 3, 300, 100, 10) for dt in ("float32", "float16", "bfloat16", "int8")]


@pytest.mark.parametrize(("dtype", "b", "n", "d", "k"), CASES)
def test_score_topk(tk, rng, dtype, b, n, d, k):
    mod, dev = tk
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32))
    table = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    row_scale = None
    if dtype == "int8":
        table, row_scale = ref.quantize_rows(table)
    else:
        table = table.to(getattr(torch, dtype))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    exclude = [rng.integers(0, n, size=rng.integers(0, 20)).tolist() for _ in range(b)]
    if b > 1:
        exclude[1] = list(range(n))
    kw = dict(query_scale=0.5, item_scale=1.5, exclude=exclude)
    qd, td, bd, rd = on(dev, q, table, bias, row_scale)
    gs, gi = mod.score_topk(qd, td, k, item_bias=bd, row_scale=rd, **kw)
    ws, wi = ref.score_topk(q, table, k, item_bias=bias, row_scale=row_scale, **kw)
    np.testing.assert_allclose(gs.cpu().numpy(), ws.numpy(), rtol=1e-5, atol=1e-4)
    # same order up to float32 rounding: equal where the reference's scores are apart
    gap = np.diff(ws.numpy(), axis=1, prepend=np.inf, append=-np.inf)
    apart = (np.abs(gap[:, :-1]) > 1e-4) & (np.abs(gap[:, 1:]) > 1e-4)
    np.testing.assert_array_equal(gi.cpu().numpy()[apart], wi.numpy()[apart])


def test_exact_ties_extremes_and_empty(tk, rng):
    mod, dev = tk
    n, d = 200, 16
    table = torch.from_numpy(rng.integers(-2, 3, (n, d)).astype(np.float32))
    table[100:] = table[:100].clone()
    q = torch.from_numpy(rng.integers(-2, 3, (5, d)).astype(np.float32))
    bias = torch.from_numpy(rng.integers(-3, 4, n).astype(np.float32))
    bias[7] = float("-inf")
    ptr = torch.tensor([0, 3, 3, 5, 5, 9])
    csr = (ptr, torch.tensor([1, 1, 199, 0, 5, 10, 11, 12, 10]))
    for k in (1, 10, n + 3):
        got = mod.score_topk(*on(dev, q, table), k, item_bias=bias.to(dev), exclude=csr)
        want = ref.score_topk(q, table, k, item_bias=bias, exclude=csr)
        torch.testing.assert_close(got[0].cpu(), want[0])
        torch.testing.assert_close(got[1].cpu(), want[1])
    huge = torch.tensor([[1e30, 1.0]])
    v = torch.tensor([[1e30, 0.0], [-1e30, 0.0], [float("inf"), 0.0], [2.0, -2.0]])
    got = mod.score_topk(*on(dev, huge, v), 4)
    want = ref.score_topk(huge, v, 4)
    torch.testing.assert_close(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1])
    assert mod.score_topk(*on(dev, torch.zeros(0, 2), v), 3)[0].shape == (0, 3)


def _launch_shapes() -> list:
    from lrec_fast.kernels.triton_score import ScoreConfig

    return [
        ScoreConfig(1, 64, 16, use_dot=False),
        ScoreConfig(2, 128, 32, use_dot=False, num_warps=8, progs_per_sm=1),
        ScoreConfig(16, 64, 64),
        ScoreConfig(32, 64, 16, precision="tf32x3", progs_per_sm=8),
    ]


@pytest.mark.parametrize("cfg", _launch_shapes(), ids=repr)
def test_every_launch_shape_is_exact(tk, rng, cfg):
    """Every launch shape gpu_check.py may time returns the reference's answer, ties included:
    integer-valued data (exact in fp32, tf32x3 too), N not a multiple of block_n, d of block_d."""
    mod, dev = tk
    b, n, d = 5, 300, 40
    table = torch.from_numpy(rng.integers(-2, 3, (n, d)).astype(np.float32))
    table[150:] = table[:150].clone()
    q = torch.from_numpy(rng.integers(-2, 3, (b, d)).astype(np.float32))
    bias = torch.from_numpy(rng.integers(-3, 4, n).astype(np.float32))
    exclude = [rng.integers(0, n, size=30).tolist() for _ in range(b)]
    exclude[2] = list(range(n))
    for k in (7, 64):
        got = mod.score_topk(*on(dev, q, table), k, item_bias=bias.to(dev), exclude=exclude,
                             config=cfg)  # fmt: skip
        want = ref.score_topk(q, table, k, item_bias=bias, exclude=exclude)
        torch.testing.assert_close(got[0].cpu(), want[0])
        torch.testing.assert_close(got[1].cpu(), want[1])
    with pytest.raises(ValueError, match="cannot serve"):
        mod.score_topk(*on(dev, q, table), cfg.block_n + 1, config=cfg)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_update_matches_reference(tk, rng, optimizer):
    mod, dev = tk
    n_rows, d = 50, 24

    def tables():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(n_rows, d, generator=g) * 0.1, torch.randn(n_rows, d, generator=g)
                * 0.1, torch.zeros(n_rows), torch.zeros(n_rows)]  # fmt: skip

    want, got = tables(), [t.to(dev) for t in tables()]
    s_w, s_g = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    mu_w, mu_g = torch.tensor([3.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    acc_w = tuple(torch.zeros(n_rows) for _ in range(4))
    acc_g = tuple(a.to(dev, copy=True) for a in acc_w)
    for n in (0, 1, 7, 64, 5, 33):
        u = torch.from_numpy(rng.integers(0, 10, n))  # heavy duplication
        i = torch.from_numpy(rng.integers(0, n_rows, n))
        r = torch.from_numpy(rng.uniform(1, 5, n).astype(np.float32))
        gains = (float(rng.uniform(0, 10)), float(rng.uniform(0, 2)), 1.0, 0.0)
        if optimizer == "sgd":
            lw = ref.mf_sgd_step(*want, s_w, mu_w, u, i, r, 0.1, 0.01, gains=gains)
            lg = mod.mf_sgd_step(*got, s_g, mu_g, u.to(dev), i.to(dev), r.to(dev), 0.1, 0.01,
                                 gains=gains)  # fmt: skip
        else:
            lw = ref.mf_adagrad_step(*want, s_w, mu_w, u, i, r, 0.05, 0.01, acc_w, gains=gains)
            lg = mod.mf_adagrad_step(*got, s_g, mu_g, u.to(dev), i.to(dev), r.to(dev), 0.05,
                                     0.01, acc_g, gains=gains)  # fmt: skip
        assert lg == pytest.approx(lw, rel=1e-5, abs=1e-7)
        for a, b in zip(got, want, strict=True):
            # 1e-5 of the table's scale: Adagrad's step is g / |g| on an element's first update,
            # so where a gradient nearly cancels, two fp32 summation orders of the duplicates
            # legitimately differ by ~2e-6 of the scale (the fp32 reference is as far from
            # float64 arithmetic there as the kernel is).
            atol = 1e-5 * max(float(b.abs().max()), 1e-3)
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=atol)
        torch.testing.assert_close(s_g, s_w)
        torch.testing.assert_close(mu_g, mu_w)
    if optimizer == "adagrad":
        for a, b in zip(acc_g, acc_w, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gpu_check_script_runs(tmp_path):
    """benchmarks/gpu_check.py stays runnable: its own CPU smoke mode (interpreter, tiny sizes)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-W", "ignore", str(script), "--cpu-smoke"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "ALL CHECKS PASSED" in res.stdout


def test_the_neighbourhood_kernels_run_on_the_host(tk):
    """The corrections' tables are CPU tables: on the Triton backend they take numba's sparse
    kernels (the torch references are dense: n_items^2 and n_users x n_items memory)."""
    from lrec_fast.kernels import cpu

    module, _ = tk
    for name in ("item_neighbours", "knn_predict", "user_neighbours", "user_knn_predict"):
        assert getattr(module, name) is getattr(cpu, name), name
