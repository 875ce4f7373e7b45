"""The text encoder as an ONNX graph: export (torch, once) and serving (onnxruntime only).

The graph takes ``input_ids`` and ``attention_mask`` (int64 [batch, seq], both dynamic) and
returns ``embedding`` (float32 [batch, 384]): mean pooling over the mask and L2 normalisation
are inside the graph, so plain onnxruntime gives the same vectors as ``MiniLMEncoder``.

Precisions: ``fp32`` (the exported graph as is), ``fp16`` (ORT's BERT fusions, then fp16
weights and compute with fp32 inputs/outputs: for the CUDA provider), ``int8`` (per-channel
int8 weights, per-token int8 activations, int8 word embeddings: ``lrec_fast.quantize``).

Provider choice (``make_session``): ``providers=None`` takes CUDA, then CPU, among those this
onnxruntime lists; a provider that is listed but cannot start (onnxruntime-gpu without CUDA
libraries, or no GPU) is reported in the log and left out, and ``.provider`` says what runs.
Providers named explicitly must all start, else ``ProviderUnavailable``: never a silent fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import WordPieceTokenizer, _check_texts

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
OPSET = 17
_DEAD_PROVIDERS: set[str] = set()  # listed by onnxruntime but failed to start in this process


class ProviderUnavailable(RuntimeError):
    """An onnxruntime execution provider was asked for by name but cannot run here."""


def export_encoder(
    path: str | Path, precision: str = "fp32", model_dir: str | Path | None = None
) -> dict[str, Any]:
    """Write all-MiniLM-L6-v2 (or the BERT model in ``model_dir``) as an ONNX encoder graph at
    ``path`` in ``precision``; returns a description for the manifest. Needs torch,
    transformers and onnx (export time only)."""
    import tempfile

    import onnx
    import torch
    from transformers import AutoModel

    from .encoder import minilm_dir

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    folder = Path(model_dir) if model_dir is not None else minilm_dir()
    # eager attention: a plain graph that ORT's BERT fusions recognise and that traces the same
    # for every shape (the SDPA path branches on Python values while tracing)
    bert = AutoModel.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager"
    )
    wrapped = _pooled(bert.eval())
    hidden = int(bert.config.hidden_size)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    mask = (ids != 0).long()
    dyn = {0: "batch", 1: "sequence"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "fp32.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                wrapped, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                output_names=["embedding"], opset_version=OPSET, dynamo=False,
                dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "embedding": {0: "batch"}},
            )  # fmt: skip
        model = onnx.load(str(raw))
    info: dict[str, Any] = {"precision": precision, "opset": OPSET, "dim": hidden,
                            "max_length": int(bert.config.max_position_embeddings)}  # fmt: skip
    if precision == "int8":
        from ..quantize import quantize_per_token

        model = quantize_per_token(model)
        info["quantization"] = "int8 weights per output channel, uint8 activations per token "\
            "(dynamic), int8 word embeddings per row"  # fmt: skip
    elif precision == "fp16":
        from onnxruntime.transformers import optimizer

        heads = int(bert.config.num_attention_heads)
        opt = optimizer.optimize_model(model, model_type="bert", num_heads=heads,
                                       hidden_size=hidden, opt_level=0, use_gpu=True)  # fmt: skip
        opt.convert_float_to_float16(keep_io_types=True)
        model = opt.model
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        info["fusions"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return info


def _pooled(bert: Any) -> Any:
    """bert + mean pooling over the mask + L2 normalisation, as one torch module."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return PooledEncoder().eval()


def make_session(
    model: str | Path | bytes, providers: Sequence[str] | None = None, threads: int | None = None
) -> tuple[Any, str]:
    """An onnxruntime InferenceSession and the provider that runs it (see the module doc)."""
    import onnxruntime as ort

    listed = ort.get_available_providers()
    explicit = providers is not None
    wanted = (
        list(providers) if providers is not None else [p for p in AUTO_PROVIDERS if p in listed]
    )
    missing = [p for p in wanted if p not in listed]
    if missing:
        raise ProviderUnavailable(f"{missing} not in this onnxruntime's providers {listed}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    if not explicit:  # known dead ones: not tried again (onnxruntime logs an error each time)
        wanted = [p for p in wanted if p not in _DEAD_PROVIDERS]
    for _ in range(len(wanted)):
        sess = ort.InferenceSession(src, opts, providers=wanted)
        running = sess.get_providers()
        dead = [p for p in wanted if p not in running]
        if not dead:
            break
        # onnxruntime drops a provider it cannot start (and only logs it): say so, or refuse
        if explicit:
            raise ProviderUnavailable(f"{dead} listed but could not start (running: {running})")
        log.warning("onnxruntime provider %s is listed but could not start; left out", dead)
        _DEAD_PROVIDERS.update(dead)
        wanted = [p for p in wanted if p not in dead]
    provider = sess.get_providers()[0]
    log.info("onnxruntime session on %s (asked: %s)", provider, wanted)
    return sess, provider


class OrtEncoder:
    """An exported encoder graph + the C++ tokeniser: ``encode(texts)`` -> float32
    [n, dim], unit-norm rows, with no torch on the path. ``provider`` is what runs."""

    def __init__(
        self,
        onnx_path: str | Path,
        tokenizer_dir: str | Path,
        *,
        name: str,
        dim: int = 384,
        providers: Sequence[str] | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        threads: int | None = None,
    ) -> None:
        self.name = name
        self.dim = dim
        self.tokenizer = WordPieceTokenizer.from_pretrained_dir(tokenizer_dir)
        self.session, self.provider = make_session(onnx_path, providers, threads)
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            for s in range(0, len(texts), self.batch_size):
                batch = self.tokenizer.encode_batch(
                    texts[s : s + self.batch_size], max_length=self.max_length
                )
                feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                out[s : s + len(feed["input_ids"])] = self.session.run(["embedding"], feed)[0]
        return out
