"""What the HTTP front costs: recommend(B = 1, k = 10) and feedback(100 events) through
``lrec-fast serve``'s server (one keep-alive connection, JSON both ways) beside the same calls
in process, on bench_service's MovieLens-sized model; then recommend over HTTP while another
connection streams feedback.

    python -m benchmarks.serve_check [--calls 2000]   # ~15 s
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

import numpy as np

from benchmarks.bench_service import movielens_sized
from benchmarks.concurrency_check import percentiles
from lrec_fast.data import make_stream
from lrec_fast.serve import make_server


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: object) -> dict:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200, out
        return out


def timed(fn, n: int) -> list[float]:
    out = []
    for j in range(n):
        t0 = time.perf_counter()
        fn(j)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    rec = movielens_sized()
    server = make_server(rec, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(server.server_address[1])
    ids = rec.state.users.ids
    ev = make_stream(n_users=943, n_items=1682, n_events=200_000, seed=1).events

    def users(j: int) -> list:
        return [ids[(j * 97) % len(ids)]]

    def body(j: int) -> dict:
        b = ev.take(slice(100 * j, 100 * j + 100))
        return {"users": b.user.tolist(), "items": b.item.tolist(), "ratings": b.rating.tolist()}

    timed(lambda j: client.post("/recommend", {"users": users(j), "k": 10}), 200)  # warm-up
    n = args.calls
    direct = timed(lambda j: rec.recommend(users(j), 10), n)
    http_ = timed(lambda j: client.post("/recommend", {"users": users(j), "k": 10}), n)
    print(f"recommend B=1 in process:  {percentiles(direct)}")
    print(f"recommend B=1 over HTTP:   {percentiles(http_)}")
    m = max(n // 20, 20)
    direct = timed(lambda j: rec.feedback(*body(j).values()), m)  # (users, items, ratings)
    http_ = timed(lambda j: client.post("/feedback", body(m + j)), m)
    print(f"feedback(100) in process:  {percentiles(direct)}")
    print(f"feedback(100) over HTTP:   {percentiles(http_)}")

    done, writer_client = threading.Event(), Client(server.server_address[1])

    def writer() -> None:
        j = 2 * m
        while not done.is_set():
            writer_client.post("/feedback", body(j))
            j += 1
            time.sleep(0.005)

    w = threading.Thread(target=writer)
    w.start()
    try:
        during = timed(lambda j: client.post("/recommend", {"users": users(j), "k": 10}), n)
    finally:
        done.set()
        w.join()
    print(f"recommend over HTTP while feedback streams over HTTP: {percentiles(during)}")
    server.shutdown()
    print(f"(mean answer {np.mean(during):.2f} ms)")


if __name__ == "__main__":
    main()
