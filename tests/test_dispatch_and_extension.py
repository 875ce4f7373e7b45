"""The backend contract and the first C++ extension."""

from __future__ import annotations

import pytest

from lrec_fast import kernels
from lrec_fast.text import minilm_dir


def test_auto_and_explicit_backends(monkeypatch):
    monkeypatch.delenv("LREC_BACKEND", raising=False)
    assert kernels.resolve_backend(None).name == kernels.available_backends()[0]
    assert kernels.resolve_backend("torch").name == "torch"
    monkeypatch.setenv("LREC_BACKEND", "torch")
    assert kernels.resolve_backend(None).name == "torch"
    for name in ("numba", "triton", "cuda-magic"):
        monkeypatch.setenv("LREC_BACKEND", name)
        with pytest.raises(kernels.BackendUnavailable, match=name):
            kernels.resolve_backend(None)
        with pytest.raises(kernels.BackendUnavailable):
            kernels.resolve_backend(name)


def test_wordpiece_extension_matches_hf_wordpiece():
    ext = pytest.importorskip("lrec_fast._wordpiece", reason="C++ extension not built")
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    wp = ext.WordPiece([t for t, _ in vocab])
    words = ["toy", "story", "unaffable", "xyzzyq", "café", "東", "a" * 100, "a" * 101,
             "embeddings", "##", "1995", "children", "supercalifragilistic"]  # fmt: skip
    ids, offsets = wp.tokenize_words(words)
    assert offsets.shape == (len(words) + 1,) and ids.dtype.name == "int32"
    model = hf.model
    for n, w in enumerate(words):
        want = [t.id for t in model.tokenize(w)]
        assert ids[offsets[n] : offsets[n + 1]].tolist() == want, w
    assert wp.tokenize_words([])[1].tolist() == [0]
    with pytest.raises(ValueError):
        ext.WordPiece(["a", "b"], unk_token="[UNK]")
