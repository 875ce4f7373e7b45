"""One short call on a GPU machine: check every Triton kernel against the torch reference on the
device, then time it against torch (cuBLAS matmul + topk, dense SGD) and against the card's
measured device-to-device copy bandwidth. Prints one report; exits 1 if a check fails.

    python benchmarks/gpu_check.py            # on a CUDA machine, a few minutes at most
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --cpu-smoke   # the script's own test

Needs torch and triton only (plus onnxruntime if installed: its providers are printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from lrec_fast.kernels import _load
from lrec_fast.kernels import reference as ref


def timed(fn, dev: str, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of fn() on the device. CUDA: Triton's do_bench (CUDA events, L2
    flushed between runs); CPU smoke: wall clock after two warm-up calls."""
    if dev == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    for _ in range(min(2, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def copy_bandwidth(dev: str, n_bytes: int) -> float:
    """Device-to-device copy, GB/s counting read + write."""
    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), dev)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def check_score(mod, dev: str, n: int, d: int, b: int, k: int, dtype: torch.dtype) -> str:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(n + b + k)
    q = torch.randn(b, d, generator=g)
    table = torch.randn(n, d, generator=g)
    bias = torch.randn(n, generator=g)
    rs = None
    if dtype == torch.int8:
        table, rs = ref.quantize_rows(table)
    else:
        table = table.to(dtype)
    excl = [torch.randint(0, n, (20,), generator=g).tolist() for _ in range(b)]
    gs, gi = mod.score_topk(q.to(dev), table.to(dev), k, item_bias=bias.to(dev), exclude=excl,
                            row_scale=None if rs is None else rs.to(dev))  # fmt: skip
    ws, wi = ref.score_topk(q, table, k, item_bias=bias, exclude=excl, row_scale=rs)
    err = float((gs.cpu() - ws).abs().max())
    same = float((gi.cpu() == wi).float().mean())
    ok = err < 1e-3 and same > 0.99
    return f"{'ok  ' if ok else 'FAIL'} score_topk {dtype} N={n} d={d} B={b} k={k}: " \
           f"max |score diff| {err:.2e}, same index {same:.4f}"  # fmt: skip


