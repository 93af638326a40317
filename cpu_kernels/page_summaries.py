"""Cache-stage kernels of the library flows on the CPU: summaries of filled pages (Numba).

`quest_cache` writes the elementwise min and max of each page's keys ("kmin", "kmax");
`centroid_cache` writes their mean ("mean"); `lowbit_cache` writes kmin, kmax and every key's
channels coded in `bits` bits on that range ("codes", packed: `vortex_hybrid.packed_codes`). One
work item per (listed page, KV head) decodes the page's keys once into a float32 tile and reduces
it. The mirror of `gpu_kernels.page_summaries`.

Shapes (N physical pages, Hkv KV heads, P page_size, D head_dim, n listed pages, R summary rows):
    k_pool [N, Hkv, P, D] bfloat16 / float16 / float32, a CPU tensor
    pages int64 [n] (physical pages, all full)   rows int64 [n] (summary row of each page; default
    `pages`)   summaries[name] float32, bfloat16 or float8_e4m3fn [R, Hkv, 1, D], written at `rows`;
    lowbit's "codes" uint8 [R, Hkv, P, bits * ceil(D / 8)]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import to_summary_dtype, write_summary_rows
from vortex_hybrid.packed_codes import code_bits

from .storage_decode import decode_into
from .tensor_views import storage_bits
from .threads import kernel_call


_TINY = np.float32(1e-20)
_HALF = np.float32(0.5)
_NO_CODES = np.zeros((1, 1, 1, 1), np.uint8)


@njit(nogil=True, cache=True)
def _store_codes(keys, lo, hi, bits, width, out):
    """lowbit's codes of keys float32 [P, D] on the per-channel range [lo, hi] (float32 [D]):
    c = #{l in 1..L : t >= l - 1/2}, t = (k - lo) / max(hi - lo, 1e-20) * L (L = 2**bits - 1, in
    float32 as the reference computes it), packed as bit planes (`vortex_hybrid.packed_codes`)
    into out uint8 [P, bits * width] (width = ceil(D / 8))."""
    page_size, head_dim = keys.shape
    levels = (1 << bits) - 1
    scale = np.float32(levels)
    span = np.empty(head_dim, np.float32)
    for d in range(head_dim):
        span[d] = max(hi[d] - lo[d], _TINY)
    code = np.zeros(8 * width, np.uint8)                 # one token's codes, zero past head_dim
    for t in range(page_size):
        for d in range(head_dim):
            x = (keys[t, d] - lo[d]) / span[d] * scale
            c = np.uint8(0)
            for level in range(1, levels + 1):
                c += np.uint8(x >= np.float32(level) - _HALF)
            code[d] = c
        for b in range(bits):
            for w in range(width):
                byte = np.uint8(0)
                for j in range(8):
                    byte |= ((code[8 * w + j] >> b) & np.uint8(1)) << np.uint8(j)
                out[t, b * width + w] = byte


@njit(parallel=True, nogil=True, cache=True)
def _page_summary_kernel(k_bits, kind, hkv, page_size, head_dim, pages, rows, quest, s0, s1,
                         codes, code_rows, bits):
    """quest: s0[row] = kmin, s1[row] = kmax; else s0[row] = mean (s1 unused). s0, s1: float32
    [R, Hkv, D]; pages, rows int64 [n]. bits > 0 (lowbit, with quest): codes[code_rows[i]] uint8
    [R', Hkv, P, bits * ceil(D / 8)] from the float32 kmin, kmax (`_store_codes`)."""
    tile = page_size * head_dim
    inv = np.float32(1.0 / page_size)
    width = (head_dim + 7) // 8
    for item in prange(pages.shape[0] * hkv):
        i = item // hkv
        h = item - i * hkv
        page, row = pages[i], rows[i]
        keys = np.empty((page_size, head_dim), np.float32)
        start = (page * hkv + h) * tile
        decode_into(k_bits[start:start + tile], kind, keys.reshape(tile))
        if quest:
            for d in range(head_dim):
                s0[row, h, d] = keys[0, d]
                s1[row, h, d] = keys[0, d]
            for t in range(1, page_size):
                for d in range(head_dim):
                    s0[row, h, d] = min(s0[row, h, d], keys[t, d])
                    s1[row, h, d] = max(s1[row, h, d], keys[t, d])
            if bits > 0:
                _store_codes(keys, s0[row, h], s1[row, h], bits, width, codes[code_rows[i], h])
        else:
            for d in range(head_dim):
                s0[row, h, d] = 0.0
            for t in range(page_size):
                for d in range(head_dim):
                    s0[row, h, d] += keys[t, d]
            for d in range(head_dim):
                s0[row, h, d] *= inv


def launch_cache(k_pool: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, quest: bool, codes: Optional[torch.Tensor] = None) -> None:
    """Unchecked launcher. a, b: summary stores [R, Hkv, 1, D] (quest, lowbit: kmin, kmax;
    centroid: mean twice). float32 stores are written in place; bfloat16 / float8 ones through a
    float32 tile of n rows (`contracts.to_summary_dtype`). codes (lowbit): packed codes uint8
    [R, Hkv, P, bits * ceil(D / 8)], written in place at `rows`, bits read from the width."""
    n = pages.numel()
    _, hkv, page_size, head_dim = k_pool.shape
    if n == 0 or hkv == 0:
        return
    pages64 = pages.to(torch.int64).contiguous().numpy()
    rows64 = rows.to(torch.int64).contiguous().numpy()
    if a.dtype == torch.float32:
        dst_a, dst_b, dst_rows = a, b, rows64
    else:
        dst_a = torch.empty(n, hkv, 1, head_dim, dtype=torch.float32)
        dst_b = torch.empty_like(dst_a) if quest else dst_a
        dst_rows = np.arange(n, dtype=np.int64)
    k_bits, kind = storage_bits("k_pool", k_pool)
    s0 = dst_a.numpy().reshape(dst_a.shape[0], hkv, head_dim)
    s1 = dst_b.numpy().reshape(dst_b.shape[0], hkv, head_dim)
    c = _NO_CODES if codes is None else codes.numpy()
    bits = 0 if codes is None else code_bits(codes.shape[-1], head_dim)
    with kernel_call():
        _page_summary_kernel(k_bits, kind, hkv, page_size, head_dim, pages64, dst_rows, quest, s0,
                             s1, c, rows64, bits)
    if dst_a is not a:
        idx = rows.to(torch.int64)
        write_summary_rows(a, idx, to_summary_dtype(dst_a, a.dtype))
        if quest:
            write_summary_rows(b, idx, to_summary_dtype(dst_b, b.dtype))
