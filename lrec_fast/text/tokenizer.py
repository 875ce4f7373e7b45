"""Batch WordPiece tokeniser with numpy output.

This version runs HF ``tokenizers`` (the reference behaviour); the C++ pipeline of
``lrec_fast._wordpiece`` takes over the same interface once it reproduces HF exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

Padding = Literal["longest", "max_length"]


class WordPieceTokenizer:
    """BERT WordPiece tokeniser: texts -> ``input_ids``, ``attention_mask``, ``token_type_ids``.

    ``backend`` says which implementation runs ("hf" for now).
    """

    backend: str = "hf"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        pad_id = tokenizer.token_to_id("[PAD]")
        self.pad_id: int = 0 if pad_id is None else int(pad_id)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> WordPieceTokenizer:
        """Load ``tokenizer.json`` from a model folder (offline)."""
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls(Tokenizer.from_file(str(file)))

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int = 128,
        padding: Padding = "longest",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Tokenise a batch. Returns int64 arrays [batch, length] (length = longest text after
        truncation, or max_length with padding="max_length")."""
        _check_texts(texts)
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', not {padding!r}")
        if max_length < 2:
            raise ValueError("max_length must be at least 2 ([CLS] and [SEP])")
        encs = self._tok.encode_batch(list(texts))
        ids = [e.ids[: max_length - 1] + e.ids[-1:] if truncation and len(e.ids) > max_length
               else e.ids for e in encs]  # fmt: skip
        types = [e.type_ids[: len(i)] for e, i in zip(encs, ids, strict=True)]
        width = max_length if padding == "max_length" else max((len(i) for i in ids), default=0)
        width = max(width, max((len(i) for i in ids), default=0))
        out_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        tt = np.zeros((len(ids), width), dtype=np.int64)
        for r, (row, trow) in enumerate(zip(ids, types, strict=True)):
            out_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
            tt[r, : len(row)] = trow
        return {"input_ids": out_ids, "attention_mask": mask, "token_type_ids": tt}

    def encode(self, text: str, max_length: int = 128) -> dict[str, np.ndarray]:
        """Tokenise one text; arrays of shape [length]."""
        out = self.encode_batch([text], max_length=max_length)
        return {k: v[0] for k, v in out.items()}


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not one str")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"texts[{i}] is not valid Unicode (lone surrogate?)") from exc
