"""The tokeniser's contract beyond parity: backends, fallback, threads, dtypes, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lrec_fast.text import WordPieceTokenizer, minilm_dir
from lrec_fast.text import tokenizer as tokmod

from .unicode_corpus import corpus_texts, fuzz_texts

HAVE_EXT = tokmod._ext is not None
KEYS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module", params=["cpp", "hf"])
def tok(request) -> WordPieceTokenizer:
    if request.param == "cpp" and not HAVE_EXT:
        pytest.skip("C++ extension not built")
    return WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend=request.param)


def test_default_backend_is_the_extension():
    tok = WordPieceTokenizer.from_pretrained_dir(minilm_dir())
    assert tok.backend == ("cpp" if HAVE_EXT else "hf")
    assert tok.model_max_length == 512


def test_fallback_without_extension_warns_and_matches(monkeypatch):
    texts = corpus_texts()
    want = WordPieceTokenizer.from_pretrained_dir(minilm_dir()).encode_batch(texts)
    monkeypatch.setattr(tokmod, "_ext", None)
    with pytest.warns(RuntimeWarning, match="falls back to HF tokenizers"):
        tok = WordPieceTokenizer.from_pretrained_dir(minilm_dir())
    assert tok.backend == "hf"
    got = tok.encode_batch(texts)
    for key in KEYS:
        np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(RuntimeError, match="not built"):
        WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="rust")


def test_unsupported_pipeline_falls_back(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(minilm_dir(), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.warns(RuntimeWarning, match="normalizer 'Lowercase'"):
        tok = WordPieceTokenizer.from_pretrained_dir(folder)
    assert tok.backend == "hf"
    assert tok.encode("Café")["input_ids"].tolist() == [101, 100, 102]  # "café" is no token
    (folder / "tokenizer.json").unlink()  # vocab.txt + tokenizer_config.json still work
    assert WordPieceTokenizer.from_pretrained_dir(folder).encode("Café")["input_ids"][1] == 7668
    with pytest.raises(FileNotFoundError):
        WordPieceTokenizer.from_pretrained_dir(tmp_path)


@pytest.mark.skipif(not HAVE_EXT, reason="C++ extension not built")
def test_threads_give_the_same_arrays():
    tok = WordPieceTokenizer.from_pretrained_dir(minilm_dir(), backend="cpp")
    texts = fuzz_texts(3000, seed=3) + corpus_texts()
    one = tok.encode_batch(texts, max_length=64, num_threads=1)
    for threads in (None, 2, 7):
        many = tok.encode_batch(texts, max_length=64, num_threads=threads)
        for key in KEYS:
            np.testing.assert_array_equal(many[key], one[key])


def test_single_text_dtypes_and_shapes(tok):
    one = tok.encode("Heat (1995)")
    assert one["input_ids"].tolist() == [101, 3684, 1006, 2786, 1007, 102]
    assert one["attention_mask"].tolist() == [1] * 6 and one["token_type_ids"].tolist() == [0] * 6
    pair = tok.encode("Heat", "Toy Story")
    assert pair["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    b32 = tok.encode_batch(["Heat", ""], dtype=np.int32, padding="max_length", max_length=5)
    assert all(v.dtype == np.int32 and v.shape == (2, 5) for v in b32.values())
    assert b32["input_ids"].tolist() == [[101, 3684, 102, 0, 0], [101, 102, 0, 0, 0]]
    empty = tok.encode_batch([])
    assert all(v.shape == (0, 0) and v.dtype == np.int64 for v in empty.values())
    assert tok.encode_batch([], padding="max_length", max_length=8)["input_ids"].shape == (0, 8)
    assert tok.encode("")["input_ids"].tolist() == [101, 102]
    assert tok.encode_batch(("a", "b"))["input_ids"].shape == (2, 3)  # any sequence of str


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.encode_batch("one str"), TypeError, "sequence of str"),
        (lambda t: t.encode_batch(["ok", None]), TypeError, r"texts\[1\] is NoneType"),
        (lambda t: t.encode_batch(["ok", b"bytes"]), TypeError, r"texts\[1\] is bytes"),
        (lambda t: t.encode_batch(["ok", "bad \udc80"]), ValueError, r"texts\[1\].*surrogate"),
        (lambda t: t.encode_batch(["a"], ["\ud800"]), ValueError, r"text_pairs\[0\].*surrogate"),
        (lambda t: t.encode_batch(["a", "b"], ["c"]), ValueError, "differ in length"),
        (lambda t: t.encode_batch(["a"], max_length=1), ValueError, "room for the 2 special"),
        (lambda t: t.encode_batch(["a"], ["b"], max_length=2), ValueError, "room for the 3"),
        (lambda t: t.encode_batch(["a"], max_length=-1), ValueError, "max_length"),
        (lambda t: t.encode_batch(["a"], padding="left"), ValueError, "padding"),
        (lambda t: t.encode_batch(["a"], truncation="middle"), ValueError, "truncation"),
        (lambda t: t.encode_batch(["a"], dtype=np.float32), ValueError, "dtype"),
        (lambda t: t.encode_batch(["a b c d"], max_length=4, truncation="only_second"),
         ValueError, "only_second|Second sequence"),
        (lambda t: t.encode_batch(["a b c d"], max_length=4, truncation=False,
                                  padding="max_length"), ValueError, "ragged"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_clearly(tok, call, error, match):
    with pytest.raises(error, match=match):
        call(tok)


def test_concurrent_callers_get_their_own_answers(tok):
    """Python threads call one tokeniser at once (the C++ path runs without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [fuzz_texts(200, seed=s) for s in range(8)]
    want = [tok.encode_batch(b, max_length=48) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: tok.encode_batch(b, max_length=48), batches * 3))
    for n, out in enumerate(got):
        for key in KEYS:
            np.testing.assert_array_equal(out[key], want[n % len(batches)][key])
