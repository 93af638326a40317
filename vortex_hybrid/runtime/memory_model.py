"""The memory model: how much HBM and host memory a `HybridAttention` takes, and for what.

HBM is a cache over the host store (docs/runtime.md, "Memory"). The runtime takes `gpu_memory_gib`
of HBM (None: the free HBM when it is built, less `gpu_reserve_gib` for activations, CUDA graphs
and workspaces) and, in the host placements, `host_memory_gib` of host memory (None: 90% of the
available memory):
- `dense`: every page in the device pool, as many as the HBM budget holds.
- `gpu`: the same, less the summaries of those pages (on the device).
- host placements: the host pool holds every full page (as many as the host budget holds); the HBM
  budget holds the summaries of every page a request can hold (rows for the host pages and the tail
  pages, on the device; a cache slot holds a copy of a host page and needs none), the tail pages
  (each request's partly filled page, and prefill chunks on their way to the host) and, in
  `offload` and `hybrid`, every page left as a GPU page-cache slot. `cpu` keeps no slots.
When the summaries do not fit beside the tail pages, `summary_location="auto"` puts them in host
memory (the indexer then runs on the CPU, and layers are not captured in CUDA graphs).

Explicit sizes override the budgets: `gpu_cache_pages` (slots), and `HybridAttention`'s
`device_pages` / `host_pages`. A plan that does not fit is refused here, with the sizes, before
anything is allocated; the pools themselves check the memory once more when they allocate.
`plan_memory` is a pure function of the configuration, the model's shape and the free memory, so
every size is tested with injected memory figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import HybridConfig
from ..kv.page_pool import GIB, pool_bytes
from ..vflow.registry import load_flow
from ..vflow.summary_store import summary_bytes

HOST_PLACEMENTS = ("offload", "cpu", "hybrid")
TAIL_PAGES = 256
"""Device pages kept for requests' partly filled pages and prefill chunks in host placements:
at most TAIL_PAGES - 1 requests at once (`HybridAttention.max_requests`)."""
HOST_SHARE = 0.9
"""Share of the available host memory the host store takes when `host_memory_gib` is None."""
CPU_STANDIN_GIB = 0.5
"""The "HBM" budget when the GPU side runs on the CPU (no CUDA: tests, CI) and
`gpu_memory_gib` is None: a stand-in, not a share of the machine's memory."""


@dataclass(frozen=True)
class MemoryPlan:
    """The sizes of one runtime's pools and what they cost. Bytes are whole-pool bytes (K and V of
    every layer); `summary_on_device` says where the summary store goes."""

    device_pages: int
    host_pages: int
    gpu_cache_pages: int
    tail_pages: int
    page_bytes: int                 # K + V of one page, every layer
    summary_bytes: int              # the summary store (rows for the pages requests hold)
    summary_on_device: bool
    gpu_budget_bytes: int           # the HBM the runtime may take (gpu_memory_gib)
    host_budget_bytes: int          # the host memory it may take (host_memory_gib)
    summary_float8_bytes: int = 0   # the same store with float8_e4m3fn summaries (packed codes
                                    # keep their bytes): what `summary_hint` offers

    @property
    def device_bytes(self) -> int:
        """HBM the runtime takes: the device pool and, on the device, the summaries."""
        return self.device_pages * self.page_bytes + \
            (self.summary_bytes if self.summary_on_device else 0)

    @property
    def host_bytes(self) -> int:
        return self.host_pages * self.page_bytes + \
            (0 if self.summary_on_device else self.summary_bytes)

    def describe(self) -> str:
        return (f"{self.device_bytes / GIB:.2f} GiB of HBM ({self.device_pages} pages: "
                f"{self.gpu_cache_pages} GPU cache slots, {self.tail_pages} tail pages; summaries "
                f"{self.summary_bytes / GIB:.2f} GiB on the "
                f"{'device' if self.summary_on_device else 'host'}), "
                f"{self.host_pages * self.page_bytes / GIB:.2f} GiB of host memory "
                f"({self.host_pages} pages)")


