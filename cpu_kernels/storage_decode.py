"""Exact bf16 / fp16 / fp32 (and float8_e4m3fn) bits -> float32 conversion inside Numba kernels.

Kernels read KV storage as raw bits (`tensor_views.storage_bits`) and decode one tile (a page's
`page_size x head_dim` slice, or a few gathered rows) at a time into a small float32 scratch that stays
in L1. Every conversion is exact: bf16 is the top half of a float32; fp16 is rebuilt from its fields
(normals by re-biasing the exponent, subnormals as mantissa * 2**-24, inf/NaN by their bit pattern,
NaNs quieted as the hardware conversion does; no float32 subnormal is ever touched, since those stall
x86 vector units), so results match
`torch.Tensor.float()` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

from .float_bits import bits_to_f32, f32_to_bits
from .tensor_views import BF16, FP8, FP16, float32_array, raw_bits

_SHIFT16 = np.uint32(16)
_SHIFT13 = np.uint32(13)
_ABS16 = np.uint32(0x7FFF)
_SIGN16 = np.uint32(0x8000)
_EXP16 = np.uint32(0x7C00)
_MANT16 = np.uint32(0x03FF)
_EXP32 = np.uint32(0x7F800000)
_POW2_M24 = np.float32(2.0 ** -24)
_REBIAS = np.uint32((127 - 15) << 23)
_MIN_NORMAL16 = np.uint32(0x0400)
_QUIET32 = np.uint32(0x00400000)
_ZERO32 = np.uint32(0)


def _fp8_table() -> np.ndarray:
    """float32 value of each float8_e4m3fn bit pattern (torch's own conversion: exact)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn) \
        .to(torch.float32).numpy().copy()


_FP8 = _fp8_table()


@njit(nogil=True, cache=True)
def decode_into(src, kind, dst):
    """Decode the stored values `src` into float32 `dst` (same length).

    src: 1-D uint16 (kind BF16 / FP16), uint32 (kind FP32) or uint8 (kind FP8) raw bits; dst: float32. Pass slices:
    plain 0..n loops let LLVM vectorise the conversion.
    """
    n = src.shape[0]
    if kind == BF16:
        for i in range(n):
            dst[i] = bits_to_f32(np.uint32(src[i]) << _SHIFT16)
    elif kind == FP16:
        for i in range(n):
            h = np.uint32(src[i])
            a = h & _ABS16
            mant = a & _MANT16
            normal = (a << _SHIFT13) + _REBIAS
            subnormal = f32_to_bits(np.float32(mant) * _POW2_M24)
            special = _EXP32 | (mant << _SHIFT13) | (_QUIET32 if mant != 0 else _ZERO32)
            mag = special if a >= _EXP16 else (normal if a >= _MIN_NORMAL16 else subnormal)
            dst[i] = bits_to_f32(np.uint32(mag | ((h & _SIGN16) << _SHIFT16)))
    elif kind == FP8:
        for i in range(n):
            dst[i] = _FP8[src[i]]
    else:
        for i in range(n):
            dst[i] = bits_to_f32(np.uint32(src[i]))


def as_f32(x):
    """float32 value of one stored element inside kernels: a uint16 is bf16 bits, a uint32 fp32 bits,
    a uint8 float8_e4m3fn bits (summary stores), a float32 itself. fp16 storage never comes here (it
    is decoded a tile at a time first)."""
    raise NotImplementedError("as_f32 runs inside Numba kernels only")


@overload(as_f32, inline="always")
def _as_f32(x):
    if x == types.uint16:
        return lambda x: bits_to_f32(np.uint32(x) << _SHIFT16)
    if x == types.uint32:
        return lambda x: bits_to_f32(x)
    if x == types.uint8:
        return lambda x: _FP8[x]
    if x == types.float32:
        return lambda x: x
    return None


def float32_of(name: str, t) -> np.ndarray:
    """A float32 NumPy array of a float CPU tensor (same shape): a view when `t` is float32 and
    contiguous; bf16 / fp16 decoded by `decode_into` in compiled code, not by a torch cast (which,
    called from a worker thread on a large enough tensor, starts torch's own thread pool beside the
    CPU kernels' threads)."""
    if t.dtype not in (torch.bfloat16, torch.float16):
        return float32_array(name, t)
    bits, kind = raw_bits(name, t)
    out = np.empty(tuple(t.shape), np.float32)
    decode_into(bits, kind, out.reshape(-1))
    return out
