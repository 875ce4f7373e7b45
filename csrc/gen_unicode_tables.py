"""Generate csrc/unicode_tables.inc: the per-code-point data of the BERT text pipeline.

    python csrc/gen_unicode_tables.py            # rewrite csrc/unicode_tables.inc
    python csrc/gen_unicode_tables.py --check    # exit 1 if the committed file is stale

Why the tables are measured rather than read from one Unicode Character Database: the behaviour
we must reproduce is that of HF ``tokenizers`` (Rust), and its BERT pipeline mixes Unicode
versions. Control and punctuation come from the ``unicode_categories`` crate (Unicode 8 era:
code points assigned later are neither punctuation nor removed, and unassigned code points are
kept), whitespace and lowercase from Rust's ``char`` (a recent Unicode), NFD and canonical
combining classes from ``unicode-normalization-alignments`` (older again). Python's
``unicodedata`` agrees with none of them on every code point (about 830k code points differ for
"control" alone). So each property is probed from the installed reference, one code point at a
time, through the reference's own public normaliser and pre-tokeniser objects:

- CONTROL: removed by ``clean_text``; CLEAN_WS: mapped to " " by ``clean_text``;
- SPLIT_WS / PUNCT: how ``BertPreTokenizer`` splits "a" + c + "b";
- CJK: spaced by ``handle_chinese_chars``;
- NFD mapping: ``normalizers.NFD``; MN: a character the accent stripper deletes;
- LOWER mapping: ``lowercase`` (per character, may expand: U+0130 -> "i" U+0307);
- canonical combining class: Python's ``unicodedata.combining`` value where the reference's
  NFD reorders the character (probed against U+0334 / U+0301), else 0 (unknown to it).

Hangul syllables decompose algorithmically in the C++ code; the generator checks that rule
against the reference for all 11,172 syllables. It also checks, for every code point, that the
tables rebuild the reference's accent-stripping output exactly.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

from tokenizers import __version__ as tokenizers_version
from tokenizers import normalizers, pre_tokenizers

OUT = Path(__file__).with_name("unicode_tables.inc")

# Flag bits; keep in sync with csrc/unicode.hpp.
CONTROL, CLEAN_WS, SPLIT_WS, PUNCT, CJK, MN = 1, 2, 4, 8, 16, 32

S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
N_COUNT = V_COUNT * T_COUNT
S_COUNT = L_COUNT * N_COUNT
MAX_CP = 0x110000
BLOCK = 256


def hangul_nfd(cp: int) -> list[int]:
    s = cp - S_BASE
    out = [L_BASE + s // N_COUNT, V_BASE + (s % N_COUNT) // T_COUNT]
    if s % T_COUNT:
        out.append(T_BASE + s % T_COUNT)
    return out


def is_surrogate(cp: int) -> bool:
    return 0xD800 <= cp <= 0xDFFF


def probe() -> tuple[list[int], list[int], dict[int, list[int]], dict[int, list[int]]]:
    """Measure flags, ccc, NFD and lowercase mappings of every code point from the reference."""
    bert = normalizers.BertNormalizer
    clean = bert(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    cjk = bert(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    strip = bert(clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False)
    lower = bert(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=True)
    nfd = normalizers.NFD()
    pre = pre_tokenizers.BertPreTokenizer()

    flags = [0] * MAX_CP
    ccc = [0] * MAX_CP
    nfd_map: dict[int, list[int]] = {}
    lower_map: dict[int, list[int]] = {}
    for cp in range(MAX_CP):
        if is_surrogate(cp):
            continue
        c = chr(cp)
        f = 0
        cleaned = clean.normalize_str(c)
        if cleaned == "":
            f |= CONTROL
        elif cleaned == " " and c != " ":
            f |= CLEAN_WS
        pieces = pre.pre_tokenize_str("a" + c + "b")
        if len(pieces) == 2:
            f |= SPLIT_WS
        elif len(pieces) == 3:
            f |= PUNCT
        if cjk.normalize_str(c) == f" {c} ":
            f |= CJK
        decomposed = nfd.normalize_str(c)
        if decomposed != c:
            nfd_map[cp] = [ord(x) for x in decomposed]
        elif strip.normalize_str(c) == "":
            f |= MN
        lowered = lower.normalize_str(c)
        if lowered != c:
            lower_map[cp] = [ord(x) for x in lowered]
        if decomposed == c and unicodedata.combining(c):
            ccc[cp] = measured_ccc(nfd, c)
        flags[cp] = f
    return flags, ccc, nfd_map, lower_map


def measured_ccc(nfd: normalizers.NFD, c: str) -> int:
    """unicodedata's class if the reference's NFD reorders c against a known mark, else 0."""
    value = unicodedata.combining(c)
    if value > 1:  # U+0334 has class 1: a known c of class > 1 moves after it
        return value if nfd.normalize_str("a" + c + "\u0334") == "a\u0334" + c else 0
    # class 1: a known c moves before U+0301 (class 230)
    return value if nfd.normalize_str("a\u0301" + c) == "a" + c + "\u0301" else 0


def self_check(flags: list[int], ccc: list[int], nfd_map: dict[int, list[int]]) -> None:
    """The tables must rebuild the reference's accent stripping for every code point."""
    strip = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False
    )
    nfd = normalizers.NFD()
    for k in range(S_COUNT):
        cp = S_BASE + k
        assert [ord(x) for x in nfd.normalize_str(chr(cp))] == hangul_nfd(cp), hex(cp)
        del nfd_map[cp]  # the C++ code decomposes Hangul by rule
    for cp in range(MAX_CP):
        if is_surrogate(cp):
            continue
        seq = nfd_map.get(cp, hangul_nfd(cp) if S_BASE <= cp < S_BASE + S_COUNT else [cp])
        assert all(x not in nfd_map for x in seq), f"NFD of {cp:#x} is not final"
        # a single character's decomposition is already in canonical order
        assert [ccc[x] for x in seq if ccc[x]] == sorted(ccc[x] for x in seq if ccc[x]), hex(cp)
        want = strip.normalize_str(chr(cp))
        got = "".join(chr(x) for x in seq if not flags[x] & MN)
        assert got == want, f"strip of {cp:#x}: {got!r} != {want!r}"


