"""The committed Unicode tables are what their generator measures from the installed HF
tokenizers (they go stale if tokenizers changes its Unicode data: regenerate, rebuild)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tables_are_up_to_date():
    res = subprocess.run(
        [sys.executable, str(ROOT / "csrc" / "gen_unicode_tables.py"), "--check"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_extension_was_built_from_these_tables():
    ext = pytest.importorskip("lrec_fast._wordpiece", reason="C++ extension not built")
    header = (ROOT / "csrc" / "unicode_tables.inc").read_text().splitlines()[2]
    assert ext.UNICODE_REFERENCE.split()[-1] in header
