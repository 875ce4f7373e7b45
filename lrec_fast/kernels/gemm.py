"""``a @ b.T`` for CPU fp32 tensors on oneDNN's matmul where torch has it, else ``torch.mm``.

Why: torch's CPU ``mm`` calls MKL's sgemm, which on the AMD EPYC this project is measured on
runs at about 160 GFLOP/s for the scan's shapes (16k item rows by 64 queries, d = 64 or 384);
oneDNN, also inside torch, ran the same products at 360-440 GFLOP/s (2.2-2.3x), in fp32 (no
implicit bf16: results within fp32 rounding of MKL's). torch reaches it through the operator
its compiler uses for fused linear layers, ``torch.ops.mkldnn._linear_pointwise``; that is not
a public API, so it is used only after it gives ``torch.mm``'s result on a probe, once per
process, and any failure falls back to ``torch.mm`` (``backend()`` says which runs).
"""

from __future__ import annotations

import logging
from functools import cache

import torch

log = logging.getLogger(__name__)


@cache
def _onednn_ok() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(37, 48, generator=g), torch.randn(5, 48, generator=g)
        got = op(a, b, None, "none", [], "")
        ok = (
            isinstance(got, torch.Tensor)
            and got.layout == torch.strided
            and got.shape == (37, 5)
            and bool(torch.allclose(got, torch.mm(a, b.T), rtol=1e-5, atol=1e-5))
        )
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as exc:
        log.info("oneDNN linear unavailable (%s); using torch.mm", exc)
        return False
    if not ok:
        log.warning("oneDNN linear disagreed with torch.mm on a probe; using torch.mm")
    return ok


def backend() -> str:
    """Which product ``matmul_nt`` runs: "onednn" or "torch.mm"."""
    return "onednn" if _onednn_ok() else "torch.mm"


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``: a float32 [M, K], b float32 [N, K], both CPU -> a new float32 [M, N]
    (contiguous), in fp32 arithmetic whichever library runs it."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError("matmul_nt takes float32 tensors")
    if a.shape[0] and b.shape[0] and a.shape[1] and _onednn_ok():
        return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), None, "none",
                                                  [], "")  # fmt: skip
    return torch.mm(a, b.T)
