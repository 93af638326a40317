"""Gather selected pages of a (pinned host) page pool into GPU cache slots, K and V in one launch.

For the offload path: after the scheduler decides which host-only pages to fetch, one launch copies
`src_k[..., src_pages[i], :, :, :]` to `dst_k[..., dst_slots[i], :, :, :]` (and the same for V) for
every i and every leading (layer) index. The GPU reads pinned host memory directly: pinned memory
is device-mapped under CUDA's unified addressing, so the kernel takes the host tensor's pointer as
is (zero-copy reads over PCIe), with no staging buffer and no per-page copy call.

Shapes: pools `[*lead, N, Hkv, P, D]` (lead = () for one layer's contract pool, (L,) for a
`PagePool` tensor); every page's `Hkv * P * D` elements contiguous; src and dst may differ only in
N. `src_pages`, `dst_slots`: int [n]. Copies are bit-exact.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

Indices = Union[torch.Tensor, Sequence[int]]
BLOCK = 2048


@triton.jit
def _gather_kernel(src_k, src_v, dst_k, dst_v, src_pages, dst_slots, n, page_elems,
                   src_lead_stride, src_page_stride, dst_lead_stride, dst_page_stride,
                   BLOCK: tl.constexpr):
    """Program (p, lead * 2 + kv, chunk) copies BLOCK elements of one layer's K or V for pages
    p, p + programs, p + 2 * programs, ... (programs = the grid's first size)."""
    lead_kv = tl.program_id(1)
    chunk = tl.program_id(2)
    lead = (lead_kv // 2).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    for i in range(tl.program_id(0), n, tl.num_programs(0)):
        sp = tl.load(src_pages + i).to(tl.int64)
        dp = tl.load(dst_slots + i).to(tl.int64)
        limit = tl.where((sp >= 0) & (dp >= 0), page_elems, 0)    # -1 entries: nothing to copy
        mask = offs < limit
        src_off = lead * src_lead_stride + sp * src_page_stride + offs
        dst_off = lead * dst_lead_stride + dp * dst_page_stride + offs
        if lead_kv % 2 == 0:
            tl.store(dst_k + dst_off, tl.load(src_k + src_off, mask=mask), mask=mask)
        else:
            tl.store(dst_v + dst_off, tl.load(src_v + src_off, mask=mask), mask=mask)


def _as_index(name: str, idx: Indices, device: torch.device) -> torch.Tensor:
    t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(list(idx), dtype=torch.int64)
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got "
                         f"shape {tuple(t.shape)} dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64, non_blocking=True)


def _check_pools(src_k, src_v, dst_k, dst_v) -> None:
    for name, t in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (4, 5):
            raise ValueError(f"{name} must be a pool tensor [N, Hkv, P, D] or [L, N, Hkv, P, D], "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if t[(0,) * (t.dim() - 4)].stride()[1:] != (t.shape[-2] * t.shape[-1], t.shape[-1], 1):
            raise ValueError(f"{name}: each page's [Hkv, P, D] elements must be contiguous "
                             f"(strides {t.stride()})")
    if src_v.shape != src_k.shape or src_v.stride() != src_k.stride() or src_v.dtype != src_k.dtype:
        raise ValueError(f"src_v (shape {tuple(src_v.shape)}, {src_v.dtype}) must match src_k "
                         f"(shape {tuple(src_k.shape)}, {src_k.dtype}) in shape, strides and dtype")
    if dst_v.shape != dst_k.shape or dst_v.stride() != dst_k.stride() or dst_v.dtype != dst_k.dtype:
        raise ValueError(f"dst_v (shape {tuple(dst_v.shape)}, {dst_v.dtype}) must match dst_k "
                         f"(shape {tuple(dst_k.shape)}, {dst_k.dtype}) in shape, strides and dtype")
    if src_k.dtype != dst_k.dtype:
        raise ValueError(f"src dtype {src_k.dtype} differs from dst dtype {dst_k.dtype}")
    if src_k.dim() != dst_k.dim() or src_k.shape[:-4] != dst_k.shape[:-4] \
            or src_k.shape[-3:] != dst_k.shape[-3:]:
        raise ValueError(f"src pool shape {tuple(src_k.shape)} and dst pool shape "
                         f"{tuple(dst_k.shape)} may differ only in the page count (dim -4)")
    if src_v.device != src_k.device or dst_v.device != dst_k.device:
        raise ValueError("K and V pools of one side must be on one device")
    if dst_k.device.type == "cuda" and src_k.device.type == "cpu" and not src_k.is_pinned():
        raise ValueError("src pools on the host must be pinned (torch pin_memory=True) so the GPU "
                         "can read them; pageable host memory is not device-mapped")
    if dst_k.device.type == "cpu" and src_k.device.type != "cpu":
        raise ValueError(f"dst on the CPU needs src on the CPU too, got {src_k.device}")


def launch_gather_pages(src_k: torch.Tensor, src_v: torch.Tensor, src_pages: torch.Tensor,
                        dst_k: torch.Tensor, dst_v: torch.Tensor, dst_slots: torch.Tensor,
                        programs: Optional[int] = None) -> None:
    """Unchecked launcher of `gather_pages`: index tensors int64 [n] already on dst's device; an
    entry whose src or dst is -1 copies nothing (fixed-size plans from the GPU page cache).
    programs: at most this many programs per (layer, K/V, chunk), each looping over every
    programs-th page (None: one program per page). A few programs leave the other SMs to kernels
    running beside the copy on another stream."""
    n = src_pages.shape[0]
    if n == 0:
        return
    page_elems = dst_k.shape[-3] * dst_k.shape[-2] * dst_k.shape[-1]
    num_lead = dst_k.shape[0] if dst_k.dim() == 5 else 1
    lead_s = (src_k.stride(0), dst_k.stride(0)) if dst_k.dim() == 5 else (0, 0)
    grid = (n if programs is None else max(1, min(n, programs)), 2 * num_lead,
            triton.cdiv(page_elems, BLOCK))
    _gather_kernel[grid](src_k, src_v, dst_k, dst_v, src_pages, dst_slots, n, page_elems,
                         lead_s[0], src_k.stride(-4), lead_s[1], dst_k.stride(-4),
                         BLOCK=BLOCK, num_warps=4)


def gather_pages(src_k: torch.Tensor, src_v: torch.Tensor, src_pages: Indices,
                 dst_k: torch.Tensor, dst_v: torch.Tensor, dst_slots: Indices,
                 programs: Optional[int] = None) -> None:
    """Copy pages `src_pages[i]` of (src_k, src_v) into slots `dst_slots[i]` of (dst_k, dst_v).

    src_k, src_v: [*lead, N_src, Hkv, P, D], pinned host memory (or on dst's device);
    dst_k, dst_v: [*lead, N_dst, Hkv, P, D] on the GPU (CPU tensors run under the interpreter);
    src_pages, dst_slots: int [n] (tensors or lists), destination slots distinct.
    programs: None (one program per page) or a positive int, the most programs the copy uses per
    (layer, K/V) (each loops over pages; `launch_gather_pages`).
    One kernel launch, asynchronous on the current stream; bit-exact.
    """
    _check_pools(src_k, src_v, dst_k, dst_v)
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int)
                                 or programs < 1):
        raise ValueError(f"programs={programs!r} must be None or a positive int")
    s = _as_index("src_pages", src_pages, torch.device("cpu"))
    d = _as_index("dst_slots", dst_slots, torch.device("cpu"))
    if s.shape != d.shape:
        raise ValueError(f"{s.shape[0]} src_pages but {d.shape[0]} dst_slots")
    if s.numel():
        n_src, n_dst = src_k.shape[-4], dst_k.shape[-4]
        if int(s.min()) < 0 or int(s.max()) >= n_src:
            raise ValueError(f"src_pages {s.tolist()} must lie in [0, {n_src})")
        if int(d.min()) < 0 or int(d.max()) >= n_dst:
            raise ValueError(f"dst_slots {d.tolist()} must lie in [0, {n_dst})")
        if torch.unique(d).numel() != d.numel():
            raise ValueError(f"dst_slots {d.tolist()} name a slot twice")
    launch_gather_pages(src_k, src_v, s.to(dst_k.device, non_blocking=True), dst_k, dst_v,
                        d.to(dst_k.device, non_blocking=True), programs)
