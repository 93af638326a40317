"""`HybridAttention`: sparse decode attention over a KV cache split between HBM and host memory.

    attn = HybridAttention(cfg, num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128)
    rid = attn.add_request(k, v)          # prefill KV [num_layers, T, Hkv, D], T >= 0
    attn.extend_request(rid, k2, v2)      # more prefill KV (a chunked prefill), between steps
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

Memory (`memory_model`): the runtime takes `cfg.gpu_memory_gib` of HBM (None: the free HBM less
`cfg.gpu_reserve_gib`) and, in host placements, `cfg.host_memory_gib` of host memory (None: 90% of
the available); in host placements every page of HBM not needed for tail pages and summaries is a
GPU page-cache slot. The cache is per layer; `scheduler.gpu_page_cache.GpuPageCache` (state on the
device) decides hits, fetches and evictions (pages in use this step are never evicted; the host
copy stays authoritative, so an eviction loses nothing). Without CUDA the "GPU" side is the torch
reference on the CPU, so the same logic runs in CI.

Every public call is all or nothing (docs/runtime.md, "Failures leave nothing behind"), and calls
that change requests are refused between plan() and the step's last run(). The calls that touch
state run in `torch.inference_mode()`, so the runtime's state is created and changed the same way
whether the caller runs under inference mode or not; outputs are inference tensors.

The class is this file (construction, plan, run, the step's undo, stats) and the mixins it is made
of, one concept each: `requests.Requests` (adding, extending, removing requests; capacity),
`selection.Selection` (the indexer pass), `resident_step.ResidentStep` (a `dense`/`gpu` layer),
`split_step.SplitStep` (a host-placement layer around the CPU hand-off).
"""

from __future__ import annotations

import logging
import os
import operator
import time
from typing import Optional, Sequence

import numpy as np
import psutil
import torch

from .. import reference
from ..contracts import check_sel_values, pages_of
from ..config import STEP_SHAPES, HybridConfig
from ..kv.errors import OutOfPagesError
from ..kv.paged_kv_cache import PagedKVCache, default_device
from ..scheduler import cost_model
from ..scheduler.gpu_page_cache import Coverage, GpuPageCache
from ..scheduler.live_rate import LiveCpuRate
from ..scheduler.step_shape import ShapeChooser, launch_order
from ..transfers import to_device
from ..vflow.registry import load_flow
from ..vflow.summary_store import SummaryStore
from .cpu_worker import CpuWorker, HostBuffers
from .head_budgets import HeadBudgets
from .layer_graphs import CaptureFailed, LayerGraphs
from .memory_model import HOST_PLACEMENTS, plan_memory, summary_hint
from .requests import Requests
from .resident_step import ResidentStep
from .selection import Selection
from .split_step import SplitStep, cache_fns, with_cache
from .step_plan import StepPlan, build_plan, host_tables_on_device
from .step_trace import NO_TRACE, StepTrace
from .fixed_shape import PAD_OWNER, FixedShape, check_fixed, fixed_step
from .whole_step import PendingLayer, WholeStep

log = logging.getLogger(__name__)

CACHE_OWNER = 2**62
"""Allocator owner of the device pages reserved as GPU page-cache slots (no request id reaches it)."""
COUNTS = ("gpu_pages", "fetched_pages", "cache_hits", "cache_misses", "evictions")
"""What a split layer counts on the device (`StepPlan.counts`), read once at the step's end."""


def _positive(name: str, value) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        v = -1
    if isinstance(value, bool) or v < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return v


