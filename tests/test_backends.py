"""Every fast backend against the torch reference (and the update against the dense rule),
on fresh random inputs: awkward sizes, duplicates, empty batches, exclusions, extreme values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrec_fast import kernels
from lrec_fast.kernels import reference as ref

FAST = [b for b in kernels.available_backends() if b != "torch"]
pytestmark = pytest.mark.skipif(not FAST, reason="no fast backend on this machine")


@pytest.fixture(params=FAST)
def backend(request) -> str:
    return request.param


def as_dtype(v: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if dtype == "int8":
        return ref.quantize_rows(v)
    return v.to(getattr(torch, dtype)), None


def check_topk(got, want, q, table, row_scale, bias, alpha, exclude, k):
    """Scores equal to tolerance, and every returned index is eligible, distinct and scores what
    we say (float64 recomputation): the order may differ from the reference only inside ties
    closer than float32 rounding."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape == gi.shape == (q.shape[0], k)
    assert gs.dtype == torch.float32 and gi.dtype == torch.int64
    np.testing.assert_allclose(gs.numpy(), ws.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(gi.numpy() < 0, wi.numpy() < 0)
    full = table.double() * (row_scale.double()[:, None] if row_scale is not None else 1.0)
    exact = (q.double() @ full.T) * alpha + (bias.double() if bias is not None else 0.0)
    for b in range(q.shape[0]):
        idx = gi[b][gi[b] >= 0]
        assert len(set(idx.tolist())) == len(idx)
        banned = set(exclude[b]) if exclude is not None else set()
        assert not banned & set(idx.tolist())
        fin = torch.isfinite(gs[b][: len(idx)])
        np.testing.assert_allclose(exact[b, idx][fin].numpy(), gs[b][: len(idx)][fin].numpy(),
                                   rtol=1e-4, atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize(
    ("b", "n", "d", "k"),
    [(1, 1, 16, 1), (3, 1001, 64, 10), (64, 517, 100, 100), (1, 70_001, 16, 10),
     (3, 70_003, 64, 5), (2, 37, 16, 50), (9, 300, 16, 1), (64, 40_001, 16, 10)],
)  # fmt: skip
def test_score_topk_matches_reference(backend, rng, dtype, b, n, d, k):
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32))
    table, row_scale = as_dtype(torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)),
                                dtype)  # fmt: skip
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    exclude = [rng.integers(0, n, size=rng.integers(0, 40)).tolist() for _ in range(b)]
    if b > 1:
        exclude[1] = list(range(n))  # an all-excluded row
    kw = dict(item_bias=bias, query_scale=0.5, item_scale=1.5, exclude=exclude,
              row_scale=row_scale)  # fmt: skip
    got = kernels.score_topk(q, table, k, backend=backend, **kw)
    want = ref.score_topk(q, table, k, **kw)
    check_topk(got, want, q, table.float(), row_scale, bias, 0.75, exclude, k)


@pytest.mark.parametrize(("b", "n"), [(1, 70_001), (4, 999), (64, 5000)])
def test_exact_ties_go_to_the_lower_index(backend, rng, b, n):
    """Small integers: every score is exact, so indices must equal the reference's exactly
    (mass ties, duplicated rows, CSR exclusions with duplicates, k beyond the eligible)."""
    d = 16
    table = torch.from_numpy(rng.integers(-2, 3, (n, d)).astype(np.float32))
    table[n // 2 :] = table[: n - n // 2].clone()  # every row has a twin
    q = torch.from_numpy(rng.integers(-2, 3, (b, d)).astype(np.float32))
    bias = torch.from_numpy(rng.integers(-3, 4, n).astype(np.float32))
    rows = [rng.integers(0, n, size=rng.integers(0, 30)) for _ in range(b)]
    ptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]), dtype=torch.int64)
    csr = (ptr, torch.from_numpy(np.concatenate(rows).astype(np.int64)))
    for k in (1, 10, 100, n + 5):
        got = kernels.score_topk(q, table, k, item_bias=bias, exclude=csr, backend=backend)
        want = ref.score_topk(q, table, k, item_bias=bias, exclude=csr)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("b", [1, 3, 12])  # 12: the GEMM-tile path on numba