def gpu_budget(cfg: HybridConfig, free_bytes: Optional[int]) -> int:
    """Bytes of HBM for the runtime: `gpu_memory_gib`, which must leave `gpu_reserve_gib` of the
    free memory; None: the free memory less the reserve. free_bytes None: no CUDA (the stand-in)."""
    if free_bytes is None:
        gib = CPU_STANDIN_GIB if cfg.gpu_memory_gib is None else cfg.gpu_memory_gib
        return int(gib * GIB)
    reserve = int(cfg.gpu_reserve_gib * GIB)
    room = free_bytes - reserve
    if cfg.gpu_memory_gib is None:
        if room <= 0:
            raise ValueError(f"{free_bytes / GIB:.2f} GiB of GPU memory is free, not more than "
                             f"gpu_reserve_gib={cfg.gpu_reserve_gib}: set gpu_memory_gib, or "
                             "lower gpu_reserve_gib")
        return room
    want = int(cfg.gpu_memory_gib * GIB)
    if want > room:
        raise ValueError(f"gpu_memory_gib={cfg.gpu_memory_gib} does not fit: {free_bytes / GIB:.2f}"
                         f" GiB of GPU memory is free and gpu_reserve_gib={cfg.gpu_reserve_gib} "
                         f"stays free for activations and graphs (at most "
                         f"{max(room, 0) / GIB:.2f} GiB)")
    return want


def host_budget(cfg: HybridConfig, available_bytes: int) -> int:
    """Bytes of host memory for the host store: `host_memory_gib`, or HOST_SHARE of what is
    available; refused when larger than what is available."""
    if cfg.host_memory_gib is None:
        return int(HOST_SHARE * available_bytes)
    want = int(cfg.host_memory_gib * GIB)
    if want > available_bytes:
        raise ValueError(f"host_memory_gib={cfg.host_memory_gib} exceeds the "
                         f"{available_bytes / GIB:.2f} GiB of available host memory")
    return want


def plan_memory(cfg: HybridConfig, num_layers: int, num_kv_heads: int, head_dim: int, *,
                gpu_free_bytes: Optional[int], host_available_bytes: int,
                device_pages: Optional[int] = None, host_pages: Optional[int] = None,
                tail_pages: int = TAIL_PAGES) -> MemoryPlan:
    """The pool sizes for this configuration and model shape (module docstring).
    gpu_free_bytes: free HBM now (None: no CUDA); host_available_bytes: psutil's available memory;
    device_pages / host_pages: explicit sizes (HybridAttention's arguments), checked, not
    derived."""
    dtype = getattr(torch, cfg.kv_dtype)
    page = pool_bytes(num_layers, 1, num_kv_heads, cfg.page_size, head_dim, dtype)
    host = cfg.placement in HOST_PLACEMENTS
    row = row8 = 0
    if cfg.placement != "dense":
        flow = load_flow(cfg.flow, **dict(cfg.extra))
        row, row8 = (summary_bytes(flow, num_layers, 1, num_kv_heads, cfg.page_size, head_dim, dt)
                     for dt in (getattr(torch, cfg.summary_dtype), torch.float8_e4m3fn))
    gpu = gpu_budget(cfg, gpu_free_bytes) if device_pages is None else 0   # explicit: not used
    hostb = host_budget(cfg, host_available_bytes) if host and (
        host_pages is None or cfg.host_memory_gib is not None) else 0
    on_device = cfg.summary_location != "host" and row > 0
    if not host:
        per_page = page + (row if on_device else 0)
        n = device_pages if device_pages is not None else (gpu - row) // per_page
        if n < 1:
            raise ValueError(f"{gpu / GIB:.3f} GiB of HBM holds no page of {per_page} bytes "
                             "(raise gpu_memory_gib)")
        return MemoryPlan(n, 0, 0, 0, page, (n + 1) * row if row else 0, on_device, gpu, 0,
                          (n + 1) * row8 if row else 0)
    h = host_pages if host_pages is not None else hostb // page
    if host_pages is None and h < 1:
        raise ValueError(f"{hostb / GIB:.3f} GiB of host memory holds no page of {page} bytes "
                         "(raise host_memory_gib)")
    if cfg.host_memory_gib is not None and h * page > hostb:
        raise ValueError(f"host_pages={h} ({h * page / GIB:.2f} GiB) exceed host_memory_gib="
                         f"{cfg.host_memory_gib}")
    caches = cfg.placement in ("offload", "hybrid")
    if device_pages is not None:                  # explicit: slots as set, or what is left
        slots = (cfg.gpu_cache_pages if cfg.gpu_cache_pages is not None else
                 max(0, device_pages - tail_pages)) if caches else 0
        if device_pages <= slots:
            raise ValueError(f"device_pages={device_pages} must exceed the {slots} GPU cache "
                             "slots (tail pages need room too)")
        d = device_pages
        return MemoryPlan(d, h, slots, d - slots, page, (d - slots + h + 1) * row, on_device, gpu,
                          hostb, (d - slots + h + 1) * row8)

    def fixed(summaries_on_device: bool) -> int:      # HBM before any slot
        return tail_pages * page + ((h + tail_pages + 1) * row if summaries_on_device else 0)

    if on_device and fixed(True) > gpu and cfg.summary_location == "auto":
        on_device = False                             # the summaries go to host memory
    if fixed(on_device) > gpu:
        raise ValueError(f"gpu_memory_gib: {gpu / GIB:.2f} GiB of HBM is less than the "
                         f"{tail_pages} tail pages" + (f" and the summaries of {h} host pages"
                                                       if on_device else "") +
                         f" take ({fixed(on_device) / GIB:.2f} GiB); raise gpu_memory_gib or lower "
                         "host_memory_gib")
    room = (gpu - fixed(on_device)) // page       # a slot holds a copy: no summary row of its own
    if not caches:
        slots = 0
    elif cfg.gpu_cache_pages is not None:
        slots = cfg.gpu_cache_pages
        if slots > room:
            raise ValueError(f"gpu_cache_pages={slots} does not fit: {gpu / GIB:.2f} GiB of HBM "
                             f"holds {room} slots beside the tail pages and summaries")
    else:
        slots = room
    d = tail_pages + slots
    return MemoryPlan(d, h, slots, tail_pages, page, (tail_pages + h + 1) * row, on_device, gpu,
                      hostb, (tail_pages + h + 1) * row8)


