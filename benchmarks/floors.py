"""The machine's limits the benchmarks are measured against, and a plain median timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import cache

import torch


def median_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls, in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@cache
def read_bandwidth_gbs() -> float:
    """Read-only memory bandwidth in GB/s: torch.sum (vectorised, all threads) over 1 GiB,
    far beyond the caches. A read pass, not a copy, as a scan only reads the table."""
    big = torch.ones(1 << 28, dtype=torch.float32)
    ms = median_ms(lambda: big.sum(), repeats=9)
    return big.numel() * 4 / (ms * 1e-3) / 1e9


def floor_ms(n_bytes: int) -> float:
    """Time to read n_bytes once at the measured bandwidth, in milliseconds."""
    return n_bytes / (read_bandwidth_gbs() * 1e9) * 1e3
