"""Zero-copy NumPy views of torch CPU tensors for the Numba kernels.

NumPy has no bfloat16, so 16-bit KV storage travels as raw bits: a bf16 or fp16 pool becomes a flat
`uint16` array plus a storage kind (`BF16`, `FP16`), an fp32 pool a flat `uint32` array with kind
`FP32`; kernels turn the bits into float32 exactly (`storage_decode`). Contiguous tensors are viewed,
never copied; small index tensors and `q` are converted to int32 / float32 (a copy only when the
dtype differs).
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

BF16, FP16, FP32, FP8 = 0, 1, 2, 3
"""Storage kinds of a KV pool (FP8, float8_e4m3fn: summary stores only), passed to kernels as a
plain int."""

_KIND = {torch.bfloat16: BF16, torch.float16: FP16, torch.float32: FP32, torch.float8_e4m3fn: FP8}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float8_e4m3fn: torch.int8}
_UNSIGNED = {torch.int8: np.uint8, torch.int16: np.uint16, torch.int32: np.uint32}


def _cpu(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; vortex_hybrid.cpu_kernels needs CPU tensors")


def _contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous():
        return t
    log.debug("%s is not contiguous: copying %d bytes", name, t.numel() * t.element_size())
    return t.contiguous()


_VIEWS: dict[int, tuple] = {}
"""id(pool) -> (weakref to pool, data_ptr, shape, bits, kind): pools live long, so their views are
made once (saves ~10 us of torch calls per kernel call); an entry goes when its pool is freed."""


def storage_bits(name: str, pool: torch.Tensor) -> tuple[np.ndarray, int]:
    """(flat raw-bit array, storage kind) of a float pool, without a copy for bf16/fp16/fp32.

    pool: any shape, bfloat16 / float16 / float32 (float64 is rounded to a float32 copy), or
    float8_e4m3fn (summary stores). Returns a 1-D uint16 (bf16, fp16), uint32 (fp32) or uint8
    (float8) array sharing the tensor's memory.
    """
    hit = _VIEWS.get(id(pool))
    if hit is not None and hit[0]() is pool and hit[1] == pool.data_ptr() and hit[2] == pool.shape:
        return hit[3], hit[4]
    bits, kind = raw_bits(name, pool)
    if bits.size and bits.ctypes.data == pool.data_ptr():          # a view, not a copy: cache it
        key = id(pool)
        _VIEWS[key] = (weakref.ref(pool, lambda _, key=key: _VIEWS.pop(key, None)),
                       pool.data_ptr(), pool.shape, bits, kind)
    return bits, kind


def raw_bits(name: str, pool: torch.Tensor) -> tuple[np.ndarray, int]:
    """`storage_bits` of a tensor that may not live long (no view kept): e.g. a step's q."""
    _cpu(name, pool)
    if pool.dtype == torch.float64:
        log.debug("%s is float64: rounding a copy to float32 for the CPU kernels", name)
        pool = pool.to(torch.float32)
    if pool.dtype not in _KIND:
        raise ValueError(f"{name} dtype {pool.dtype} is not a KV storage dtype; "
                         f"use one of {list(_KIND)}")
    pool = _contiguous(name, pool)
    bits = pool.view(_BITS[pool.dtype]).reshape(-1).numpy().view(_UNSIGNED[_BITS[pool.dtype]])
    return bits, _KIND[pool.dtype]


def float32_array(name: str, t: torch.Tensor) -> np.ndarray:
    """A float32 NumPy array of `t` (same shape): a view when `t` is float32 and contiguous."""
    _cpu(name, t)
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return _contiguous(name, t.detach()).numpy()


def int32_array(name: str, t: torch.Tensor) -> np.ndarray:
    """An int32 NumPy array of an index tensor (same shape): a view when it is int32 and contiguous."""
    _cpu(name, t)
    if t.dtype != torch.int32:
        t = t.to(torch.int32)
    return _contiguous(name, t).numpy()


def float_bits(name: str, t: torch.Tensor) -> np.ndarray:
    """The uint32 bit patterns of a float32 tensor (same shape, a view when contiguous)."""
    return float32_array(name, t).view(np.uint32)


def out_tensor(name: str, out: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """`out` when given (checked: a contiguous CPU tensor of this shape and dtype), else a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {tuple(shape)}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    return out
