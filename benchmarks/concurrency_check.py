"""What a service's readers see while the model learns: recommend() latency from one thread,
alone and while another thread streams feedback() (calls of 100 events, every 10th bringing a
new item with its text), on a MovieLens-sized model (bench_service's).

An answer waits only for the part of a feedback call that changes the model in place (the
steps and their bookkeeping); the long parts (consolidation on a fork, the neighbour lists, the
refit's share on a copy of its rows, new items' texts) run while answers read (README, API,
"Thread-safe").
``scale_check --readers`` measures the same at 20,000 users.

    python -m benchmarks.concurrency_check [--seconds 10] [--minilm]   # ~30 s
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import numpy as np

from benchmarks.bench_service import movielens_sized
from lrec_fast import Recommender
from lrec_fast.data import make_stream


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return f"p50 {p50:.2f}, p90 {p90:.2f}, p99 {p99:.2f}, max {a.max():.1f} ms ({a.size:,} calls)"


def for_seconds(seconds: float) -> Callable[[], bool]:
    stop = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= stop


def readers(rec: Recommender, done: Callable[[], bool], gap_s: float = 0.001) -> list[float]:
    """recommend(B = 1, k = 10) until ``done()``, one call every ``gap_s`` at most: latencies,
    ms."""
    ids, out, j = rec.state.users.ids, [], 0
    while not done():
        t0 = time.perf_counter()
        rec.recommend([ids[(j * 97) % len(ids)]], 10)
        out.append(1e3 * (time.perf_counter() - t0))
        j += 1
        time.sleep(gap_s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--minilm", action="store_true", help="the real encoder for new items")
    args = ap.parse_args()
    rec = movielens_sized()
    if args.minilm:  # new items' texts through the real encoder (the same 384 dims)
        from lrec_fast.text.encoder import MINILM_NAME

        rec._encoder_spec, rec._encoder = MINILM_NAME, None
        rec.encoder.encode(["warm up"])
    ev = make_stream(n_users=943, n_items=1682, n_events=200_000, seed=1).events
    print(f"model: {rec.n_users} users, {rec.n_items} items, backend {rec.backend}, "
          f"encoder {rec.encoder.name}")  # fmt: skip
    readers(rec, for_seconds(1.0))  # warm-up
    print("recommend alone:          ", percentiles(readers(rec, for_seconds(args.seconds))))

    done, calls = threading.Event(), []

    def writer() -> None:
        s, c = 0, 0
        while not done.is_set():
            b = ev.take(slice(s, s + 100))
            items, texts = list(b.item), None
            if c % 10 == 9:  # a new item arrives with its text
                items[0] = f"new-{c}"
                texts = {items[0]: f"A New Film {c} (2026) | Drama"}
            t0 = time.perf_counter()
            rec.feedback(b.user, items, b.rating, texts=texts)
            calls.append(1e3 * (time.perf_counter() - t0))
            s, c = s + 100, c + 1
            time.sleep(0.005)  # a stream, not a saturating loop

    w = threading.Thread(target=writer)
    w.start()
    try:
        lat = readers(rec, for_seconds(args.seconds))
    finally:
        done.set()
        w.join()
    print("recommend during feedback:", percentiles(lat))
    print("feedback(100) calls:      ", percentiles(calls))


if __name__ == "__main__":
    main()
