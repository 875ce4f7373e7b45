"""int8 quantisation of an exported encoder graph: per-channel weights, per-token activations.

ORT's ``quantize_dynamic`` quantises each activation tensor with one (scale, zero point) for the
whole batch. In BERT-style encoders a few tokens ([CLS], [SEP], padding) carry activations
far larger than the rest, so one range per tensor leaves the ordinary tokens a handful of
levels: measured on all-MiniLM-L6-v2 over the 1,682 MovieLens titles, mean cosine 0.9925 to
fp32 and top-10 neighbour overlap 0.85 (per-channel weights). Quantising every token on its
own range (asymmetric uint8, computed at run time) keeps 0.9989 / 0.945 at the same file size;
weights alone cost 0.9996 / 0.97.

Rewrite, for each ``MatMul(X, W)`` with a constant 2-D W [K, N]:

    X2 = reshape(X, [-1, K]);  lo, hi = row min / max of X2 (widened to include 0)
    s = (hi - lo) / 255;  z = round(-lo / s);  Xq = QuantizeLinear(X2, s, z, axis=0)  (uint8)
    F = MatMulIntegerToFloat(Xq, Wq, 1, w_scale)        (= Xq @ Wq * w_scale, int8 kernels)
    Y = reshape(s * (F - z * colsum(Wq) * w_scale), [..., N])

with Wq = round(W / w_scale) int8 and w_scale = max|W[:, n]| / 127 per output column. The
zero-point term is one rank-1 ``Gemm``. Activations shared by several MatMuls (Q, K, V) are
quantised once. The word-embedding table (half of MiniLM's weights) is stored int8 with one
scale per row and dequantised after the ``Gather``. Everything else stays fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of w [K, N]: (int8 [K, N], float32 scales [N])."""
    scale = np.maximum(np.abs(w).max(0), 1e-12) / 127.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _int8_rows(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of t [R, C] as the kernels store a catalogue
    (``reference.quantize_rows``): (int8 [R, C], float32 scales [R, 1])."""
    import torch

    from .kernels.reference import quantize_rows

    q, scale = quantize_rows(torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)))
    return q.numpy(), scale.numpy()[:, None]


class _Builder:
    """Collects the new nodes and constants of one rewrite (unique names, shared constants)."""

    def __init__(self) -> None:
        from onnx import helper

        self.h = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        self._consts: dict[tuple[str, bytes], str] = {}

    def name(self, stem: str) -> str:
        self._n += 1
        return f"lrq_{stem}_{self._n}"

    def const(self, arr: Any, stem: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(arr)
        key = (str(arr.dtype) + str(arr.shape), arr.tobytes()) if arr.size <= 4 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self.name(stem)
        domain = MS_DOMAIN if op_type == "MatMulIntegerToFloat" else ""
        self.nodes.append(self.h.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> None:
        self.nodes.append(self.h.make_node(op_type, inputs, [output], **attrs))


def _is_word_embeddings(name: str, weights: dict[str, Any]) -> bool:
    return name in weights and "word_embeddings" in name


def quantize_per_token(model: Any) -> Any:
    """Return a copy of the onnx ``ModelProto`` with the int8 rewrite above applied.

    Expects opset 13..20 (``ReduceMin``/``ReduceMax`` with an ``axes`` attribute)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not 13 <= opset <= 17:
        raise ValueError(f"quantize_per_token handles opset 13-17 graphs, got {opset}")
    weights = {t.name: t for t in graph.initializer}
    b = _Builder()
    zero, c255 = b.const(np.float32(0.0)), b.const(np.float32(255.0))
    eps = b.const(np.float32(1e-8))
    one, axis1 = b.const(np.float32(1.0)), b.const(np.array([1], np.int64))
    quantised: dict[str, tuple[str, str, str, str]] = {}
    drop: set[str] = set()
    out_nodes: list[Any] = []

    def quantise_activation(x: str, k: int) -> tuple[str, str, str, str]:
        if x in quantised:
            return quantised[x]
        lead = b.op("Shape", [x], "lead", end=-1)  # [..., K] -> the leading dims
        x2 = b.op("Reshape", [x, b.const(np.array([-1, k], np.int64))], "x2")
        lo = b.op("Min", [b.op("ReduceMin", [x2], "rmin", axes=[1], keepdims=0), zero], "lo")
        hi = b.op("Max", [b.op("ReduceMax", [x2], "rmax", axes=[1], keepdims=0), zero], "hi")
        s = b.op("Max", [b.op("Div", [b.op("Sub", [hi, lo], "rng"), c255], "s0"), eps], "s")
        z = b.op("Round", [b.op("Neg", [b.op("Div", [lo, s], "lo_s")], "nz")], "z")
        z8 = b.op("Cast", [z], "z8", to=TensorProto.UINT8)
        xq = b.op("QuantizeLinear", [x2, s, z8], "xq", axis=0)
        quantised[x] = (xq, s, z, lead)
        return quantised[x]

    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        arr = numpy_helper.to_array(w) if w is not None else None
        if arr is not None and arr.ndim == 2:
            k, n = arr.shape
            wq, ws = _int8_columns(arr.astype(np.float32))
            drop.add(node.input[1])
            start = len(b.nodes)
            xq, s, z, lead = quantise_activation(node.input[0], k)
            f = b.op("MatMulIntegerToFloat", [xq, b.const(wq, "wq"), one, b.const(ws, "ws")], "f")
            colsum = (wq.astype(np.float32).sum(0) * ws)[None, :].astype(np.float32)
            zc = b.op("Unsqueeze", [z, axis1], "zc")
            f = b.op("Gemm", [zc, b.const(colsum, "colsum"), f], "fc", alpha=-1.0, beta=1.0)
            y2 = b.op("Mul", [f, b.op("Unsqueeze", [s, axis1], "sc")], "y2")
            shape = b.op("Concat", [lead, b.const(np.array([n], np.int64))], "shape", axis=0)
            b.op_to("Reshape", [y2, shape], node.output[0])
            out_nodes.extend(b.nodes[start:])
        elif node.op_type == "Gather" and _is_word_embeddings(node.input[0], weights):
            table = numpy_helper.to_array(weights[node.input[0]]).astype(np.float32)
            tq, rs = _int8_rows(table)
            drop.add(node.input[0])
            start = len(b.nodes)
            rows = b.op("Cast", [b.op("Gather", [b.const(tq, "emb_q"), node.input[1]], "eq")], "ef",
                        to=TensorProto.FLOAT)  # fmt: skip
            scale = b.op("Gather", [b.const(rs, "emb_scale"), node.input[1]], "es")
            b.op_to("Mul", [rows, scale], node.output[0])
            out_nodes.extend(b.nodes[start:])
        else:
            out_nodes.append(node)
    if not drop:
        raise ValueError("no MatMul with a constant weight found: nothing to quantise")
    keep = [t for t in graph.initializer if t.name not in drop]
    del graph.node[:]
    graph.node.extend(out_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + b.inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return model