def render(
    flags: list[int],
    ccc: list[int],
    nfd_map: dict[int, list[int]],
    lower_map: dict[int, list[int]],
) -> str:
    pool: list[int] = []
    pool_index: dict[tuple[int, ...], int] = {}

    def intern(seq: list[int]) -> int:
        key = tuple(seq)
        if key not in pool_index:
            pool_index[key] = len(pool)
            pool.extend(seq)
        return pool_index[key]

    records: list[tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]
    record_index = {records[0]: 0}
    rec_of = [0] * MAX_CP
    for cp in range(MAX_CP):
        n = nfd_map.get(cp)
        lo = lower_map.get(cp)
        rec = (
            flags[cp],
            ccc[cp],
            len(n) if n else 0,
            len(lo) if lo else 0,
            intern(n) if n else 0,
            intern(lo) if lo else 0,
        )
        if rec not in record_index:
            record_index[rec] = len(records)
            records.append(rec)
        rec_of[cp] = record_index[rec]
    assert len(records) < 1 << 16 and len(pool) < 1 << 32

    blocks: list[tuple[int, ...]] = []
    block_index: dict[tuple[int, ...], int] = {}
    stage1 = []
    for b in range(MAX_CP // BLOCK):
        blk = tuple(rec_of[b * BLOCK : (b + 1) * BLOCK])
        if blk not in block_index:
            block_index[blk] = len(blocks)
            blocks.append(blk)
        stage1.append(block_index[blk])
    stage2 = [x for blk in blocks for x in blk]

    def rows(values: list[int] | list[str], per: int) -> str:
        items = [str(v) for v in values]
        return "\n".join(
            "    " + ", ".join(items[i : i + per]) + "," for i in range(0, len(items), per)
        )

    rec_lines = [f"{{{f}, {c}, {nl}, {ll}, {no}, {lo}}}" for f, c, nl, ll, no, lo in records]
    return f"""// Generated by csrc/gen_unicode_tables.py; do not edit. Regenerate with
//   python csrc/gen_unicode_tables.py   (check with --check)
// Measured from HF tokenizers {tokenizers_version}; combining classes from unicodedata
// {unicodedata.unidata_version}. {len(records)} records, {len(blocks)} blocks, pool {len(pool)}.
// NOLINTBEGIN
namespace lrec::unicode_data {{

constexpr const char* kReferenceVersion = "tokenizers {tokenizers_version}";
constexpr int kBlockShift = 8;

inline constexpr std::uint16_t kStage1[{len(stage1)}] = {{
{rows(stage1, 16)}
}};

inline constexpr std::uint16_t kStage2[{len(stage2)}] = {{
{rows(stage2, 16)}
}};

inline constexpr Record kRecords[{len(records)}] = {{
{rows(rec_lines, 4)}
}};

inline constexpr char32_t kPool[{max(len(pool), 1)}] = {{
{rows(pool or [0], 12)}
}};

}}  // namespace lrec::unicode_data
// NOLINTEND
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = ap.parse_args()
    flags, ccc, nfd_map, lower_map = probe()
    self_check(flags, ccc, nfd_map)
    text = render(flags, ccc, nfd_map, lower_map)
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: rerun python csrc/gen_unicode_tables.py", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
