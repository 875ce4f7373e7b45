"""``lrec-fast``: the command line (demo, evaluate, export, serve, info). The only module that
prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ._version import __version__


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(path: Path, results: dict[str, Any], k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ["rmse", f"hr@{k}", f"ndcg@{k}"], strict=True):
        for name, res in results.items():
            xs = [s["start"] + s["events"] for s in res.segments]
            ax.plot(xs, [s[metric] for s in res.segments], marker="o", ms=3, label=name)
        ax.set_title(metric.upper())
        ax.set_xlabel("stream events")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("MovieLens-100k, prequential (test-then-train) over the second half")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_movielens_100k
    from .evaluate import history_of, prequential
    from .service import Recommender

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"lrec-fast {__version__} demo -> {out}")
    ds = load_movielens_100k(args.data)
    ev = ds.events
    n_warm = len(ev) // 2
    warm, stream = ev.take(slice(0, n_warm)), ev.take(slice(n_warm, None))
    print(f"MovieLens-100k: {len(ev):,} ratings; warm-up {len(warm):,}, stream {len(stream):,} "
          f"in micro-batches of {args.batch_size}")  # fmt: skip

    t0 = time.perf_counter()
    rec = Recommender(encoder=args.encoder)
    rec.add_items(ds.item_ids, ds.item_text)
    t_enc = time.perf_counter() - t0
    print(f"catalogue: {rec.n_items} items encoded with {rec.encoder.name} in {t_enc:.1f}s "
          f"(kernel backend: {rec.backend})")  # fmt: skip
    t0 = time.perf_counter()
    fit = rec.fit(warm.user, warm.item, warm.rating)
    t_fit = time.perf_counter() - t0
    print(f"warm-up fit: {fit.epochs} epochs (best {fit.best_epoch}, validation RMSE "
          f"{min(fit.val_rmse):.4f}) in {t_fit:.1f}s")  # fmt: skip
    rec.save(out / "model_warmup")
    static = Recommender.load(out / "model_warmup", cache_dir=None)

    results = {}
    times = {}
    for name, model, learn in (("static", static, False), ("lifelong", rec, True)):
        t0 = time.perf_counter()
        with tqdm(total=len(stream), desc=f"{name:>8}", unit="ev", file=sys.stderr,
                  disable=args.quiet) as bar:  # fmt: skip
            results[name] = prequential(
                model, stream, history_of(warm), learn=learn, batch_size=args.batch_size,
                segment=args.segment, name=name, on_batch=bar.update,
            )  # fmt: skip
        times[name] = time.perf_counter() - t0
    rec.save(out / "model")

    k = 10
    keys = ["rmse", f"hr@{k}", f"ndcg@{k}"]
    rows = [["segment", "events"] + [f"{m} {n}" for m in keys for n in ("static", "lifelong")]]
    segs = zip(results["static"].segments, results["lifelong"].segments, strict=True)
    for i, (a, b) in enumerate(segs):
        rows.append([str(i + 1), f"{int(a['start']):,}+"]
                    + [f"{s[m]:.4f}" for m in keys for s in (a, b)])  # fmt: skip
    a, b = results["static"].overall, results["lifelong"].overall
    rows.append(
        ["overall", f"{int(a['events']):,}"] + [f"{s[m]:.4f}" for m in keys for s in (a, b)]
    )
    print()
    print(_table(rows))
    lo = results["lifelong"].overall
    print(f"\nlifelong updates: {lo['update_ms_per_batch']:.2f} ms per micro-batch of "
          f"{args.batch_size} (guarded step, {rec.backend} kernels), rejected batches: "
          f"{int(lo['rejected_batches'])}")  # fmt: skip

    _example(rec, ds)
    _plot(out / "metrics.png", results, k)
    report = {
        name: {m: res.overall[m] for m in keys} for name, res in results.items()
    } | {
        "segments": {name: res.segments for name, res in results.items()},
        "details": {name: res.overall for name, res in results.items()},
        "config": {"batch_size": args.batch_size, "segment": args.segment,
                   "warmup_events": len(warm), "stream_events": len(stream),
                   "learner": rec.config.as_dict(), "dim": rec.state.dim,
                   "backend": rec.backend, "encoder": rec.encoder.name},
        "seconds": {"encode": t_enc, "fit": t_fit, **times,
                    "total": time.perf_counter() - t_all},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nwrote {out / 'report.json'}, {out / 'metrics.png'}, checkpoints in {out}/model*")
    print(f"demo took {time.perf_counter() - t_all:.1f}s")
    return 0


def _example(rec: Any, ds: Any) -> None:
    """A brand-new user before and after one micro-batch of feedback."""
    text = ds.text_of()
    user = "demo-user"
    sci = [j for j, t in text.items() if "Sci-Fi" in t and "Action" in t]
    rom = [j for j, t in text.items() if "Romance" in t and "Comedy" in t]
    liked, disliked, probe = sci[:6], rom[:6], [sci[6], rom[6]]
    before, _ = rec.recommend([user], k=5)
    p0 = rec.predict([user, user], probe)
    items = liked + disliked
    rec.feedback([user] * len(items), items, [5.0] * len(liked) + [1.0] * len(disliked))
    after, scores = rec.recommend([user], k=5)
    p1 = rec.predict([user, user], probe)
    print(f"\nexample: new user {user!r}")
    print("  before any feedback (cold start: learned item bias + recency prior):")
    for j in before[0]:
        print(f"    {text[int(j)]}")
    print(f"  one feedback call: {len(liked)} sci-fi action films rated 5, "
          f"{len(disliked)} romantic comedies rated 1")  # fmt: skip
    print(
        "  right after it (ranking head: history fold-in score + recency prior, its top 30 "
        "re-ranked with the predicted rating):"
    )
    for j, s in zip(after[0], scores[0], strict=True):
        print(f"    {s:4.2f}  {text[int(j)]}")
    for j, a, b in zip(probe, p0, p1, strict=True):
        print(f"  predicted rating of unseen {text[j]!r}: {a:.2f} -> {b:.2f}")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .kernels import available_backends, resolve_backend

    print(f"lrec-fast {__version__}, torch {torch.__version__}")
    print(f"backends available: {', '.join(available_backends())}; "
          f"selected: {resolve_backend(None).name}")  # fmt: skip
    if "numba" in available_backends():
        from .kernels import gemm, int_dot

        print(f"numba scan: many-query tiles on {gemm.backend()}, int8 dot {int_dot.MODE}")
    omp = {k: os.environ.get(k, "unset") for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    print("OpenMP: " + ", ".join(f"{k}={v}" for k, v in omp.items()))
    from .text import tokenizer

    if tokenizer._ext is not None:
        print(f"tokeniser: cpp (lrec_fast._wordpiece, tables {tokenizer._ext.UNICODE_REFERENCE})")
    else:
        print("tokeniser: hf (C++ extension lrec_fast._wordpiece missing: HF tokenizers fallback)")
    return 0


def _fmt(x: float, spec: str = ".4f") -> str:
    return "-" if x != x else format(x, spec)  # NaN: the metric does not apply


def cmd_evaluate(args: argparse.Namespace) -> int:
    import csv

    from tqdm import tqdm

    from .data import load_movielens_100k
    from .evaluate import MODELS, run_protocol

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_movielens_100k(args.data)
    models = args.models.split(",") if args.models else list(MODELS)
    print(f"lrec-fast {__version__} evaluate -> {out}: MovieLens-100k, {len(ds.events):,} events, "
          f"micro-batches of {args.batch_size}, models: {', '.join(models)}")  # fmt: skip
    n_stream = len(ds.events) - len(ds.events) // 2
    with tqdm(total=n_stream * len(models), unit="ev", file=sys.stderr,
              disable=args.quiet) as bar:  # fmt: skip
        res = run_protocol(
            ds.events, ds.item_ids.tolist(), ds.item_text, batch_size=args.batch_size,
            segment=args.segment, retrain_every=args.retrain_every, seed=args.seed,
            encoder=args.encoder, models=models, on_batch=lambda _name, n: bar.update(n),
            exclude=args.exclude,
        )  # fmt: skip
    k = res.config["k"]
    hr, nd = f"hr@{k}", f"ndcg@{k}"
    rows = [["model", "RMSE", "HR@10", "NDCG@10", "pct rank", "HR cold u", "HR warm u",
             "HR new items", "ret. RMSE", "ret. HR@10", "update s"]]  # fmt: skip
    for name, r in res.streams.items():
        g, b, a = r.groups, res.retention_before[name], res.retention_after[name]
        rows.append([
            res.config["names"][name], _fmt(r.overall["rmse"]), _fmt(r.overall[hr]),
            _fmt(r.overall[nd]), _fmt(r.overall["percentile"]), _fmt(g["cold users"][hr]),
            _fmt(g["warm users"][hr]), _fmt(g["new items"][hr]),
            f"{_fmt(b['rmse'])} -> {_fmt(a['rmse'])}", f"{_fmt(b[hr])} -> {_fmt(a[hr])}",
            f"{r.overall['update_s']:.1f}",
        ])  # fmt: skip
    print()
    print(_table(rows))
    c = res.config
    cold = int(next(iter(res.streams.values())).groups["cold users"]["events"])
    before = "the event" if c["exclude"] == "event" else "the micro-batch"
    print(f"\nwarm-up {c['train']:,} training + {c['retain']:,} retention events; stream "
          f"{c['stream']:,} ({cold:,} from cold users); ret. = the retention set right after "
          f"the warm-up -> after the stream; candidates: items the user had not interacted "
          f"with before {before}")  # fmt: skip
    with open(out / "segments.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "segment", "start", "events", "rmse", hr, nd, "percentile"])
        for name, r in res.streams.items():
            for i, sgm in enumerate(r.segments):
                w.writerow([name, i + 1, int(sgm["start"]), int(sgm["events"]), sgm["rmse"],
                            sgm[hr], sgm[nd], sgm["percentile"]])  # fmt: skip
    report = {
        "config": c, "seconds": res.seconds,
        "models": {n: {"overall": r.overall, "groups": r.groups,
                       "retention_before": res.retention_before[n],
                       "retention_after": res.retention_after[n]}
                   for n, r in res.streams.items()},
        "segments": {n: r.segments for n, r in res.streams.items()},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _plot(out / "metrics.png", {c["names"][n]: r for n, r in res.streams.items()}, k)
    print(f"wrote {out / 'report.json'}, {out / 'segments.csv'}, {out / 'metrics.png'} "
          f"({res.seconds['total']:.0f} s)")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, load_deployment

    t = time.perf_counter()
    out = export(args.model, args.out, args.precision, encoder_from=args.encoder_from,
                 overwrite=args.overwrite)  # fmt: skip
    dep = load_deployment(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"exported {dep.precision} deployment to {out} ({size:.1f} MB, "
          f"{time.perf_counter() - t:.1f} s); it loads and serves on {dep.provider}")  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .serve import make_server

    if (args.model is None) == (args.deployment is None):
        print("lrec-fast serve: give --model CKPT (learns) or --deployment DIR (read-only)",
              file=sys.stderr)  # fmt: skip
        return 2
    token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else None
    model: Any
    if args.model is not None:
        from .service import Recommender

        model = Recommender.load(args.model, backend=args.backend)
    else:
        from .export import load_deployment

        model = load_deployment(args.deployment)
    learns = args.model is not None
    server = make_server(model, args.host, args.port, token=token,
                         save_to=args.save_to if learns else None,
                         export_to=args.export_to if learns else None)  # fmt: skip
    service = server.service  # type: ignore[attr-defined]
    stop = threading.Event()

    def saver() -> None:  # the periodic save
        while not stop.wait(args.save_every):
            service.save_if_changed()

    if args.save_to and args.model is not None and args.save_every > 0:
        threading.Thread(target=saver, daemon=True).start()
    # SIGTERM (a service manager's stop) ends it as Ctrl-C does: no new requests, a last save
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = args.host, server.server_address[1]  # (the port bound, for --port 0)
    print(f"serving {type(model).__name__} ({model.n_users:,} users, {model.n_items:,} items) "
          f"on http://{host}:{port} (token: {'yes' if token else 'no'}; saving to "
          f"{args.save_to if service.save_to else 'nowhere'})", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
        if service.save_if_changed():
            print(f"saved to {args.save_to}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lrec-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lrec-fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MovieLens-100k: static vs lifelong, prequential")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--data", default=None, help="folder with ml-100k files (default: cache)")
    demo.add_argument("--batch-size", type=int, default=100, help="events per micro-batch")
    demo.add_argument("--segment", type=int, default=2500, help="events per report segment")
    demo.add_argument("--encoder", default=None, help="text encoder (default all-MiniLM-L6-v2)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("evaluate", help="the lifelong-learning protocol with every baseline")
    ev.add_argument("--out", default="runs/evaluate", help="output folder")
    ev.add_argument("--data", default=None, help="folder with ml-100k files (default: cache)")
    ev.add_argument("--batch-size", type=int, default=100, help="events per micro-batch (M)")
    ev.add_argument("--segment", type=int, default=2500, help="events per report segment")
    ev.add_argument("--retrain-every", type=int, default=2500, help="retrain baseline cadence")
    ev.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    ev.add_argument("--encoder", default=None, help="text encoder (default all-MiniLM-L6-v2)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the retention split")
    ev.add_argument("--exclude", choices=["event", "batch"], default="event",
                    help="candidates exclude the user's items from before the event (default) "
                         "or only from before its micro-batch")  # fmt: skip
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)
    exp = sub.add_parser("export", help="write an ONNX deployment directory for a checkpoint")
    exp.add_argument("--model", required=True, help="checkpoint folder (Recommender.save)")
    exp.add_argument("--out", required=True, help="deployment folder to write")
    exp.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="int8")
    exp.add_argument(
        "--encoder-from",
        default=None,
        help="earlier deployment whose encoder.onnx to reuse (same precision)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exp.set_defaults(func=cmd_export)
    srv = sub.add_parser("serve", help="serve a model over HTTP/JSON (lrec_fast/serve.py)")
    srv.add_argument("--model", default=None, help="checkpoint folder: learns from /feedback")
    srv.add_argument("--deployment", default=None, help="ONNX deployment folder: read-only")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    srv.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    srv.add_argument("--token-file", default=None,
                     help="file with the bearer token that all but /health need")  # fmt: skip
    srv.add_argument("--save-to", default=None,
                     help="checkpoint folder for POST /save, periodic and final saves")  # fmt: skip
    srv.add_argument("--export-to", default=None,
                     help="deployment folder for POST /export (replicas /reload it)")  # fmt: skip
    srv.add_argument("--save-every", type=float, default=300.0,
                     help="seconds between saves when the model learned (0: none)")  # fmt: skip
    srv.add_argument("--backend", default=None, help="kernel backend (default: the best)")
    srv.set_defaults(func=cmd_serve)
    info = sub.add_parser("info", help="version, backends, extension")
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
