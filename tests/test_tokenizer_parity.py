"""The tokeniser against HF tokenizers: identical ids, masks and type ids, always.

The reference is HF ``tokenizers`` built from the model's tokenizer.json (or, for cased and
other configurations, from its vocab.txt), with HF's own truncation and padding. Every C++
result is compared with it, and so is the HF fallback backend of our class.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from lrec_fast.text import WordPieceTokenizer, minilm_dir
from lrec_fast.text import tokenizer as tokmod

from .unicode_corpus import TRICKY, corpus_texts

HAVE_EXT = tokmod._ext is not None
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="C++ extension not built")
KEYS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def hf_ref() -> Tokenizer:
    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


@pytest.fixture(scope="module", params=["cpp", "hf"])
def ours(request) -> WordPieceTokenizer:
    if request.param == "cpp" and not HAVE_EXT:
        pytest.skip("C++ extension not built")
    return WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend=request.param)


def reference(
    ref: Tokenizer,
    texts: list[str],
    pairs: list[str] | None = None,
    max_length: int = 512,
    padding: str = "longest",
    truncation: str | None = "longest_first",
) -> dict[str, np.ndarray]:
    """HF tokenizers' own truncation and padding, stacked into arrays."""
    if truncation:
        ref.enable_truncation(max_length, strategy=truncation)
    else:
        ref.no_truncation()
    ref.enable_padding(length=max_length if padding == "max_length" else None, pad_id=0)
    inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
    encs = ref.encode_batch(inputs)
    ref.no_truncation()
    ref.no_padding()
    width = max_length if padding == "max_length" else max((len(e.ids) for e in encs), default=0)
    out = {}
    for key, attr in zip(KEYS, ("ids", "attention_mask", "type_ids"), strict=True):
        out[key] = np.array([getattr(e, attr) for e in encs], dtype=np.int64).reshape(-1, width)
    return out


def assert_parity(
    tok: WordPieceTokenizer, ref: Tokenizer, texts: list[str], pairs: list[str] | None = None, **kw
) -> None:
    got = tok.encode_batch(texts, pairs, **kw)
    want = reference(ref, texts, pairs, **_ref_kw(kw))
    for key in KEYS:
        assert got[key].dtype == np.int64
        if not np.array_equal(got[key], want[key]):
            rows = np.flatnonzero((got[key] != want[key]).any(axis=1))
            bad = [texts[r] for r in rows[:5]]
            raise AssertionError(f"{key}: {len(rows)} rows differ, e.g. {bad!r}")


def _ref_kw(kw: dict) -> dict:
    out = dict(kw)
    if "truncation" in out:
        t = out.pop("truncation")
        out["truncation"] = "longest_first" if t is True else (t or None)
    return out


def test_multilingual_corpus_and_edges(ours, hf_ref):
    texts = corpus_texts()
    assert len(texts) > 150
    for max_length in (512, 16):
        for padding in ("longest", "max_length"):
            assert_parity(ours, hf_ref, texts, max_length=max_length, padding=padding)


@pytest.mark.slow
def test_movielens_titles(ours, hf_ref):
    from transformers import BertTokenizerFast

    from lrec_fast.data import load_movielens_100k

    texts = load_movielens_100k().item_text
    assert len(texts) == 1682
    for max_length in (32, 128):
        assert_parity(ours, hf_ref, texts, max_length=max_length, padding="max_length")
    # and against what users call: transformers' BertTokenizerFast.__call__
    fast = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
    want = fast(texts, max_length=32, padding="longest", truncation=True, return_tensors="np")
    got = ours.encode_batch(texts, max_length=32, padding="longest")
    for key in KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@needs_ext
