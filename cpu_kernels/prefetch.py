"""Software prefetch for Numba kernels that hop between pages.

A work item reads a page's K and V slices (4 KiB each at page 16, head_dim 128, bf16) at random places
in the pool; the hardware prefetchers only start after the first misses of each slice, so a thread
otherwise stalls on DRAM latency at every page. Asking for the next page's lines while the current one
is computed overlaps the two (`prefetch_range`).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE_BYTES = 64


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the CPU to load the cache line holding `arr[index]` (1-D array) into all cache levels."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, value=args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@njit(nogil=True, cache=True)
def prefetch_range(arr, start, n):
    """Prefetch the cache lines of arr[start:start+n] (1-D array, indices in range)."""
    step = max(1, LINE_BYTES // arr.itemsize)
    for i in range(start, start + n, step):
        prefetch(arr, i)
    prefetch(arr, start + n - 1)