def check_update(mod, dev: str, adagrad: bool, steps: int, batch: int) -> str:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(5)
    n_rows, d = 5000, 64
    base = [torch.randn(n_rows, d, generator=g) * 0.1, torch.randn(n_rows, d, generator=g) * 0.1,
            torch.zeros(n_rows), torch.zeros(n_rows)]  # fmt: skip
    mine = [t.to(dev, copy=True) for t in base]
    s_w, s_g = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    mu_w, mu_g = torch.tensor([3.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    acc_w = tuple(torch.zeros(n_rows) for _ in range(4))
    acc_g = tuple(a.to(dev, copy=True) for a in acc_w)
    for step in range(steps):
        u = torch.randint(0, 300, (batch,), generator=g)
        i = torch.randint(0, n_rows, (batch,), generator=g)
        r = torch.rand(batch, generator=g) * 4 + 1
        lr = 0.05 * (1 + step % 3)
        gains = (15.0, 1.0, 1.0, 1.0) if step % 2 else (1.0, 1.0, 1.0, 1.0)  # the learner's
        if adagrad:
            ref.mf_adagrad_step(*base, s_w, mu_w, u, i, r, lr, 0.01, acc_w, gains=gains)
            mod.mf_adagrad_step(*mine, s_g, mu_g, u.to(dev), i.to(dev), r.to(dev), lr, 0.01, acc_g,
                                gains=gains)  # fmt: skip
        else:
            ref.mf_sgd_step(*base, s_w, mu_w, u, i, r, lr, 0.01, gains=gains)
            mod.mf_sgd_step(*mine, s_g, mu_g, u.to(dev), i.to(dev), r.to(dev), lr, 0.01,
                            gains=gains)  # fmt: skip
    err = max(float((a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-12))
              for a, b in zip(mine, base, strict=True))  # fmt: skip
    name = "adagrad" if adagrad else "sgd"
    status = "ok  " if err < 1e-5 else "FAIL"
    return f"{status} update {name}, {steps} steps of {batch}: max rel diff {err:.2e}"


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def sweep_configs(b: int, k: int, small: bool) -> list:  # type: ignore[type-arg]
    """Launch shapes to time against the default for one (B, k)."""
    from lrec_fast.kernels.triton_score import ScoreConfig

    if b <= 2:
        out = [ScoreConfig(1, bn, 32, use_dot=False, num_warps=w)
               for bn in (256, 512, 1024) for w in (4, 8)]  # fmt: skip
        out.append(ScoreConfig(1, 512, 32, use_dot=False, progs_per_sm=8))
    else:
        shapes = ((64, 64), (64, 128), (32, 128))
        out = [
            ScoreConfig(bb, bn, 64, precision=p) for bb, bn in shapes for p in ("ieee", "tf32x3")
        ]
        out.append(ScoreConfig(16, 128, 64))
    k_sel = 1 << max(0, (k - 1).bit_length())
    out = [c for c in out if c.block_n >= k_sel]
    return out[:2] if small else out


def onnx_check(path: Path, say: Callable[[str], None]) -> int:
    """An exported fp16 encoder on ORT's CUDA provider: against the same graph on the CPU
    provider, and timed beside torch fp16 (when the encoder package is installed). Returns the
    number of failed checks."""
    import numpy as np

    try:
        import onnxruntime as ort

        from lrec_fast.text.onnx_encoder import ProviderUnavailable, make_session
    except ImportError as exc:
        say(f"onnx: skipped ({exc})")
        return 0
    try:
        gpu, _ = make_session(path, ["CUDAExecutionProvider"])
    except ProviderUnavailable as exc:
        say(f"onnx: CUDA provider unavailable, nothing to time ({exc}; onnxruntime "
            f"{ort.__version__}, providers {ort.get_available_providers()})")  # fmt: skip
        return 0
    cpu, _ = make_session(path, ["CPUExecutionProvider"])
    fails = 0
    rng = np.random.default_rng(0)
    for b, s in ((1, 16), (32, 32), (256, 32)):
        ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
        f = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        got, want = gpu.run(None, f)[0], cpu.run(None, f)[0]
        cos = float((got * want).sum(1).min())
        ms = timed(lambda f=f: gpu.run(None, f), "cpu", 30)  # host-side wall clock, I/O included
        line = f"onnx fp16 CUDA EP {b}x{s}: {ms:.3f} ms, min cosine to CPU EP {cos:.5f}"
        try:
            from transformers import AutoModel

            from lrec_fast.text.encoder import minilm_dir

            m = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
            m = m.half().cuda().eval()
            t_ids = torch.from_numpy(ids).cuda()

            def torch_fp16(m=m, t_ids=t_ids) -> None:  # type: ignore[no-untyped-def]
                with torch.inference_mode():
                    m(input_ids=t_ids, attention_mask=torch.ones_like(t_ids))
                torch.cuda.synchronize()

            line += f"; torch fp16 {timed(torch_fp16, 'cpu', 30):.3f} ms"
        except Exception as exc:  # the encoder package is not on every GPU machine
            line += f"; torch fp16 not timed ({type(exc).__name__})"
        ok = cos >= 0.999
        fails += not ok
        say(("ok   " if ok else "FAIL ") + line)
    return fails


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, CPU interpreter")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    ap.add_argument("--no-sweep", action="store_true", help="skip timing the launch shapes")
    ap.add_argument("--onnx", type=Path, help="an fp16 encoder.onnx to check on ORT's CUDA EP")
    ap.add_argument("--sweep-until", type=float, default=200.0, help="no new sweep after (s)")
    args = ap.parse_args()
    dev = "cpu" if args.cpu_smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --cpu-smoke with TRITON_INTERPRET=1)")
        return 2
    import triton

    from lrec_fast.kernels import triton_score

    lines: list[str] = []

    t0 = time.perf_counter()

    def say(line: str) -> None:
        lines.append(line)
        print(f"[{time.perf_counter() - t0:5.0f} s] {line}", flush=True)

    say(f"python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")  # fmt: skip
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        say(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    try:
        import onnxruntime as ort

        say(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    except ImportError:
        say("onnxruntime: not installed")
    mod = _load("triton").module
    small = args.cpu_smoke
    fails = 0
    # Each new (dtype, launch shape) is a Triton compile of 5-50 s on the device (the top-k
    # networks are unrolled): every dtype on the B = 1 path, the other shapes in fp32.
    cases = [(dt, 300, 1, 10) for dt in DTYPES] + [(torch.float32, 200, 3, 20)]
    if not small:
        cases = [(dt, 1_000_003, 1, 10) for dt in DTYPES] + [
            (torch.float32, 100_000, 64, 100), (torch.float32, 50_000, 5, 1024),
            (torch.float32, 77_777, 17, 33)]  # fmt: skip
    for dtype, n, b, k in cases:
        line = check_score(mod, dev, n, 64, b, k, dtype)
        fails += line.startswith("FAIL")
        say(line)
    for adagrad in (False, True):
        line = check_update(mod, dev, adagrad, *((3, 32) if small else (50, 512)))
        fails += line.startswith("FAIL")
        say(line)

    n = 256 if small else 1_000_000
    reps = 1 if small else 20
    d = 64
    bw = copy_bandwidth(dev, 4 << 20 if small else 1 << 30)
    say(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    table = torch.randn(n, d, device=dev)
    table16 = table.half()
    bias = torch.randn(n, device=dev)
    q8, rs8 = (t.to(dev) for t in ref.quantize_rows(table.cpu()))
    read_floor_ms = table.numel() * 4 / (bw * 1e9) * 1e3

    def pct(ms: float, nbytes: int) -> str:
        gbs = nbytes / (ms * 1e-3) / 1e9
        return f"{gbs:.0f} GB/s, {gbs / bw:.0%} of copy"

    say(f"score: N={n:,} d={d}, floor at copy bandwidth {read_floor_ms:.3f} ms")
    cases = ((1, 10),) if small else ((1, 10), (64, 10), (1, 100), (64, 100))
    queries = {b: torch.randn(b, d, device=dev) for b in (1, 64)}
    for b, k in cases:  # the defaults first: the figures that matter come out even if cut short
        q = queries[b]
        ours = timed(lambda: mod.score_topk(q, table, k, item_bias=bias), dev, reps)  # noqa: B023
        c0 = triton_score.default_config(b, n, d, k)
        cand = partial(triton_score.scan_candidates, q, table, min(k, n), bias, 1.0, None, None, c0)
        stage1 = timed(cand, dev, reps)
        torch_ms = timed(lambda: torch.topk(torch.addmm(bias, q, table.T), k, dim=1), dev, reps)  # noqa: B023
        line = (f"score B={b} k={k}: triton {ours:.3f} ms ({pct(ours, table.numel() * 4)}; "
                f"scan alone {stage1:.3f} ms); torch matmul+topk {torch_ms:.3f} ms = "
                f"{torch_ms / ours:.2f}x ours")  # fmt: skip
        if k == 10:
            half = timed(lambda: mod.score_topk(q, table16, k, item_bias=bias), dev, reps)  # noqa: B023
            int8 = timed(lambda: mod.score_topk(q, q8, k, item_bias=bias, row_scale=rs8), dev, reps)  # noqa: B023
            line += (f"; fp16 table {half:.3f} ms ({pct(half, table.numel() * 2)}), int8 "
                     f"{int8:.3f} ms ({pct(int8, table.numel())})")  # fmt: skip
        say(line)
    m = 16 if small else 1024
    users = torch.randint(0, n, (m,), device=dev)
    items = torch.randint(0, n, (m,), device=dev)
    r = torch.rand(m, device=dev) * 4 + 1
    tabs = [torch.randn(n, d, device=dev) * 0.1, torch.randn(n, d, device=dev) * 0.1,
            torch.zeros(n, device=dev), torch.zeros(n, device=dev)]  # fmt: skip
    scales = torch.ones(4, dtype=torch.float64)
    mu = torch.tensor([3.5], dtype=torch.float64)

    def ours_step() -> None:
        mod.mf_sgd_step(*tabs, scales, mu, users, items, r, 1e-3, 1e-4)
        if float(scales.min()) < 1e-3:
            scales.fill_(1.0)

    emb = [torch.nn.Embedding(n, dim).to(dev) for dim in (d, d, 1, 1)]
    opt = torch.optim.SGD([p for e in emb for p in e.parameters()], lr=1e-3, weight_decay=1e-4)

    def dense_step() -> None:
        opt.zero_grad(set_to_none=True)
        pred = (
            3.5 + emb[2](users)[:, 0] + emb[3](items)[:, 0] + (emb[0](users) * emb[1](items)).sum(1)
        )
        torch.mean((r - pred) ** 2).backward()
        opt.step()

    t_ours, t_dense = timed(ours_step, dev, reps), timed(dense_step, dev, reps)
    say(f"update N={n:,} batch {m}: triton {t_ours:.3f} ms, torch dense SGD(weight_decay) "
        f"{t_dense:.3f} ms ({t_dense / t_ours:.0f}x)")  # fmt: skip
    if args.onnx and not small:
        fails += onnx_check(args.onnx, say)
    for b, k in cases:  # then the alternatives, while time allows
        if args.no_sweep or time.perf_counter() - t0 > args.sweep_until:
            break
        q = queries[b]
        base_i = mod.score_topk(q, table, k, item_bias=bias)[1]
        for cfg in sweep_configs(b, k, small):
            try:
                gi = mod.score_topk(q, table, k, item_bias=bias, config=cfg)[1]
                same = float((gi == base_i).float().mean())
                ms = timed(lambda: mod.score_topk(q, table, k, item_bias=bias, config=cfg),  # noqa: B023
                           dev, reps)  # fmt: skip
            except Exception as exc:  # a shape the compiler refuses: report, go on
                say(f"  sweep B={b} k={k} {cfg}: error {type(exc).__name__}: {exc}"[:300])
                continue
            flag = "" if same > 0.99 else f"  MISMATCH same={same:.3f}"
            say(f"  sweep B={b} k={k} {cfg}: {ms:.3f} ms{flag}")
    say("ALL CHECKS PASSED" if fails == 0 else f"{fails} CHECK(S) FAILED")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
