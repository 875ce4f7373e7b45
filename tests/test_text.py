"""Tokeniser wrapper, encoders and the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

from lrec_fast.text import (
    CachedEncoder,
    HashingEncoder,
    MiniLMEncoder,
    encoder_by_name,
    minilm_dir,
)

TEXTS = ["Toy Story (1995) | Animation, Children's, Comedy", "", "Café crème ünïcödé 東京",
         "a " * 300, "Heat (1995) | Action, Crime"]  # fmt: skip


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = [t for t in TEXTS if t]
    encoder = MiniLMEncoder(batch_size=2)
    from lrec_fast.text import tokenizer

    assert encoder.tokenizer.backend == ("cpp" if tokenizer._ext is not None else "hf")
    ours = encoder.encode(texts)
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    want = st.encode(texts, normalize_embeddings=True)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(ours * want, axis=1)) > 0.9999


class Counting(HashingEncoder):
    def __init__(self) -> None:
        super().__init__(32)
        self.calls: list[int] = []

    def encode(self, texts):  # type: ignore[no-untyped-def]
        self.calls.append(len(texts))
        return super().encode(texts)


def test_cache_encodes_each_text_once(tmp_path):
    inner = Counting()
    enc = CachedEncoder(inner, tmp_path)
    a = enc.encode(["x y", "z", "x y"])
    b = enc.encode(["z", "new words"])
    assert inner.calls == [2, 1]
    np.testing.assert_array_equal(a[1], b[0])
    fresh = CachedEncoder(Counting(), tmp_path)  # a new process reads the file
    np.testing.assert_array_equal(fresh.encode(["x y"])[0], a[0])
    enc.path.write_bytes(b"garbage")
    again = CachedEncoder(Counting(), tmp_path)
    np.testing.assert_array_equal(again.encode(["x y"])[0], a[0])  # corrupt cache: recomputed


def test_hashing_encoder_and_registry():
    enc = encoder_by_name("hashing-16")
    v = enc.encode(["space war", "war space", "romance", ""])
    np.testing.assert_allclose(v[0], v[1])
    assert abs(float(v[0] @ v[2])) < 0.9 and not v[3].any()
    with pytest.raises(ValueError):
        encoder_by_name("nope")


def test_cache_writes_each_calls_new_embeddings_apart_and_merges_them(tmp_path, monkeypatch):
    """A call that encodes new texts writes a file of those embeddings only (not the whole
    cache again); at MAX_SHARDS files they merge into one, or into the main file once they hold
    as many; a new process reads them all; an unreadable file is skipped and its texts encoded
    again."""
    monkeypatch.setattr(CachedEncoder, "MAX_SHARDS", 3)
    enc = CachedEncoder(Counting(), tmp_path)
    first = enc.encode(["a b", "c"])
    assert len(enc._shards()) == 1 and not enc.path.exists()
    enc.encode(["c"])  # nothing new: nothing written
    enc.encode(["d"])
    assert len(enc._shards()) == 2
    enc.encode(["e"])  # the third file: 4 embeddings merged, more than the main file's 0
    assert enc._shards() == [] and enc.path.exists()
    enc.encode(["f"])
    enc.encode(["g"])
    enc.encode(["h"])  # 3 merged, fewer than the main file's 5: one file of the three
    assert len(enc._shards()) == 1
    fresh = CachedEncoder(Counting(), tmp_path)
    np.testing.assert_array_equal(fresh.encode(["a b", "h"]), enc.encode(["a b", "h"]))
    assert fresh.encoder.calls == []  # every text came from the files
    enc._shards()[0].write_bytes(b"garbage")
    again = CachedEncoder(Counting(), tmp_path)
    np.testing.assert_array_equal(again.encode(["g", "c"]), enc.encode(["g", "c"]))
    assert again.encoder.calls == [1]  # "g" (its file unreadable) encoded again, "c" read
    np.testing.assert_array_equal(first[1], again.encode(["c"])[0])
