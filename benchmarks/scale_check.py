"""The service at a larger scale than MovieLens, with the skew real streams have: a synthetic
stream of 20,000 users (Pareto activity: heavy users rate in bursts) and 5,000 items (Pareto
popularity: one item takes about 15% of all ratings). Fit on the first 450,000 events, then
test-then-train on the next ``--events`` in calls of 100, beside the same fitted model left
static. Prints what a service owner asks first: does the stream keep learning (rejected calls,
RMSE against the static model), and what each call costs (p50 / p90 / max, the refit ends
included).

    python -m benchmarks.scale_check [--events 20000]       # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from lrec_fast import DivergenceError, Recommender
from lrec_fast.data import make_stream

N_FIT = 450_000


def ms(xs: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(xs, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="stream events after the fit")
    args = ap.parse_args()
    ds = make_stream(n_users=20_000, n_items=5_000, n_events=N_FIT + args.events, seed=0)
    ev = ds.events
    rec = Recommender(encoder="hashing-384", max_epochs=2)
    rec.add_items(ds.item_ids, ds.item_text)
    t0 = time.perf_counter()
    rec.fit(ev.user[:N_FIT], ev.item[:N_FIT], ev.rating[:N_FIT])
    top = np.bincount(ev.item[:N_FIT]).max()
    print(f"fit on {N_FIT:,} events: {time.perf_counter() - t0:.1f} s (the most rated item: "
          f"{top:,} ratings; backend {rec.backend})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rec.save(tmp)
        static = Recommender.load(tmp)
    sq, sq_static, calls, rejected = [], [], [], 0
    for s in range(N_FIT, N_FIT + args.events, 100):
        u, i, r = ev.user[s : s + 100], ev.item[s : s + 100], ev.rating[s : s + 100]
        sq.append((np.clip(rec.predict(u, i), 1, 5) - r) ** 2)
        sq_static.append((np.clip(static.predict(u, i), 1, 5) - r) ** 2)
        t0 = time.perf_counter()
        try:
            rec.feedback(u, i, r)
        except DivergenceError:
            rejected += 1
        calls.append(time.perf_counter() - t0)
    rmse, rmse_static = (float(np.sqrt(np.concatenate(x).mean())) for x in (sq, sq_static))
    print(f"stream of {args.events:,} events: RMSE {rmse:.4f} (static model {rmse_static:.4f}), "
          f"{rejected} of {len(calls)} calls rejected")  # fmt: skip
    print(f"feedback(100): p50 {ms(calls, 50):.1f} ms, p90 {ms(calls, 90):.1f} ms, max "
          f"{1e3 * max(calls):.0f} ms (refit ends included)")  # fmt: skip
    ids = rec.state.users.ids
    for b in (1, 64):
        ts = []
        for j in range(30):
            q = [ids[(j * 97 + x) % len(ids)] for x in range(b)]
            t0 = time.perf_counter()
            rec.recommend(q, 10)
            ts.append(time.perf_counter() - t0)
        print(f"recommend B={b}: median {1e3 * statistics.median(ts):.2f} ms")
    ts = []
    for j in range(30):
        t0 = time.perf_counter()
        rec.predict([ids[j]], [rec.item_ids[j]])
        ts.append(time.perf_counter() - t0)
    print(f"predict 1 pair: median {1e3 * statistics.median(ts):.3f} ms")


if __name__ == "__main__":
    main()