def test_sorted_and_malformed_csr_exclusions(backend, rng, b):
    """Sorted rows (what the facade passes), rows with duplicates, empty rows and negative
    indices give the reference's answer; a malformed indptr is a clear error (before this
    check, an indptr past the end of no indices at all sent the numba scan out of bounds)."""
    n, d = 300, 16
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32))
    table = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    for rows in (
        [np.sort(rng.integers(0, n, rng.integers(0, 60))) for _ in range(b)],  # dups, sorted
        [np.array([-1, 4, 4, 9])] + [np.arange(0, n, 2)] * (b - 1),  # a negative index first
        [np.zeros(0, np.int64)] * b,
    ):
        ptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]))
        csr = (ptr, torch.from_numpy(np.concatenate(rows).astype(np.int64)))
        got = kernels.score_topk(q, table, 7, exclude=csr, backend=backend)
        want = ref.score_topk(q, table, 7, exclude=csr)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    four, none = torch.arange(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    for bad, idx in (([1] + [4] * b, four), ([0] + [3] * b, four), ([0] + [9] * b, none),
                     ([0, 4] + [2] * (b - 1) if b > 1 else [0, 5], four)):  # fmt: skip
        with pytest.raises(ValueError, match="indptr must start at 0"):
            kernels.score_topk(q, table, 3, exclude=(torch.tensor(bad), idx), backend=backend)


@pytest.mark.parametrize("b", [1, 5])
def test_exclusion_rows_sorted_or_not_give_one_csr(rng, b):
    """Rows already ascending and non-negative (the facade's) skip the sort; unsorted ones,
    duplicates and negative indices are sorted and cleaned: the same CSR either way."""
    cpu = pytest.importorskip("lrec_fast.kernels.cpu")
    rows = [rng.integers(-2, 50, rng.integers(0, 30)) for _ in range(b)]
    clean = [np.sort(r[r >= 0]) for r in rows]
    for given in (rows, clean):
        ptr, idx = cpu.exclusion_csr([r.tolist() for r in given], b)
        assert ptr.tolist() == np.concatenate([[0], np.cumsum([len(r) for r in clean])]).tolist()
        assert idx.tolist() == np.concatenate(clean).tolist()


def test_extreme_values_and_empty_inputs(backend):
    q = torch.tensor([[1e30, 1.0], [0.0, 0.0], [1.0, -1.0]])
    v = torch.tensor([[1e30, 0.0], [-1e30, 0.0], [1.0, 1.0], [float("inf"), 0.0], [2.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, float("-inf"), 0.0, 1.0])
    many = q.repeat(4, 1)  # 12 queries: the numba backend's GEMM-tile path, not the fused scan
    for k in (1, 3, 7):
        for qq in (q, many):
            got = kernels.score_topk(qq, v, k, item_bias=bias, backend=backend)
            want = ref.score_topk(qq, v, k, item_bias=bias)
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
    empty_q = kernels.score_topk(torch.zeros(0, 2), v, 3, backend=backend)
    assert empty_q[0].shape == (0, 3) and empty_q[1].shape == (0, 3)
    no_items = kernels.score_topk(q, torch.zeros(0, 2), 2, backend=backend)
    assert (no_items[1] == -1).all() and torch.isinf(no_items[0]).all()
    assert kernels.score_topk(q, v, 0, backend=backend)[1].shape == (3, 0)
    with pytest.raises(ValueError, match="row_scale"):
        kernels.score_topk(q, v.to(torch.int8), 2, backend=backend)
    with pytest.raises(ValueError, match="shapes"):
        kernels.score_topk(q, torch.zeros(4, 3), 2, backend=backend)


def test_int8_catalogue_recall(backend, rng):
    """A quantised catalogue finds the fp32 top 10 (recall@10 >= 0.99) on embeddings with the
    structure of trained ones (a few strong directions plus noise)."""
    n, d, b = 50_000, 64, 512  # 512 queries: the mean recall is ~0.994, its spread ~0.0015
    basis = rng.standard_normal((8, d))
    table = rng.standard_normal((n, 8)) @ basis + 0.3 * rng.standard_normal((n, d))
    table = torch.from_numpy(table.astype(np.float32))
    q = torch.from_numpy((rng.standard_normal((b, 8)) @ basis).astype(np.float32))
    _, want = kernels.score_topk(q, table, 10, backend=backend)
    values, scale = ref.quantize_rows(table)
    _, got = kernels.score_topk(q, values, 10, row_scale=scale, backend=backend)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist(),
                                                                 strict=True)])  # fmt: skip
    assert recall >= 0.99, recall


