"""`PagedKVCache`: requests, their page tables, and KV pages split between a device and a host pool.

Each request owns logical pages `0..n-1`. Logical page `p` holds tokens
`[p*page_size, min((p+1)*page_size, seq_len))` of every layer and KV head, and lives in the device
pool, the host pool, or both (a host page loaded into a GPU cache slot keeps its host copy, so
evicting it again costs no copy). New tokens always land in device pages.

    kv = PagedKVCache(num_layers=2, num_kv_heads=8, head_dim=128, page_size=16,
                      device_pages=1024, host_pages=8192)
    rid = kv.create_request()
    kv.append(rid, k, v)            # k, v: [num_layers, T, num_kv_heads, head_dim]
    kv.offload(rid, [0, 1])         # full pages -> host; device pages freed
    kv.load(rid, [1])               # host page -> a device slot (host copy kept)
    table, lens = kv.page_table([rid], where="device")   # int32 tables for the kernels
    kv.free_request(rid)

A request can only name its own logical pages; physical pages are checked against the allocators'
ownership before every copy or free, so no call can touch another request's KV. Every operation that
can run out of pages allocates first and changes nothing when it fails.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..config import HybridConfig
from ..transfers import to_device
from .errors import KVCacheError, UnknownRequestError
from .page_allocator import PageAllocator
from .page_pool import GIB, PagePool

log = logging.getLogger(__name__)

NOT_RESIDENT = -1

PageFilledListener = Callable[[int, int, list[int], list[int]], None]
"""`fn(request_id, layer, logical_pages, device_pages)`: called once per write of one layer with every
page whose last token that write stored (a prefill chunk fills many at once, a decode token at most
one)."""

PagesFilledAllLayers = Callable[[int, range, list[int], list[int]], None]
"""`fn(request_id, layers, logical_pages, device_pages)`: the same for a write of several layers at
once (`append`), called once for all of them; a listener registered without one is called per
layer instead."""

RequestFreedListener = Callable[[int], None]
"""`fn(request_id)`: called when a request is freed, before its id is forgotten."""

TruncatedListener = Callable[[int, int], None]
"""`fn(request_id, seq_len)`: called after a request was shortened to `seq_len` tokens (pages
`seq_len // page_size` onward are no longer full, or gone)."""


@dataclass(frozen=True)
class Checkpoint:
    """A request's length and the residency of its logical pages from `first_page` on, taken
    before a change that may fail (`PagedKVCache.checkpoint`, `rollback`)."""

    rid: int
    seq_len: int
    first_page: int
    device_pages: tuple[int, ...]
    host_pages: tuple[int, ...]


@dataclass
class _Request:
    seq_len: int = 0
    device_pages: list[int] = field(default_factory=list)   # logical -> device page or -1
    host_pages: list[int] = field(default_factory=list)     # logical -> host page or -1
    rows: dict = field(default_factory=dict)                # "device"/"host" -> int32 tensor row,
                                                            # dropped whenever a page list changes


@dataclass(frozen=True)
class _Positions:
    """Where a write's tokens go (`PagedKVCache._positions`): device pages and slots per token
    (device int64 [n]), and the logical pages it fills with their device pages."""

    pages: torch.Tensor
    slots: torch.Tensor
    filled: list[int]
    device_pages: list[int]


def padded_table(rows: Sequence[torch.Tensor], max_pages: Optional[int] = None) -> torch.Tensor:
    """Rows of int32 entries per logical page stacked into `[len(rows), width]`, -1 padded; width
    is the longest row, or `max_pages` (which must not be shorter)."""
    width = max([len(r) for r in rows], default=0)
    if max_pages is not None:
        if max_pages < width:
            raise ValueError(f"max_pages={max_pages} is below the {width} pages a request holds")
        width = max_pages
    table = torch.full((len(rows), width), NOT_RESIDENT, dtype=torch.int32)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return table


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class PagedKVCache:
    """The paged KV substrate: a device page pool, a host page pool and per-request page tables.

    On a machine without CUDA the device pool is a CPU tensor, so everything runs in CI.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device_pages: int, host_pages: int, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device | str] = None,
                 host_memory_cap_bytes: Optional[int] = None) -> None:
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size!r} must be a power of two")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size = page_size
        self.dtype = dtype
        dev = torch.device(device) if device is not None else default_device()
        self.device_pool = PagePool(num_layers, device_pages, num_kv_heads, page_size, head_dim,
                                    dtype, dev, name="device pool")
        self.host_pool = PagePool(num_layers, host_pages, num_kv_heads, page_size, head_dim,
                                  dtype, "cpu", memory_cap_bytes=host_memory_cap_bytes,
                                  name="host pool")
        self.device_alloc = PageAllocator(device_pages, "device pool")
        self.host_alloc = PageAllocator(host_pages, "host pool")
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._listeners: list[tuple[PageFilledListener, Optional[PagesFilledAllLayers]]] = []
        self._freed_listeners: list[RequestFreedListener] = []
        self._truncated_listeners: list[TruncatedListener] = []

    @classmethod
    def from_config(cls, cfg: HybridConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                    device_pages: int, host_pages: int,
                    device: Optional[torch.device | str] = None) -> "PagedKVCache":
        cap = None if cfg.host_memory_gib is None else int(cfg.host_memory_gib * GIB)
        return cls(num_layers, num_kv_heads, head_dim, cfg.page_size, device_pages, host_pages,
                   getattr(torch, cfg.kv_dtype), device, cap)

    @property
    def device(self) -> torch.device:
        return self.device_pool.device

    # ---- requests ---------------------------------------------------------------------------
    def create_request(self) -> int:
        """A new empty request; returns its id."""
        rid = next(self._ids)
        self._requests[rid] = _Request()
        return rid

    def _req(self, rid: int) -> _Request:
        try:
            return self._requests[rid]
        except (KeyError, TypeError):
            raise UnknownRequestError(f"request {rid!r} does not exist (never created or already "
                                      f"freed); live requests: {sorted(self._requests)}") from None

    def has_request(self, rid: int) -> bool:
        """Whether `rid` is a live request (no sort of every id, unlike `request_ids`)."""
        return rid in self._requests

    @property
    def request_ids(self) -> list[int]:
        return sorted(self._requests)

    def seq_len(self, rid: int) -> int:
        return self._req(rid).seq_len

    def num_pages(self, rid: int) -> int:
        return len(self._req(rid).device_pages)

    def num_full_pages(self, rid: int) -> int:
        return self._req(rid).seq_len // self.page_size

    def residency(self, rid: int, start: int = 0, stop: Optional[int] = None
                  ) -> list[tuple[int, int]]:
        """Per logical page of [start, stop) (default: all): (device page or -1, host page or -1)."""
        r = self._req(rid)
        return list(zip(r.device_pages[start:stop], r.host_pages[start:stop]))

    def free_request(self, rid: int) -> None:
        """Return every page of a finished request to its pool (and tell the freed listeners)."""
        r = self._req(rid)
        for fn in self._freed_listeners:
            fn(rid)
        self.device_alloc.free(rid, [p for p in r.device_pages if p != NOT_RESIDENT])
        self.host_alloc.free(rid, [p for p in r.host_pages if p != NOT_RESIDENT])
        del self._requests[rid]

    # ---- writing ----------------------------------------------------------------------------
    def add_page_filled_listener(self, fn: PageFilledListener,
                                 all_layers: Optional[PagesFilledAllLayers] = None) -> None:
        """Call `fn(rid, layer, logical_pages, device_pages)` after each write of a layer that filled
        pages (a `SummaryStore` computes their summaries there). With `all_layers`, a write of
        every layer at once (`append`) calls `all_layers(rid, range(num_layers), logical_pages,
        device_pages)` once instead of `fn` per layer."""
        self._listeners.append((fn, all_layers))

    def add_request_freed_listener(self, fn: RequestFreedListener) -> None:
        """Call `fn(rid)` when a request is freed (a `SummaryStore` frees its rows there)."""
        self._freed_listeners.append(fn)

    def add_truncated_listener(self, fn: TruncatedListener) -> None:
        """Call `fn(rid, seq_len)` after a request is shortened (a `SummaryStore` drops the rows of
        pages that are no longer full there)."""
        self._truncated_listeners.append(fn)

    def extend(self, rid: int, num_tokens: int) -> int:
        """Reserve room for `num_tokens` more tokens; returns the first new position.

        Allocates device pages for the new logical pages, all or nothing.
        """
        r = self._req(rid)
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens!r} must be a non-negative integer")
        start = r.seq_len
        need = -(-(start + num_tokens) // self.page_size) - len(r.device_pages)
        new = self.device_alloc.alloc(rid, need) if need > 0 else []
        if new:
            r.device_pages.extend(new)
            r.host_pages.extend([NOT_RESIDENT] * len(new))
            r.rows.clear()
        r.seq_len = start + num_tokens
        return start

    def truncate(self, rid: int, seq_len: int) -> None:
        """Shorten a request to `seq_len` tokens (undo an `extend` whose writes did not finish);
        pages past the new end are freed from both pools. A partly filled last page is writable
        again afterwards: on the device, with no host copy (an offloaded copy would go stale)."""
        r = self._req(rid)
        if not isinstance(seq_len, int) or not 0 <= seq_len <= r.seq_len:
            raise ValueError(f"seq_len={seq_len!r} must be an integer in [0, {r.seq_len}]")
        keep = -(-seq_len // self.page_size)
        self.device_alloc.free(rid, [p for p in r.device_pages[keep:] if p != NOT_RESIDENT])
        self.host_alloc.free(rid, [p for p in r.host_pages[keep:] if p != NOT_RESIDENT])
        del r.device_pages[keep:], r.host_pages[keep:]
        r.rows.clear()
        r.seq_len = seq_len
        if seq_len % self.page_size:
            self._writable_tail(rid, r)
        for fn in self._truncated_listeners:
            fn(rid, seq_len)

    def _writable_tail(self, rid: int, r: _Request) -> None:
        """Bring a partly filled last page back to the device and drop its host copy."""
        tail = len(r.device_pages) - 1
        if r.device_pages[tail] == NOT_RESIDENT:
            self.load(rid, [tail])
        host = r.host_pages[tail]
        if host != NOT_RESIDENT:
            self.host_alloc.free(rid, [host])
            r.host_pages[tail] = NOT_RESIDENT
            r.rows.clear()

    def checkpoint(self, rid: int, first_page: int = 0) -> Checkpoint:
        """The request's length and the residency of its pages from `first_page` on (pages before
        it must stay as they are until `rollback`: callers pass the first page a change may move)."""
        r = self._req(rid)
        first = max(0, min(first_page, len(r.device_pages)))
        return Checkpoint(rid, r.seq_len, first, tuple(r.device_pages[first:]),
                          tuple(r.host_pages[first:]))

    def rollback(self, cp: Checkpoint) -> None:
        """Undo whatever happened to the request since `checkpoint`: its length, and for the pages
        it had then from `cp.first_page` on, where their copies are (a page moved to the host goes
        back to the device, a host copy made since is dropped); the page contents below the length
        are as they were (new tokens land past it; an offload copies bit-exactly)."""
        r = self._req(cp.rid)
        self.truncate(cp.rid, min(cp.seq_len, r.seq_len))
        if r.seq_len < cp.seq_len:
            raise KVCacheError(f"request {cp.rid} is shorter ({r.seq_len} tokens) than its "
                               f"checkpoint ({cp.seq_len}): a rollback restores, it cannot regrow")
        for i, (dev, host) in enumerate(zip(cp.device_pages, cp.host_pages)):
            p = cp.first_page + i
            if dev != NOT_RESIDENT and r.device_pages[p] == NOT_RESIDENT:
                self.load(cp.rid, [p])
            if host == NOT_RESIDENT and r.host_pages[p] != NOT_RESIDENT:
                if r.device_pages[p] == NOT_RESIDENT:
                    raise KVCacheError(f"request {cp.rid}: logical page {p} has no device copy "
                                       "to keep while dropping its host copy")
                self.host_alloc.free(cp.rid, [r.host_pages[p]])
                r.host_pages[p] = NOT_RESIDENT
                r.rows.clear()

    def write(self, rid: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, *,
              _at: Optional["_Positions"] = None) -> None:
        """Write `k`, `v` `[T, num_kv_heads, head_dim]` of one layer at positions `[start, start+T)`.

        The positions must have been reserved by `extend` and their pages must be on the device.
        (`_at`: `append`'s positions, found once for every layer; the listeners are then told by
        `append`, once the last layer is written.)
        """
        self._req(rid)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} outside 0..{self.num_layers - 1}")
        shape = (self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or tuple(t.shape[1:]) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [T, {shape[0]}, "
                                 f"{shape[1]}]")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
        at = self._positions(rid, start, k.shape[0]) if _at is None else _at
        if at is None:
            return
        pool = self.device_pool
        pool.k[layer, at.pages, :, at.slots] = k.to(device=self.device, dtype=self.dtype)
        pool.v[layer, at.pages, :, at.slots] = v.to(device=self.device, dtype=self.dtype)
        if _at is None:
            self._filled(rid, range(layer, layer + 1), at)

    def _positions(self, rid: int, start: int, n: int) -> Optional["_Positions"]:
        """Where tokens [start, start + n) of a request go in the device pool (checked: reserved,
        on the device, owned), or None for n == 0: the pages and slots as device tensors, made
        with one small host -> device copy of the pages they touch (not of the request's whole
        page list), and the pages the tokens fill."""
        r = self._req(rid)
        if start < 0 or start + n > r.seq_len:
            raise ValueError(f"request {rid}: positions [{start}, {start + n}) are outside the "
                             f"reserved [0, {r.seq_len}); call extend first")
        if n == 0:
            return None
        ps = self.page_size
        first, last = start // ps, (start + n - 1) // ps
        dev = r.device_pages[first:last + 1]
        if NOT_RESIDENT in dev:
            raise KVCacheError(f"request {rid}: a page of positions [{start}, {start + n}) is not "
                               f"on the device (offloaded pages are read-only)")
        self.device_alloc.check_owned(rid, dev)
        off = start - first * ps
        pos = torch.arange(off, off + n, device=self.device)
        pages = to_device(torch.as_tensor(dev, dtype=torch.int64), self.device)[pos // ps]
        filled = [p for p in range(first, last + 1) if start <= (p + 1) * ps - 1 < start + n]
        return _Positions(pages, pos % ps, filled, [r.device_pages[p] for p in filled])

    def _filled(self, rid: int, layers: range, at: "_Positions") -> None:
        """Tell the page-filled listeners that `layers` were written at `at`: per layer, or once
        for every layer through a listener's `all_layers`."""
        if not at.filled:
            return
        whole = len(layers) == self.num_layers
        for fn, all_layers in self._listeners:
            if whole and all_layers is not None:
                all_layers(rid, layers, at.filled, at.device_pages)
            else:
                for layer in layers:
                    fn(rid, layer, at.filled, at.device_pages)

    def append(self, rid: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Append tokens of every layer: `k`, `v` `[num_layers, T, num_kv_heads, head_dim]`.

        A prefill chunk or one decode token; returns the first new position. The positions are
        found once for every layer; the page-filled listeners are told after the last layer.
        """
        expect = (self.num_layers, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != expect:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{expect[0]}, T, "
                                 f"{expect[1]}, {expect[2]}]")
        if k.shape != v.shape:
            raise ValueError(f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
        start = self.extend(rid, k.shape[1])
        at = self._positions(rid, start, k.shape[1])
        if at is None:
            return start
        for layer in range(self.num_layers):
            self.write(rid, layer, start, k[layer], v[layer], _at=at)
        self._filled(rid, range(self.num_layers), at)
        return start

    # ---- moving pages -----------------------------------------------------------------------
    def _logical(self, rid: int, pages: Iterable[int], full_only: bool) -> list[int]:
        r = self._req(rid)
        pages = [int(p) for p in pages]
        limit = r.seq_len // self.page_size if full_only else len(r.device_pages)
        for p in pages:
            if not 0 <= p < limit:
                what = "full pages" if full_only else "pages"
                raise ValueError(f"request {rid} has {what} 0..{limit - 1}; got logical page {p}"
                                 + (" (the partly filled tail page stays on the device)"
                                    if full_only and p < len(r.device_pages) else ""))
        if len(set(pages)) != len(pages):
            raise ValueError(f"request {rid}: logical pages listed twice in {pages}")
        return pages

    def offload(self, rid: int, pages: Sequence[int]) -> None:
        """Move full pages to the host pool and free their device pages (bit-exact).

        Pages that already have a host copy only drop their device copy; host-only pages are left.
        """
        r = self._req(rid)
        pages = [p for p in self._logical(rid, pages, full_only=True)
                 if r.device_pages[p] != NOT_RESIDENT]
        to_copy = [p for p in pages if r.host_pages[p] == NOT_RESIDENT]
        self.device_alloc.check_owned(rid, [r.device_pages[p] for p in pages])
        dst = self.host_alloc.alloc(rid, len(to_copy))
        self.host_pool.copy_pages_from(self.device_pool, [r.device_pages[p] for p in to_copy], dst)
        for p, h in zip(to_copy, dst):
            r.host_pages[p] = h
        r.rows.clear()
        self._drop_device(rid, r, pages)

    def load(self, rid: int, pages: Sequence[int]) -> None:
        """Copy host-resident pages into device slots (bit-exact); the host copies stay."""
        r = self._req(rid)
        pages = [p for p in self._logical(rid, pages, full_only=False)
                 if r.device_pages[p] == NOT_RESIDENT]
        src = [r.host_pages[p] for p in pages]
        self.host_alloc.check_owned(rid, src)
        dst = self.device_alloc.alloc(rid, len(pages))
        self.device_pool.copy_pages_from(self.host_pool, src, dst)
        for p, d in zip(pages, dst):
            r.device_pages[p] = d
        r.rows.clear()

    def evict(self, rid: int, pages: Sequence[int]) -> None:
        """Drop the device copy of pages that have a host copy (no copy is made)."""
        r = self._req(rid)
        pages = self._logical(rid, pages, full_only=False)
        lost = [p for p in pages if r.host_pages[p] == NOT_RESIDENT]
        if lost:
            raise KVCacheError(f"request {rid}: pages {lost} have no host copy; offload them "
                               f"instead of evicting")
        self._drop_device(rid, r, [p for p in pages if r.device_pages[p] != NOT_RESIDENT])

    def _drop_device(self, rid: int, r: _Request, pages: list[int]) -> None:
        self.device_alloc.free(rid, [r.device_pages[p] for p in pages])
        for p in pages:
            r.device_pages[p] = NOT_RESIDENT
        r.rows.clear()

    # ---- reading ----------------------------------------------------------------------------
    def read_pages(self, rid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as pages `[num_pages, num_kv_heads, page_size, head_dim]` on the
        CPU, each page from whichever copy it has; positions past `seq_len` hold whatever the tail
        page holds, as in the pools (for tests, debugging and research paths)."""
        self._req(rid)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} outside 0..{self.num_layers - 1}")
        k, v = self.gather(rid, layer, layer + 1, torch.device("cpu"))
        return k[0], v[0]

    def gather(self, rid: int, first_layer: int = 0, end_layer: Optional[int] = None,
               device: Optional[torch.device] = None, pages: Optional[slice] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layers [first_layer, end_layer) as pages `[layers, num_pages, num_kv_heads,
        page_size, head_dim]` (the request's logical `pages`, default all) on `device` (default:
        the device pool's), each page from the device copy when it has one, else the host copy:
        one gather per pool, not a copy per page."""
        r = self._req(rid)
        end_layer = self.num_layers if end_layer is None else end_layer
        if not 0 <= first_layer < end_layer <= self.num_layers:
            raise ValueError(f"layers [{first_layer}, {end_layer}) outside 0..{self.num_layers}")
        device = self.device if device is None else torch.device(device)
        pages = slice(None) if pages is None else pages
        dev, host = r.device_pages[pages], r.host_pages[pages]
        shape = (end_layer - first_layer, len(dev), self.num_kv_heads, self.page_size,
                 self.head_dim)
        out = tuple(torch.empty(shape, dtype=self.dtype, device=device) for _ in range(2))
        on_dev = [i for i, d in enumerate(dev) if d != NOT_RESIDENT]     # host lists: no sync
        on_host = [i for i, d in enumerate(dev) if d == NOT_RESIDENT]
        for pool, where_, at in ((self.device_pool, dev, on_dev), (self.host_pool, host, on_host)):
            if not at:
                continue
            src = torch.as_tensor([where_[i] for i in at], dtype=torch.int64)
            at_t = to_device(torch.as_tensor(at, dtype=torch.int64), device)
            if device.type == "cuda" and pool.device.type == "cpu" and pool.pinned:
                # the GPU reads the pinned pages itself, K and V of every layer in one launch:
                # no gather on the CPU and no pageable copy (as `PagePool.copy_pages_from`)
                from vortex_hybrid.gpu_kernels.gather_pages import launch_gather_pages

                launch_gather_pages(pool.k[first_layer:end_layer], pool.v[first_layer:end_layer],
                                    to_device(src, device), out[0], out[1], at_t)
                continue
            src = to_device(src, pool.k.device)
            for o, t in zip(out, (pool.k, pool.v)):
                o[:, at_t] = t[first_layer:end_layer].index_select(1, src).to(device)
        return out

    def read_tokens(self, rid: int, start: int = 0, end: Optional[int] = None,
                    device: Optional[torch.device] = None, first_layer: int = 0,
                    end_layer: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens [start, end) (default: all) of layers [first_layer, end_layer)
        (default: every layer), `[layers, end - start, num_kv_heads, head_dim]` on `device`
        (default: the device pool's): `gather`'s pages as token rows."""
        n = self._req(rid).seq_len
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"tokens [{start}, {end}) outside request {rid}'s 0..{n}")
        P = self.page_size
        first, last = start // P, -(-end // P)
        k, v = self.gather(rid, first_layer, end_layer, device=device, pages=slice(first, last))
        return tuple(t.transpose(2, 3).reshape(
            t.shape[0], -1, self.num_kv_heads, self.head_dim)[:, start - first * P:
                                                              end - first * P]
            for t in (k, v))

    def read(self, rid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[seq_len, num_kv_heads, head_dim]` of one layer, on the CPU (`read_pages` as
        token rows)."""
        k, v = self.read_pages(rid, layer)
        n = self._req(rid).seq_len
        return tuple(t.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)[:n]
                     for t in (k, v))

    def page_table(self, rids: Sequence[int], where: str = "device",
                   max_pages: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel inputs for a batch: `page_table` int32 `[B, max_pages]` (physical page in the
        `where` pool, -1 where the page is not resident there) and `seq_lens` int32 `[B]`, both on
        that pool's device."""
        if where not in ("device", "host"):
            raise ValueError(f"where={where!r} must be 'device' or 'host'")
        reqs = [self._req(rid) for rid in rids]
        rows = []
        for r in reqs:
            row = r.rows.get(where)
            if row is None:                 # built once per change of the request's pages
                row = r.rows[where] = torch.as_tensor(
                    r.device_pages if where == "device" else r.host_pages, dtype=torch.int32)
            rows.append(row)
        table = padded_table(rows, max_pages)
        lens = torch.as_tensor([r.seq_len for r in reqs], dtype=torch.int32)
        dev = self.device if where == "device" else torch.device("cpu")
        return to_device(table, dev), to_device(lens, dev)       # never a stream sync
