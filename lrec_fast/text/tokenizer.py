"""Batch BERT WordPiece tokeniser with numpy output: the C++ extension, or HF ``tokenizers``.

Both backends give the ids of HF ``tokenizers`` for the same vocabulary and configuration
(tests/test_tokenizer_parity.py holds them to it). The C++ path (``lrec_fast._wordpiece``)
reads Python strs in place, releases the GIL, splits big batches over threads and writes the
three arrays directly; HF ``tokenizers`` is the fallback where the extension was not built, or
for a tokenizer.json whose pipeline the C++ code does not implement (a warning says which).
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

Padding = Literal["longest", "max_length"]
TruncationArg = bool | Literal["longest_first", "only_first", "only_second", "do_not_truncate"]
BACKENDS = ("cpp", "hf")

try:  # the optional C++ extension; its absence is reported when a tokeniser is built
    from .. import _wordpiece as _ext  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised on machines without a compiler
    _ext = None

# Rust's char::is_whitespace, which HF uses to trim vocab.txt lines.
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


@dataclass
class BertSpec:
    """Everything that defines a BERT WordPiece tokeniser, as plain data.

    ``vocab`` and ``added_tokens`` are (token, id) pairs; ``strip_accents`` is resolved (HF's
    None means "same as lowercase"). ``unsupported`` names what only HF can run, if anything.
    """

    vocab: list[tuple[str, int]]
    unk_token: str = "[UNK]"
    continuing_prefix: str = "##"
    max_input_chars_per_word: int = 100
    clean_text: bool = True
    handle_chinese_chars: bool = True
    strip_accents: bool = True
    lowercase: bool = True
    added_tokens: list[tuple[str, int]] = field(default_factory=list)
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"
    model_max_length: int = 512
    unsupported: str | None = None

    def token_id(self, token: str) -> int:
        ids = dict(self.vocab)
        ids.update(self.added_tokens)
        if token not in ids:
            raise ValueError(f"the vocabulary has no {token!r}")
        return ids[token]


class WordPieceTokenizer:
    """BERT WordPiece tokeniser: texts -> ``input_ids``, ``attention_mask``, ``token_type_ids``.

    ``backend`` is "cpp" (the C++ extension) or "hf" (HF ``tokenizers``); both give identical
    output. Build one with :meth:`from_pretrained_dir` (a model folder with tokenizer.json or
    vocab.txt) or :meth:`from_vocab_file`.
    """

    backend: str

    def __init__(self, spec: BertSpec, hf: Tokenizer, backend: str | None = None) -> None:
        if backend not in (None, *BACKENDS):
            raise ValueError(f"backend must be one of {BACKENDS} or None, not {backend!r}")
        self.spec = spec
        self.model_max_length = spec.model_max_length
        self.pad_id = spec.token_id(spec.pad_token)
        self._hf = hf
        self._hf_lock = threading.Lock()
        self._hf.no_truncation()
        self._hf.no_padding()
        self._cpp: Any = None
        reason = None
        if _ext is None:
            reason = "the C++ extension lrec_fast._wordpiece is not built"
        elif spec.unsupported:
            reason = f"the C++ tokeniser does not implement {spec.unsupported}"
        if backend == "cpp" and reason:
            raise RuntimeError(f"backend='cpp' asked for, but {reason}")
        if reason is None and backend != "hf":
            self._cpp = _ext.BertTokenizer(
                spec.vocab, spec.unk_token, spec.max_input_chars_per_word,
                spec.continuing_prefix, spec.clean_text, spec.handle_chinese_chars,
                spec.strip_accents, spec.lowercase, spec.added_tokens,
                spec.token_id(spec.cls_token), spec.token_id(spec.sep_token), self.pad_id,
            )  # fmt: skip
            self.backend = "cpp"
        else:
            if backend is None:
                msg = "lrec_fast tokeniser falls back to HF tokenizers (same ids, slower): "
                msg += str(reason)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning(msg)
            self.backend = "hf"

    @classmethod
    def from_pretrained_dir(
        cls, path: str | Path, backend: str | None = None
    ) -> WordPieceTokenizer:
        """Load from a model folder (offline): tokenizer.json if present, else vocab.txt with
        tokenizer_config.json's ``do_lower_case`` / ``strip_accents`` /
        ``tokenize_chinese_chars``."""
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        max_len = int(config.get("model_max_length", 512))
        if max_len > 1_000_000:  # transformers' "no limit" sentinel
            max_len = 512
        file = folder / "tokenizer.json"
        if file.exists():
            spec = _spec_from_tokenizer_json(_read_json(file))
            spec.model_max_length = max_len
            return cls(spec, Tokenizer.from_file(str(file)), backend)
        if (folder / "vocab.txt").exists():
            tok = cls.from_vocab_file(
                folder / "vocab.txt",
                lowercase=bool(config.get("do_lower_case", True)),
                strip_accents=config.get("strip_accents"),
                handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                backend=backend,
            )
            tok.model_max_length = tok.spec.model_max_length = max_len
            return tok
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {folder}")

    @classmethod
    def from_vocab_file(
        cls,
        path: str | Path,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        handle_chinese_chars: bool = True,
        clean_text: bool = True,
        backend: str | None = None,
    ) -> WordPieceTokenizer:
        """A BERT tokeniser from a vocab.txt (one token per line, id = line number), with the
        special tokens [PAD] [UNK] [CLS] [SEP] [MASK] matched in the raw text as HF does."""
        from tokenizers.implementations import BertWordPieceTokenizer

        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # a final newline ends the last line, it does not start a new one
        vocab = [(ln.rstrip(_RUST_WHITESPACE), i) for i, ln in enumerate(lines)]
        tokens = dict(vocab)
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        spec = BertSpec(
            vocab=vocab,
            clean_text=clean_text,
            handle_chinese_chars=handle_chinese_chars,
            strip_accents=lowercase if strip_accents is None else bool(strip_accents),
            lowercase=lowercase,
            added_tokens=[(t, tokens[t]) for t in specials if t in tokens],
        )
        hf = BertWordPieceTokenizer(
            str(path), clean_text=clean_text, handle_chinese_chars=handle_chinese_chars,
            strip_accents=strip_accents, lowercase=lowercase,
        )._tokenizer  # fmt: skip
        return cls(spec, hf, backend)

    def encode_batch(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        max_length: int | None = None,
        padding: Padding | bool = "longest",
        truncation: TruncationArg = True,
        num_threads: int | None = None,
        dtype: type[np.integer] = np.int64,
    ) -> dict[str, np.ndarray]:
        """Tokenise a batch (and its second texts, for pairs).

        Returns int64 (or ``dtype=np.int32``) arrays [batch, width]: width is the longest row
        after truncation (``padding="longest"``) or ``max_length`` (``"max_length"``).
        ``max_length`` defaults to the model's limit; ``truncation`` is True/"longest_first",
        "only_first", "only_second" or False. ``num_threads`` caps the threads of the C++ path
        (None: chosen from the batch size; small batches always run on the calling thread).
        """
        pad_max = _padding_to_max(padding)
        if max_length is None:
            max_length = self.model_max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
            raise ValueError(f"max_length must be a non-negative int, not {max_length!r}")
        int32 = np.dtype(dtype) == np.int32
        if not int32 and np.dtype(dtype) != np.int64:
            raise ValueError(f"dtype must be np.int64 or np.int32, not {dtype!r}")
        threads = 0 if num_threads is None else int(num_threads)
        if threads < 0:
            raise ValueError("num_threads must be positive or None")
        texts = _as_list(texts, "texts")
        if text_pairs is not None:
            text_pairs = _as_list(text_pairs, "text_pairs")
        if self._cpp is not None:
            out: dict[str, np.ndarray] = self._cpp.encode_batch(
                texts, text_pairs, max_length, truncation, pad_max, threads, int32
            )
            return out
        return self._hf_encode_batch(texts, text_pairs, max_length, pad_max, truncation, dtype)

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        max_length: int | None = None,
        truncation: TruncationArg = True,
    ) -> dict[str, np.ndarray]:
        """Tokenise one text (or pair); arrays of shape [length], no padding."""
        pairs = None if text_pair is None else [text_pair]
        out = self.encode_batch([text], pairs, max_length=max_length, truncation=truncation)
        return {k: v[0] for k, v in out.items()}

    # HF fallback: the same contract as the C++ path, errors included.
    def _hf_encode_batch(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None,
        max_length: int,
        pad_max: bool,
        truncation: TruncationArg,
        dtype: type[np.integer],
    ) -> dict[str, np.ndarray]:
        _check_texts(texts)
        strategy = _truncation_strategy(truncation)
        n_special = 2 if text_pairs is None else 3
        if text_pairs is not None:
            _check_texts(text_pairs, "text_pairs")
            if len(text_pairs) != len(texts):
                raise ValueError("texts and text_pairs differ in length")
        if strategy is not None and max_length < n_special:
            raise ValueError(f"max_length must leave room for the {n_special} special tokens")
        inputs: list[Any] = list(texts)
        if text_pairs is not None:
            inputs = list(zip(texts, text_pairs, strict=True))
        with self._hf_lock:  # truncation is state of the shared HF object
            if strategy is not None:
                self._hf.enable_truncation(max_length, strategy=strategy)
            try:
                encs = self._hf.encode_batch(inputs)
            except Exception as exc:  # HF refuses a too-short sequence for only_first/second
                raise ValueError(f"text could not be truncated: {exc}") from exc
            finally:
                self._hf.no_truncation()
        longest = max((len(e.ids) for e in encs), default=0)
        if pad_max and longest > max_length:
            raise ValueError(
                "a text is longer than max_length and truncation is off: the rows would be "
                "ragged; use padding='longest' or truncation=True"
            )
        width = max_length if pad_max else longest
        ids = np.full((len(encs), width), self.pad_id, dtype=dtype)
        mask = np.zeros((len(encs), width), dtype=dtype)
        types = np.zeros((len(encs), width), dtype=dtype)
        for r, e in enumerate(encs):
            n = len(e.ids)
            ids[r, :n] = e.ids
            mask[r, :n] = 1
            types[r, :n] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _as_list(texts: Sequence[str], what: str) -> Sequence[str]:
    """Lists and tuples pass as they are; other iterables of str are listed once."""
    if isinstance(texts, list | tuple):
        return texts
    if isinstance(texts, str | bytes):
        raise TypeError(f"{what} must be a sequence of str, not one {type(texts).__name__}")
    return list(texts)


def _padding_to_max(padding: Padding | bool) -> bool:
    if padding is True or padding == "longest":
        return False
    if padding == "max_length":
        return True
    raise ValueError(f"padding must be 'longest', True or 'max_length', not {padding!r}")


def _truncation_strategy(truncation: TruncationArg) -> str | None:
    if truncation is True:
        return "longest_first"
    if truncation is False or truncation == "do_not_truncate":
        return None
    if truncation in ("longest_first", "only_first", "only_second"):
        return str(truncation)
    raise ValueError(f"unknown truncation strategy {truncation!r}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _spec_from_tokenizer_json(d: dict[str, Any]) -> BertSpec:
    """The C++ spec of a tokenizer.json, with ``unsupported`` set where it leaves the BERT
    pipeline the C++ code implements."""
    model = d.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"not a WordPiece tokenizer.json (model type {model.get('type')!r})")
    norm = d.get("normalizer") or {}
    problems = []
    if norm.get("type") != "BertNormalizer":
        problems.append(f"normalizer {norm.get('type')!r}")
    if (d.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        problems.append(f"pre_tokenizer {(d.get('pre_tokenizer') or {}).get('type')!r}")
    added = []
    for t in d.get("added_tokens", []):
        if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            problems.append(f"added token {t.get('content')!r} with normalized/strip/single_word")
        added.append((str(t["content"]), int(t["id"])))
    cls_tok, sep_tok = _bert_template(d.get("post_processor"), problems)
    lowercase = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    return BertSpec(
        vocab=[(str(k), int(v)) for k, v in model["vocab"].items()],
        unk_token=str(model.get("unk_token", "[UNK]")),
        continuing_prefix=str(model.get("continuing_subword_prefix", "##")),
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        clean_text=bool(norm.get("clean_text", True)),
        handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
        strip_accents=lowercase if strip is None else bool(strip),
        lowercase=lowercase,
        added_tokens=added,
        cls_token=cls_tok,
        sep_token=sep_tok,
        pad_token=str((d.get("padding") or {}).get("pad_token", "[PAD]")),
        unsupported="; ".join(problems) or None,
    )


def _bert_template(post: dict[str, Any] | None, problems: list[str]) -> tuple[str, str]:
    """[CLS] A [SEP] (B [SEP]) with type ids 0/0/0 (1/1): the only post-processor supported."""
    if post is None:
        problems.append("a missing post_processor")
        return "[CLS]", "[SEP]"
    if post.get("type") == "BertProcessing":
        return str(post["cls"][0]), str(post["sep"][0])
    if post.get("type") == "TemplateProcessing":
        single = [_piece(p) for p in post.get("single", [])]
        pair = [_piece(p) for p in post.get("pair", [])]
        if len(single) == 3 and single[1] == ("A", 0):
            cls_tok, sep_tok = single[0][0], single[2][0]
            want_single = [(cls_tok, 0), ("A", 0), (sep_tok, 0)]
            want_pair = [*want_single, ("B", 1), (sep_tok, 1)]
            if single == want_single and pair == want_pair:
                return cls_tok, sep_tok
    problems.append(f"post_processor {post.get('type')!r} other than the BERT template")
    return "[CLS]", "[SEP]"


def _piece(p: dict[str, Any]) -> tuple[str, int]:
    _kind, body = next(iter(p.items()))
    return str(body["id"]), int(body.get("type_id", 0))


def _check_texts(texts: Sequence[str], what: str = "texts") -> None:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of str, not one str")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{what}[{i}] is not valid Unicode: it holds a lone surrogate code point"
            ) from exc