def dense_rule(tables, mu, steps, wd, adagrad=False, eps=1e-8, gains=(1.0, 1.0, 1.0, 1.0)):
    """The dense decoupled rule in float64 numpy: every row decays every step (an empty batch
    is no step at all, as in every backend); table w's gradient step is scaled by gains[w]."""
    U, V, bu, bv = (t.copy() for t in tables)
    acc = [np.zeros(len(U)), np.zeros(len(V)), np.zeros(len(U)), np.zeros(len(V))]
    for users, items, r, lr in steps:
        n = len(users)
        if n == 0:
            continue
        e = r - (mu + bu[users] + bv[items] + (U[users] * V[items]).sum(1))
        g = -2.0 * e / n
        gU, gV = np.zeros_like(U), np.zeros_like(V)
        gbu, gbv = np.zeros_like(bu), np.zeros_like(bv)
        np.add.at(gU, users, g[:, None] * V[items])
        np.add.at(gV, items, g[:, None] * U[users])
        np.add.at(gbu, users, g)
        np.add.at(gbv, items, g)
        if adagrad:
            for a, grad in zip(acc, (gU, gV, gbu, gbv), strict=True):
                touched = np.zeros(len(a), bool)
                touched[users if len(a) == len(U) and grad is not gV and grad is not gbv
                        else items] = True  # fmt: skip
                sq = (grad**2).mean(1) if grad.ndim == 2 else grad**2
                a[touched] += sq[touched]
            gU = gU / (np.sqrt(acc[0])[:, None] + eps)
            gV = gV / (np.sqrt(acc[1])[:, None] + eps)
            gbu, gbv = gbu / (np.sqrt(acc[2]) + eps), gbv / (np.sqrt(acc[3]) + eps)
        gU, gV, gbu, gbv = (x * w for x, w in zip((gU, gV, gbu, gbv), gains, strict=True))
        U, V = U - lr * gU - lr * wd * U, V - lr * gV - lr * wd * V
        bu, bv = bu - lr * gbu - lr * wd * bu, bv - lr * gbv - lr * wd * bv
    return U, V, bu, bv


