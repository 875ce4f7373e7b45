"""A software prefetch for numba kernels (LLVM's ``llvm.prefetch``, which never faults).

Why: on the 2-core AMD EPYC this project is measured on, the fused scan over a 1M x 64 fp32
table ran 1.4x the read floor (9.3 ms against 6.5) once its loop held the top-k test; the same
loop with a reduction instead of the test ran at the floor. Prefetching the rows a few KB ahead
brought the scan back to the floor (6.5 ms): the hardware prefetcher alone kept too few lines in
flight for the branchy loop.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PREFETCH_BYTES = 4096  # how far ahead of the row being scored (2-8 KB measured the same)
LINE_BYTES = 64


@intrinsic
def _prefetch_row(typingctx: Any, arr: Any, row: Any, col: Any) -> Any:  # pragma: no cover
    """Hint the cache line holding ``arr[row, col]`` (a 2-D array) into every cache level for
    reading. No effect on results; an address past the array is harmless, but callers clamp
    ``row`` anyway."""
    sig = types.void(arr, row, col)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, aryty, ary, [args[1], args[2]], wraparound=False
        )
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # (address, read, locality 3 = keep in all levels, data cache)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch_step(typingctx: Any, arr: Any) -> Any:  # pragma: no cover
    """Elements of ``arr`` per cache line, the stride to prefetch a row with, or 0 where
    scanning it gains nothing from ``prefetch_row``. A constant per dtype, known when the
    kernel compiles: the loop's step is a constant, and the 0 specialisation carries no
    prefetch code at all (in the exact scan, int8 rows ran 2.6x slower with the prefetch loop
    merely present but skipped at run time, and no faster with it running: that scan is bound
    by its int8 -> fp32 dot; the prefiltered int8 scan, bound by memory, prefetches with its own
    compile-time stride)."""
    bits = arr.dtype.bitwidth
    step = LINE_BYTES * 8 // bits if bits > 8 else 0
    sig = types.intp(arr)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return context.get_constant(types.intp, step)

    return sig, codegen


# the typing context argument is numba's, not the caller's
prefetch_row: Any = _prefetch_row
prefetch_step: Any = _prefetch_step
