"""`HybridAttention`: sparse decode attention over a KV cache split between HBM and host memory.

    attn = HybridAttention(cfg, num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128)
    rid = attn.add_request(k, v)          # prefill KV [num_layers, T, Hkv, D], T >= 0
    attn.plan([rid0, rid1])               # once per step: order, tables, budgets, placement; checks
    o = attn.run(layer, q, k_new, v_new)  # per layer, in order: append, index, partition, attend, merge
    attn.remove_request(rid)              # between steps
    attn.stats()                          # counters of the last step and totals

The step's new token sits at position `seq_len` of each request in every layer; `run(layer)` returns
attention over the selected pages of tokens `[0, seq_len]` (the new token's page is always among the
`recent` pages). After the last layer every planned request is one token longer.

Placements (`cfg.placement`): `dense` (all pages in HBM, full attention), `gpu` (all in HBM, sparse),
`offload` (full pages live in pinned host memory; selected pages missing from the GPU page cache are
fetched into it and attended on the GPU), `cpu` (host pages attended by the CPU where they are, the
GPU attends the tail pages it holds), `hybrid` (host pages not cached are split between CPU attention
and fetches by the cost model, so that the CPU and the PCIe link finish together; cached pages are
used where they are). All sparse placements attend exactly the pages the flow selects: they differ
in where the work runs, never in what is attended.

The GPU page cache is per layer: `cfg.gpu_cache_pages` device-pool pages reserved at start-up serve as
slots, and `scheduler.page_cache.PageCache` decides hits, fetches and evictions (pages in use this
step are never evicted; the host copy stays authoritative, so eviction loses nothing). Without CUDA
the "GPU" side is the torch reference on the CPU, so the same logic runs in CI.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import reference
from ..config import HybridConfig
from ..kv.page_pool import GIB, pool_bytes
from ..kv.paged_kv_cache import NOT_RESIDENT, PagedKVCache
from ..vflow.registry import load_flow
from ..vflow.summary_store import SummaryStore
from .cpu_worker import CpuWorker
from .host_split import HostCosts, choose_fetches

log = logging.getLogger(__name__)

HOST_PLACEMENTS = ("offload", "cpu", "hybrid")
CACHE_OWNER = 2**62
"""Allocator owner of the device pages reserved as GPU page-cache slots (no request id reaches it)."""
TAIL_PAGES = 256
"""Device pages kept for the not-yet-full tail pages of requests (and prefill chunks) in host
placements; `device_pages=` overrides the total."""


@dataclass
class _Step:
    """What `plan` computed for one decode step."""

    rids: list[int]
    old_lens: list[int]
    dev_table: torch.Tensor            # int32 [B, W] on the device: logical -> device page or -1
    host_table: torch.Tensor           # int32 [B, W] CPU: logical -> host page or -1
    lens: torch.Tensor                 # int32 [B] on the device (new lengths)
    lens_cpu: torch.Tensor             # int32 [B]
    s_table: Optional[torch.Tensor]    # summary rows (store device)
    s_lens: Optional[torch.Tensor]
    groups: dict[int, torch.Tensor]    # budget -> row indices (store device)
    width: int                         # largest budget: sel is [B, Hkv, width]
    next_layer: int = 0
    failed: bool = False
    counters: dict = field(default_factory=dict)


def _positive(name: str, value) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        v = -1
    if isinstance(value, bool) or v < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return v


class HybridAttention:
    """Hybrid sparse decode attention for one model; see the module docstring.

    device_pages / host_pages size the pools (defaults: `dense`/`gpu` keep every page in HBM and
    take `cfg.gpu_cache_pages` device pages and no host pages; host placements take TAIL_PAGES +
    `cfg.gpu_cache_pages` device pages and host pages filling `cfg.host_memory_gib`, or
    8 x `cfg.gpu_cache_pages` when it is None). device: where the GPU side runs (default: CUDA if
    present, else the CPU with the torch reference).
    """

    def __init__(self, cfg: HybridConfig, num_layers: int, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, *, device_pages: Optional[int] = None,
                 host_pages: Optional[int] = None, device: Optional[torch.device | str] = None,
                 host_costs: Optional[HostCosts] = None) -> None:
        if not isinstance(cfg, HybridConfig):
            raise ValueError(f"cfg must be a HybridConfig, got {type(cfg).__name__}")
        L, hq, hkv = (_positive(n, v) for n, v in (("num_layers", num_layers),
                                                    ("num_q_heads", num_q_heads),
                                                    ("num_kv_heads", num_kv_heads)))
        D = _positive("head_dim", head_dim)
        if hq % hkv:
            raise ValueError(f"num_q_heads={hq} must be a multiple of num_kv_heads={hkv} (GQA)")
        self.cfg, self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = \
            cfg, L, hq, hkv, D
        self.placement = cfg.placement
        host = self.placement in HOST_PLACEMENTS
        slots = cfg.gpu_cache_pages if self.placement in ("offload", "hybrid") else 0
        dtype = getattr(torch, cfg.kv_dtype)
        if device_pages is None:
            device_pages = TAIL_PAGES + slots if host else cfg.gpu_cache_pages
        if host_pages is None:
            if not host:
                host_pages = 0
            elif cfg.host_memory_gib is not None:
                per_page = pool_bytes(L, 1, hkv, cfg.page_size, D, dtype)
                host_pages = int(cfg.host_memory_gib * GIB // per_page)
            else:
                host_pages = 8 * max(cfg.gpu_cache_pages, 1)
        device_pages, host_pages = operator.index(device_pages), operator.index(host_pages)
        if device_pages <= slots:
            raise ValueError(f"device_pages={device_pages} must exceed the {slots} GPU cache slots "
                             "(tail pages need room too)")
        self.kv = PagedKVCache.from_config(cfg, L, hkv, D, device_pages, max(host_pages, 0), device)
        dev = self.kv.device
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dev.type == "cuda" and dev.index is None else dev
        self._slot_pages = torch.as_tensor(self.kv.device_alloc.alloc(CACHE_OWNER, slots),
                                           dtype=torch.int64)
        self.store = None
        if self.placement != "dense":
            flow = load_flow(cfg.flow, **dict(cfg.extra))
            self.store = SummaryStore(self.kv, flow, group=hq // hkv,
                                      location=getattr(cfg, "summary_location", "auto"),
                                      dtype=getattr(torch, cfg.summary_dtype))
        from ..scheduler.page_cache import PageCache
        self._caches = [PageCache(slots) for _ in range(L)] if slots else []
        self._costs = host_costs or HostCosts.defaults(self.device)
        self._worker = CpuWorker() if host else None
        self._gpu = self._gpu_backend()
        self._step: Optional[_Step] = None
        self._last: dict = {}
        self._totals: dict = {}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Prefill KV of every layer, k and v [num_layers, T, Hkv, D] (T >= 0); returns the request
        id. Host placements stream the prompt through the device pool in chunks, offloading full
        pages to pinned host memory as they fill."""
        self._check_between_steps("add_request")
        want = (self.num_layers, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or \
                    (t.shape[0], t.shape[2], t.shape[3]) != want or not t.is_floating_point():
                raise ValueError(f"{name} must be a float tensor [{want[0]}, T, {want[1]}, "
                                 f"{want[2]}], got {getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if k.shape != v.shape:
            raise ValueError(f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
        rid = self.kv.create_request()
        try:
            if self.placement not in HOST_PLACEMENTS:
                self.kv.append(rid, k, v)
            else:
                P = self.cfg.page_size
                done, T = 0, k.shape[1]
                while done < T:
                    room = (self.kv.device_alloc.num_free - 1) * P
                    if room <= 0:
                        raise ValueError("the device pool has no room for a prefill chunk; raise "
                                         "device_pages")
                    n = min(T - done, room)
                    self.kv.append(rid, k[:, done:done + n], v[:, done:done + n])
                    self._offload_full(rid)
                    done += n
        except Exception:
            self.kv.free_request(rid)
            raise
        return rid

    def remove_request(self, rid: int) -> None:
        """Free a request's device, host, cache and summary pages (refused inside a step)."""
        step = self._step
        if step is not None and not step.failed and step.next_layer < self.num_layers \
                and rid in step.rids:
            raise ValueError(f"request {rid} is in the current step (layers {step.next_layer}.."
                             f"{self.num_layers - 1} still to run); remove it after the step")
        self.kv.free_request(rid)
        for cache in self._caches:
            cache.remove_request(rid)

    def _offload_full(self, rid: int) -> None:
        full = self.kv.num_full_pages(rid)
        res = self.kv.residency(rid)
        pages = [p for p in range(full) if res[p][0] != NOT_RESIDENT]
        if pages:
            self.kv.offload(rid, pages)

    def _check_between_steps(self, what: str) -> None:
        step = self._step
        if step is not None and not step.failed and 0 < step.next_layer < self.num_layers:
            raise ValueError(f"{what} during a step (layer {step.next_layer} of "
                             f"{self.num_layers} is next); finish the step first")

    # ---- plan -------------------------------------------------------------------------------
    def plan(self, rids: Sequence[int]) -> None:
        """Prepare one decode step for `rids` (batch order = this order): reserve the new token's
        slot, offload pages that filled, build tables, budgets and selection groups. All checks
        happen here."""
        self._check_between_steps("plan")
        self._rollback_failed()
        rids = [operator.index(r) for r in rids]
        if len(set(rids)) != len(rids):
            raise ValueError(f"rids lists a request twice: {rids}")
        live = set(self.kv.request_ids)
        unknown = [r for r in rids if r not in live]
        if unknown:
            raise ValueError(f"unknown request ids {unknown}; live requests: {sorted(live)}")
        if self.placement in HOST_PLACEMENTS:
            for rid in rids:
                self._offload_full(rid)
        old = [self.kv.seq_len(r) for r in rids]
        extended = []
        try:
            for rid in rids:
                self.kv.extend(rid, 1)
                extended.append(rid)
        except Exception:
            for rid, n in zip(extended, old):
                self.kv.truncate(rid, n)
            raise
        P = self.cfg.page_size
        new = [n + 1 for n in old]
        dev_table, lens = self.kv.page_table(rids, "device")
        host_table, lens_cpu = self.kv.page_table(rids, "host")
        s_table = s_lens = None
        groups: dict[int, list[int]] = {}
        width = 0
        if self.store is not None:
            for rid, n in zip(rids, new):
                self.store.reserve_rows(rid, n // P)
            s_table, s_lens = self.store.table(rids)
            for b, n in enumerate(new):
                groups.setdefault(self.cfg.budget_for(-(-n // P)), []).append(b)
            width = max(groups, default=0)
        sdev = self.store.device if self.store is not None else self.device
        self._step = _Step(rids, old, dev_table, host_table, lens, lens_cpu, s_table, s_lens,
                           {k: torch.as_tensor(v, dtype=torch.int64, device=sdev)
                            for k, v in groups.items()}, width)
        self._step.counters = {k: 0 for k in ("gpu_pages", "cpu_pages", "fetched_pages",
                                              "cache_hits", "cache_misses", "evictions",
                                              "bytes_h2d", "bytes_cpu")}
        self._step.counters.update(gpu_wait_s=0.0, step_host_s=0.0)

    def _rollback_failed(self) -> None:
        """A step that failed mid-way leaves the new token written in some layers only: drop it."""
        step = self._step
        if step is not None and step.failed:
            for rid, n in zip(step.rids, step.old_lens):
                if rid in self.kv.request_ids:
                    self.kv.truncate(rid, n)
            self._step = None

    # ---- run --------------------------------------------------------------------------------
    def run(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            sel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append this layer's new token, select, partition, attend and merge: o [B, Hq, D] in q's
        dtype. Layers run in order 0..num_layers-1 after `plan`.

        sel (research and benchmarks: replaying recorded selections): int [B, Hkv, K] logical pages
        of each request after this step's token, -1 padded, unique per row; attended instead of
        the flow's selection (not with `dense`). Checked here, which synchronises the GPU."""
        step = self._step
        if step is None or step.failed or step.next_layer >= self.num_layers:
            raise ValueError("run() needs a plan(): call plan(rids) once before layer 0 of each step")
        if layer != step.next_layer:
            raise ValueError(f"layer={layer!r}: layers run in order; layer {step.next_layer} is next")
        B = len(step.rids)
        self._check_inputs(B, q, k_new, v_new)
        if sel is not None:
            sel = self._check_sel(step, sel)
        t0 = time.perf_counter()
        try:
            o = self._run_layer(step, layer, q, k_new, v_new, sel)
        except BaseException:
            step.failed = True
            raise
        step.next_layer += 1
        step.counters["step_host_s"] += time.perf_counter() - t0
        if step.next_layer == self.num_layers:
            self._last = dict(step.counters)
            for k, v in step.counters.items():
                self._totals[k] = self._totals.get(k, 0) + v
            self._totals["steps"] = self._totals.get("steps", 0) + 1
        return o

    def _check_inputs(self, B: int, q, k_new, v_new) -> None:
        shapes = (("q", q, (B, self.num_q_heads, self.head_dim)),
                  ("k_new", k_new, (B, self.num_kv_heads, self.head_dim)),
                  ("v_new", v_new, (B, self.num_kv_heads, self.head_dim)))
        for name, t, want in shapes:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or \
                    not t.is_floating_point():
                raise ValueError(f"{name} must be a float tensor {list(want)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; the runtime's device is {self.device}")

    def _check_sel(self, step: _Step, sel) -> torch.Tensor:
        B = len(step.rids)
        if self.placement == "dense":
            raise ValueError("sel= is for sparse placements; placement 'dense' attends every page")
        if not isinstance(sel, torch.Tensor) or sel.dim() != 3 or \
                tuple(sel.shape[:2]) != (B, self.num_kv_heads) or \
                sel.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sel must be an int32 tensor [{B}, {self.num_kv_heads}, K], got "
                             f"{getattr(sel, 'dtype', type(sel).__name__)} "
                             f"{tuple(getattr(sel, 'shape', ()))}")
        sel = sel.to(self.device, torch.int32)
        n = -(-step.lens.to(torch.int64) // self.cfg.page_size)
        s = sel.to(torch.int64)
        bad = (s < -1) | (s >= n[:, None, None])
        if bool(bad.any()):
            b, h, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"sel[{b}, {h}, {j}]={int(s[b, h, j])} is not a page of request "
                             f"{step.rids[b]} (it holds {int(n[b])} pages this step)")
        srt = torch.sort(s, dim=-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError("sel lists a page twice in a row; pages must be unique per row")
        return sel

    def _run_layer(self, step: _Step, layer: int, q, k_new, v_new, sel=None) -> torch.Tensor:
        kv, c = self.kv, step.counters
        for b, (rid, pos) in enumerate(zip(step.rids, step.old_lens)):
            kv.write(rid, layer, pos, k_new[b:b + 1], v_new[b:b + 1])
        k_pool, v_pool = kv.device_pool.k[layer], kv.device_pool.v[layer]
        if self.placement == "dense":
            sel = reference.all_pages_sel(step.lens, self.num_kv_heads, step.dev_table.shape[1],
                                          self.cfg.page_size)
            c["gpu_pages"] += int((sel >= 0).sum())
            o, _ = self._gpu.attend(q, k_pool, v_pool, step.dev_table, step.lens, sel)
            return o.to(q.dtype)
        if sel is None:
            sel = self._select(step, layer, q)
        table = step.dev_table
        if self._caches:
            table = self._with_cache(step, layer, sel)
        phys = torch.gather(table.to(torch.int64), 1, sel.clamp_min(0).flatten(1).to(torch.int64)
                            ).view_as(sel)
        chosen = sel >= 0
        on_gpu = chosen & (phys >= 0)
        on_host = chosen & ~on_gpu
        page_bytes = 2 * self.cfg.page_size * self.head_dim * kv.device_pool.k.element_size()
        c["gpu_pages"] += int(on_gpu.sum())
        n_host = int(on_host.sum())
        c["cpu_pages"] += n_host
        c["bytes_cpu"] += n_host * page_bytes
        future = None
        if n_host:
            cpu_sel = torch.where(on_host, sel, -1).cpu()
            future = self._worker.submit(self._cpu_attend, q.cpu(), layer, step.host_table,
                                         step.lens_cpu, cpu_sel)
        gpu_sel = torch.where(on_gpu, sel, -1)
        o, lse = self._gpu.attend(q, k_pool, v_pool, table, step.lens, gpu_sel)
        if future is not None:
            t0 = time.perf_counter()
            o_c, lse_c = future.result()
            c["gpu_wait_s"] += time.perf_counter() - t0
            o, lse = self._gpu.merge(o, lse, o_c.to(self.device), lse_c.to(self.device))
        return o.to(q.dtype)

    def _select(self, step: _Step, layer: int, q: torch.Tensor) -> torch.Tensor:
        """sel int32 [B, Hkv, width]: each row at its own budget (-1 padded to the widest)."""
        B = len(step.rids)
        sel = torch.full((B, self.num_kv_heads, step.width), -1, dtype=torch.int32,
                         device=self.device)
        sink, recent = self.cfg.sink_pages, self.cfg.recent_pages
        for budget, rows in step.groups.items():
            qg = q if len(rows) == B else q[rows.to(q.device)]
            part = self.store.index(layer, qg, step.s_table[rows], step.s_lens[rows], budget, sink,
                                    recent, check=False)
            if len(rows) == B:
                sel[:, :, :budget] = part
            else:
                sel[rows.to(self.device), :, :budget] = part
        return sel

    def _with_cache(self, step: _Step, layer: int, sel: torch.Tensor) -> torch.Tensor:
        """This layer's device table with the GPU page cache: hits mapped to their slots, chosen
        misses fetched into slots (one copy per page), the rest left to the CPU."""
        cache, c = self._caches[layer], step.counters
        host_sel = sel.cpu()
        dev_rows = step.dev_table.cpu()
        wanted: dict[int, list[int]] = {}
        heads: dict[tuple[int, int], int] = {}
        for b, rid in enumerate(step.rids):
            pages = host_sel[b][host_sel[b] >= 0]
            pages = pages[dev_rows[b, pages.long()] < 0]                # host-resident
            uniq, count = torch.unique(pages, return_counts=True)
            wanted[rid] = uniq.tolist()
            for p, n in zip(wanted[rid], count.tolist()):
                heads[(rid, p)] = n
        hits = {rid: [p for p in ps if cache.slot_of(rid, p) is not None]
                for rid, ps in wanted.items()}
        misses = {rid: [p for p in ps if cache.slot_of(rid, p) is None]
                  for rid, ps in wanted.items()}
        if self.placement == "hybrid":
            misses = choose_fetches(self._costs, misses, heads, self.num_kv_heads,
                                    self.cfg.page_size, self.head_dim,
                                    self.kv.device_pool.k.element_size())
        plan = cache.step({rid: hits[rid] + misses[rid] for rid in step.rids})
        c["cache_hits"] += sum(len(v) for v in plan.hits.values())
        c["cache_misses"] += sum(len(v) for v in wanted.values()) - \
            sum(len(v) for v in plan.hits.values())
        c["evictions"] += sum(len(v) for v in plan.evict.values())
        src, dst = [], []
        for b, rid in enumerate(step.rids):
            for p, slot in zip(plan.fetch.get(rid, ()), plan.fetch_slots.get(rid, ())):
                src.append(int(step.host_table[b, p]))
                dst.append(int(self._slot_pages[slot]))
        if src:
            hk, hv = self.kv.host_pool.k[layer], self.kv.host_pool.v[layer]
            idx = torch.as_tensor(dst, dtype=torch.int64, device=self.device)
            s = torch.as_tensor(src, dtype=torch.int64)
            self.kv.device_pool.k[layer].index_copy_(0, idx, hk[s].to(self.device, non_blocking=True))
            self.kv.device_pool.v[layer].index_copy_(0, idx, hv[s].to(self.device, non_blocking=True))
            c["fetched_pages"] += len(src)
            c["bytes_h2d"] += 2 * hk[0].numel() * hk.element_size() * len(src)
        table = dev_rows.clone()
        for b, rid in enumerate(step.rids):
            for p in wanted[rid]:
                slot = cache.slot_of(rid, p)
                if slot is not None:
                    table[b, p] = int(self._slot_pages[slot])
        return table.to(self.device)

    def _cpu_attend(self, q, layer, host_table, lens, sel):
        from .. import cpu_kernels
        return cpu_kernels.launch_sparse_decode_attention(
            q, self.kv.host_pool.k[layer], self.kv.host_pool.v[layer], host_table, lens, sel)

    def _gpu_backend(self):
        if self.device.type == "cuda":
            from .. import gpu_kernels

            class _Gpu:
                attend = staticmethod(gpu_kernels.launch_sparse_decode_attention)
                merge = staticmethod(gpu_kernels.merge_states)
            return _Gpu
        return _TorchGpu

    # ---- stats ------------------------------------------------------------------------------
    def stats(self) -> dict:
        """{"last_step": counters of the last completed step, "totals": sums over steps}:
        pages attended on GPU / CPU (page-heads), pages fetched, cache hits / misses (pages),
        evictions, bytes moved over PCIe and read by the CPU, time the GPU side waited for the CPU,
        host time of the step's run() calls."""
        return {"last_step": dict(self._last), "totals": dict(self._totals)}

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


class _TorchGpu:
    """The GPU side without CUDA: the torch reference (float32 states)."""

    @staticmethod
    def attend(q, k_pool, v_pool, table, lens, sel):
        return reference.sparse_decode_attention(q, k_pool, v_pool, table, lens, sel)

    @staticmethod
    def merge(o_a, lse_a, o_b, lse_b):
        return reference.merge_states(o_a, lse_a, o_b, lse_b)
