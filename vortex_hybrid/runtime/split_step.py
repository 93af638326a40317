"""`SplitStep`: a layer of the host placements (a mixin of `HybridAttention`), in two GPU parts
around the CPU hand-off: front (append, select, partition against the GPU page cache, the hybrid
split of host pages between CPU attention and fetches, the host's share copied to pinned buffers)
and back (fetch into the cache's slots, attend what the GPU holds); the CPU worker attends the
host's share between them, and the states merge. Neither part synchronises, so each is one CUDA
graph replay (`layer_graphs`). docs/runtime.md describes the flow and the split's cost model.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from ..compiled import compiled
from .step_plan import head_table
from .step_trace import NO_TRACE

if TYPE_CHECKING:
    from .step_plan import StepPlan


class SplitStep:
    """The host placements' layer (module docstring)."""

    def _attend_split(self, step: StepPlan, layer: int, q, k_new, v_new, sel=None,
                      graphs=None) -> torch.Tensor:
        """Host placements (or a given selection), in two GPU parts around the CPU hand-off:
        front (append, select, partition, cache, the host's part copied to pinned buffers) and back
        (fetch, attend what the GPU holds); the CPU worker starts between them, as soon as the
        front's copies land, and the merge follows both. Neither part synchronises, so each is
        one CUDA graph replay when `graphs` is given (docs/runtime.md)."""
        c, tr = step.counters, self.trace or NO_TRACE
        host = self.placement != "gpu"
        inputs = dict(q=q, k_new=k_new, v_new=v_new)
        if sel is not None:
            inputs["sel"] = sel
        step.fronts = layer + 1             # its cache layer is checkpointed first (the undo)
        with tr.gpu(layer, "select + partition + cache"):
            front = self._replay(graphs, layer, "front",
                                 self._front_part(layer, graphs.pinned) if graphs else None,
                                 self._cache_state(layer), **inputs)
            if front is None:               # the back part then runs eagerly too
                graphs = None
                front = self._front(step, layer, q, k_new, v_new, sel, self._pinned)
        gsel, table, src, dst, counts, q_host, sel_host, _ = front
        step.counts += counts
        ready = None
        if host and self.device.type == "cuda":
            ready = self._handoff
            ready.record()                  # the worker waits for the front's copies only
        future, out = None, None
        try:
            for hand in step.launch_order:      # the list scheduler's order (plan())
                if hand == "cpu" and host:
                    future = self._worker.submit(self._cpu_attend, layer, q_host, sel_host,
                                                 step.host_table, step.lens_cpu, ready)
                elif hand == "gpu":
                    with tr.gpu(layer, "fetch + attend"):
                        out = self._replay(graphs, layer, "back", self._back_part(layer, front))
                        if out is None:
                            graphs = None
                            out = self._back(step, layer, q, gsel, table, src, dst)
        except BaseException:
            if future is not None:          # the step's undo must not race the CPU's reads
                future.exception()
            raise
        o, lse = out
        if future is not None:
            t0 = time.perf_counter()
            with tr.host(layer, "wait for the CPU"):
                part = future.result()
            c["gpu_wait_s"] += time.perf_counter() - t0
            if part is not None:
                o_c, lse_c, n_host, kernel_s = part
                c["cpu_pages"] += n_host
                c["cpu_calls"] += 1
                c["cpu_kernel_s"] += kernel_s
                with tr.gpu(layer, "merge"):
                    o, lse = self._gpu.merge(o, lse, o_c.to(self.device), lse_c.to(self.device))
                return o.to(q.dtype)
        return o.to(q.dtype) if graphs is None or o.dtype != q.dtype else o.clone()

    def _front_part(self, layer: int, pinned):
        def body(step: StepPlan, inp: dict) -> tuple:
            return self._front(step, layer, inp["q"], inp["k_new"], inp["v_new"], inp.get("sel"),
                               pinned)
        return body

    def _cache_state(self, layer: int) -> tuple:
        """The tensors a front part changes (the page cache's layer), for graph capture."""
        return () if self._cache is None else self._cache.state(layer)

    def _back_part(self, layer: int, front: tuple):
        def body(step: StepPlan, inp: dict) -> tuple:
            return self._back(step, layer, inp["q"], *front[:4])
        return body

    def _front(self, step: StepPlan, layer: int, q, k_new, v_new, sel, pinned,
               whole: bool = False) -> tuple:
        """Append, select, partition (GPU page cache, hybrid split), and copy the host's part of
        the selection and q to pinned buffers for the CPU worker. No sync. Returns (the GPU's
        selection, its head table, fetch sources, fetch destinations (-1: none), counts [5], q and
        the selection on the host, the number of head-pages of that host part as a device scalar
        (None in `gpu`)). The page cache's layer is checkpointed first (for a failed step's undo;
        a whole step's (`whole`) first front checkpoints every layer at once: seven copies, not
        seven a layer).

        The GPU side works per (request, KV head) row, in head-pages: the pools viewed as
        [pages x Hkv, 1, P, D], the head table [B x Hkv, W] maps each row's logical page to the
        head-page holding that head of it (its device page, or a cache slot), so a cache slot is
        one KV head of one page and a fetch copies only the heads that selected the page."""
        if self._cache is not None:         # a whole step keeps every layer at its first front
            if not whole:
                self._cache.checkpoint(layer)
            elif layer == 0:
                self._cache.checkpoint()
        self._append(step, layer, k_new, v_new)
        sel = self._chosen(step, layer, q, sel)
        table, src, dst = self._dev_heads(step), None, None
        if self._cache is not None:
            table, src, dst, cache_counts = self._cache_table(step, layer, sel, table)
        else:                                       # fetched, hits, misses, evictions
            cache_counts = torch.zeros(4, dtype=torch.int64, device=self.device)
        host = self.placement != "gpu"
        gsel, host_sel, counts, host_n = self._cache_fns.partition(table, sel, cache_counts, host)
        q_host = sel_host = None
        if host:
            if self.device.type == "cuda":   # q as float32: the CPU side converts nothing (a
                q_host = pinned.get("q", q.shape, torch.float32)   # torch op there would wake
                sel_host = pinned.get("sel", host_sel.shape, host_sel.dtype)   # its thread pool)
                q_host.copy_(q.float(), non_blocking=True)
                sel_host.copy_(host_sel, non_blocking=True)
            else:
                q_host, sel_host = q, host_sel
        return gsel, table, src, dst, counts, q_host, sel_host, host_n

    def _dev_heads(self, step: StepPlan) -> torch.Tensor:
        """The step's device head table: built once by plan() in the host placements; for `dense`
        with a given selection (research), from its page table here."""
        if step.dev_heads is not None:
            return step.dev_heads
        return head_table(step.dev_table, self.num_kv_heads)

    def _back(self, step: StepPlan, layer: int, q, gsel, table, src, dst) -> tuple:
        """Fetch the head-pages the front chose into their slots, then attend what the GPU holds
        (per (request, KV head) row over the head-page pools; o [B, Hq, D], lse [B, Hq])."""
        if src is not None:
            self._copy_pages(layer, src, dst)
        B, H, K = gsel.shape
        hq, D, P = self.num_q_heads, self.head_dim, self.cfg.page_size
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        o, lse = self._gpu.attend(q.reshape(B * H, hq // H, D), k_pool.view(-1, 1, P, D),
                                  v_pool.view(-1, 1, P, D), table,
                                  step.lens.repeat_interleave(H) if step.lens_heads is None
                                  else step.lens_heads,
                                  gsel.reshape(B * H, 1, K))
        return o.view(B, hq, D), lse.view(B, hq)

    def _cache_table(self, step: StepPlan, layer: int, sel, table) -> tuple:
        """This layer's head table with the GPU page cache, and the copy to make: host head-pages
        that are cached map to their slots; misses chosen for fetching get slots, and (src host
        head-pages, dst device head-pages, -1 where unused) is returned for the back part to copy;
        the rest stays with the CPU. sel [B, Hkv, K]: the selection; table: the device head
        table. All on the device, no sync; counts (fetched, hits, misses, evictions) [4], in
        head-pages. The work is three functions of the layer's tensors (`fetch_wish`,
        `GpuPageCache.step`, `fetched_table`), `torch.compile`d with `cfg.compile_cache_step`."""
        cache = self._cache
        R, W = table.shape
        rows = step.cache_rows
        mode = "all" if self.placement == "offload" else \
            "cpu_rows" if step.shape == "subbatch" else "split"
        cpu_rows = step.cpu_rows.repeat_interleave(self.num_kv_heads) if mode == "cpu_rows" \
            else None
        fns = self._cache_fns
        slots, wanted, to_fetch, idx = fns.wish(
            cache.slot_of[layer], cache.reuse[layer], rows, sel, table, cpu_rows,
            self._live_cpu.tensor, self._live_cpu.call_tensor, mode, cache.num_slots,
            self._head_bytes, self._costs.h2d_bw_concurrent)
        capacity = self._fetch_capacity(R * sel.shape[2])
        plan = cache.step(layer, rows, slots, wanted, to_fetch, capacity=capacity, pages=idx)
        table, src, dst = fns.fetched(cache.slot_of[layer], rows, table, plan.rows, plan.pages,
                                      plan.slots, step.host_heads, self._slot_heads)
        return table, src, dst, torch.stack([plan.count, plan.hits, plan.misses, plan.evictions])

    def _fetch_capacity(self, selected: int) -> int:
        """Entries of a layer's cache step (`GpuPageCache.step`'s capacity): no more than the
        slots or the `selected` head-pages, and in `hybrid` no more than `cfg.fetch_share` of
        them (the rest of the misses go to the CPU)."""
        cap = min(self._cache.num_slots, selected)
        if self.placement == "hybrid":
            cap = min(cap, math.ceil(self.cfg.fetch_share * selected))
        return max(1, cap)

    def _hybrid_fetch(self, miss: torch.Tensor, reuse: torch.Tensor,
                      wanted: torch.Tensor) -> torch.Tensor:
        """`hybrid_fetch` with this runtime's cache size, rates and costs."""
        return hybrid_fetch(miss, reuse, wanted, self._live_cpu.tensor, self._live_cpu.call_tensor,
                            self._cache.num_slots, self._head_bytes,
                            self._costs.h2d_bw_concurrent)

    def _copy_pages(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy head-pages `src` of the host pool into head-pages `dst` of the device pool (both
        viewed as [pages x Hkv, 1, P, D]; -1 entries copy nothing)."""
        P, D = self.cfg.page_size, self.head_dim
        hk, hv = (t[layer].view(-1, 1, P, D) for t in (self.kv.host_pool.k, self.kv.host_pool.v))
        dk, dv = (t[layer].view(-1, 1, P, D) for t in (self.kv.device_pool.k,
                                                        self.kv.device_pool.v))
        if self.device.type == "cuda":
            from ..gpu_kernels.gather_pages import launch_gather_pages
            launch_gather_pages(hk, hv, src, dk, dv, dst, self.cfg.fetch_programs)
        else:                           # the torch stand-in (no CUDA): a sync is free here
            keep = src >= 0
            src, dst = src[keep], dst[keep]
            dk.index_copy_(0, dst, hk.index_select(0, src))
            dv.index_copy_(0, dst, hv.index_select(0, src))

    def _cpu_attend(self, layer, q, sel, host_table, lens, ready):
        """On the worker: wait for the front's copies (`ready`, a CUDA event), then attend the
        host part of the selection; (o, lse, page-heads attended, seconds in the kernel's call), or
        None when there is none."""
        if ready is not None:
            ready.synchronize()
        n = int((sel >= 0).sum())
        if n == 0:
            return None
        t0 = time.perf_counter()
        o, lse = self._cpu_state(layer, q, sel, host_table, lens)
        return o, lse, n, time.perf_counter() - t0

    def _cpu_state(self, layer, q, sel, host_table, lens, out=None):
        """The CPU's state (o, lse) over the host part `sel` of a layer's selection (in `out`
        when given; token heads of a calibration return new tensors)."""
        from .. import cpu_kernels
        k_pool, v_pool = self.kv.host_pool.k[layer], self.kv.host_pool.v[layer]
        tok = None if self.head_budgets is None else self.head_budgets.token_heads[layer]
        with (self.trace or NO_TRACE).host(layer, "attend host pages", "cpu"):
            if tok is None:
                return cpu_kernels.launch_sparse_decode_attention(q, k_pool, v_pool, host_table,
                                                                  lens, sel, out=out)
            return self._cpu_attend_by_granularity(q, k_pool, v_pool, host_table, lens, sel, tok)

    def _cpu_attend_by_granularity(self, q, k_pool, v_pool, host_table, lens, sel, tok):
        """Page heads attend their host pages whole; token heads (calibration) keep, of theirs,
        the best `token_share` of the tokens (at least: k_tokens is one count for the batch, from
        the row with the most host pages), by the group's largest score; the states merge."""
        from .. import cpu_kernels
        heads = tok[None, :, None]
        o, lse = cpu_kernels.launch_sparse_decode_attention(
            q, k_pool, v_pool, host_table, lens, torch.where(heads, -1, sel))
        cand = torch.where(heads, sel, -1)
        most = int((cand >= 0).sum(-1).max())
        if most == 0:
            return o, lse
        k_tokens = math.ceil(self.calibration.token_share * most * self.cfg.page_size)
        o_t, lse_t, _ = cpu_kernels.launch_token_topk_attention(q, k_pool, v_pool, host_table,
                                                                lens, cand, k_tokens)
        return cpu_kernels.merge_states(o, lse, o_t, lse_t)


class CacheFns(NamedTuple):
    """A split layer's functions of tensors, each `torch.compile`d or not (`cache_fns`)."""
    wish: Callable          # `fetch_wish`
    fetched: Callable       # `fetched_table`
    partition: Callable     # `partition`


def cache_fns(compile_them: bool) -> CacheFns:
    """`fetch_wish`, `fetched_table` and `partition`, `torch.compile`d when asked
    (`vortex_hybrid.compiled`)."""
    fns = (fetch_wish, fetched_table, partition)
    return CacheFns(*(compiled(f) for f in fns) if compile_them else fns)


def with_cache(slot_of: torch.Tensor, rows: torch.Tensor, table: torch.Tensor,
               slot_heads: torch.Tensor) -> torch.Tensor:
    """`table` [R, W] with the cached slots filled in where it has no device head-page: slot_of
    [rows of the cache, W'] (one layer's; or [L, rows, W'] for every layer's tables at once,
    [L, R, W]), slot_heads: slot -> head-page."""
    slots = slot_of.index_select(-2, rows)[..., :table.shape[1]]
    in_cache = torch.where(slots >= 0, slot_heads[slots.clamp_min(0).to(torch.int64)], -1)
    return torch.where(table >= 0, table, in_cache.to(table.dtype))


def _entries(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection [B, Hkv, K] as rows [B x Hkv, K]: (which entries hold a page, their pages
    (int64; 0 where none))."""
    sel_r = sel.reshape(-1, sel.shape[-1])
    return sel_r >= 0, sel_r.clamp_min(0).to(torch.int64)


def partition(table: torch.Tensor, sel: torch.Tensor, cache_counts: torch.Tensor,
              host: bool) -> tuple:
    """A layer's selection [B, Hkv, K] split by the head table [B x Hkv, W] (with the cache's
    slots): (the GPU's part, the host's part (None without a host), counts [5]: head-pages on the
    GPU then `cache_counts`, the host part's head-pages (None without a host)), each -1 where
    the other side has the page. No sync."""
    chosen, idx = _entries(sel)
    on_gpu = (chosen & (torch.gather(table, 1, idx) >= 0)).view(sel.shape)
    counts = torch.cat([on_gpu.sum().view(1), cache_counts])
    gsel = torch.where(on_gpu, sel, -1)
    if not host:
        return gsel, None, counts, None
    on_host = chosen.view(sel.shape) & ~on_gpu
    return gsel, torch.where(on_host, sel, -1), counts, on_host.sum()


def fetch_wish(slot_of: torch.Tensor, reuse: torch.Tensor, rows: torch.Tensor,
               sel: torch.Tensor, table: torch.Tensor,
               cpu_rows: "torch.Tensor | None", cpu_rate: torch.Tensor, call_s: torch.Tensor,
               mode: str, num_slots: int, head_bytes: int, h2d_bw: float) -> tuple:
    """Before a layer's cache step, over the selection's entries [R, K] (`GpuPageCache.step`
    with pages=idx): (their slots, the entries the step reads from the cache or wants (wanted),
    those it would like fetched (to_fetch), idx the entries' pages). One layer's `slot_of` and
    `reuse`; sel [B, Hkv, K] the selection (R = B x Hkv); table the device head table. mode:
    "all" (`offload`: every host page wanted is fetched), "cpu_rows" (`subbatch`: rows of
    `cpu_rows` fetch nothing, the rest every miss), "split" (`hybrid_fetch`). No sync."""
    chosen, idx = _entries(sel)
    Wc = slot_of.shape[1]
    slots = slot_of.view(-1)[rows[:, None] * Wc + idx]                     # [R, K]
    wanted = chosen & (torch.gather(table, 1, idx) < 0)                     # host head-pages
    if mode == "all":
        return slots, wanted, wanted, idx
    miss = wanted & (slots < 0)                                             # [R, K]
    if mode == "cpu_rows":                  # the CPU's sub-batch fetches nothing
        pick = miss & ~cpu_rows[:, None]
    else:
        pick = hybrid_fetch(miss, reuse.index_select(0, rows), wanted.sum(), cpu_rate, call_s,
                            num_slots, head_bytes, h2d_bw)
    return slots, wanted, pick, idx


def fetched_table(slot_of: torch.Tensor, rows: torch.Tensor, table: torch.Tensor,
                  plan_rows: torch.Tensor, plan_pages: torch.Tensor, plan_slots: torch.Tensor,
                  host_heads: torch.Tensor, slot_heads: torch.Tensor) -> tuple:
    """After a layer's cache step: (the head table with the cache's slots, the fetches' sources
    in the host pool's head-pages and destinations in the device pool's, -1 where unused)."""
    ok = plan_slots >= 0
    src = torch.where(ok, host_heads[plan_rows.clamp_min(0), plan_pages.clamp_min(0)]
                      .to(torch.int64), -1)
    dst = torch.where(ok, slot_heads[plan_slots.clamp_min(0)], -1)
    return with_cache(slot_of, rows, table, slot_heads), src, dst


def hybrid_fetch(miss: torch.Tensor, reuse: torch.Tensor, wanted: torch.Tensor,
                 cpu_rate: torch.Tensor, call_s: torch.Tensor, num_slots: int, head_bytes: int,
                 h2d_bw: float) -> torch.Tensor:
    """Which missing head-pages to fetch (miss, the result: bool [B x Hkv, K] over the
    selection). The CPU attends a missing head-page every step it is selected; a fetch
    copies it once, and the copy serves the following steps too while it stays selected and
    cached. So a fetch is charged its amortised cost: copy time x (1 - reuse x survival),
    reuse = the row's measured selection reuse (`GpuPageCache.reuse`), survival = min(1,
    slots / head-pages wanted this step). Both draw on host DRAM at once, so their concurrent
    rates apply (docs/hardware.md; the CPU's rate `cpu_rate` and a call's fixed cost `call_s` as
    the running steps measure them, `scheduler.live_rate`; `h2d_bw` the link's). Head-pages go to
    the copy in order of amortised cost (a row's share one cost: rows are ordered, not
    head-pages), until the copy would end after the CPU's remaining work, the CPU call's fixed
    cost included: the two then finish together, and a host part too small to pay for a CPU call
    is fetched whole (the CPU part then has nothing to attend). All on the device, no sync."""
    survive = (num_slots / wanted.clamp_min(1).to(torch.float64)).clamp_max(1.0)
    factor = (1 - reuse.to(torch.float64) * survive).clamp_min(0.05)        # [R]
    R, K = miss.shape
    rank = _rank(factor)                              # each row's place, cheap rows first
    rows = torch.empty_like(rank).scatter_(0, rank, torch.arange(R, device=miss.device))
    m = miss.to(torch.float64)
    n_row = m.sum(1)                                  # a row's head-pages share its cost:
    n_before = _before(n_row, rows, rank)             # rows are ordered, head-pages follow
    cost_before = _before(factor * n_row, rows, rank)  # their row (row-major in that order)
    inside = torch.cumsum(m, 1)                       # [R, K], this row's up to each one
    cpu_s = head_bytes / cpu_rate                     # read at replay: the live rate
    copy = (cost_before[:, None] + factor[:, None] * inside) * (head_bytes / h2d_bw)
    cpu_after = (n_row.sum() - n_before[:, None] - inside) * cpu_s
    # stop before the first head-page whose fetch would end the copy after what the CPU would
    # take with it kept: its pages, the rest after it, and the call's fixed cost
    stop = (copy > cpu_after + m * cpu_s + call_s) & miss
    pos = rank[:, None] * K + torch.arange(K, device=miss.device)  # place in the fetch order
    first = torch.where(stop, pos, R * K).min()
    return (pos < first) & miss


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Each element's place in `x` [R] sorted ascending, ties in index order (a stable
    argsort's inverse): by R x R comparisons, one fused kernel on the GPU (a compiled sort of a
    few hundred values is one slow kernel); `argsort` for large R."""
    R = x.shape[0]
    if R > 4096:
        order = torch.argsort(x, stable=True)
        return torch.empty_like(order).scatter_(0, order, torch.arange(R, device=x.device))
    i = torch.arange(R, device=x.device)
    before = (x[None, :] < x[:, None]) | ((x[None, :] == x[:, None]) & (i[None, :] < i[:, None]))
    return before.sum(1)


def _before(v: torch.Tensor, order: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """For each element of `v` [R], the sum of the elements before it in `order` (`rank` its
    inverse)."""
    s = v.index_select(0, order)
    return (torch.cumsum(s, 0) - s).index_select(0, rank)