@pytest.mark.parametrize("gains", [(1.0, 1.0, 1.0, 1.0), (6.0, 0.5, 2.0, 0.0)])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_update_equals_dense_rule_after_1000_steps(backend, rng, optimizer, gains):
    nu, ni, d, wd = 40, 60, 16, 0.02
    tables = [rng.normal(0, 0.3, (nu, d)), rng.normal(0, 0.3, (ni, d)),
              rng.normal(0, 0.3, nu), rng.normal(0, 0.3, ni)]  # fmt: skip
    steps = []
    for t in range(1000):
        n = int(rng.integers(0, 24))  # empty batches too
        users, items = rng.integers(0, nu // 2, n), rng.integers(0, ni, n)
        if n > 1:
            users[0], items[1] = users[-1], items[0]  # duplicates in every batch
        lr = (0.05 if optimizer == "sgd" else 0.01) * (1 + np.sin(t / 40))  # a schedule
        steps.append((users, items, rng.uniform(1, 5, n), lr))
    want = dense_rule(tables, 3.5, steps, wd, adagrad=optimizer == "adagrad", gains=gains)
    raw = [torch.tensor(t, dtype=torch.float32) for t in tables]
    scales = torch.ones(4, dtype=torch.float64)
    mu = torch.tensor([3.5], dtype=torch.float64)
    acc = tuple(torch.zeros(len(t)) for t in (raw[0], raw[1], raw[2], raw[3]))
    for users, items, r, lr in steps:
        args = (*raw, scales, mu, torch.from_numpy(users), torch.from_numpy(items),
                torch.from_numpy(r).float(), lr, wd)  # fmt: skip
        if optimizer == "sgd":
            kernels.mf_sgd_step(*args, learn_mu=False, gains=gains, backend=backend)
        else:
            kernels.mf_adagrad_step(*args, acc, learn_mu=False, gains=gains, backend=backend)
        if float(scales.min()) < 0.5:  # fold, as the model does
            for k in range(4):
                raw[k].mul_(float(scales[k]))
            scales.fill_(1.0)
    for k in range(4):
        got = raw[k].double().numpy() * float(scales[k])
        err = np.abs(got - want[k]).max() / np.abs(want[k]).max()
        assert err <= 1e-5, (k, err)


def test_update_matches_reference_step_by_step(backend, rng):
    n_rows, d = 200, 64
    base = [torch.randn(n_rows, d) * 0.1, torch.randn(n_rows, d) * 0.1, torch.zeros(n_rows),
            torch.zeros(n_rows), torch.ones(4, dtype=torch.float64),
            torch.tensor([3.0], dtype=torch.float64)]  # fmt: skip
    mine = [t.clone() for t in base]
    for n in (0, 1, 3, 64, 1024):
        u = torch.from_numpy(rng.integers(0, 20, n))  # heavy duplication
        i = torch.from_numpy(rng.integers(0, n_rows, n))
        r = torch.from_numpy(rng.uniform(1, 5, n).astype(np.float32))
        gains = (float(rng.uniform(0, 20)), float(rng.uniform(0, 2)), 1.0, 0.5)
        want = ref.mf_sgd_step(*base, u, i, r, 0.1, 0.01, gains=gains)
        got = kernels.mf_sgd_step(*mine, u, i, r, 0.1, 0.01, gains=gains, backend=backend)
        assert got == pytest.approx(want, rel=1e-5)
        for a, b in zip(mine, base, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", kernels.available_backends())
@pytest.mark.parametrize(
    ("gains", "lr", "msg"),
    [
        ((1.0, 1.0, 1.0), 0.1, "gains"),
        ((1.0, 1.0, 1.0, -1.0), 0.1, "gains"),
        ((1.0, float("nan"), 1.0, 1.0), 0.1, "gains"),
        ((float("inf"),) * 4, 0.1, "gains"),
        ((1.0,) * 4, 100.0, "weight_decay < 1"),
        ((1.0,) * 4, 300.0, "weight_decay < 1"),
    ],
)
def test_update_rejects_bad_gains_and_rates_and_changes_nothing(name, gains, lr, msg):
    tabs = [
        torch.ones(3, 4),
        torch.ones(3, 4),
        torch.zeros(3),
        torch.zeros(3),
        torch.ones(4, dtype=torch.float64),
        torch.tensor([3.0], dtype=torch.float64),
    ]
    before = [t.clone() for t in tabs]
    one = torch.tensor([0, 1])
    for n in (one, one[:0]):  # the empty batch too
        with pytest.raises(ValueError, match=msg):
            kernels.mf_sgd_step(*tabs, n, n, torch.ones(len(n)), lr, 0.01, gains=gains,
                                backend=name)  # fmt: skip
    for a, b in zip(tabs, before, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the ranking head: histories and the softmax step


def rank_tables(rng: np.random.Generator, n: int, d: int, scale: float = 1.0) -> list[torch.Tensor]:
    """ctx, ctx_acc, tgt, tgt_acc, tgt_bias, tgt_bias_acc with Adagrad sums under way."""

    def t(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * scale)

    acc = [torch.from_numpy(rng.uniform(0, 1, n).astype(np.float32)) for _ in range(3)]
    return [t(n, d), acc[0], t(n, d), acc[1], t(n), acc[2]]


def rank_batch(rng: np.random.Generator, n_items: int, n: int, length: int):
    hist = torch.from_numpy(rng.integers(0, n_items, (n, length)))
    hist[torch.from_numpy(rng.random((n, length)) < 0.3)] = ref.PAD  # ragged
    hist[0] = ref.PAD  # no history at all
    hist[-1, : length // 2] = hist[-1, -1]  # duplicates inside one history
    targets = torch.from_numpy(rng.integers(0, n_items, n))
    targets[: n // 2] = targets[0]  # duplicate targets
    return hist, targets


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize(
    ("n_items", "d", "n", "length"),
    [(7, 3, 1, 1), (50, 16, 33, 5), (301, 100, 64, 20), (1000, 64, 3, 7)],
)
def test_softmax_step_matches_reference(backend, rng, sampled, n_items, d, n, length):
    hist, targets = rank_batch(rng, n_items, n, length)
    if sampled:  # the targets plus some others, with a log-Q correction
        extra = torch.from_numpy(rng.integers(0, n_items, 2 * n + 3))
        cand = torch.unique(torch.cat([targets, extra]))
        logq = torch.from_numpy(rng.normal(0, 2, cand.numel()).astype(np.float32))
    else:
        cand, logq = torch.arange(n_items), None
    weights = 0.8 ** torch.arange(length, dtype=torch.float32)
    want, got = rank_tables(rng, n_items, d), None
    got = [x.clone() for x in want]
    args = (hist, weights, torch.searchsorted(cand, targets), cand, logq, 0.05)
    lw, okw = ref.softmax_step(*want, *args)
    lg, okg = kernels.softmax_step(*got, *args, backend=backend)
    assert okw and okg
    assert lg == pytest.approx(lw, rel=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_softmax_step_reports_non_finite(backend, rng):
    for bad in (float("inf"), float("nan"), 3e38):
        want = rank_tables(rng, 20, 4)
        want[0][3] = bad  # a context row that a history names
        got = [x.clone() for x in want]
        hist, cand = torch.tensor([[3, -1], [1, 3]]), torch.arange(20)
        args = (hist, torch.ones(2), torch.tensor([5, 6]), cand, None, 0.1)
        _, okw = ref.softmax_step(*want, *args)
        _, okg = kernels.softmax_step(*got, *args, backend=backend)
        assert not okw and not okg


@pytest.mark.parametrize(("n_users", "length", "n"), [(1, 1, 0), (3, 4, 1), (17, 20, 500)])
def test_advance_histories_matches_reference(backend, rng, n_users, length, n):
    recent = torch.from_numpy(rng.integers(-1, 50, (n_users, length)))
    users = torch.from_numpy(rng.integers(0, n_users, n))  # many repeats: order matters
    items = torch.from_numpy(rng.integers(0, 50, n))
    want, got = recent.clone(), recent.clone()
    hw = ref.advance_histories(want, users, items)
    hg = kernels.advance_histories(got, users, items, backend=backend)
    assert torch.equal(hg, hw) and torch.equal(got, want) and hg.shape == (n, length)


@pytest.mark.parametrize(
    ("n_users", "length", "b", "d"), [(0, 3, 2, 4), (1, 1, 1, 16), (5, 4, 7, 3), (40, 20, 64, 100)]
)
def test_user_queries_match_reference(backend, rng, n_users, length, b, d):
    """Ragged histories (empty slots anywhere, fully empty rows), repeated and unknown users
    (-1: a zero query), one row repeated inside a history, and large and tiny weights."""
    n_items = 30
    ctx = torch.from_numpy(
        (rng.standard_normal((n_items, d)) * 10.0 ** rng.integers(-3, 4, (n_items, 1))).astype(
            np.float32
        )
    )
    recent = torch.from_numpy(rng.integers(-1, n_items, (n_users, length)))
    if n_users:
        recent[0] = -1  # no history at all
    if n_users > 1:
        recent[-1, : min(length, 3)] = recent[-1, 0].clamp_min(0)  # one item thrice
    users = torch.from_numpy(rng.integers(-1, n_users, b) if n_users else np.full(b, -1))
    weights = torch.from_numpy(
        (rng.random(length) * 2.0 ** rng.integers(-20, 3, length)).astype(np.float32)
    )
    want = ref.user_queries(ctx, recent, users, weights)
    got = kernels.user_queries(ctx, recent, users, weights, backend=backend)
    assert got.shape == want.shape == (b, d) and got.dtype == torch.float32
    # rows of magnitudes 1e-3 to 1e3 cancel: the absolute tolerance follows the largest
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(ctx.abs().max()))
    assert not got[users < 0].any()
    if n_users:
        assert not got[users == 0].any()  # user 0's history is empty
    if n_users > 1 and ((users > 0) & (recent[users.clamp_min(0)] >= 0).any(1)).any():
        assert got.abs().sum() > 0  # (not zeros on both sides)


def test_parallel_and_serial_scans_cache_apart():
    # numba keys its disk cache by name and bytecode, not by compile options: sharing one
    # entry, a process could load the serial scan where the parallel one was asked for
    cpu = pytest.importorskip("lrec_fast.kernels.cpu")
    scans = [
        *cpu._SCANS.values(),
        *(cpu._int8_scan(d, par) for d in (16, 64) for par in (False, True)),
    ]
    names = {d._cache._cache_file._index_name for d in scans}
    assert len(names) == len(scans) == 8


@pytest.mark.parametrize("trial", range(6))
def test_int8_prefilter_keeps_the_exact_scans_results(rng, monkeypatch, trial):
    """The one-query int8 scan rules rows out with an integer dot and an error bound; its
    results must equal the exact scan's bit for bit, on awkward scales, biases and ties."""
    cpu = pytest.importorskip("lrec_fast.kernels.cpu")
    n = [1, 999, 70_001][trial % 3]
    d = [16, 64, 48][trial % 3]
    rows = rng.integers(-128, 128, (n, d)).astype(np.int8)
    rows[n // 2 :] = rows[: n - n // 2]  # twins: exact ties, which go to the lower index
    table = torch.from_numpy(rows)
    scale = np.exp(rng.standard_normal(n) * [0.0, 3.0][trial % 2]).astype(np.float32)
    if trial == 5:
        scale[::7] = [np.inf, 0.0, -1.0][trial % 3]  # non-finite, zero and negative scales
    bias = (rng.standard_normal(n) * [0.0, 1e-3, 1e3][trial % 3]).astype(np.float32)
    bias[rng.integers(0, n, 3)] = [np.inf, -np.inf, np.nan]
    q = torch.from_numpy(
        (rng.standard_normal((1, d)) * 10 ** rng.uniform(-4, 4)).astype(np.float32)
    )
    if trial == 4:
        q = torch.from_numpy(rng.integers(-3, 4, (1, d)).astype(np.float32))  # exact scores
    exclude = [rng.integers(0, n, size=rng.integers(0, 40)).tolist()]
    kw = dict(item_bias=torch.from_numpy(bias), row_scale=torch.from_numpy(scale),
              query_scale=-0.5 if trial == 3 else 0.5, exclude=exclude)  # fmt: skip
    for k in (1, 10, 100, n + 3):
        got = cpu.score_topk(q, table, k, **kw)
        with monkeypatch.context() as m:
            m.setattr(cpu, "quantize_query", lambda q: None)  # the exact scan only
            want = cpu.score_topk(q, table, k, **kw)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def rerank_case(rng, b: int, m: int, n_items: int, integer: bool):
    """Candidate lists [b, m] (best first, -1 padding at the end of some rows) with scores,
    and a rating model: integer-valued (exact in float32: ties are real) or random."""
    d, n_users = 8, 5
    draw = (lambda *s: rng.integers(-2, 3, s).astype(np.float32)) if integer else (
        lambda *s: rng.standard_normal(s).astype(np.float32))  # fmt: skip
    tables = [torch.from_numpy(draw(n_users, d)), torch.from_numpy(draw(n_items, d)),
              torch.from_numpy(draw(n_users)), torch.from_numpy(draw(n_items))]  # fmt: skip
    scales = torch.tensor([1.0, 0.5, 2.0, 1.0] if integer else rng.uniform(0.5, 2, 4).tolist(),
                          dtype=torch.float64)  # fmt: skip
    mu = torch.tensor([3.0 if integer else 3.3], dtype=torch.float64)
    top = torch.from_numpy(
        np.array([rng.permutation(n_items)[:m] for _ in range(b)], dtype=np.int64).reshape(b, m)
    )
    scores = torch.from_numpy(-np.sort(-draw(b, m), axis=1))
    for r in range(0, b, 3):  # padding in every third row
        cut = int(rng.integers(0, m + 1))
        top[r, cut:], scores[r, cut:] = -1, -torch.inf
    users = torch.from_numpy(rng.integers(0, n_users, b))
    return scores, top, users, tables, scales, mu


def test_reference_rerank_is_the_documented_order(rng):
    """reference.rerank_mf against a brute force: blended = score + w * rating, sorted by
    (blended desc, item row asc), padding last; the rest shifted to stay below."""
    scores, top, users, tables, scales, mu = rerank_case(rng, 7, 12, 40, integer=True)
    w, depth = 2.0, 8
    got_s, got_t, shift = ref.rerank_mf(scores, top, users, *tables, scales, mu, w, depth)
    for b in range(7):
        cand = [j for j in top[b, :depth].tolist() if j >= 0]
        u = int(users[b])
        rating = {j: float(ref.predict(*tables, scales, mu, torch.tensor([u]), torch.tensor([j])))
                  for j in cand}  # fmt: skip
        blended = {j: float(scores[b, c]) + w * rating[j] for c, j in enumerate(cand)}
        want = sorted(cand, key=lambda j: (-blended[j], j))
        assert got_t[b, : len(want)].tolist() == want
        assert got_t[b, len(want) : depth].tolist() == [-1] * (depth - len(want))
        assert got_s[b, : len(want)].tolist() == pytest.approx([blended[j] for j in want])
        assert got_t[b, depth:].tolist() == top[b, depth:].tolist()
        if cand and int(top[b, depth]) >= 0:  # lowered only as far as needed: 1 below
            nxt, low = float(scores[b, depth]), min(blended.values())
            assert float(got_s[b, depth]) == pytest.approx(min(nxt, low - 1.0))
            assert float(shift[b]) == pytest.approx(max(0.0, nxt - low + 1.0))
        else:
            assert float(shift[b]) == 0.0


@pytest.mark.parametrize(("b", "m", "depth", "integer"),
                         [(1, 30, 30, True), (9, 40, 30, True), (9, 40, 7, False),
                          (4, 10, 30, False), (0, 30, 30, True)])  # fmt: skip
def test_rerank_mf_matches_reference(backend, rng, b, m, depth, integer):
    scores, top, users, tables, scales, mu = rerank_case(rng, b, m, 60, integer)
    before = (scores.clone(), top.clone())
    d = min(depth, m)  # the neighbourhood predictions blended in at weights 0, 1/4 or 1/2
    knn = (
        torch.from_numpy(rng.integers(4, 21, (b, d)).astype(np.float32) / 4),
        torch.from_numpy(rng.integers(0, 3, (b, d)).astype(np.float32) / 4),
    )  # (exact)
    added = torch.from_numpy(rng.integers(-4, 5, (b, d)).astype(np.float32) / 8)  # (uknn)
    for w, nb in ((0.0, None), (2.0, None), (2.0, knn), (2.0, (*knn, added))):
        want = ref.rerank_mf(scores, top, users, *tables, scales, mu, w, depth, nb)
        got = kernels.rerank_mf(scores, top, users, *tables, scales, mu, w, depth, nb,
                                backend=backend)  # fmt: skip
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
        if integer:  # exact arithmetic: the same values and order, ties by item row included
            assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
            assert torch.equal(got[1], want[1])
        else:  # the dot products sum in another order: near-ties within rounding may swap
            for g, t in zip(got[1].tolist(), want[1].tolist(), strict=True):
                assert sorted(g[:depth]) == sorted(t[:depth]) and g[depth:] == t[depth:]
    assert torch.equal(scores, before[0]) and torch.equal(top, before[1])  # inputs untouched
