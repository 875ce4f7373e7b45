"""Tokenisation: ours (C++, 1 and 2 threads) vs transformers' ``BertTokenizerFast.__call__``
(return_tensors="np", what users call) and ``tokenizers.Tokenizer.encode_batch`` (+ numpy).

Corpora: the 1,682 MovieLens item texts, and 50,000 mixed-language sentences assembled from
the test corpus's words and the titles' words (seeded). max_length 32 and 128; batches of 1,
32 and the whole corpus. Every call returns the same arrays (input_ids, attention_mask,
token_type_ids); the parity tests hold the ids equal.

    pytest benchmarks/bench_tokenize.py --benchmark-enable      # pytest-benchmark tables
    python -m benchmarks.bench_tokenize                         # texts/s and ratios vs HF
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from lrec_fast.text import WordPieceTokenizer, minilm_dir

from .conftest import SMALL

MULTILINGUAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual.txt"
N_MIXED = 5_000 if SMALL else 50_000
BATCHES = ["1", "32", "all"]
MAX_LENGTHS = [32, 128]
# Texts per timed call for batch 1 and 32 (a slice of the corpus, looped over in one call).
SLICE = {"1": 256, "32": 2048}


@cache
def titles() -> list[str]:
    from lrec_fast.data import load_movielens_100k

    return list(load_movielens_100k().item_text)


@cache
def mixed() -> list[str]:
    """Seeded sentences of 4-40 words drawn from every script of the test corpus and from the
    MovieLens titles, with punctuation, numbers and the odd emoji."""
    rng = np.random.default_rng(2026)
    words = MULTILINGUAL.read_text(encoding="utf-8").split() + " ".join(titles()).split()
    pool = np.array(words, dtype=object)
    out = []
    for _ in range(N_MIXED):
        n = int(rng.integers(4, 41))
        sent = " ".join(rng.choice(pool, n))
        out.append(sent + rng.choice(np.array([".", "!", "?", " 🙂", "…", ""], dtype=object)))
    return out


CORPORA: dict[str, Callable[[], list[str]]] = {"titles": titles, "mixed": mixed}


@cache
def tokenizers_() -> dict[str, object]:
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    return {
        "ours": WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="cpp"),
        "hf_call": BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True),
        "hf_encode_batch": Tokenizer.from_file(str(minilm_dir() / "tokenizer.json")),
    }


def runner(impl: str, texts: list[str], batch: str, max_length: int) -> Callable[[], object]:
    """A zero-argument call that tokenises `texts` in batches of `batch` with `impl`."""
    toks = tokenizers_()
    size = len(texts) if batch == "all" else int(batch)
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    if impl.startswith("ours"):
        tok = toks["ours"]
        threads = int(impl[-1])
        assert isinstance(tok, WordPieceTokenizer)
        if batch == "1":
            return lambda: [tok.encode(c[0], max_length=max_length) for c in chunks]
        return lambda: [
            tok.encode_batch(c, max_length=max_length, num_threads=threads) for c in chunks
        ]
    if impl == "hf_call":
        call = toks["hf_call"]
        kw = dict(max_length=max_length, truncation=True, padding="longest", return_tensors="np")
        return lambda: [call(c, **kw) for c in chunks]  # type: ignore[operator]
    hf = toks["hf_encode_batch"]
    hf.enable_truncation(max_length)  # type: ignore[attr-defined]
    hf.enable_padding()  # type: ignore[attr-defined]

    def encode_batch() -> list[dict[str, np.ndarray]]:
        out = []
        for c in chunks:
            encs = hf.encode_batch(c)  # type: ignore[attr-defined]
            out.append({
                "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
            })  # fmt: skip
        return out

    return encode_batch


def corpus_slice(corpus: str, batch: str) -> list[str]:
    texts = CORPORA[corpus]()
    return texts if batch == "all" else texts[: SLICE[batch]]


IMPLS = ["ours_1", "ours_2", "hf_call", "hf_encode_batch"]


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("max_length", MAX_LENGTHS)
@pytest.mark.parametrize("corpus", list(CORPORA))
def test_tokenize(benchmark, corpus, max_length, batch, impl):
    pytest.importorskip("lrec_fast._wordpiece", reason="C++ extension not built")
    if impl == "ours_2" and batch == "1":
        pytest.skip("one text runs on one thread")
    texts = corpus_slice(corpus, batch)
    benchmark.group = f"tokenize {corpus} max_length={max_length} batch={batch}"
    benchmark.extra_info["texts"] = len(texts)
    out = benchmark(runner(impl, texts, batch, max_length))
    assert len(out) > 0


def measure(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(repeats: int = 7) -> str:
    """texts/s of every implementation, and the ratio to HF __call__, in one run."""
    lines = [
        f"| corpus | max_length | batch | {' | '.join(IMPLS)} | ours_1 / hf_call | "
        "ours_2 / hf_call | ours_1 / hf_encode_batch |",
        "|" + "---|" * (6 + len(IMPLS)),
    ]
    for corpus in CORPORA:
        for max_length in MAX_LENGTHS:
            for batch in BATCHES:
                texts = corpus_slice(corpus, batch)
                rate = {}
                for impl in IMPLS:
                    if impl == "ours_2" and batch == "1":
                        rate[impl] = float("nan")
                        continue
                    t = measure(runner(impl, texts, batch, max_length), repeats)
                    rate[impl] = len(texts) / t
                cells = " | ".join(f"{rate[i] / 1e3:,.1f}k" for i in IMPLS)
                r1 = rate["ours_1"] / rate["hf_call"]
                r2 = rate["ours_2"] / rate["hf_call"]
                r3 = rate["ours_1"] / rate["hf_encode_batch"]
                lines.append(
                    f"| {corpus} | {max_length} | {batch} | {cells} | {r1:.1f}x | {r2:.1f}x | "
                    f"{r3:.1f}x |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    print(f"texts/s (median of runs), {os.cpu_count()} CPUs", file=sys.stderr)
    print(report())
