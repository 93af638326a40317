"""Cache-stage kernels of the library flows on the CPU: summaries of filled pages (Numba).

`quest_cache` writes the elementwise min and max of each page's keys ("kmin", "kmax");
`centroid_cache` writes their mean ("mean"). One work item per (listed page, KV head) decodes the
page's keys once into a float32 tile and reduces it. The mirror of `gpu_kernels.page_summaries`.

Shapes (N physical pages, Hkv KV heads, P page_size, D head_dim, n listed pages, R summary rows):
    k_pool [N, Hkv, P, D] bfloat16 / float16 / float32, a CPU tensor
    pages int64 [n] (physical pages, all full)   rows int64 [n] (summary row of each page; default
    `pages`)   summaries[name] float32 or bfloat16 [R, Hkv, 1, D], written at `rows` in place
"""

from __future__ import annotations


import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import to_summary_dtype, write_summary_rows

from .storage_decode import decode_into
from .tensor_views import storage_bits
from .threads import kernel_call


@njit(parallel=True, nogil=True, cache=True)
def _page_summary_kernel(k_bits, kind, hkv, page_size, head_dim, pages, rows, quest, s0, s1):
    """quest: s0[row] = kmin, s1[row] = kmax; else s0[row] = mean (s1 unused). s0, s1: float32
    [R, Hkv, D]; pages, rows int64 [n]."""
    tile = page_size * head_dim
    inv = np.float32(1.0 / page_size)
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
        else:
            for d in range(head_dim):
                s0[row, h, d] = 0.0
            for t in range(page_size):
                for d in range(head_dim):
                    s0[row, h, d] += keys[t, d]
            for d in range(head_dim):
                s0[row, h, d] *= inv


def launch_cache(k_pool: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, quest: bool) -> None:
    """Unchecked launcher. a, b: summary stores [R, Hkv, 1, D] (quest: kmin, kmax; centroid: mean
    twice). float32 stores are written in place; bfloat16 / float8 ones through a float32 tile of n
    rows (`contracts.to_summary_dtype`)."""
    n = pages.numel()
    _, hkv, page_size, head_dim = k_pool.shape
    if n == 0 or hkv == 0:
        return
    pages64 = pages.to(torch.int64).contiguous().numpy()
    if a.dtype == torch.float32:
        dst_a, dst_b, dst_rows = a, b, rows.to(torch.int64).contiguous().numpy()
    else:
        dst_a = torch.empty(n, hkv, 1, head_dim, dtype=torch.float32)
        dst_b = torch.empty_like(dst_a) if quest else dst_a
        dst_rows = np.arange(n, dtype=np.int64)
    k_bits, kind = storage_bits("k_pool", k_pool)
    s0 = dst_a.numpy().reshape(dst_a.shape[0], hkv, head_dim)
    s1 = dst_b.numpy().reshape(dst_b.shape[0], hkv, head_dim)
    with kernel_call():
        _page_summary_kernel(k_bits, kind, hkv, page_size, head_dim, pages64, dst_rows, quest, s0,
                             s1)
    if dst_a is not a:
        idx = rows.to(torch.int64)
        write_summary_rows(a, idx, to_summary_dtype(dst_a, a.dtype))
        if quest:
            write_summary_rows(b, idx, to_summary_dtype(dst_b, b.dtype))
