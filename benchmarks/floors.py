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


def interleaved_ms(
    fns: dict[str, Callable[[], object]], rounds: int, block: int = 3, settle_s: float = 0.15
) -> dict[str, list[float]]:
    """Wall time of each function in milliseconds, one value per round: in each round every
    function in turn is called ``block`` times and the median of those is its value. On a
    shared machine whose speed drifts, per-round ratios between them are far steadier than
    medians taken one function after another. Before each function's block the process
    idles ``settle_s``: long enough for the previous one's spinning threads (OpenBLAS spins
    about 0.1 s after a call) to go to sleep instead of taking the cores; the median of the
    block drops the first call's wake-up."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle_s)
            ts = []
            for _ in range(block):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            out[name].append(statistics.median(ts))
    return out


def round_median(ms: dict[str, list[float]], name: str) -> float:
    """Median of ``name``'s times from ``interleaved_ms`` (NaN when it was not timed)."""
    return statistics.median(ms[name]) if name in ms else float("nan")


def round_ratio(ms: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time / ``den``'s (NaN when either was not timed)."""
    if num not in ms or den not in ms:
        return float("nan")
    return statistics.median(a / b for a, b in zip(ms[num], ms[den], strict=True))


READ_PASS_BYTES = 1 << 30


@cache
def _big() -> torch.Tensor:
    return torch.ones(READ_PASS_BYTES // 4, dtype=torch.float32)


def read_pass() -> Callable[[], object]:
    """One read-only pass over 1 GiB of float32 (torch.sum, all threads), far beyond the
    caches: timed in the same rounds as the kernels, then scaled by table bytes / 1 GiB, it
    is each round's bandwidth floor."""
    return _big().sum


@cache
def read_bandwidth_gbs() -> float:
    """Read-only memory bandwidth in GB/s: torch.sum (vectorised, all threads) over 1 GiB,
    far beyond the caches. A read pass, not a copy, as a scan only reads the table."""
    ms = median_ms(read_pass(), repeats=9)
    return READ_PASS_BYTES / (ms * 1e-3) / 1e9


def floor_ms(n_bytes: int) -> float:
    """Time to read n_bytes once at the measured bandwidth, in milliseconds."""
    return n_bytes / (read_bandwidth_gbs() * 1e9) * 1e3
