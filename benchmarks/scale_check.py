"""The service at a larger scale than MovieLens, with the skew real streams have: a synthetic
stream of 20,000 users (Pareto activity: heavy users rate in bursts) and 5,000 items (Pareto
popularity: one item takes about 15% of all ratings). Fit on the first 400,000 of 500,000
events, then test-then-train on the next ``--events`` in calls of 100, beside the same fitted
model left static. Prints what a service owner asks first: does the stream keep learning
(rejected calls, RMSE against the static model), and what each call costs (mean, p50, p90,
max, the refit ends included); with ``--readers``, also what answers wait while the stream
learns: recommend(B = 1) latency from another thread throughout (the calls then share the
2 cores with it).

    python -m benchmarks.scale_check [--events 20000] [--set uknn_max_raters=1000] [--readers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time

import numpy as np

from benchmarks.concurrency_check import percentiles, readers
from lrec_fast import DivergenceError, Recommender
from lrec_fast.data import make_stream

N_FIT, N_ALL = 400_000, 500_000


def ms(xs: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(xs, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="stream events after the fit")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a learner setting (e.g. uknn_max_raters=1000), repeatable")  # fmt: skip
    ap.add_argument("--readers", action="store_true",
                    help="recommend from another thread while the stream learns")  # fmt: skip
    args = ap.parse_args()
    settings = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    if not 0 < args.events <= N_ALL - N_FIT:
        ap.error(f"--events must be in 1..{N_ALL - N_FIT}")
    ds = make_stream(n_users=20_000, n_items=5_000, n_events=N_ALL, seed=0)
    ev = ds.events
    rec = Recommender(encoder="hashing-384", max_epochs=2, **settings)
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
    done, lat = threading.Event(), []
    reader = threading.Thread(target=lambda: lat.extend(readers(rec, done.is_set)))
    if args.readers:
        reader.start()
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
    done.set()
    if args.readers:
        reader.join()
    rmse, rmse_static = (float(np.sqrt(np.concatenate(x).mean())) for x in (sq, sq_static))
    print(f"stream of {args.events:,} events: RMSE {rmse:.4f} (static model {rmse_static:.4f}), "
          f"{rejected} of {len(calls)} calls rejected")  # fmt: skip
    print(f"feedback(100): mean {1e3 * float(np.mean(calls)):.1f} ms, p50 {ms(calls, 50):.1f}"
          f" ms, p90 {ms(calls, 90):.1f} ms, max {1e3 * max(calls):.0f} ms (refit ends"
          " included)")  # fmt: skip
    if args.readers:
        print(f"recommend B=1 from another thread meanwhile: {percentiles(lat)}")
    st = rec.stats()  # (the fit's steps included)
    print(f"rating steps: {st['steps']:,}, {st['steps_backtracked'] / max(st['steps'], 1):.0%} of "
          f"them backtracked ({st['step_halvings']:,} halvings), {st['steps_rejected']} rejected; "
          f"{st['user_lists_made']:,} user lists made")  # fmt: skip
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