SUMMARY_HINT_SHARE = 0.25
"""`summary_hint` speaks when the summaries take more than this share of the HBM budget."""


def summary_hint(cfg: HybridConfig, plan: MemoryPlan) -> Optional[str]:
    """A line for the user when the summaries of a host placement's store crowd the GPU page cache
    out of HBM (or were moved to host memory, where layers run eagerly) and float8 summaries
    (`summary_dtype="float8_e4m3fn"`) would give that room back; None otherwise."""
    if cfg.placement not in ("offload", "hybrid") or not plan.summary_bytes or \
            cfg.summary_dtype == "float8_e4m3fn" or not plan.gpu_budget_bytes:
        return None                 # explicit pool sizes (no HBM budget) are the caller's choice
    small = plan.summary_float8_bytes
    if not plan.summary_on_device:
        if cfg.summary_location != "auto":
            return None
        return (f"summary_dtype={cfg.summary_dtype!r}: the summaries of the host store "
                f"({plan.summary_bytes / GIB:.2f} GiB) do not fit in the {plan.gpu_budget_bytes / GIB:.2f}"
                f" GiB of HBM beside the tail pages, so they live in host memory and layers run "
                f"eagerly; summary_dtype='float8_e4m3fn' needs {small / GIB:.2f} GiB")
    if plan.summary_bytes <= SUMMARY_HINT_SHARE * plan.gpu_budget_bytes:
        return None
    saved = plan.summary_bytes - small
    return (f"summary_dtype={cfg.summary_dtype!r}: the summaries of the host store take "
            f"{plan.summary_bytes / GIB:.2f} of the {plan.gpu_budget_bytes / GIB:.2f} GiB of HBM "
            f"for KV; summary_dtype='float8_e4m3fn' would leave {saved / GIB:.2f} GiB more to the "
            f"GPU page cache (about {saved // plan.page_bytes} pages; selection quality measured "
            "unchanged, docs/BENCHMARKS.md)")
