"""feedback's other hot path: one step of the ranking head (ranking.step: history fold-in,
softmax cross-entropy against the whole catalogue or 2,048 sampled negatives with the log-Q
correction, row-wise Adagrad on the rows it touches). Ours (numba: the gradients by hand, three
GEMMs, compiled row updates; and the torch autograd reference) vs what a user would write
instead: an nn.EmbeddingBag history encoder, logits against the whole target table, and
torch.optim.Adagrad (dense: every row, every step).

    pytest benchmarks/bench_ranking.py --benchmark-enable     # pytest-benchmark tables
    python -m benchmarks.bench_ranking                        # one table with the ratios
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lrec_fast import kernels, ranking
from lrec_fast.model import ModelState
from lrec_fast.online import LearnerConfig

from .conftest import SMALL
from .floors import median_ms

D, L, LR = 64, 20, 0.05
SIZES = [1_682, 10_000] if SMALL else [1_682, 100_000]  # MovieLens-100k, a large catalogue
BATCHES = [1, 128]


def events(n_items: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(0, n_items, (m, L), generator=g)
    hist[torch.rand(m, L, generator=g) < 0.2] = ranking.PAD
    return hist, torch.randint(0, n_items, (m,), generator=g)


def ours(n_items: int, m: int, backend: str) -> Callable[[], object]:
    cfg = LearnerConfig(history_len=L)
    st = ModelState(dim=D, text_dim=1, history_len=L)
    rows = {k: torch.randn(n_items, D) * 0.1 for k in ("item_rows", "tgt_rows", "ctx_rows")}
    rows |= {"item_bias": torch.zeros(n_items), "tgt_bias": torch.zeros(n_items)}
    st.add_items(list(range(n_items)), rows, torch.zeros(n_items, 1))
    st.item_count.t.copy_(torch.randint(0, 100, (n_items,)))
    hist, targets = events(n_items, m)
    gen = torch.Generator().manual_seed(0)
    return lambda: ranking.step(st, hist, targets, LR, cfg, gen, backend=backend)


def torch_module(n_items: int, m: int) -> Callable[[], object]:
    ctx = torch.nn.EmbeddingBag(n_items, D, mode="sum")
    tgt, bias = torch.nn.Embedding(n_items, D), torch.nn.Parameter(torch.zeros(n_items))
    opt = torch.optim.Adagrad([*ctx.parameters(), *tgt.parameters(), bias], lr=LR)
    hist, targets = events(n_items, m)
    valid = hist >= 0
    w = (0.9 ** torch.arange(L, dtype=torch.float32)).expand(m, L) * valid
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    flat, offsets = hist[valid], torch.cat([torch.zeros(1, dtype=torch.int64),
                                           valid.sum(1).cumsum(0)[:-1]])  # fmt: skip

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        q = ctx(flat, offsets, per_sample_weights=w[valid])
        loss = torch.nn.functional.cross_entropy(q @ tgt.weight.T + bias, targets)
        loss.backward()
        opt.step()

    return step


IMPLS: dict[str, Callable[[int, int], Callable[[], object]]] = {
    "ours (numba)": lambda n, m: ours(n, m, "numba"),
    "ours (torch reference)": lambda n, m: ours(n, m, "torch"),
    "torch EmbeddingBag + full softmax + Adagrad": torch_module,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("n_items", SIZES)
def test_ranking_step(benchmark, n_items, m, impl):
    if "numba" in impl and "numba" not in kernels.available_backends():
        pytest.skip("numba backend unavailable")
    benchmark.group = f"ranking step N={n_items} batch={m}"
    benchmark(IMPLS[impl](n_items, m))


def report() -> str:
    head = " | ".join(IMPLS)
    lines = [
        "ms per ranking step, d = 64, history 20 (median; exact softmax up to 2,048 items, "
        "sampled beyond)",
        f"| N | batch | {head} | reference / ours | torch module / ours |",
        "|" + "---|" * (4 + len(IMPLS)),
    ]
    for n in SIZES:
        for m in BATCHES:
            ms = {name: median_ms(make(n, m), repeats=15, warmup=2) for name, make in IMPLS.items()}
            mine = ms["ours (numba)"]
            cells = " | ".join(f"{ms[i]:.3f}" for i in IMPLS)
            ref, module = ms["ours (torch reference)"], ms[list(IMPLS)[2]]
            lines.append(f"| {n:,} | {m} | {cells} | {ref / mine:.1f}x | {module / mine:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    print(report())
