"""Cache-stage kernels of the library flows: summaries of filled pages, written in place (Triton).

`quest_cache` writes the elementwise min and max of each page's keys ("kmin", "kmax");
`centroid_cache` writes their mean ("mean"). One program per listed page (and group of KV heads
when a page holds more than TILE_ELEMENTS keys' elements) reads the page's [Hkv, page_size, D] keys
once and accumulates in float32.

Shapes (N physical pages, Hkv KV heads, P page_size, D head_dim, n listed pages, R summary rows):
    k_pool [N, Hkv, P, D] float16 / bfloat16 / float32      pages int64 [n] (physical, all full)
    rows int64 [n] (summary row of each page; default `pages`)
    summaries[name] float32 or bfloat16 [R, Hkv, 1, D] on k_pool's device, written at `rows`
The mirror of `cpu_kernels.page_summaries`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


TILE_ELEMENTS = 16384                   # key elements per program: all KV heads of a page if they fit


@triton.jit
def _page_summary_kernel(k_ptr, pages_ptr, rows_ptr, a_ptr, b_ptr, stride_kn, stride_kh, stride_kp,
                         stride_sn, stride_sh, H, P, D, MEAN: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_H KV heads of one listed page, keys [BLOCK_H, P, D] read once."""
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
        tl.store(a_ptr + row, tl.sum(keys, axis=1) / P, mask=hd)
    else:
        tl.store(a_ptr + row, tl.min(tl.where(mask, keys, float("inf")), axis=1), mask=hd)
        tl.store(b_ptr + row, tl.max(tl.where(mask, keys, float("-inf")), axis=1), mask=hd)


def launch_cache(k_pool: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, quest: bool) -> None:
    """Unchecked launcher. a, b: summary stores [R, Hkv, 1, D] (quest: kmin, kmax; centroid: mean
    twice), written at `rows` in their own dtype (float32 accumulation)."""
    n = pages.numel()
    _, hkv, P, d = k_pool.shape
    if n == 0 or hkv == 0:
        return
    if k_pool.stride(-1) != 1:
        k_pool = k_pool.contiguous()
    block_p, block_d = triton.next_power_of_2(P), triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), TILE_ELEMENTS // (block_p * block_d)))
    _page_summary_kernel[(n, triton.cdiv(hkv, block_h))](
        k_pool, pages, rows, a, b, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        a.stride(0), a.stride(1), hkv, P, d, MEAN=not quest, BLOCK_H=block_h, BLOCK_P=block_p,
        BLOCK_D=block_d, num_warps=8)
