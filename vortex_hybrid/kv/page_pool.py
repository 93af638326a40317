"""`PagePool`: the K and V page storage of one device, in the layout of docs/architecture.md."""

from __future__ import annotations

import math
import mmap
import weakref
from typing import Optional, Sequence

import psutil
import torch

GIB = 1 << 30


def pool_bytes(num_layers: int, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int,
               dtype: torch.dtype) -> int:
    """Bytes of K plus V for a pool of this shape."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_pages * num_kv_heads * page_size * head_dim * elem


HUGE_MIN_BYTES = 64 << 20
"""Host tensors from this size up are mapped on their own, advised for transparent huge pages."""


def host_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host tensor. From `HUGE_MIN_BYTES` up, an anonymous mapping of its own (zero
    pages from the kernel: no pass of writes over a pool of tens of GiB) advised for transparent
    huge pages (`MADV_HUGEPAGE`, where the kernel offers it): 2 MiB pages instead of 4 KiB ones for
    the page tables, the TLB, and the pinning and unpinning of `pinned_zeros`. The mapping is
    released when the tensor is freed."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:                     # no transparent huge pages here: 4 KiB pages
            pass
    return torch.frombuffer(buf, dtype=dtype).view(shape)   # holds `buf` while it lives


def pinned_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host tensor page-locked for the GPU at its exact size: plain memory
    (`host_zeros`) registered with `cudaHostRegister` (torch's pinned allocator would round each
    block up to a power of two, so 96 GiB of usable memory held only 2 x 32 GiB pools).
    Unregistered when the tensor is freed. Registered memory is mapped for the device (UVA), so
    kernels read it by its host pointer, as they read torch's pinned tensors."""
    t = host_zeros(shape, dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / GIB:.2f} GiB of host memory failed "
                           f"({err}); lower host_memory_gib")
    weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, t.data_ptr())
    return t


class PagePool:
    """K and V pages `[num_layers, num_pages, num_kv_heads, page_size, head_dim]` on one device.

    `pool.k[layer]` is the contract's `k_pool` `[num_pages, num_kv_heads, page_size, head_dim]`,
    contiguous, so kernels take it directly. A host pool is pinned when CUDA is present (pageable
    host memory moves ~6x slower over PCIe, docs/hardware.md), at its exact size (`pinned_zeros`).
    """

    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, page_size: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 pin: Optional[bool] = None, memory_cap_bytes: Optional[int] = None,
                 name: str = "pool") -> None:
        for field, value in (("num_layers", num_layers), ("num_pages", num_pages),
                             ("num_kv_heads", num_kv_heads), ("page_size", page_size),
                             ("head_dim", head_dim)):
            if not isinstance(value, int) or value < (0 if field == "num_pages" else 1):
                raise ValueError(f"{name}: {field}={value!r} must be a positive integer")
        self.name = name
        self.device = torch.device(device)
        need = pool_bytes(num_layers, num_pages, num_kv_heads, page_size, head_dim, dtype)
        if pin is None:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
        self._check_memory(need, memory_cap_bytes)
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        make = pinned_zeros if pin else host_zeros if self.device.type == "cpu" else \
            (lambda s, d: torch.zeros(s, dtype=d, device=self.device))
        self.k = make(shape, dtype)
        self.v = make(shape, dtype)
        self.pinned = pin

    def _check_memory(self, need: int, cap: Optional[int]) -> None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            limit, what = free, "free GPU memory"
        else:
            avail = int(psutil.virtual_memory().available)
            limit, what = avail, "the available host memory"
            if cap is not None and cap < avail:
                limit, what = cap, f"the host memory cap (available: {avail / GIB:.2f} GiB)"
        if need > limit:
            raise ValueError(f"{self.name}: {need / GIB:.2f} GiB of pages exceed {what} "
                             f"({limit / GIB:.2f} GiB); use fewer pages")

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def copy_pages_from(self, src: "PagePool", src_pages: Sequence[int],
                        dst_pages: Sequence[int]) -> None:
        """Copy whole pages (all layers, K and V) from `src`; bit-exact.

        Between a CUDA pool and a pinned host pool, both directions go through
        `gpu_kernels.gather_pages`: one launch that reads (or writes) the pinned pages directly over
        PCIe. Into the GPU it is asynchronous on the current stream (host pages are never rewritten
        while referenced); into the host it synchronises the stream before returning, so the CPU
        reads the pages at once. Other directions use torch index copies.
        """
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destinations")
        if not src_pages:
            return
        d = torch.as_tensor(list(dst_pages), dtype=torch.int64, device=self.device)
        if self.device.type == "cuda" and src.device.type == "cpu" and src.pinned:
            from vortex_hybrid.gpu_kernels.gather_pages import launch_gather_pages

            s = torch.as_tensor(list(src_pages), dtype=torch.int64).to(self.device)
            launch_gather_pages(src.k, src.v, s, self.k, self.v, d)
            return
        if self.device.type == "cpu" and self.pinned and src.device.type == "cuda":
            from vortex_hybrid.gpu_kernels.gather_pages import launch_gather_pages

            s = torch.as_tensor(list(src_pages), dtype=torch.int64).to(src.device)
            launch_gather_pages(src.k, src.v, s, self.k, self.v, d.to(src.device))
            torch.cuda.current_stream(src.device).synchronize()
            return
        s = torch.as_tensor(list(src_pages), dtype=torch.int64, device=src.device)
        for dst_t, src_t in ((self.k, src.k), (self.v, src.v)):
            dst_t[:, d] = src_t[:, s].to(self.device, non_blocking=False)