class HybridAttention(Requests, Selection, ResidentStep, SplitStep, WholeStep):
    """Hybrid sparse decode attention for one model; see the module docstring.

    device_pages / host_pages override the pool sizes the memory model derives from
    `cfg.gpu_memory_gib` and `cfg.host_memory_gib` (`memory_model.plan_memory`; `self.memory` is
    the plan). device: where the GPU side runs (default: CUDA if
    present, else the CPU with the torch reference). costs: the machine's bandwidths for the
    host placements' scheduling (default: `scheduler.cost_model.costs_for(placement)`: `hybrid`
    measures once per machine and caches; the figures a placement reads that are defaults are named
    once in the log). cuda_graphs: capture the per-layer GPU work in CUDA graphs (`layer_graphs`; CUDA only,
    with the summaries on the device): the whole layer for `dense` and `gpu`, the two parts around
    the CPU hand-off for the host placements; a flow whose indexer has no fused kernel runs eagerly.
    """

    def __init__(self, cfg: HybridConfig, num_layers: int, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, *, device_pages: Optional[int] = None,
                 host_pages: Optional[int] = None, device: Optional[torch.device | str] = None,
                 costs: Optional["cost_model.MachineCosts"] = None,
                 cuda_graphs: bool = True) -> None:
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
        for name, n in (("device_pages", device_pages), ("host_pages", host_pages)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"{name}={n!r} must be a non-negative integer, or None")
        dev = torch.device(device) if device is not None else default_device()
        gpu_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
        self.memory = plan_memory(cfg, L, hkv, D, gpu_free_bytes=gpu_free,
                                  host_available_bytes=psutil.virtual_memory().available,
                                  device_pages=device_pages, host_pages=host_pages)
        """The pools' sizes and bytes (`memory_model.MemoryPlan`)."""
        mem = self.memory
        slots = mem.gpu_cache_pages
        self.kv = PagedKVCache.from_config(cfg, L, hkv, D, mem.device_pages, mem.host_pages, dev)
        self._head_bytes = 2 * cfg.page_size * D * self.kv.device_pool.k.element_size()
        """K and V bytes of one KV head of one page: what the CPU reads per page-head."""
        dev = self.kv.device
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dev.type == "cuda" and dev.index is None else dev
        self._slot_pages = torch.as_tensor(self.kv.device_alloc.alloc(CACHE_OWNER, slots),
                                           dtype=torch.int64).to(self.kv.device)
        self.store = None
        if self.placement != "dense":
            flow = load_flow(cfg.flow, **dict(cfg.extra))
            self.store = SummaryStore(self.kv, flow, group=hq // hkv,
                                      location="device" if mem.summary_on_device else "host",
                                      dtype=getattr(torch, cfg.summary_dtype),
                                      capacity=mem.device_pages - slots + mem.host_pages)
            if self.store.bound.reads_keys:
                raise ValueError(f"flow {cfg.flow!r} reads page keys when it selects; the runtime "
                                 "selects from page summaries only (library flows that do: quest, "
                                 "centroid, double_sparsity, streaming)")
        self.calibration = cfg.load_calibration() if self.store is not None else None
        """The per-head budgets' calibration (`HybridConfig.calibration`), or None: uniform."""
        self.head_budgets = None
        if self.calibration is not None:
            cal = self.calibration
            cal.check_model(f"HybridConfig.calibration {cfg.calibration!r}", num_layers=L,
                            num_q_heads=hq, num_kv_heads=hkv, head_dim=D,
                            page_size=cfg.page_size, flow=cfg.flow)
            self.head_budgets = HeadBudgets(cal, self.device, self.store.device)
        self._cache = GpuPageCache(L, slots * hkv, self.device, prior_reuse=self._prior_reuse(),
                                   heads=hkv, compiled=cfg.compile_cache_step) if slots else None
        """Per (page, KV head) slots: a slot holds one KV head of one page (`GpuPageCache`)."""
        self._cache_fns = cache_fns(cfg.compile_cache_step)
        """A split layer's page-cache work before and after the cache's step (`split_step`)."""
        self._slot_heads = (self._slot_pages[:, None] * hkv +
                            torch.arange(hkv, device=self.device)).flatten()
        """Cache slot -> its head-page in the device pool viewed as [pages x Hkv, 1, P, D]."""
        if costs is None:           # this machine's figures; logs once those that are defaults
            costs = cost_model.costs_for(self.placement)
        self._costs = costs
        self._live_cpu = LiveCpuRate(costs.cpu_attn_bw_concurrent, costs.cpu_call_s, self.device)
        """The CPU's rate as the steps measure it, read by hybrid's split (`scheduler.live_rate`)."""
        self._worker = None
        if host:
            from .. import cpu_kernels
            cpu_kernels.set_cpu_threads(self._cpu_threads(reserved=1))   # the driving thread's
            self._worker = CpuWorker()
        self._gpu = self._gpu_backend()
        self._step: Optional[StepPlan] = None
        self.deferred_failure: Optional[BaseException] = None
        """Set when the last plan() raised because the step before it (ended with
        finish_step(wait=False)) had failed, and both were undone; None otherwise."""
        self.trace: Optional[StepTrace] = None
        """Set to a `StepTrace` to record a timeline of the steps that follow (docs/runtime.md)."""
        self._serial = 0
        self._pad_page: Optional[int] = None
        """The scratch device page fixed-shape steps' padding rows write to (`fixed_shape`)."""
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda" and (
                self.store is None or self.store.device.type == "cuda"):
            self._graphs = LayerGraphs(self)
        self._whole_sets = LayerGraphs(self)
        """Whole steps' static buffers per shape (`whole_step`)."""
        self._whole_handoff = None
        """Whole steps' CPU hand-off (`handoff`), made by the first whole step of a host placement,
        or shared with other runtimes (`micro_batches`)."""
        self._handoff_ch = 0
        """This runtime's channel of the hand-off (several when runtimes share its worker)."""
        self._handoff_owned = True
        """Whether close() stops the hand-off (False: a `MicroBatches` owns it)."""
        self._back_stream = None
        """A CUDA stream for a captured whole step's back parts (fetch, the GPU's attention), so
        work enqueued between run_begin and run_end overlaps them (set by `MicroBatches` with
        overlap_back; None: they run on the caller's stream)."""
        self._step_done = None
        """A blocking CUDA event the driving thread sleeps on at a host placement's finish_step."""
        self._pinned = HostBuffers(pin=self.device.type == "cuda")
        """Eager steps' staging buffers for the CPU hand-off (graph sets have their own)."""
        self._handoff = torch.cuda.Event() if self.device.type == "cuda" else None
        """Recorded after a split layer's front part: the CPU worker waits on it."""
        self._shapes = None
        """`hybrid` with step_shape "auto": picks split or subbatch per situation, measured."""
        self.step_shape = cfg.step_shape
        self._cpu_share = self._cpu_row_share()
        self._offloaded: dict[int, int] = {}      # request -> full pages known to be on the host
        self._coverage: Optional[Coverage] = None  # the page cache's coverage, known on the host
        self._nonfinite: set[int] = set()         # requests that ever wrote NaN / inf K/V
        self._nonfinite_step: set[int] = set()
        self._last: dict = {}
        self._totals: dict = {}
        log.info("vortex_hybrid runtime: placement %s, %s; capacity %d tokens", self.placement,
                 self.memory.describe(), self.capacity()["tokens"])
        hint = summary_hint(cfg, self.memory)
        if hint:
            log.warning("vortex_hybrid runtime: %s", hint)

    def _cpu_threads(self, reserved: int) -> int:
        """Threads of the CPU attention: `cfg.cpu_threads`, else the cores less `reserved` (the
        thread driving the GPU; whole steps' hand-off worker too)."""
        return self.cfg.cpu_threads or max(1, (os.cpu_count() or reserved + 1) - reserved)

    def _prior_reuse(self):
        """Per layer, the selection reuse the calibration measured (mean over KV heads): the GPU
        page cache's estimate for a request before its own is measured (quotas, and the hybrid
        split's amortised fetch cost); None without a calibration (optimistic 1)."""
        cal = self.calibration
        reuse = None if cal is None else (cal.extra.get("properties") or {}).get("reuse")
        if reuse is None:
            return None
        per_layer = np.asarray(reuse, dtype=np.float64)
        if per_layer.shape != (cal.num_layers, cal.num_kv_heads):
            return None
        return np.clip(per_layer.mean(1), 0.0, 1.0)

    # ---- the open step: refused changes, undo ----------------------------------------------
    def _open(self, step: Optional[StepPlan]) -> bool:
        """Whether `step` is planned or running (layers still to run; a whole step: until
        finish_step(), with or without wait)."""
        if step is None:
            return False
        return not (step.finished or step.deferred) if step.whole else \
            step.next_layer < self.num_layers

    def _check_between_steps(self, what: str) -> None:
        """Refuse a change of requests while a step is planned or running: the step's tables,
        write targets and selections were fixed by plan() over the requests as they were. A step
        ended with finish_step(wait=False) is completed first (its failure raises here)."""
        self.complete_step()
        step = self._step
        if self._open(step):
            where = "planned (layer 0 not run yet)" if step.next_layer == 0 else \
                f"running (layer {step.next_layer} of {self.num_layers} is next)"
            if step.whole:
                where = "planned whole (finish_step() not called yet)"
            raise ValueError(f"{what} while a step is {where} for requests {step.rids}; run its "
                             "remaining layers or cancel_step() first")

    @torch.inference_mode()
    def cancel_step(self) -> None:
        """Drop the planned or running step: its requests are as before plan() (their new token
        gone), and the GPU page cache as before it, except that slots the step fetched into are
        free again. Nothing to do when no step is open (a step ended with finish_step(wait=False)
        is completed instead: it ran)."""
        self.complete_step()
        step = self._step
        if self._open(step):
            self._abort(step)

    def _abort(self, step: StepPlan) -> None:
        """Undo a step: the page cache's layers whose front part began (each checkpointed itself
        first: `step.fronts`) and its clock, the requests' pages, lengths and summaries
        (checkpoints taken by plan()). The step's counters are never added to the totals."""
        if step.whole:
            self._settle_whole(step)
        self._step = None
        self._coverage = None
        if self._cache is not None and step.cache_rows is not None:
            if step.shape != "cached":      # a cached step's layers change no cache state
                for layer in range(step.fronts):
                    self._cache.restore(layer)
            self._cache.undo_step()
            for rid in step.cache_new:
                self._cache.remove_request(rid)
        self._restore(step.checkpoints, step.offloaded)

    # ---- plan -------------------------------------------------------------------------------
    @torch.inference_mode()
    def plan(self, rids: Sequence[int], whole_step: bool = False,
             fixed: Optional[FixedShape] = None) -> Optional[tuple]:
        """Prepare one decode step for `rids` (batch order = this order): reserve the new token's
        slot, offload pages that filled, build tables, budgets and selection groups. All checks
        happen here. A step planned earlier that no run() followed is replaced, and so is a whole
        step not finished. All or nothing: when it raises, every request is as before
        (`OutOfPagesError` when the pools cannot take the step's new tokens, naming the sizes).

        whole_step: the step's layers will run inside the caller's CUDA graph (`whole_step`);
        returns the key of the graph to replay (None otherwise); `finish_step()` ends the step.
        fixed: with whole_step, a `FixedShape(batch, max_pages)`: the step's tables have that
        shape whatever the requests, so every step with it has one key (`fixed_shape`); rids may
        then hold None (a padding row there; the rows past rids are padding too) or be empty (a
        step of padding only).

        After `finish_step(wait=False)`, that step is completed here once this step's tables are
        built (its host work overlaps the GPU's step) and before its buffers are bound; when it
        failed, this step and then it are undone and its error raised."""
        step = self._step
        prev = step if step is not None and step.awaiting else None
        self.deferred_failure = None
        if self._open(step) and step.next_layer > 0 and not step.whole:
            self._check_between_steps("plan")
        rows = len(rids)
        positions = [i for i, r in enumerate(rids) if r is not None or fixed is None]
        if fixed is not None:                         # None: a padding row
            rids = [r for r in rids if r is not None]
        rids = [self._live(r) for r in rids]
        if not rids and fixed is None:
            raise ValueError("plan([]): a step needs at least one request id (skip the step when "
                             "no request decodes)")
        if len(set(rids)) != len(rids):
            raise ValueError(f"rids lists a request twice: {rids}")
        if fixed is not None:
            check_fixed(self, rids, rows, fixed, whole_step)
        if self._open(step):
            self._abort(step)                         # replaced: nothing of it ran
        self._check_step_room(rids)
        new_pad = fixed is not None and self._pad_page is None
        if new_pad:                                   # once: padding rows' scratch page
            if self.kv.device_alloc.num_free < 1:
                raise OutOfPagesError("a fixed-shape step needs one device page for its padding "
                                      "rows and none is free (finish requests or raise "
                                      "device_pages)")
            self._pad_page = self.kv.device_alloc.alloc(PAD_OWNER, 1)[0]
        host = self.placement in HOST_PLACEMENTS
        checkpoints = [self._checkpoint(r) for r in rids]
        offloaded = {r: self._offloaded.get(r) for r in rids}
        old = [self.kv.seq_len(r) for r in rids]
        step = None
        try:
            if host:
                self._offload_step(rids)
            for rid in rids:
                self.kv.extend(rid, 1)
            shape, key = self._step_shape(len(rids))
            if fixed is not None and shape != self._shape_mode:
                shape = "split"                   # "auto" measures: the key would follow it
            step = build_plan(self, rids, old, self._serial + 1, shape, key,
                              round(self._cpu_share * len(rids)))
            step.checkpoints, step.offloaded = checkpoints, offloaded
            step.launch_order = self._launch_order()
            pad_rows = None
            if self._cache is not None:
                cache = self._cache
                if fixed is not None:             # sized once: the fixed key's generation stays
                    live = fixed.max_requests or self.max_requests
                    gen = cache.generation
                    cache.presize(live + 1, max(16, 1 << (fixed.max_pages - 1).bit_length()))
                    if cache.generation != gen:
                        log.info("vortex_hybrid runtime: page cache state sized for %d requests "
                                 "of %d pages (fixed-shape steps): %.2f GiB", live + 1,
                                 cache.max_pages, cache.state_bytes() / 2**30)
                    pad_rows = cache.rows(to_device(torch.tensor([cache.index_of(PAD_OWNER)]),
                                                    self.device))
                step.cache_new = [r for r in rids if not cache.has(r)]
                cache.reserve(step.dev_table.shape[1])
                rows = cache.rows_of(rids)            # [B x Hkv]: one per KV head
                cache.next_step()                     # last: cache_rows set = the clock moved
                step.cache_rows = rows
                if fixed is None and self._all_cached(rids, rows):
                    self._plan_cached(step, rids)
            if step.shape != "cached":
                self._coverage = None             # its layers may change the cache (replays)
                host_tables_on_device(self, step)
            if fixed is not None:
                step = fixed_step(self, step, fixed, positions, self._pad_page, pad_rows)
            if prev is not None:                  # the step before, still on the GPU so far
                self._finish_whole(prev, undo=False)
                prev = None
            key = self._plan_whole(step) if whole_step else None
        except BaseException:
            if step is None:
                self._restore(checkpoints, offloaded)
            else:
                self._abort(step)                     # nothing of it ran: fronts == 0
            if new_pad:
                self.kv.device_alloc.free(PAD_OWNER, [self._pad_page])
                self._pad_page = None
            if prev is not None:                  # then the step before: undone if it failed,
                self._step = prev                 # else completed (its failure raises there)
                if prev.failed is not None:
                    self.deferred_failure = prev.failed
                    self._abort(prev)
                else:
                    self._finish_whole(prev)
            raise
        self._serial += 1
        self._step = step
        return key

    def _all_cached(self, rids: list[int], rows: torch.Tensor) -> bool:
        """Whether the step can run `cached` (`cfg.cached_steps`): every host page of its requests
        is in the GPU page cache in every layer. A count first; then what the runtime knows
        (`Coverage`: what the last check found, still true while only cached steps and admissions
        into known-free slots changed the cache), else one check on the device
        (`GpuPageCache.coverage`: a synchronisation, only while the batch fits)."""
        if not self.cfg.cached_steps:
            return False
        host = [self._offloaded.get(r, 0) for r in rids]
        if sum(host) * self.num_kv_heads > self._cache.num_slots:
            return False
        known = self._coverage
        if known is not None and known.holds(self._cache, rids, host):
            return True
        pages = torch.as_tensor(host, dtype=torch.int64).repeat_interleave(self.num_kv_heads)
        ok, free = self._cache.coverage(rows, pages.to(self.device), max(host, default=0))
        self._coverage = Coverage(self._cache.version, free, dict(zip(rids, host))) if ok \
            else None
        return ok

    def _plan_cached(self, step: StepPlan, rids: list[int]) -> None:
        """Make `step` a `cached` one: every layer's head table with the cache's slots filled in,
        at once (`cached_heads` [L, B x Hkv, W]: a cached layer then does no table work), and the
        page-heads its layers read from slots: every selected page but each request's pages on the
        device, which are its last ones, always among the `recent` pages the selection keeps."""
        step.cached_heads = with_cache(self._cache.slot_of, step.cache_rows, step.dev_heads,
                                       self._slot_heads)                       # [L, R, W]
        H = self.num_kv_heads
        on_device = sum(self.kv.num_pages(r) - self._offloaded.get(r, 0) for r in rids)
        step.cached_hits = max(0, step.resident_pages - H * on_device)
        step.shape = "cached"

    def _check_step_room(self, rids: list[int]) -> None:
        """Refuse, before anything changes, a step whose new tokens the pools cannot take: a token
        that starts a page needs a device page (host placements first offload the full pages a
        step filled, freeing theirs), and offloading needs host pages."""
        kv, P = self.kv, self.cfg.page_size
        new_pages = sum(1 for r in rids if kv.seq_len(r) % P == 0)
        freed = to_host = 0
        if self.placement in HOST_PLACEMENTS:
            for r in rids:
                start, full = self._offloaded.get(r, 0), kv.num_full_pages(r)
                to_host += full - start
                freed += sum(1 for d, _ in kv.residency(r, start, full) if d >= 0)
            if to_host > kv.host_alloc.num_free:
                raise OutOfPagesError(
                    f"the step offloads {to_host} full pages but {kv.host_alloc.num_free} of "
                    f"{kv.host_alloc.num_pages} host pages are free (finish requests or raise "
                    "host_memory_gib / host_pages)")
        if new_pages > kv.device_alloc.num_free + freed:
            raise OutOfPagesError(
                f"the step's new tokens start {new_pages} pages but {kv.device_alloc.num_free} of "
                f"{kv.device_alloc.num_pages} device pages are free (finish requests or raise "
                "device_pages)")

    def _launch_order(self) -> tuple[str, str]:
        """Which hand-off of a split layer goes first, the CPU worker's or the GPU's: the list
        scheduler's choice (`scheduler.step_shape.launch_order`) from the last step's bytes per
        layer (before any step: the CPU's, the chain that usually ends last)."""
        last = self._last
        if self.placement not in HOST_PLACEMENTS or "bytes_cpu" not in last:
            return ("cpu", "gpu")
        L = self.num_layers
        return launch_order(self._costs, cpu_bytes=last["bytes_cpu"] / L,
                            fetch_bytes=last["bytes_h2d"] / L,
                            gpu_bytes=last["gpu_pages"] * self._head_bytes / L,
                            launch_s=self._costs.gpu_launch_s)

    @property
    def selection_captures(self) -> bool:
        """Whether the step's page selection can run inside a CUDA graph: `dense` selects nothing;
        the other placements need the flow's fused indexer kernel (its interpreter synchronises)."""
        return self.placement == "dense" or self.store.bound.indexer_kernel is not None

    @property
    def step_shape(self) -> str:
        """The `hybrid` placement's step shape (config.STEP_SHAPES), settable between steps (for
        benchmarks and research: one instance measured in each shape)."""
        return self._shape_mode

    @step_shape.setter
    def step_shape(self, shape: str) -> None:
        if shape not in STEP_SHAPES:
            raise ValueError(f"step_shape={shape!r} must be one of {list(STEP_SHAPES)}")
        self._check_between_steps("setting step_shape")
        self._shape_mode = shape
        if shape == "auto" and self.placement == "hybrid" and self._shapes is None:
            self._shapes = ShapeChooser()

    def _step_shape(self, batch: int) -> tuple[str, tuple]:
        """This step's shape and its situation key (placement, batch size rounded up to a power
        of two). Only `hybrid` has a choice; the others run "split"."""
        key = (self.placement, 1 << max(batch - 1, 0).bit_length())
        if self.placement != "hybrid":
            return "split", key
        if self._shape_mode != "auto":
            return self._shape_mode, key
        return self._shapes.choose(key), key

    def _cpu_row_share(self) -> float:
        """Share of a `subbatch` step's requests given to the CPU: per request, the CPU reads the
        page-heads selected (concurrent CPU bandwidth) where a fetch copies the same page-heads
        over the link (concurrent PCIe bandwidth; the cache holds (page, KV head) slots); the
        shares that make both finish together when nothing is cached (the GPU cache only shortens
        the fetches)."""
        cpu = 1 / self._live_cpu.value
        fetch = 1 / self._costs.h2d_bw_concurrent
        return fetch / (cpu + fetch)

    # ---- run --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            sel: Optional[torch.Tensor] = None, *, check_sel: bool = True) -> torch.Tensor:
        """Append this layer's new token, select, partition, attend and merge: o [B, Hq, D] in q's
        dtype. Layers run in order 0..num_layers-1 after `plan`.

        sel (research and benchmarks: replaying recorded selections): int [B, Hkv, K] logical pages
        of each request after this step's token, -1 padded, unique per row; attended instead of
        the flow's selection (not with `dense`). Checked here, which synchronises the GPU;
        check_sel=False skips the value checks (for a caller that checked its selections once).

        `run` is `run_end(run_begin(...))`: a caller with other GPU work to put between the two
        (another micro-batch's layer, `runtime.micro_batches`) calls them apart."""
        return self.run_end(self.run_begin(layer, q, k_new, v_new, sel, check_sel=check_sel))

    @torch.inference_mode()
    def run_begin(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                  sel: Optional[torch.Tensor] = None, *, check_sel: bool = True) -> PendingLayer:
        """The first half of `run` (same arguments): in a whole step of a host placement, the
        GPU's part up to its wait for the CPU (append, select, partition, hand the host's share to
        the CPU worker, fetch, attend what the GPU holds); `run_end` waits for the CPU's answer and
        merges. The CPU attends meanwhile, so GPU work the caller enqueues between the two (another
        runtime's layer) overlaps it. Anywhere else the whole layer runs here. One layer at a time:
        the next run_begin comes after this one's run_end."""
        step = self._step
        if not self._open(step):
            raise ValueError("run() needs a plan(): call plan(rids) once before layer 0 of each step")
        if step.pending is not None:
            raise ValueError(f"run_begin(layer={layer!r}) while layer {step.pending.layer} is begun "
                             "and not ended: call run_end() on it first")
        if layer != step.next_layer:
            raise ValueError(f"layer={layer!r}: layers run in order; layer {step.next_layer} is next")
        B = step.batch
        self._check_inputs(B, q, k_new, v_new)
        if sel is not None and step.fixed is not None:
            raise ValueError("sel= is not taken by a fixed-shape step (plan(fixed=...)); plan "
                             "without fixed= to attend a given selection")
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and not step.whole:
            raise ValueError("run() inside a CUDA graph capture needs a step planned with "
                             "plan(rids, whole_step=True)")
        if sel is not None:
            sel = self._check_sel(step, sel, check_sel and not capturing)
        if step.whole:
            if not capturing:
                step.fronts = layer + 1     # runs now: its cache layer is checkpointed first
            try:
                pending = self._begin_whole(step, layer, q, k_new, v_new, sel)
            except BaseException:
                self._abort(step)
                raise
            step.pending = pending
            return pending
        t0 = time.perf_counter()
        if layer == 0:
            step.t_start = t0
        try:
            with (self.trace or NO_TRACE).host(layer, "run()"):
                o = self._run_layer(step, layer, q, k_new, v_new, sel)
        except BaseException:
            self._abort(step)               # the whole step is undone: plan() again to retry
            raise
        step.next_layer += 1
        step.counters["step_host_s"] += time.perf_counter() - t0
        if step.next_layer == self.num_layers:
            flags = step.nonfinite
            bound = self._graphs.bound_set(step) if self._graphs is not None else None
            if bound is not None:
                flags = flags | bound.step.nonfinite
            self._end_step(step, torch.cat([step.counts, flags.to(torch.int64)]).tolist())
        return PendingLayer(layer, out=o)

    @torch.inference_mode()
    def run_end(self, pending: PendingLayer) -> torch.Tensor:
        """The second half of `run` for a layer `run_begin` returned: o [B, Hq, D] in q's dtype."""
        if not isinstance(pending, PendingLayer):
            raise ValueError(f"run_end() takes what run_begin() returned, got "
                             f"{type(pending).__name__}")
        if pending.out is not None:
            return pending.out
        step = self._step
        if step is None or step.pending is not pending:
            raise ValueError(f"run_end(): layer {pending.layer} is not the layer begun in this "
                             "runtime's open step (ended already, or its step was undone)")
        try:
            o = self._end_whole(step, pending)
        except BaseException:
            self._abort(step)
            raise
        step.pending = None
        step.next_layer += 1
        return o

    def _end_step(self, step: StepPlan, read: list) -> None:
        """Add a completed step's counters to the stats: `read` = its device counts (COUNTS) then
        its per-request NaN flags, read in the step's one synchronisation."""
        c = dict(step.counters)
        for name, v in zip(COUNTS, read):
            c[name] += v
        flags = read[len(COUNTS):]
        if step.positions is not None:          # a fixed-shape step: rows, padding among them
            flags = [flags[p] for p in step.positions]
        self._report_nonfinite([r for r, bad in zip(step.rids, flags) if bad])
        c["bytes_h2d"] = c["fetched_pages"] * self._head_bytes      # page-heads fetched
        c["bytes_cpu"] = c["cpu_pages"] * self._head_bytes
        if c["cpu_kernel_s"]:
            self._live_cpu.observe(c["bytes_cpu"], c["cpu_kernel_s"], c.get("cpu_calls", 0))
        c["steps_" + step.shape] = 1
        if self._shape_mode == "auto" and self.placement == "hybrid" and not step.whole and \
                step.shape != "cached":
            self._shapes.record(step.shape_key, step.shape,
                                (time.perf_counter() - step.t_start) / self.num_layers)
        step.counters = c
        self._last = dict(c)
        for k, v in step.counters.items():
            self._totals[k] = self._totals.get(k, 0) + v
        self._totals["steps"] = self._totals.get("steps", 0) + 1
        self._last["step_shape"] = step.shape
        self._last["nonfinite_requests"] = sorted(self._nonfinite_step)
        self._totals["nonfinite_requests"] = sorted(self._nonfinite)

    def _report_nonfinite(self, rids: list[int]) -> None:
        """Requests whose step token wrote NaN or inf K/V: named in a warning (once per request)
        and in stats(); their later steps attend that token, so their outputs are NaN too."""
        self._nonfinite_step = set(rids)
        new = [r for r in rids if r not in self._nonfinite]
        if new:
            log.warning("requests %s wrote NaN or inf K/V in this step (the model's k/v for "
                        "run()); their attention outputs will not be finite", new)
        self._nonfinite.update(rids)

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

    def _check_sel(self, step: StepPlan, sel, values: bool = True) -> torch.Tensor:
        B = step.batch
        if self.placement == "dense":
            raise ValueError("sel= is for sparse placements; placement 'dense' attends every page")
        if not isinstance(sel, torch.Tensor) or sel.dim() != 3 or \
                tuple(sel.shape[:2]) != (B, self.num_kv_heads) or \
                sel.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sel must be an int32 tensor [{B}, {self.num_kv_heads}, K], got "
                             f"{getattr(sel, 'dtype', type(sel).__name__)} "
                             f"{tuple(getattr(sel, 'shape', ()))}")
        sel = sel.to(self.device, torch.int32)
        if not values:
            return sel
        check_sel_values(sel, pages_of(step.lens, self.cfg.page_size), step.rids)
        return sel

    def _run_layer(self, step: StepPlan, layer: int, q, k_new, v_new, sel=None) -> torch.Tensor:
        graphs = self._graphs.bind(step, sel) if self._graphs is not None else None
        cached = step.shape == "cached"     # every host page cached: as `gpu` over the cache
        if cached or self.placement == "gpu" or (self.placement == "dense" and sel is None):
            inputs = dict(q=q, k_new=k_new, v_new=v_new)
            if sel is not None:
                inputs["sel"] = sel
            out = None
            if graphs is not None:
                with (self.trace or NO_TRACE).gpu(layer, "graph replay"):
                    out = self._replay(graphs, layer, "layer", self._resident_part(layer),
                                       **inputs)
            if out is not None:
                out = (out[0].clone(),) + tuple(out[1:])    # the graph's static output
            else:
                self._append(step, layer, k_new, v_new)
                with (self.trace or NO_TRACE).gpu(layer, "select + attend"):
                    out = self.attend_whole(step, layer, q, sel)
            o = out[0]
            if len(out) > 1:                # a given selection: counted on the device
                step.counts += out[1]
            else:
                step.counters["gpu_pages"] += step.resident_pages
                step.counters["cache_hits"] += step.cached_hits
        else:
            o = self._attend_split(step, layer, q, k_new, v_new, sel, graphs)
        self._summarize_filled(step, layer)
        return o

    def _append(self, step: StepPlan, layer: int, k_new, v_new) -> None:
        """Write the batch's new token of this layer and flag the rows whose K or V is not finite
        (`step.nonfinite`, read with the step's counters): on CUDA one kernel
        (`gpu_kernels.append_tokens`), else two index_puts and the reductions."""
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        k_new, v_new = k_new.to(k_pool.dtype), v_new.to(v_pool.dtype)
        if self.device.type == "cuda":
            from ..gpu_kernels.append_tokens import launch_append_tokens
            launch_append_tokens(k_new.contiguous(), v_new.contiguous(), k_pool, v_pool,
                                 step.write_pages, step.write_offs, step.nonfinite)
            return
        step.nonfinite |= ~(torch.isfinite(k_new).flatten(1).all(1) &
                            torch.isfinite(v_new).flatten(1).all(1))
        k_pool[step.write_pages, :, step.write_offs] = k_new
        v_pool[step.write_pages, :, step.write_offs] = v_new

    def _summarize_filled(self, step: StepPlan, layer: int) -> None:
        """Summaries of the pages this step's token filled. After attention is fine: such a page
        is its request's last page, always among the `recent` pages, so its score is not used."""
        if self.store is not None and step.filled_pages.numel():
            self.store.compute_rows(layer, self.kv.device_pool.k[layer], step.filled_pages,
                                    step.filled_rows)

    @staticmethod
    def _replay(graphs, layer: int, part: str, body, state=(), **inputs) -> Optional[tuple]:
        """The part's outputs from its CUDA graph, or None when there are no graphs or the part
        cannot be captured (the caller then runs it eagerly)."""
        if graphs is None:
            return None
        try:
            return graphs.run(layer, part, body, state, **inputs)
        except CaptureFailed:
            return None

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
        host time of the step's run() calls; in `hybrid` also "cpu_attn_bw", the CPU attention
        rate in bytes/s its split plans with, and "cpu_call_s", the fixed cost of a CPU call in
        seconds it plans with (`scheduler.live_rate`: the cost model's figures, then what the
        steps measure)."""
        self.complete_step()                # a step ended with finish_step(wait=False)
        out = {"last_step": dict(self._last), "totals": dict(self._totals)}
        if self.placement == "hybrid":      # the CPU rate and call cost its split now plans with
            out["cpu_attn_bw"] = self._live_cpu.value
            out["cpu_call_s"] = self._live_cpu.call_s
        return out

    def close(self) -> None:
        """Stop the CPU worker and release the pools, summaries, page cache and graphs now (not
        when the garbage collector finds the object): a runtime built next gets this memory.
        Nothing may be called on the runtime afterwards. A step ended with finish_step(wait=False)
        is waited for first (a failure of it is logged, not raised)."""
        try:
            self.complete_step()
        except Exception as exc:            # noqa: BLE001 - closing anyway; the step is undone
            log.warning("vortex_hybrid runtime: the last step failed while closing: %s", exc)
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._whole_handoff is not None:
            if self._handoff_owned:
                self._whole_handoff.close()
            self._whole_handoff = None
        self._step = None
        self._graphs = self._cache = self.store = self.head_budgets = None
        self._slot_pages = self._slot_heads = None
        if self.kv is not None:
            for pool in (self.kv.device_pool, self.kv.host_pool):
                pool.k = pool.v = None
            self.kv = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _TorchGpu:
    """The GPU side without CUDA: the torch reference (float32 states)."""

    @staticmethod
    def attend(q, k_pool, v_pool, table, lens, sel):
        return reference.sparse_decode_attention(q, k_pool, v_pool, table, lens, sel)

    @staticmethod
    def merge(o_a, lse_a, o_b, lse_b):
        return reference.merge_states(o_a, lse_a, o_b, lse_b)
