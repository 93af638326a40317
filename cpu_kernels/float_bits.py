"""Float32 bit tricks for Numba kernels: a bit-cast intrinsic and an `exp` that vectorises.

Numba calls libm's `expf` one value at a time (no SVML here), which cost as much as the dot products
of a decode tile; `exp32` is a branch-free Cody-Waite range reduction plus a degree-6 polynomial that
LLVM vectorises, accurate to about 2 ulp over the float32 range, 0 below -87.3 (and for -inf), inf
above 88.37 (exp(x) <= 2**127.5 stays finite below), NaN for NaN. `bits_to_f32` and `f32_to_bits`
reinterpret between uint32 and float32 in registers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def bits_to_f32(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the low 32 bits of the unsigned integer `bits`."""
    if not isinstance(bits, types.Integer) or bits.signed or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """The uint32 IEEE-754 bit pattern of the float32 `value`."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_MIN_X = np.float32(-87.33654)
_MAX_X = np.float32(88.37)
_C2 = np.float32(5.0000001201e-1)
_C3 = np.float32(1.6666665459e-1)
_C4 = np.float32(4.1665795894e-2)
_C5 = np.float32(8.3334519073e-3)
_C6 = np.float32(1.3981999507e-3)
_C7 = np.float32(1.9875691500e-4)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_INF = np.float32(np.inf)


@njit(nogil=True, cache=True)
def exp32(x):
    """exp of a float32, vectorisable (see the module docstring for range and accuracy)."""
    xc = min(max(x, _MIN_X), _MAX_X)
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = ((((((_C7 * r + _C6) * r + _C5) * r + _C4) * r + _C3) * r + _C2) * r * r) + r + _ONE
    scale = bits_to_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))
    y = p * scale
    y = _ZERO if x < _MIN_X else y
    y = _INF if x > _MAX_X else y
    return x if x != x else y

