"""The tokeniser core under AddressSanitizer + UndefinedBehaviorSanitizer.

csrc/fuzz_main.cpp drives the same C++ sources as the extension (setup.py's CORE_SOURCES) over
the corpus, the edge cases, a seeded random corpus and malformed UTF-8, through the per-text
and the threaded batch paths; any sanitizer report fails the test, and the ids it prints must
still equal HF tokenizers'.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lrec_fast.text import minilm_dir

from .unicode_corpus import corpus_texts, fuzz_texts

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/normalizer.cpp", "csrc/tokenizer.cpp", "csrc/wordpiece.cpp", "csrc/fuzz_main.cpp"]
FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]  # fmt: skip
MALFORMED = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"abc\xe2\x82", b"\xf4\x90\x80\x80", b"\x80"]


@pytest.fixture(scope="module")
def fuzz_binary(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("asan") / "fuzz_main"
    cmd = [cxx, *FLAGS, "-I", str(ROOT / "csrc"), *(str(ROOT / s) for s in SOURCES), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "sanitize" in res.stderr:
        pytest.skip(f"the compiler has no ASan/UBSan runtime: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    # The runtimes must really report here: a use-after-free (ASan) and a signed overflow (UBSan).
    canaries = {
        "heap-use-after-free": "int main() { int* p = new int[2]; delete[] p; return p[0]; }",
        "signed integer overflow": "int main(int n, char**) { int x = 2147483647; return x + n; }",
    }
    for report, code in canaries.items():
        src = out.with_name("canary.cpp")
        src.write_text(code)
        subprocess.run([cxx, *FLAGS, str(src), "-o", str(src.with_suffix(""))], check=True)
        res = subprocess.run([str(src.with_suffix(""))], capture_output=True, text=True)
        assert res.returncode != 0 and report in res.stderr, res.stderr[-1000:]
    return out


@pytest.mark.slow
def test_core_is_clean_under_sanitizers(fuzz_binary, tmp_path):
    texts = corpus_texts() + fuzz_texts(4000, seed=7)
    records = [t.encode("utf-8") for t in texts] + MALFORMED
    blob = b"".join(struct.pack("<I", len(r)) + r for r in records)
    (tmp_path / "texts.bin").write_bytes(blob)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=3",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")  # fmt: skip
    res = subprocess.run(
        [str(fuzz_binary), str(minilm_dir() / "vocab.txt"), str(tmp_path / "texts.bin"),
         str(tmp_path / "ids.txt")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert "Sanitizer" not in res.stderr and "runtime error" not in res.stderr, res.stderr[-4000:]
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (tmp_path / "ids.txt").read_text().split("\n")[:-1]
    assert len(lines) == len(records)
    assert lines[len(texts) :] == ["!"] * len(MALFORMED)
    ref = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    encs = ref.encode_batch(texts, add_special_tokens=False)
    for text, line, enc in zip(texts, lines, encs, strict=False):
        assert line == " ".join(map(str, enc.ids)), repr(text)