def test_every_code_point(hf_ref):
    """Each of the 1,112,064 scalar values, inside a word, before a combining mark."""
    tok = WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="cpp")
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"x{chr(c)}\u0301y{chr(c)}" for c in cps]
    hf_ref.no_truncation()
    hf_ref.no_padding()
    encs = hf_ref.encode_batch(texts)
    want_len = np.array([len(e.ids) for e in encs])
    want = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=want_len.sum())
    got = tok.encode_batch(texts, max_length=64)
    got_len = got["attention_mask"].sum(axis=1)
    bad = np.flatnonzero(got_len != want_len)
    assert bad.size == 0, [hex(cps[i]) for i in bad[:10]]
    np.testing.assert_array_equal(got["input_ids"][got["attention_mask"] == 1], want)


@pytest.mark.parametrize("truncation", [True, "only_first", "only_second", False])
@pytest.mark.parametrize("max_length", [3, 4, 5, 9, 64])
def test_pairs_truncation_and_padding(ours, truncation, max_length):
    from transformers import BertTokenizerFast

    fast = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
    first = ["Toy Story (1995)", "", "a b c d e f g h i j k l", "Café 東京 한국", "x"]
    second = ["a b c d e f g h i j", "y", "", "Heat", "one two three four five six"]
    for pairs in (None, second):
        for padding in ("longest", "max_length"):
            kw = dict(max_length=max_length, padding=padding, truncation=truncation)
            try:
                want = fast(first, pairs, return_tensors="np", **kw)
                want_error = None
            except Exception as exc:  # HF refuses: we must refuse too
                want_error = exc
            ragged = want_error is None and want["input_ids"].dtype == object
            if want_error is not None or ragged:
                with pytest.raises(ValueError):
                    ours.encode_batch(first, pairs, **kw)
                continue
            got = ours.encode_batch(first, pairs, **kw)
            for key in KEYS:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} {kw}")


_CACHE: dict[str, tuple[WordPieceTokenizer, Tokenizer]] = {}


def vocab_tokenizers(**cfg) -> tuple[WordPieceTokenizer, Tokenizer]:
    """Ours and HF's, both built from the model's vocab.txt with the given configuration."""
    key = repr(sorted(cfg.items()))
    if key not in _CACHE:
        vocab = minilm_dir() / "vocab.txt"
        backend = "cpp" if HAVE_EXT else "hf"
        ours = WordPieceTokenizer.from_vocab_file(vocab, backend=backend, **cfg)
        _CACHE[key] = ours, BertWordPieceTokenizer(str(vocab), **cfg)._tokenizer
    return _CACHE[key]


CONFIGS = [
    dict(lowercase=False),
    dict(lowercase=False, strip_accents=True),
    dict(lowercase=True, strip_accents=False),
    dict(lowercase=True, handle_chinese_chars=False, clean_text=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_other_configurations(cfg):
    ours, ref = vocab_tokenizers(**cfg)
    texts = corpus_texts()
    assert_parity(ours, ref, texts, max_length=64)


tricky_text = st.lists(st.sampled_from(TRICKY), max_size=40).map("".join)
any_text = st.text(max_size=60)  # every code point but surrogates
mixed_text = st.one_of(
    tricky_text, any_text, st.lists(st.one_of(tricky_text, any_text)).map(" ".join)
)


@needs_ext
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(mixed_text, min_size=1, max_size=40))
def test_random_unicode(texts):
    tok, ref = _hypothesis_pair()
    assert_parity(tok, ref, texts, max_length=128)


@needs_ext
@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(mixed_text, min_size=1, max_size=20),
    cfg=st.sampled_from(CONFIGS),
    max_length=st.integers(3, 40),
)
def test_random_unicode_other_configurations(texts, cfg, max_length):
    ours, ref = vocab_tokenizers(**cfg)
    pairs = texts[::-1]
    assert_parity(ours, ref, texts, pairs=pairs, max_length=max_length, padding="max_length")


def _hypothesis_pair() -> tuple[WordPieceTokenizer, Tokenizer]:
    if "main" not in _CACHE:
        _CACHE["main"] = (
            WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="cpp"),
            Tokenizer.from_file(str(minilm_dir() / "tokenizer.json")),
        )
    return _CACHE["main"]
