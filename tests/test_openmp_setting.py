"""lrec_fast bounds OpenMP spinning (GOMP_SPINCOUNT) only where it can take effect for both
thread pools and the user has not chosen: torch not loaded yet, neither variable set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("first", "env", "expected"),
    [
        ("import lrec_fast", {}, "3000 None"),
        ("import torch, lrec_fast", {}, "None None"),  # torch's pool already read its setting
        ("import lrec_fast", {"GOMP_SPINCOUNT": "50"}, "50 None"),
        ("import lrec_fast", {"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
    ],
)
def test_spin_setting(first, env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", f"{first}; {SHOW}"], env=base | env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split("\n")[-2] == expected
