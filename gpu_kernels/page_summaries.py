"""Cache-stage kernels of the library flows: summaries of filled pages, written in place (Triton).

`quest_cache` writes the elementwise min and max of each page's keys ("kmin", "kmax");
`centroid_cache` writes their mean ("mean"). One program per listed page (and group of KV heads
when a page holds more than TILE_ELEMENTS keys' elements) reads the page's [Hkv, page_size, D] keys
once and accumulates in float32.

Shapes (N physical pages, Hkv KV heads, P page_size, D head_dim, n listed pages):
    k_pool [N, Hkv, P, D] float16 / bfloat16 / float32      pages int64 [n] (physical, all full)
    summaries[name] float32 [N, Hkv, 1, D], rows indexed by physical page, on k_pool's device
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import FLOAT_DTYPES, INDEX_DTYPES

TILE_ELEMENTS = 16384                   # key elements per program: all KV heads of a page if they fit


@triton.jit
def _page_summary_kernel(k_ptr, pages_ptr, a_ptr, b_ptr, stride_kn, stride_kh, stride_kp,
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
    row = page * stride_sn + offs_h[:, None] * stride_sh + offs_d[None, :]
    if MEAN:
        tl.store(a_ptr + row, tl.sum(keys, axis=1) / P, mask=hd)
    else:
        tl.store(a_ptr + row, tl.min(tl.where(mask, keys, float("inf")), axis=1), mask=hd)
        tl.store(b_ptr + row, tl.max(tl.where(mask, keys, float("-inf")), axis=1), mask=hd)


def _check_cache_args(k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict,
                      names: tuple[str, ...]) -> None:
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 4:
        raise ValueError(f"k_pool has shape {tuple(getattr(k_pool, 'shape', ()))}; expected "
                         "[num_pages, num_kv_heads, page_size, head_dim]")
    if k_pool.dtype not in FLOAT_DTYPES[:3]:
        raise ValueError(f"k_pool dtype {k_pool.dtype}; expected one of {FLOAT_DTYPES[:3]}")
    if not isinstance(pages, torch.Tensor) or pages.dim() != 1 or pages.dtype not in INDEX_DTYPES:
        got = f"{getattr(pages, 'dtype', type(pages).__name__)} {tuple(getattr(pages, 'shape', ()))}"
        raise ValueError(f"pages must be an int64 tensor [n] of physical pages, got {got}")
    if pages.device != k_pool.device:
        raise ValueError(f"pages is on {pages.device} but k_pool is on {k_pool.device}")
    N, hkv, _, d = k_pool.shape
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= N):
        raise ValueError(f"pages holds {int(pages.min())}..{int(pages.max())}; the pool has pages "
                         f"0..{N - 1}")
    for name in names:
        t = summaries.get(name) if isinstance(summaries, dict) else None
        if t is None:
            raise ValueError(f"summaries lacks {name!r}; it needs {list(names)}")
        if (tuple(t.shape) != (N, hkv, 1, d) or t.dtype != torch.float32
                or t.device != k_pool.device):
            raise ValueError(f"summaries[{name!r}] is {t.dtype} {tuple(t.shape)} on {t.device}; "
                             f"expected float32 {(N, hkv, 1, d)} on {k_pool.device}")
        if t.stride(-1) != 1 or t.stride(1) != d:
            raise ValueError(f"summaries[{name!r}] must be contiguous per row, strides {t.stride()}")


def _launch(k_pool: torch.Tensor, pages: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            mean: bool) -> None:
    n = pages.numel()
    _, hkv, P, d = k_pool.shape
    if n == 0 or hkv == 0:
        return
    if k_pool.stride(-1) != 1:
        k_pool = k_pool.contiguous()
    block_p, block_d = triton.next_power_of_2(P), triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), TILE_ELEMENTS // (block_p * block_d)))
    _page_summary_kernel[(n, triton.cdiv(hkv, block_h))](
        k_pool, pages, a, b, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        a.stride(0), a.stride(1), hkv, P, d, MEAN=mean, BLOCK_H=block_h, BLOCK_P=block_p,
        BLOCK_D=block_d, num_warps=8)


def quest_cache(k_pool: torch.Tensor, pages: torch.Tensor,
                summaries: dict[str, torch.Tensor]) -> None:
    """Write summaries["kmin"] and summaries["kmax"] rows `pages`: elementwise min / max of keys.

    k_pool [N, Hkv, P, D] float16/bfloat16/float32; pages int64 [n] physical pages (all full);
    summaries["kmin"], summaries["kmax"] float32 [N, Hkv, 1, D], updated in place.
    """
    _check_cache_args(k_pool, pages, summaries, ("kmin", "kmax"))
    _launch(k_pool, pages, summaries["kmin"], summaries["kmax"], mean=False)


def centroid_cache(k_pool: torch.Tensor, pages: torch.Tensor,
                   summaries: dict[str, torch.Tensor]) -> None:
    """Write summaries["mean"] rows `pages`: the mean key of each page (float32 accumulation).

    k_pool [N, Hkv, P, D] float16/bfloat16/float32; pages int64 [n] physical pages (all full);
    summaries["mean"] float32 [N, Hkv, 1, D], updated in place.
    """
    _check_cache_args(k_pool, pages, summaries, ("mean",))
    _launch(k_pool, pages, summaries["mean"], summaries["mean"], mean=True)
