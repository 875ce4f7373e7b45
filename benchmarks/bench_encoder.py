"""The text encoder: torch eager fp32 (what a user runs) vs onnxruntime fp32, ORT with its BERT
fusions ("optimised"), ORT's own ``quantize_dynamic`` (per-channel int8, per-tensor
activations) and ours (int8 per-channel weights + per-token activations, lrec_fast.quantize),
at batch x tokens 1 x 16, 32 x 32, 256 x 32; and end to end, the 1,682 MovieLens titles ->
embeddings: C++ tokeniser + ORT int8 vs HF ``BertTokenizerFast`` + torch. Fidelity (mean
cosine and top-10 neighbour overlap against torch fp32 on the titles) beside each time.

Every timing runs in a fresh process with 2 threads: torch's and onnxruntime's thread pools
spin after their work and slowed each other by up to 1.6x when timed in one process.

    python -m benchmarks.bench_encoder                      # the table (about 3 minutes)
    pytest benchmarks/bench_encoder.py --benchmark-enable   # pytest-benchmark, one process
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHAPES = ((1, 16), (32, 32), (256, 32))
THREADS = 2
VARIANTS = ("torch eager fp32", "ORT fp32", "ORT optimised fp32", "ORT quantize_dynamic int8",
            "ORT int8 (ours)")  # fmt: skip


@cache
def models() -> dict[str, Path]:
    """The ONNX files of each ORT variant, exported once per process into a temp folder."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    from lrec_fast.quantize import quantize_per_token
    from lrec_fast.text.onnx_encoder import export_encoder

    root = Path(tempfile.mkdtemp(prefix="lrec-bench-encoder-"))
    out = {"ORT fp32": root / "fp32.onnx", "ORT int8 (ours)": root / "int8.onnx"}
    export_encoder(out["ORT fp32"], "fp32")
    onnx.save(quantize_per_token(onnx.load(str(out["ORT fp32"]))), str(out["ORT int8 (ours)"]))
    opt = optimizer.optimize_model(str(out["ORT fp32"]), model_type="bert", num_heads=12,
                                   hidden_size=384, opt_level=0)  # fmt: skip
    out["ORT optimised fp32"] = root / "opt.onnx"
    opt.save_model_to_file(str(out["ORT optimised fp32"]))
    out["ORT quantize_dynamic int8"] = root / "qd.onnx"
    quantize_dynamic(str(out["ORT fp32"]), str(out["ORT quantize_dynamic int8"]),
                     weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
    return out


def feeds(b: int, s: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(b * 1000 + s)
    ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def runner(variant: str, path: Path | None) -> Callable[[dict[str, np.ndarray]], Any]:
    """A function running one batch of ``feeds`` through ``variant``."""
    if variant == "torch eager fp32":
        import torch

        from lrec_fast.text.encoder import MiniLMEncoder

        torch.set_num_threads(THREADS)
        model = MiniLMEncoder().model

        def run_torch(f: dict[str, np.ndarray]) -> Any:
            with torch.inference_mode():
                ids, mask = torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

        return run_torch
    from lrec_fast.text.onnx_encoder import make_session

    sess, _ = make_session(path, ["CPUExecutionProvider"], threads=THREADS)
    return lambda f: sess.run(None, f)


def median_ms(fn: Callable[[], object], budget_s: float = 2.0, max_n: int = 50) -> float:
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_n and (len(times) < 5 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _child_shapes(variant: str, path: Path | None) -> list[float]:
    run = runner(variant, path)
    out = []
    for b, s in SHAPES:
        f = feeds(b, s)
        out.append(median_ms(lambda f=f: run(f)))
    return out


def _child_end_to_end(which: str, path: Path | None, texts: list[str]) -> tuple[float, np.ndarray]:
    """ms to embed all ``texts`` in batches of 64, and the embeddings."""
    if which == "ours":
        from lrec_fast.text.encoder import minilm_dir
        from lrec_fast.text.onnx_encoder import OrtEncoder

        enc: Any = OrtEncoder(path, minilm_dir(), name="bench", providers=["CPUExecutionProvider"],
                              threads=THREADS)  # fmt: skip
        fn = enc.encode
    else:
        import torch
        from transformers import BertTokenizerFast

        from lrec_fast.text.encoder import MiniLMEncoder, minilm_dir

        torch.set_num_threads(THREADS)
        model = MiniLMEncoder().model
        tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)

        def fn(batch_texts: list[str]) -> np.ndarray:
            out = []
            with torch.inference_mode():
                for s in range(0, len(batch_texts), 64):
                    b = tok(batch_texts[s : s + 64], padding=True, truncation=True,
                            max_length=256, return_tensors="pt")  # fmt: skip
                    h = model(**b).last_hidden_state
                    m = b["attention_mask"].unsqueeze(-1).float()
                    p = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                    out.append(p.numpy())
            return np.concatenate(out)

    emb = fn(texts)
    return median_ms(lambda: fn(texts), budget_s=10.0, max_n=5), emb


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a fresh process (spawn), so no thread pool of another run is alive."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def fidelity(emb: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean cosine, mean top-10 neighbour overlap) of emb against ref, rows aligned."""

    def top10(e: np.ndarray) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :10]

    a, b = top10(emb), top10(ref)
    nn = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)]))
    return float((emb * ref).sum(1).mean()), nn


def report() -> str:
    from lrec_fast.data import load_movielens_100k

    texts = list(load_movielens_100k().item_text)
    paths = models()
    e2e_torch_ms, ref = in_child(_child_end_to_end, "torch", None, texts)
    times = {v: in_child(_child_shapes, v, paths.get(v)) for v in VARIANTS}
    sizes = {v: paths[v].stat().st_size / 1e6 for v in VARIANTS if v in paths}
    fid: dict[str, tuple[float, float]] = {"torch eager fp32": (1.0, 1.0)}
    e2e: dict[str, float] = {}
    for v in VARIANTS[1:]:
        ms, emb = in_child(_child_end_to_end, "ours", paths[v], texts)
        fid[v] = fidelity(emb, ref)
        e2e[v] = ms
    base = times["torch eager fp32"]
    head = " | ".join(f"{b} x {s} ms (x torch)" for b, s in SHAPES)
    lines = [f"CPU, {THREADS} threads, medians; fidelity: 1,682 MovieLens titles vs torch fp32",
             f"| variant | file MB | {head} | mean cosine | top-10 overlap |",
             "|---|---|" + "---|" * (len(SHAPES) + 2)]  # fmt: skip
    for v in VARIANTS:
        cells = " | ".join(f"{t:.2f} ({b / t:.1f}x)" for t, b in zip(times[v], base, strict=True))
        size = f"{sizes[v]:.1f}" if v in sizes else "-"
        lines.append(f"| {v} | {size} | {cells} | {fid[v][0]:.4f} | {fid[v][1]:.3f} |")
    lines.append("")
    lines.append(f"End to end, {len(texts):,} titles -> embeddings (batches of 64, ms):")
    lines.append(f"| HF BertTokenizerFast + torch eager fp32 | {e2e_torch_ms:.0f} | 1.0x |")
    for v, ms in e2e.items():
        lines.append(f"| C++ tokeniser + {v} | {ms:.0f} | {e2e_torch_ms / ms:.1f}x |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def onnx_models() -> dict[str, Path]:
    pytest.importorskip("onnxruntime")
    return models()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder(benchmark, onnx_models, variant, shape):
    benchmark.group = f"encoder {shape[0]}x{shape[1]}"
    run = runner(variant, onnx_models.get(variant))
    f = feeds(*shape)
    benchmark(lambda: run(f))


if __name__ == "__main__":
    print(report())
