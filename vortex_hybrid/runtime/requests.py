"""`Requests`: the request side of `HybridAttention` (a mixin of it): adding, extending and
removing requests, all or nothing, and the capacity they are measured against.

A prefill (`add_request`, `extend_request`) is refused before anything changes when the pools
cannot hold it (`OutOfPagesError` naming the sizes); any other failure is undone from a checkpoint
of the request (`PagedKVCache.checkpoint` / `rollback`: its length and the residency of the pages
the change may move; the summary store follows the truncation). Host placements stream a prompt
through the device pool in chunks and offload full pages to the host store as they fill.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from ..kv.errors import OutOfPagesError, UnknownRequestError
from ..kv.paged_kv_cache import Checkpoint
from .memory_model import HOST_PLACEMENTS


class Requests:
    """Request calls and capacity of `HybridAttention` (module docstring)."""

    def capacity(self) -> dict:
        """What the runtime can take now: `tokens`, how many more tokens (prompts and decode,
        across requests) its store holds (host placements: the host pool, less the pages that
        wait to be offloaded; `dense`/`gpu`: the device pool), counting the room left in each
        request's last page; `pages`, the store's free pages (what a new prompt of `pages x
        page_size` tokens may take); `requests`, how many more requests the tail pages serve
        (None: bounded by pages only); `gpu_cache_pages`; and the HBM and host bytes the pools
        take."""
        kv, P = self.kv, self.cfg.page_size
        rids = kv.request_ids
        tail_room = sum(-kv.seq_len(r) % P for r in rids)
        if self.placement in HOST_PLACEMENTS:
            pending = sum(kv.num_full_pages(r) - self._offloaded.get(r, 0) for r in rids)
            pages, requests = kv.host_alloc.num_free - pending, self.max_requests - len(rids)
        else:
            pages, requests = kv.device_alloc.num_free, None
        pages = max(pages, 0)
        return {"tokens": pages * P + tail_room, "pages": pages, "requests": requests,
                "gpu_cache_pages": self.memory.gpu_cache_pages,
                "device_bytes": self.memory.device_bytes, "host_bytes": self.memory.host_bytes}

    @property
    def max_requests(self) -> Optional[int]:
        """Host placements: how many requests the device pool's tail pages serve at once (each
        request keeps its partly filled last page on the device, and a prefill streams through one
        more page); None for `dense`/`gpu` (bounded by pages only)."""
        if self.placement not in HOST_PLACEMENTS:
            return None
        pad = 0 if self._pad_page is None else 1        # fixed-shape steps' scratch page
        return self.kv.device_alloc.num_pages - self._slot_pages.numel() - 1 - pad

    @torch.inference_mode()
    def add_request(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Prefill KV of every layer, k and v [num_layers, T, Hkv, D] (T >= 0); returns the request
        id. Host placements stream the prompt through the device pool in chunks, offloading full
        pages to pinned host memory as they fill. All or nothing: when it raises (bad input, too
        little room: `OutOfPagesError` naming the sizes) no request was added."""
        self._check_between_steps("add_request")
        self._check_prefill(k, v)
        self._check_room(None, k.shape[1])
        rid = self.kv.create_request()
        try:
            self._fill(rid, k, v)
            self._admit_prefill(rid, k, v, 0)
        except BaseException:
            self.kv.free_request(rid)
            self._offloaded.pop(rid, None)
            if self._cache is not None:
                self._cache.remove_request(rid)
            raise
        return rid

    @torch.inference_mode()
    def extend_request(self, rid: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """More prefill KV for a live request (a chunked prefill's next chunk), k and v
        [num_layers, T, Hkv, D]: appended after its tokens, between steps. All or nothing: when it
        raises, the request is exactly as before (length, pages, summaries)."""
        self._check_between_steps("extend_request")
        self._check_prefill(k, v)
        rid = self._live(rid)
        self._check_room(rid, k.shape[1])
        cp, offloaded = self._checkpoint(rid), self._offloaded.get(rid)
        start = self.kv.seq_len(rid)
        try:
            self._fill(rid, k, v)
        except BaseException:
            self._restore([cp], {rid: offloaded})
            raise
        try:
            self._admit_prefill(rid, k, v, start)
        except BaseException:       # rare (a device error): its cached copies may name pages
            self._restore([cp], {rid: offloaded})         # rolled back, so they all go
            self._cache.remove_request(rid)
            raise

    def _live(self, rid) -> int:
        """`rid` as an int, checked to be a live request (`UnknownRequestError`, a ValueError)."""
        try:
            r = operator.index(rid)
        except TypeError:
            raise ValueError(f"request id {rid!r} must be an integer") from None
        if not self.kv.has_request(r):
            raise UnknownRequestError(f"unknown request id {r}; live requests: "
                                      f"{self.kv.request_ids}")
        return r

    def _checkpoint(self, rid: int) -> Checkpoint:
        """The request's state before a change (`PagedKVCache.checkpoint`) from the first page
        the change may move: host placements offload full pages from `_offloaded[rid]` on."""
        first = self._offloaded.get(rid, 0) if self.placement in HOST_PLACEMENTS else \
            self.kv.num_full_pages(rid)
        return self.kv.checkpoint(rid, first)

    def _restore(self, checkpoints: Sequence[Checkpoint], offloaded: dict) -> None:
        """Undo a failed change of requests: their pages, lengths and summaries (the store follows
        the cache's truncation) as at `checkpoints`, and what is known offloaded."""
        for cp in checkpoints:
            self.kv.rollback(cp)
        for rid, n in offloaded.items():
            if n is None:
                self._offloaded.pop(rid, None)
            else:
                self._offloaded[rid] = n

    def _check_room(self, rid: Optional[int], tokens: int) -> None:
        """Refuse, before anything changes, a prefill of `tokens` more tokens (a new request when
        rid is None) that the pools cannot hold: `OutOfPagesError` naming the sizes."""
        P, kv = self.cfg.page_size, self.kv
        n = 0 if rid is None else kv.seq_len(rid)
        if self.placement not in HOST_PLACEMENTS:
            need = -(-(n + tokens) // P) - (-(-n // P))
            if need > kv.device_alloc.num_free:
                raise OutOfPagesError(
                    f"a prefill of {tokens} tokens needs {need} device pages; {kv.device_alloc.num_free}"
                    f" of {kv.device_alloc.num_pages} are free (finish requests or size the pool "
                    "larger: device_pages)")
            return
        if rid is None and len(kv.request_ids) >= self.max_requests:
            raise OutOfPagesError(
                f"{len(kv.request_ids)} requests already hold the device pool's tail pages: at most "
                f"{self.max_requests} requests at once with {kv.device_alloc.num_pages} device "
                f"pages and {self._slot_pages.numel()} GPU cache slots (raise device_pages)")
        need = (n + tokens) // P - self._offloaded.get(rid, 0)
        if need > kv.host_alloc.num_free:
            raise OutOfPagesError(
                f"a prefill of {tokens} tokens needs {need} host pages; {kv.host_alloc.num_free} of "
                f"{kv.host_alloc.num_pages} are free (finish requests or raise host_memory_gib / "
                "host_pages)")
        if kv.device_alloc.num_free < 2:
            raise OutOfPagesError(
                f"the device pool has {kv.device_alloc.num_free} free pages; a prefill streams "
                "through at least 2 (finish requests or raise device_pages)")

    def _check_prefill(self, k, v) -> None:
        want = (self.num_layers, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or \
                    (t.shape[0], t.shape[2], t.shape[3]) != want or not t.is_floating_point():
                raise ValueError(f"{name} must be a float tensor [{want[0]}, T, {want[1]}, "
                                 f"{want[2]}], got {getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if k.shape != v.shape:
            raise ValueError(f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
        if not k.numel():
            return
        # amin / amax are reductions (no prompt-sized mask) that carry NaN and inf: one sync per
        # prefill for k and v together, never per decode step; the mask is built only to name a
        # bad value
        # (float32 ends, on k's device: a value out of float32's range shows as inf here and is
        # judged by the exact check per tensor below)
        ends = torch.stack([t.float().to(k.device) for t in (k.amin(), k.amax(), v.amin(),
                                                             v.amax())])
        if bool(torch.isfinite(ends).all()):
            return
        for name, t in (("k", k), ("v", v)):
            if bool(torch.isfinite(torch.stack([t.amin(), t.amax()])).all()):
                continue
            layer, pos, head, _ = (int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise ValueError(f"{name} holds NaN or inf (first at layer {layer}, token {pos}, "
                             f"KV head {head}); the KV store takes finite values only")

    def _fill(self, rid: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append prefill KV to a request; host placements stream it through the device pool in
        chunks, offloading full pages to pinned host memory as they fill."""
        if self.placement not in HOST_PLACEMENTS:
            self.kv.append(rid, k, v)
            return
        P = self.cfg.page_size
        done, T = 0, k.shape[1]
        while done < T:
            room = (self.kv.device_alloc.num_free - 1) * P
            if room <= 0:                   # _check_room refused this before anything changed
                raise OutOfPagesError("the device pool has no room for a prefill chunk; raise "
                                      "device_pages")
            n = min(T - done, room)
            self.kv.append(rid, k[:, done:done + n], v[:, done:done + n])
            self._offload_full(rid)
            done += n

    def _admit_prefill(self, rid: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Host placements with a GPU page cache (`HybridConfig.cache_prefill`): copy the pages this prefill filled (k, v: its KV
        from token `start` of the request on) into free cache slots, every layer, as many as fit,
        the most recent first (`GpuPageCache.admit`). The KV is at hand, so a cache with room
        starts warm instead of fetching each page over PCIe the first time a step selects it; while
        HBM holds every page, no step reads host memory at all. Copies only: the host store
        stays authoritative."""
        cache = self._cache
        if cache is None or not self.cfg.cache_prefill:
            return
        P, H = self.cfg.page_size, self.num_kv_heads
        first, last = -(-start // P), self._offloaded.get(rid, 0)   # pages wholly in this prefill
        if last <= first:
            return
        ms, slots = cache.admit_layers(rid, range(first, last))     # one sync, every layer
        M = max(ms)
        if M == 0:
            return
        pool, L, D = self.kv.device_pool, self.num_layers, self.head_dim
        if min(ms) == M:            # every layer took its last M pages: one copy each for K, V
            lo = (last - M) * P - start                     # the admitted pages' first token
            dst = self._slot_heads[slots]                   # [L, M, H] head-pages
            layer = torch.arange(L, device=self.device)[:, None, None]
            for src, kv_pool in ((k, pool.k), (v, pool.v)):
                part = src[:, lo:lo + M * P].to(self.device)              # [L, M x P, H, D]
                heads = part.view(L, M, P, H, D).transpose(2, 3)           # [L, M, H, P, D]
                kv_pool.view(L, -1, P, D)[layer, dst] = heads.to(kv_pool.dtype)
            return
        for layer, m in enumerate(ms):
            if m == 0:
                continue
            lo = (last - m) * P - start                     # the admitted pages' first token
            dst = self._slot_heads[slots[layer, :m].flatten()]           # head-pages, page-major
            for src, kv_pool in ((k, pool.k), (v, pool.v)):
                part = src[layer, lo:lo + m * P].to(self.device)         # [m x P, H, D]
                heads = part.view(m, P, H, -1).transpose(1, 2).reshape(m * H, P, -1)
                kv_pool[layer].view(-1, P, heads.shape[-1])[dst] = heads.to(kv_pool.dtype)

    @torch.inference_mode()
    def remove_request(self, rid: int) -> None:
        """Free a request's device, host, cache and summary pages. Refused for a request of a step
        that is planned or running (other requests may go: the step uses none of their pages). A
        step ended with finish_step(wait=False) is completed first (its failure raises here)."""
        self.complete_step()
        rid = self._live(rid)
        step = self._step
        if self._open(step) and rid in step.rids:
            left = "finish_step() not called yet" if step.whole else \
                f"layers {step.next_layer}..{self.num_layers - 1} still to run"
            raise ValueError(f"request {rid} is in the current step ({left}); remove it after "
                             "the step, or "
                             "cancel_step() first")
        self.kv.free_request(rid)
        self._offloaded.pop(rid, None)
        if self._cache is not None:
            self._cache.remove_request(rid)

    def _offload_step(self, rids: Sequence[int]) -> None:
        """plan() in the host placements: offload the pages the requests filled since their last
        step. While the batch's host pages fit the GPU page cache (and `cfg.cache_prefill`), those
        pages first enter free cache slots in every layer, copied on the device from the pages they
        leave (`GpuPageCache.admit_all`; no sync): a batch the cache holds stays wholly cached, so
        its steps run `cached` (`HybridAttention.plan`)."""
        cache, kv = self._cache, self.kv
        if cache is not None and self.cfg.cache_prefill and \
                sum(kv.num_full_pages(r) for r in rids) * self.num_kv_heads <= cache.num_slots:
            self._admit_filled(rids)
        for rid in rids:
            self._offload_full(rid)

    def _admit_filled(self, rids: Sequence[int]) -> None:
        """Copy the full pages of `rids` not offloaded yet into free cache slots, every layer
        (`_offload_step`)."""
        cache, kv, H = self._cache, self.kv, self.num_kv_heads
        found = []                                  # (request, logical page, device page)
        whole = {}                                  # request -> (start, full) if all admitted
        for rid in rids:
            start, full = self._offloaded.get(rid, 0), kv.num_full_pages(rid)
            got = [(rid, start + i, d) for i, (d, _) in
                   enumerate(kv.residency(rid, start, full)) if d >= 0]
            found += got
            if len(got) == full - start:
                whole[rid] = (start, full)
        if not found:
            return
        version = cache.version
        cache.reserve(max(p for _, p, _ in found) + 1)
        dev = self.device
        req = torch.as_tensor([cache.index_of(r) for r, _, _ in found], dtype=torch.int64)
        heads = torch.arange(H, dtype=torch.int64)
        rows = (req[:, None] * H + heads).flatten().to(dev)                # [m x H] head-minor
        pages = torch.as_tensor([p for _, p, _ in found], dtype=torch.int64)
        pages = pages.repeat_interleave(H).to(dev)
        src = torch.as_tensor([d for _, _, d in found], dtype=torch.int64)
        src = (src[:, None] * H + heads).flatten().to(dev)                 # device head-pages
        slots = cache.admit_all(rows, pages)                                # [L, m x H]
        if self._coverage is not None and \
                not self._coverage.admitted(cache, version, len(found) * H, whole):
            self._coverage = None
        dst = torch.where(slots >= 0, self._slot_heads[slots.clamp_min(0)], src)   # else: itself
        layer = torch.arange(self.num_layers, device=dev)[:, None].expand_as(dst)
        P, D = self.cfg.page_size, self.head_dim
        for pool in (kv.device_pool.k, kv.device_pool.v):
            heads_of = pool.view(self.num_layers, -1, P, D)
            heads_of[layer, dst] = heads_of[layer, src[None, :].expand_as(dst)]

    def _offload_full(self, rid: int) -> None:
        """Move the request's full pages that are still device-only to host memory (pages below
        `_offloaded[rid]` already are: no scan of the whole request per step)."""
        full = self.kv.num_full_pages(rid)
        start = self._offloaded.get(rid, 0)
        if full > start:
            self.kv.offload(rid, range(start, full))
        self._offloaded[rid] = full
