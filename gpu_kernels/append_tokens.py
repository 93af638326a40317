"""Append a decode step's token of one layer to a paged pool and flag non-finite rows, one launch.

Row b's K and V `[Hkv, D]` go to page `pages[b]`, slot `offs[b]` of `k_pool`, `v_pool`
`[N, Hkv, P, D]` (the tokens already in the pool's dtype: copied bit for bit), and `flags[b]` (uint8, a view of the runtime's
bool flags) becomes 1 when any of that row's K or V values is NaN or infinite; a flag already set
stays set. The runtime's eager equivalent is two `index_put`s and seven reductions and logical ops
per layer; this is one kernel, and it is what a step's CUDA graph records.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kernel(k_new, v_new, k_pool, v_pool, pages, offs, flags,
                   row_stride, page_stride, head_stride, slot_stride,
                   HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HKV) & (d < D)
    src = b.to(tl.int64) * row_stride + h * D + d
    k = tl.load(k_new + src, mask=mask, other=0.0)
    v = tl.load(v_new + src, mask=mask, other=0.0)
    page = tl.load(pages + b).to(tl.int64)
    slot = tl.load(offs + b).to(tl.int64)
    dst = page * page_stride + h * head_stride + slot * slot_stride + d
    tl.store(k_pool + dst, k, mask=mask)
    tl.store(v_pool + dst, v, mask=mask)
    kf = k.to(tl.float32)
    vf = v.to(tl.float32)
    bad = ((kf - kf) != 0) | ((vf - vf) != 0)      # x - x is 0 when finite, NaN for NaN / inf
    bad = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)
    old = tl.load(flags + b)
    tl.store(flags + b, (old.to(tl.int32) | bad).to(tl.uint8))


def launch_append_tokens(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor,
                         flags: torch.Tensor) -> None:
    """Unchecked launcher: k_new, v_new [B, Hkv, D] contiguous, in the pools' dtype; k_pool, v_pool
    [N, Hkv, P, D] contiguous; pages, offs int [B] (valid pages and slots); flags bool [B], all on
    one device."""
    B, hkv, D = k_new.shape
    if B == 0:
        return
    _append_kernel[(B,)](k_new, v_new, k_pool, v_pool, pages, offs, flags.view(torch.uint8),
                         hkv * D, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
                         HKV=hkv, D=D, BLOCK_H=triton.next_power_of_2(hkv),
                         BLOCK_D=triton.next_power_of_2(D), num_warps=4)


def append_tokens(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                  v_pool: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor,
                  flags: torch.Tensor) -> None:
    """Write each row's K/V into (pages[b], offs[b]) of the pools and raise flags[b] when the row
    holds NaN or inf (module docstring). Checked: shapes, dtypes, devices, index ranges (this
    synchronises; the runtime calls `launch_append_tokens`)."""
    if k_new.dim() != 3 or v_new.shape != k_new.shape:
        raise ValueError(f"k_new and v_new must be [B, Hkv, D] alike, got {tuple(k_new.shape)} "
                         f"and {tuple(v_new.shape)}")
    B, hkv, D = k_new.shape
    if len({k_new.dtype, v_new.dtype, k_pool.dtype, v_pool.dtype}) != 1:
        raise ValueError(f"k_new, v_new, k_pool, v_pool must share one dtype (convert the tokens "
                         f"first), got {k_new.dtype}, {v_new.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape or \
            (k_pool.shape[1], k_pool.shape[3]) != (hkv, D):
        raise ValueError(f"k_pool and v_pool must be [N, {hkv}, P, {D}] alike, got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    for name, t in (("pages", pages), ("offs", offs)):
        if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int tensor [{B}], got {t.dtype} {tuple(t.shape)}")
    if flags.shape != (B,) or flags.dtype != torch.bool:
        raise ValueError(f"flags must be a bool tensor [{B}], got {flags.dtype} "
                         f"{tuple(flags.shape)}")
    tensors = (k_new, v_new, k_pool, v_pool, pages, offs, flags)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("k_new, v_new, k_pool, v_pool, pages, offs and flags must be contiguous")
    N, P = k_pool.shape[0], k_pool.shape[2]
    if B and (int(pages.min()) < 0 or int(pages.max()) >= N or int(offs.min()) < 0
              or int(offs.max()) >= P):
        raise ValueError(f"pages must lie in [0, {N}) and offs in [0, {P}), got pages "
                         f"{pages.tolist()} offs {offs.tolist()}")
    launch_append_tokens(k_new, v_new, k_pool, v_pool, pages, offs, flags)
