"""Shared sizes for the benchmark suites. Run: make bench (or pytest benchmarks
--benchmark-enable). Each file times our path beside what a user would use instead."""

from __future__ import annotations

import os

# Big sizes live here, never in tests. LREC_BENCH_SMALL=1 shrinks them for a quick look.
SMALL = os.environ.get("LREC_BENCH_SMALL") == "1"
N_ITEMS = [10_000] if SMALL else [100_000, 1_000_000]
