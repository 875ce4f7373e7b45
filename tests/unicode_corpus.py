"""Text corpora for the tokeniser tests: the hand-written multilingual lines, generated edge
cases, the characters where fast tokenisers drift, and a seeded random fuzz corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS = Path(__file__).parent / "data" / "multilingual.txt"


def corpus_texts() -> list[str]:
    """The multilingual corpus (tests/data/multilingual.txt) plus the generated edge cases."""
    return CORPUS.read_text(encoding="utf-8").splitlines() + edge_texts()


def edge_texts() -> list[str]:
    """Generated edge cases: word-length limits, controls, zero-width, private use, unassigned,
    combining sequences in every order, added tokens glued to text."""
    texts = []
    for n in (99, 100, 101):
        texts += ["a" * n, "x" * n + " tail", "é" * n, "İ" * n, "ﬁ" * n, "a\u0301" * n]
    texts += ["한" * 33, "한" * 34, "한국" * 17, "\u00e9" * 100 + "!", "ab" * 49 + "c"]
    controls = "".join(map(chr, range(0x20))), "".join(map(chr, range(0x7F, 0xA1)))
    texts += [controls[0] + "visible" + controls[1]]
    texts += [
        "zero\u200bwidth\u200cnon\u200djoiner\u2060wj\ufeffbom\u00adshy",
        "\u202eRTL\u202c ok",
    ]
    texts += ["\ue000\uf8ff \U000f0000\U0010fffd private", "\u0378\u0379 \U000e0000 \U0003ffff"]
    texts += ["\ufdd0\ufffe\uffff nonchars", "\ufffd\x00\x00 nul", "a\u2028b\u2029c\x85d\x1ce"]
    marks = ["\u0301", "\u0316", "\u0334", "\u05b0", "\u0898", "\u1ab0", "\u0345", "\U0001d165"]
    for m1 in marks:
        for m2 in marks:
            texts.append(f"e{m1}{m2}x o{m2}\U0001d166{m1}")
    texts += ["[CLS]", "[CLS][SEP]", "x[MASK]y", "[[CLS]]", "[cls] [Mask]", "[UNK][UNK]"]
    texts += ["", " ", "   \t\n ", "!!!", "a", "\U0001f468\u200d\U0001f469\u200d\U0001f467"]
    return texts


# Characters where fast tokenisers drift: marks of every class (some unknown to the
# reference's older Unicode data), Hangul, CJK and compatibility ideographs, case oddities,
# controls and spaces of every kind, emoji parts, and the pieces of added tokens.
TRICKY = [
    *"aZ09 .,!?'\"-_#[]()\t\n\r\x00\x0b\x1c\x7f\x85\xa0\xad"
    "\u0301\u0316\u0334\u0345\u05b0\u0898\u1ab0\u1dfa\u20dd\u0f39\u0e31\u093f\u094d"
    "éÉİıßẞΣσςǅ\u212a\u2126ﬁ한가힣\u1100\u1161\u11a8東京\uf900\ufa0e\U00020000"
    "\u200b\u200c\u200d\u2028\u3000\ufeff\ufffd\ue000\U000e0001\u0378"
    "😀\U0001f3fd\ufe0f\u20e3🇯🇵\U0001d165\U0001d16d\U0001d166",
    *["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "##", "a" * 100, "é" * 50],
]


def fuzz_texts(n: int, seed: int) -> list[str]:
    """n random texts: runs of uniform scalar values, of BMP characters and of TRICKY pieces."""
    rng = np.random.default_rng(seed)
    scalars = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)])
    out = []
    for _ in range(n):
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            kind, size = int(rng.integers(3)), int(rng.integers(0, 40))
            if kind == 0:
                parts.append("".join(map(chr, rng.choice(scalars, size))))
            elif kind == 1:
                parts.append("".join(map(chr, rng.choice(scalars[:0xF800], size))))
            else:
                parts.append("".join(rng.choice(np.array(TRICKY, dtype=object), size)))
        out.append(" ".join(parts) if rng.random() < 0.5 else "".join(parts))
    return out
