"""An integer dot product for int8 item rows in numba kernels: the int8 scan's prefilter.

Why: the one-query scan of an int8 catalogue spent most of a row's time turning int8 into
fp32 (sign-extend, convert, FMA, for every element). Here the query is quantised once per
call to int16, and a row's dot is ``vpmovsxbw`` + ``vpmaddwd`` (which LLVM fuses into
``vpdpwssd`` on AVX-512 VNNI): 32 elements per instruction pair, exact in int32. The scan uses
it only to rule rows out, with a bound on its error (``QueryQuant.bound``); rows it cannot rule
out are scored exactly as before, so results do not change.

The instructions are chosen from the features numba compiles for (``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES``, else the host): AVX-512BW, AVX2, else plain LLVM vector IR that any
target compiles (``MODE``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

MODES = ("avx512", "avx2", "generic")
STEP = 16  # rows must have a multiple of this many int8 elements
MAX_DIM = 1024  # straight-line code per dimension; beyond, the plain int8 scan
_U = 2.0**-24  # fp32 unit roundoff


def _target_mode() -> str:
    """The widest integer multiply-add numba's target has (see the module docstring)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    features, name = getattr(config, "CPU_FEATURES", None), getattr(config, "CPU_NAME", None)
    if features is not None:
        feats = {f[1:] for f in str(features).split(",") if f.startswith("+")}
    elif name is not None:
        return "generic"  # a named CPU (e.g. "generic" for portable caches): no assumptions
    else:
        host = ll.get_host_cpu_features()
        feats = {name for name in host if host[name]}
    if "avx512bw" in feats:
        return "avx512"
    return "avx2" if "avx2" in feats else "generic"


MODE = _target_mode()

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _chunk_dot(builder: Any, p: Any, qp: Any, off: int, width: int, mode: str) -> Any:
    """Products of ``width`` int8 elements at p + off and int16 at qp + off, summed in pairs
    (``width / 2`` int32 lanes; the plain IR keeps ``width`` lanes)."""
    vec8, vec16 = ir.VectorType(ir.IntType(8), width), ir.VectorType(_I16, width)
    x = builder.load(builder.bitcast(builder.gep(p, [_I64(off)]), vec8.as_pointer()), align=1)
    y = builder.load(builder.bitcast(builder.gep(qp, [_I64(off)]), vec16.as_pointer()), align=2)
    if mode == "generic":
        wide = ir.VectorType(_I32, width)
        return builder.mul(builder.sext(x, wide), builder.sext(y, wide))
    name = "llvm.x86.avx512.pmaddw.d.512" if width == 32 else "llvm.x86.avx2.pmadd.wd"
    fnty = ir.FunctionType(ir.VectorType(_I32, width // 2), [vec16, vec16])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, [builder.sext(x, vec16), y])


def _reduce(builder: Any, vec: Any) -> Any:
    lanes = vec.type.count
    fnty = ir.FunctionType(_I32, [vec.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{lanes}i32")
    return builder.call(fn, [vec])


def make_idot(mode: str) -> Any:
    """``idot(items, row, q16, d)``: sum_t items[row, t] * q16[t] as int64, for an int8 C array
    ``items`` [N, d] and an int16 C array ``q16`` [d]; ``d`` a compile-time constant (a numba
    literal, a multiple of ``STEP``), so the dot is straight-line code. The sum is exact while
    ``128 * 32767 * d < 2**31`` (d <= 512; ``quantize_query`` scales the query down beyond)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    wide = 32 if mode == "avx512" else 16

    @intrinsic
    def idot(typingctx: Any, items: Any, row: Any, q16: Any, d: Any) -> Any:  # pragma: no cover
        if not isinstance(d, types.IntegerLiteral):
            return None  # numba retries with the literal
        dim = d.literal_value
        if dim % STEP or not 0 < dim <= MAX_DIM:
            raise ValueError(f"idot: d = {dim} must be a positive multiple of {STEP}, <= {MAX_DIM}")
        sig = types.int64(items, row, q16, d)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            aryty, _, qty, _ = sig.args
            ary = context.make_array(aryty)(context, builder, args[0])
            qarr = context.make_array(qty)(context, builder, args[2])
            p = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], _I64(0)],
                                         wraparound=False)  # fmt: skip
            parts, acc, off = [], None, 0
            while off < dim:
                width = wide if dim - off >= wide else STEP
                m = _chunk_dot(builder, p, qarr.data, off, width, mode)
                if acc is not None and m.type != acc.type:
                    parts.append(acc)  # a narrower tail chunk: reduced on its own
                    acc = None
                acc = m if acc is None else builder.add(acc, m)
                off += width
            total = _reduce(builder, acc)
            for part in parts:
                total = builder.add(total, _reduce(builder, part))
            return builder.sext(total, _I64)

        return sig, codegen

    return idot


idot: Any = make_idot(MODE)


@dataclass(frozen=True)
class QueryQuant:
    """A query quantised for ``idot``: ``q ~ scale * q16``.

    ``bound`` bounds, for any int8 row c (|c_t| <= 128) of this query's dimension,
    |fp32 score of c - scale * idot(c)| / |multiplier|, where the fp32 score is the scan's own
    ``(sum_t q_t * float(c_t)) * multiplier`` in any summation order: the quantisation error
    (scale / 2 per element), the fp32 rounding of the exact dot (at most 2 d + 8 units of
    roundoff of sum_t |q_t c_t|, twice the textbook bound), and the rounding of the scan's own
    arithmetic, all doubled. The scan adds ``4 u |bias|`` for the bias's rounding."""

    q16: np.ndarray  # int16 [d]
    scale: np.float32
    bound: np.float32


def quantize_query(q: np.ndarray) -> QueryQuant | None:
    """Quantise one fp32 query [d] for ``idot``; None when it is not finite or all zero (the
    scan then takes its exact path only)."""
    d = q.shape[0]
    top = float(np.max(np.abs(q))) if d else 0.0
    if not (np.isfinite(top) and top > 0.0):
        return None
    levels = min(32767, (2**31 - 1) // (128 * d))  # the int32 sum cannot overflow
    # rounded up, so |q / scale| <= levels and no clipping breaks the error bound
    scale = np.nextafter(np.float32(top / levels), np.float32(np.inf))
    q16 = np.rint(q.astype(np.float64) / float(scale)).astype(np.int16)
    dot_abs = top * 128.0 * d  # >= sum_t |q_t c_t|
    bound = 2.0 * (float(scale) * 0.5 * 128.0 * d + (2 * d + 8) * _U * dot_abs + 4 * _U * dot_abs)
    return QueryQuant(q16, scale, np.float32(bound * (1 + 1e-6)))
