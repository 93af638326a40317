"""Cache-stage kernels of the library flows: summaries of filled pages, written in place (Triton).

`quest_cache` writes the elementwise min and max of each page's keys ("kmin", "kmax");
`centroid_cache` writes their mean ("mean"); `lowbit_cache` writes kmin, kmax and every key's
channels coded in `bits` bits on that range ("codes", packed: `vortex_hybrid.packed_codes`). One
program per listed page (and group of KV heads when a page holds more than TILE_ELEMENTS keys'
elements) reads the page's [Hkv, page_size, D] keys once and accumulates in float32.

Shapes (N physical pages, Hkv KV heads, P page_size, D head_dim, n listed pages, R summary rows):
    k_pool [N, Hkv, P, D] float16 / bfloat16 / float32      pages int64 [n] (physical, all full)
    rows int64 [n] (summary row of each page; default `pages`)
    summaries[name] float32, bfloat16 or float8_e4m3fn [R, Hkv, 1, D] on k_pool's device, written
    at `rows`; lowbit's "codes" uint8 [R, Hkv, P, bits * ceil(D / 8)]
The mirror of `cpu_kernels.page_summaries`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import FP8_SUMMARY_MAX
from vortex_hybrid.packed_codes import code_bits


TILE_ELEMENTS = 16384                   # key elements per program: all KV heads of a page if they fit


@triton.jit
def _fp8_round(x, SAT: tl.constexpr):
    """x (float32) clamped to +-SAT and rounded to float8_e4m3fn's grid, ties to even (as torch
    rounds), so the store's conversion is exact: 3 mantissa bits for normals (|x| >= 2**-6, an
    integer round of the float32 bits, its carry moving the exponent), multiples of 2**-9 below
    (float32 addition of 2**14 rounds there). Rounding here rather than in the store's cast gives
    the same bits natively and in Triton's interpreter (whose float8 cast loses that carry)."""
    x = tl.clamp(x, -SAT, SAT, propagate_nan=tl.PropagateNan.ALL)
    bits = x.to(tl.uint32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    ax = tl.abs(x)
    small = ((ax + 16384.0) - 16384.0).to(tl.uint32, bitcast=True)
    mag = tl.where(ax >= 0.015625, normal, small)
    return (mag | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _page_summary_kernel(k_ptr, pages_ptr, rows_ptr, a_ptr, b_ptr, c_ptr, stride_kn, stride_kh,
                         stride_kp, stride_sn, stride_sh, stride_cn, stride_ch, H, P, D, W,
                         MEAN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_D: tl.constexpr, SAT: tl.constexpr, BITS: tl.constexpr):
    """One program: BLOCK_H KV heads of one listed page, keys [BLOCK_H, P, D] read once. SAT > 0
    (float8 stores): values clamped to +-SAT and rounded by `_fp8_round` before the store.
    BITS > 0 (lowbit): also each key's channels coded on [kmin, kmax] (float32, before any
    rounding of the stored bounds) into packed codes c [R, Hkv, P, BITS * W] (W = ceil(D / 8))."""
    page = tl.load(pages_ptr + tl.program_id(0)).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    hd = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    mask = hd[:, None, :] & (offs_p[None, :, None] < P)
    keys = tl.load(k_ptr + page * stride_kn + offs_h[:, None, None] * stride_kh
                   + offs_p[None, :, None] * stride_kp + offs_d[None, None, :],
                   mask=mask, other=0.0).to(tl.float32)
    dst = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    row = dst * stride_sn + offs_h[:, None] * stride_sh + offs_d[None, :]
    if MEAN:
        lo = tl.sum(keys, axis=1) / P
    else:
        lo = tl.min(tl.where(mask, keys, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, keys, float("-inf")), axis=1)
        if BITS > 0:
            _store_codes(keys, lo, hi, c_ptr + dst * stride_cn, offs_h, offs_p, stride_ch, H, P, W,
                         BLOCK_H, BLOCK_P, BLOCK_D, BITS)
        if SAT > 0:
            hi = _fp8_round(hi, SAT)
        tl.store(b_ptr + row, hi.to(b_ptr.dtype.element_ty), mask=hd)
    if SAT > 0:
        lo = _fp8_round(lo, SAT)
    tl.store(a_ptr + row, lo.to(a_ptr.dtype.element_ty), mask=hd)


@triton.jit
def _store_codes(keys, lo, hi, c_row, offs_h, offs_p, stride_ch, H, P, W, BLOCK_H: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """lowbit's codes of keys [BLOCK_H, BLOCK_P, BLOCK_D] on the per-channel range [lo, hi]
    ([BLOCK_H, BLOCK_D]): c = #{l in 1..L : t >= l - 1/2}, t = (k - lo) / max(hi - lo, 1e-20) * L
    (L = 2**BITS - 1; float32 with IEEE division, as the reference computes it), packed as bit
    planes (`vortex_hybrid.packed_codes`) at c_row + h * stride_ch + p * BITS * W."""
    LEVELS: tl.constexpr = 2 ** BITS - 1
    span = tl.maximum(hi - lo, 1e-20)
    t = tl.math.div_rn(keys - lo[:, None, :], span[:, None, :]) * LEVELS
    code = tl.zeros([BLOCK_H, BLOCK_P, BLOCK_D], tl.int32)
    for level in tl.static_range(1, LEVELS + 1):
        code += (t >= level - 0.5).to(tl.int32)
    code = tl.reshape(code, [BLOCK_H, BLOCK_P, BLOCK_D // 8, 8])
    weight = (1 << tl.arange(0, 8))[None, None, None, :]
    offs_w = tl.arange(0, BLOCK_D // 8)
    dst = c_row + offs_h[:, None, None] * stride_ch + offs_p[None, :, None] * (BITS * W) \
        + offs_w[None, None, :]
    ok = (offs_h[:, None, None] < H) & (offs_p[None, :, None] < P) & (offs_w[None, None, :] < W)
    for b in tl.static_range(BITS):
        byte = tl.sum(((code >> b) & 1) * weight, axis=3)
        tl.store(dst + b * W, byte.to(tl.uint8), mask=ok)


def launch_cache(k_pool: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, quest: bool, codes: Optional[torch.Tensor] = None) -> None:
    """Unchecked launcher. a, b: summary stores [R, Hkv, 1, D] (quest, lowbit: kmin, kmax;
    centroid: mean twice), written at `rows` in their own dtype (float32 accumulation; float8
    saturates as `contracts.to_summary_dtype` does). codes (lowbit): packed codes uint8
    [R, Hkv, P, bits * ceil(D / 8)], bits read from the width."""
    n = pages.numel()
    _, hkv, P, d = k_pool.shape
    if n == 0 or hkv == 0:
        return
    if k_pool.stride(-1) != 1:
        k_pool = k_pool.contiguous()
    w = -(-d // 8)
    bits = 0 if codes is None else code_bits(codes.shape[-1], d)
    block_p, block_d = triton.next_power_of_2(P), max(8, triton.next_power_of_2(d))
    block_h = max(1, min(triton.next_power_of_2(hkv), TILE_ELEMENTS // (block_p * block_d)))
    c = a if codes is None else codes
    _page_summary_kernel[(n, triton.cdiv(hkv, block_h))](
        k_pool, pages, rows, a, b, c, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        a.stride(0), a.stride(1), c.stride(0), c.stride(1), hkv, P, d, w, MEAN=not quest,
        BLOCK_H=block_h, BLOCK_P=block_p, BLOCK_D=block_d,
        SAT=FP8_SUMMARY_MAX if a.dtype == torch.float8_e4m3fn else 0.0, BITS=bits, num_warps=8)
