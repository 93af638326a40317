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

The GPU page cache is per layer: `cfg.gpu_cache_pages` device-pool pages reserved at start-up serve as
slots, and `scheduler.gpu_page_cache.GpuPageCache` (state on the device) decides hits, fetches and
evictions (pages in use this step are never evicted; the host copy stays authoritative, so an
eviction loses nothing). Without CUDA
the "GPU" side is the torch reference on the CPU, so the same logic runs in CI.

The four calls that touch state (add_request, plan, run, remove_request) run in
`torch.inference_mode()`, so the runtime's state is created and changed the same way whether the
caller runs under inference mode or not; outputs are inference tensors (inputs anywhere, no autograd).
"""

from __future__ import annotations

import logging
import math
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
from ..kv.errors import OutOfPagesError, PageOwnershipError, UnknownRequestError
from ..kv.paged_kv_cache import Checkpoint, PagedKVCache, default_device
from ..scheduler import cost_model
from ..scheduler.gpu_page_cache import GpuPageCache
from ..scheduler.step_shape import ShapeChooser, launch_order
from ..vflow.registry import load_flow
from ..vflow.summary_store import SummaryStore
from .cpu_worker import CpuWorker, HostBuffers
from .head_budgets import HeadBudgets
from .layer_graphs import CaptureFailed, LayerGraphs
from .memory_model import HOST_PLACEMENTS, plan_memory
from .step_plan import StepPlan, build_plan
from .step_trace import NO_TRACE, StepTrace

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


class HybridAttention:
    """Hybrid sparse decode attention for one model; see the module docstring.

    device_pages / host_pages size the pools (defaults: `dense`/`gpu` keep every page in HBM and
    take `cfg.gpu_cache_pages` device pages and no host pages; host placements take TAIL_PAGES +
    `cfg.gpu_cache_pages` device pages and host pages filling `cfg.host_memory_gib`, or
    8 x `cfg.gpu_cache_pages` when it is None). device: where the GPU side runs (default: CUDA if
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
                                      dtype=getattr(torch, cfg.summary_dtype))
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
        self._cache = GpuPageCache(L, slots, self.device, prior_reuse=self._prior_reuse()) \
            if slots else None
        if costs is None:           # this machine's figures; logs once those that are defaults
            costs = cost_model.costs_for(self.placement)
        self._costs = costs
        self._worker = None
        if host:
            from .. import cpu_kernels
            # The thread driving the GPU needs a core: Numba gets the rest unless set in cfg.
            cpu_kernels.set_cpu_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
            self._worker = CpuWorker()
        self._gpu = self._gpu_backend()
        self._step: Optional[StepPlan] = None
        self.trace: Optional[StepTrace] = None
        """Set to a `StepTrace` to record a timeline of the steps that follow (docs/runtime.md)."""
        self._serial = 0
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda" and (
                self.store is None or self.store.device.type == "cuda"):
            self._graphs = LayerGraphs(self)
        self._pinned = HostBuffers(pin=self.device.type == "cuda")
        """Eager steps' staging buffers for the CPU hand-off (graph sets have their own)."""
        self._handoff = torch.cuda.Event() if self.device.type == "cuda" else None
        """Recorded after a split layer's front part: the CPU worker waits on it."""
        self._shapes = None
        """`hybrid` with step_shape "auto": picks split or subbatch per situation, measured."""
        self.step_shape = cfg.step_shape
        self._cpu_share = self._cpu_row_share()
        self._offloaded: dict[int, int] = {}      # request -> full pages known to be on the host
        self._nonfinite: set[int] = set()         # requests that ever wrote NaN / inf K/V
        self._nonfinite_step: set[int] = set()
        self._last: dict = {}
        self._totals: dict = {}
        log.info("vortex_hybrid runtime: placement %s, %s; capacity %d tokens", self.placement,
                 self.memory.describe(), self.capacity()["tokens"])

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

    # ---- requests ---------------------------------------------------------------------------
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
        except BaseException:
            self.kv.free_request(rid)
            self._offloaded.pop(rid, None)
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
        try:
            self._fill(rid, k, v)
        except BaseException:
            self._restore([cp], {rid: offloaded})
            raise

    def _live(self, rid) -> int:
        """`rid` as an int, checked to be a live request (`UnknownRequestError`, a ValueError)."""
        try:
            r = operator.index(rid)
        except TypeError:
            raise ValueError(f"request id {rid!r} must be an integer") from None
        if r not in self.kv.request_ids:
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

    @property
    def max_requests(self) -> Optional[int]:
        """Host placements: how many requests the device pool's tail pages serve at once (each
        request keeps its partly filled last page on the device, and a prefill streams through one
        more page); None for `dense`/`gpu` (bounded by pages only)."""
        if self.placement not in HOST_PLACEMENTS:
            return None
        return self.kv.device_alloc.num_pages - self._slot_pages.numel() - 1

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
        for name, t in (("k", k), ("v", v)):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):                 # one sync per prefill, never per decode step
                layer, pos, head, _ = (int(i) for i in bad.nonzero()[0])
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

    @torch.inference_mode()
    def remove_request(self, rid: int) -> None:
        """Free a request's device, host, cache and summary pages. Refused for a request of a step
        that is planned or running (other requests may go: the step uses none of their pages)."""
        rid = self._live(rid)
        step = self._step
        if self._open(step) and rid in step.rids:
            raise ValueError(f"request {rid} is in the current step (layers {step.next_layer}.."
                             f"{self.num_layers - 1} still to run); remove it after the step, or "
                             "cancel_step() first")
        self.kv.free_request(rid)
        self._offloaded.pop(rid, None)
        if self._cache is not None:
            self._cache.remove_request(rid)

    def _offload_full(self, rid: int) -> None:
        """Move the request's full pages that are still device-only to host memory (pages below
        `_offloaded[rid]` already are: no scan of the whole request per step)."""
        full = self.kv.num_full_pages(rid)
        start = self._offloaded.get(rid, 0)
        if full > start:
            self.kv.offload(rid, range(start, full))
        self._offloaded[rid] = full

    def _open(self, step: Optional[StepPlan]) -> bool:
        """Whether `step` is planned or running (layers still to run)."""
        return step is not None and step.next_layer < self.num_layers

    def _check_between_steps(self, what: str) -> None:
        """Refuse a change of requests while a step is planned or running: the step's tables,
        write targets and selections were fixed by plan() over the requests as they were."""
        step = self._step
        if self._open(step):
            where = "planned (layer 0 not run yet)" if step.next_layer == 0 else \
                f"running (layer {step.next_layer} of {self.num_layers} is next)"
            raise ValueError(f"{what} while a step is {where} for requests {step.rids}; run its "
                             "remaining layers or cancel_step() first")

    @torch.inference_mode()
    def cancel_step(self) -> None:
        """Drop the planned or running step: its requests are as before plan() (their new token
        gone), and the GPU page cache as before it, except that slots the step fetched into are
        free again. Nothing to do when no step is open."""
        step = self._step
        if self._open(step):
            self._abort(step, step.next_layer - 1)

    def _abort(self, step: StepPlan, last_layer: int) -> None:
        """Undo a step whose layers up to `last_layer` ran (or began): the page cache's layers
        0..last_layer and its clock, the requests' pages, lengths and summaries (checkpoints
        taken by plan()). The step's counters are never added to the totals."""
        self._step = None
        if self._cache is not None and step.cache_rows is not None:
            for layer in range(last_layer + 1):
                self._cache.restore(layer)
            self._cache.undo_step()
            for rid in step.cache_new:
                self._cache.remove_request(rid)
        self._restore(step.checkpoints, step.offloaded)

    # ---- plan -------------------------------------------------------------------------------
    @torch.inference_mode()
    def plan(self, rids: Sequence[int]) -> None:
        """Prepare one decode step for `rids` (batch order = this order): reserve the new token's
        slot, offload pages that filled, build tables, budgets and selection groups. All checks
        happen here. A step planned earlier that no run() followed is replaced. All or nothing:
        when it raises, every request is as before (`OutOfPagesError` when the pools cannot take
        the step's new tokens, naming the sizes)."""
        step = self._step
        if self._open(step) and step.next_layer > 0:
            self._check_between_steps("plan")
        rids = [self._live(r) for r in rids]
        if not rids:
            raise ValueError("plan([]): a step needs at least one request id (skip the step when "
                             "no request decodes)")
        if len(set(rids)) != len(rids):
            raise ValueError(f"rids lists a request twice: {rids}")
        if self._open(step):
            self._abort(step, -1)                     # replaced: nothing of it ran
        self._check_step_room(rids)
        host = self.placement in HOST_PLACEMENTS
        checkpoints = [self._checkpoint(r) for r in rids]
        offloaded = {r: self._offloaded.get(r) for r in rids}
        old = [self.kv.seq_len(r) for r in rids]
        step = None
        try:
            if host:
                for rid in rids:
                    self._offload_full(rid)
            for rid in rids:
                self.kv.extend(rid, 1)
            shape, key = self._step_shape(len(rids))
            step = build_plan(self, rids, old, self._serial + 1, shape, key,
                              round(self._cpu_share * len(rids)))
            step.checkpoints, step.offloaded = checkpoints, offloaded
            step.launch_order = self._launch_order()
            if self._cache is not None:
                cache = self._cache
                step.cache_new = [r for r in rids if not cache.has(r)]
                cache.reserve(step.dev_table.shape[1])
                rows = [cache.index_of(r) for r in rids]
                cache.next_step()
                step.cache_rows = torch.as_tensor(rows, dtype=torch.int64).to(self.device)
        except BaseException:
            if self._cache is not None and step is not None:
                if step.cache_rows is not None:
                    self._cache.undo_step()
                for rid in step.cache_new:
                    self._cache.remove_request(rid)
            self._restore(checkpoints, offloaded)
            raise
        self._serial += 1
        self._step = step

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
                freed += sum(1 for d, _ in kv.residency(r)[start:full] if d >= 0)
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
        page-heads selected (concurrent CPU bandwidth) where a fetch copies every KV head of each
        page (concurrent PCIe bandwidth); the shares that make both finish together when heads
        select different pages and nothing is cached (the GPU cache only shortens the fetches)."""
        cpu = 1 / self._costs.cpu_attn_bw_concurrent
        fetch = self.num_kv_heads / self._costs.h2d_bw_concurrent
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
        check_sel=False skips the value checks (for a caller that checked its selections once)."""
        step = self._step
        if not self._open(step):
            raise ValueError("run() needs a plan(): call plan(rids) once before layer 0 of each step")
        if layer != step.next_layer:
            raise ValueError(f"layer={layer!r}: layers run in order; layer {step.next_layer} is next")
        B = len(step.rids)
        self._check_inputs(B, q, k_new, v_new)
        if sel is not None:
            sel = self._check_sel(step, sel, check_sel)
        t0 = time.perf_counter()
        if layer == 0:
            step.t_start = t0
        try:
            with (self.trace or NO_TRACE).host(layer, "run()"):
                o = self._run_layer(step, layer, q, k_new, v_new, sel)
        except BaseException:
            self._abort(step, layer)        # the whole step is undone: plan() again to retry
            raise
        step.next_layer += 1
        step.counters["step_host_s"] += time.perf_counter() - t0
        if step.next_layer == self.num_layers:
            c = dict(step.counters)
            flags = step.nonfinite
            bound = self._graphs.bound_set(step) if self._graphs is not None else None
            if bound is not None:
                flags = flags | bound.step.nonfinite
            read = torch.cat([step.counts, flags.to(torch.int64)]).tolist()   # the one sync
            for name, v in zip(COUNTS, read):
                c[name] += v
            self._report_nonfinite([r for r, bad in zip(step.rids, read[len(COUNTS):]) if bad])
            c["bytes_h2d"] = c["fetched_pages"] * self._head_bytes * self.num_kv_heads
            c["bytes_cpu"] = c["cpu_pages"] * self._head_bytes
            c["steps_" + step.shape] = 1
            if self._shape_mode == "auto" and self.placement == "hybrid":
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
        return o

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
        if not values:
            return sel
        check_sel_values(sel, pages_of(step.lens, self.cfg.page_size), step.rids)
        return sel

    def _run_layer(self, step: StepPlan, layer: int, q, k_new, v_new, sel=None) -> torch.Tensor:
        graphs = self._graphs.bind(step, sel) if self._graphs is not None else None
        if self.placement in ("dense", "gpu") and sel is None:
            out = None
            if graphs is not None:
                with (self.trace or NO_TRACE).gpu(layer, "graph replay"):
                    out = self._replay(graphs, layer, "layer", self._resident_part(layer),
                                       q=q, k_new=k_new, v_new=v_new)
            o = None if out is None else out[0].clone()
            if o is None:
                self._append(step, layer, k_new, v_new)
                with (self.trace or NO_TRACE).gpu(layer, "select + attend"):
                    o = self.attend_resident(step, layer, q)
            step.counters["gpu_pages"] += step.resident_pages
        else:
            o = self._attend_split(step, layer, q, k_new, v_new, sel, graphs)
        self._summarize_filled(step, layer)
        return o

    def _resident_part(self, layer: int):
        def body(step: StepPlan, inp: dict) -> tuple:
            self._append(step, layer, inp["k_new"], inp["v_new"])
            return (self.attend_resident(step, layer, inp["q"]),)
        return body

    def _append(self, step: StepPlan, layer: int, k_new, v_new) -> None:
        """Write the batch's new token of this layer (one index_put for K, one for V), and flag the
        rows whose K or V is not finite (`step.nonfinite`, read with the step's counters)."""
        step.nonfinite |= ~(torch.isfinite(k_new).flatten(1).all(1) &
                            torch.isfinite(v_new).flatten(1).all(1))
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        k_pool[step.write_pages, :, step.write_offs] = k_new.to(k_pool.dtype)
        v_pool[step.write_pages, :, step.write_offs] = v_new.to(v_pool.dtype)

    def _summarize_filled(self, step: StepPlan, layer: int) -> None:
        """Summaries of the pages this step's token filled. After attention is fine: such a page
        is its request's last page, always among the `recent` pages, so its score is not used."""
        if self.store is not None and step.filled_pages.numel():
            self.store.compute_rows(layer, self.kv.device_pool.k[layer], step.filled_pages,
                                    step.filled_rows)

    def attend_resident(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        """`dense` and `gpu`: every page is in the device pool; select (gpu) and attend. Pure GPU
        work on the step's tensors: what `layer_graphs` captures."""
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        if self.placement == "dense":
            sel = reference.all_pages_sel(step.lens, self.num_kv_heads, step.dev_table.shape[1],
                                          self.cfg.page_size)
        else:
            sel = self._select(step, layer, q)
        o, _ = self._gpu.attend(q, k_pool, v_pool, step.dev_table, step.lens, sel)
        return o.to(q.dtype)

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
        with tr.gpu(layer, "select + partition + cache"):
            front = self._replay(graphs, layer, "front",
                                 self._front_part(layer, graphs.pinned) if graphs else None,
                                 self._cache_state(layer), **inputs)
            if front is None:               # the back part then runs eagerly too
                graphs = None
                front = self._front(step, layer, q, k_new, v_new, sel, self._pinned)
        gsel, table, src, dst, counts, q_host, sel_host = front
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
                o_c, lse_c, n_host = part
                c["cpu_pages"] += n_host
                with tr.gpu(layer, "merge"):
                    o, lse = self._gpu.merge(o, lse, o_c.to(self.device), lse_c.to(self.device))
                return o.to(q.dtype)
        return o.to(q.dtype) if graphs is None or o.dtype != q.dtype else o.clone()

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

    def _front(self, step: StepPlan, layer: int, q, k_new, v_new, sel, pinned) -> tuple:
        """Append, select, partition (GPU page cache, hybrid split), and copy the host's part of
        the selection and q to pinned buffers for the CPU worker. No sync. Returns (the GPU's
        selection, its page table, fetch sources, fetch destinations (-1: none), counts [5], q and
        the selection on the host). The page cache's layer is checkpointed first (for a failed
        step's undo)."""
        if self._cache is not None:
            self._cache.checkpoint(layer)
        self._append(step, layer, k_new, v_new)
        if sel is None:
            sel = self._select(step, layer, q)
        chosen = sel >= 0
        flat = sel.clamp_min(0).flatten(1).to(torch.int64)                # [B, Hkv * K]
        table, src, dst = step.dev_table, None, None
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        cache_counts = [zero] * 4                 # fetched, hits, misses, evictions
        if self._cache is not None:
            table, src, dst, cache_counts = self._cache_table(step, layer, sel, chosen, flat, table)
        on_gpu = chosen & (torch.gather(table, 1, flat).view_as(sel) >= 0)
        counts = torch.stack([on_gpu.sum(), *cache_counts])
        q_host = sel_host = None
        if self.placement != "gpu":
            host_sel = torch.where(chosen & ~on_gpu, sel, -1)
            if self.device.type == "cuda":
                q_host = pinned.get("q", q.shape, q.dtype)
                sel_host = pinned.get("sel", host_sel.shape, host_sel.dtype)
                q_host.copy_(q, non_blocking=True)
                sel_host.copy_(host_sel, non_blocking=True)
            else:
                q_host, sel_host = q, host_sel
        return torch.where(on_gpu, sel, -1), table, src, dst, counts, q_host, sel_host

    def _back(self, step: StepPlan, layer: int, q, gsel, table, src, dst) -> tuple:
        """Fetch the pages the front chose into their slots, then attend what the GPU holds."""
        if src is not None:
            self._copy_pages(layer, src, dst)
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        return self._gpu.attend(q, k_pool, v_pool, table, step.lens, gsel)

    def _select(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        """sel int32 [B, Hkv, width]: each row at its own budget (-1 padded to the widest); with a
        calibration, each (row, KV head) at its own (`head_budgets`)."""
        B = len(step.rids)
        if step.passes is not None:
            return self._select_per_head(step, layer, q)
        if len(step.groups) == 1:
            (budget, _), = step.groups.items()
            return self.store.index(layer, q, step.s_table, step.s_lens, budget,
                                    self.cfg.sink_pages, self.cfg.recent_pages, check=False)
        sel = torch.full((B, self.num_kv_heads, step.width), -1, dtype=torch.int32,
                         device=self.device)
        for budget, rows in step.groups.items():
            part = self.store.index(layer, q[rows.to(q.device)], step.s_table[rows],
                                    step.s_lens[rows], budget, self.cfg.sink_pages,
                                    self.cfg.recent_pages, check=False)
            sel[rows.to(self.device), :, :budget] = part
        return sel

    def _select_per_head(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        sel = torch.full((len(step.rids), self.num_kv_heads, step.width), -1, dtype=torch.int32,
                         device=self.device)
        for p in step.passes[layer]:
            if p.rows is None:
                part = self.store.index(layer, q, step.s_table, step.s_lens, p.budget,
                                        self.cfg.sink_pages, self.cfg.recent_pages, check=False)
                sel[:, :, :p.budget] = torch.where(p.keep[:, :, None], part, sel[:, :, :p.budget])
                continue
            part = self.store.index(layer, q[p.rows.to(q.device)], step.s_table[p.rows_store],
                                    step.s_lens[p.rows_store], p.budget, self.cfg.sink_pages,
                                    self.cfg.recent_pages, check=False)
            cur = sel[p.rows, :, :p.budget]
            sel[p.rows, :, :p.budget] = torch.where(p.keep[:, :, None], part.to(self.device), cur)
        return sel

    def _cache_table(self, step: StepPlan, layer: int, sel, chosen, flat, dev_table) -> tuple:
        """This layer's table with the GPU page cache, and the copy to make: host pages that are
        cached map to their slots; misses chosen for fetching get slots, and (src host pages, dst
        device pages, -1 where unused) is returned for the back part to copy (one copy per page);
        the rest stays with the CPU. All on the device, no sync; counts (fetched, hits, misses,
        evictions) as device scalars."""
        cache = self._cache
        B, W = dev_table.shape
        slots = cache.table(layer, step.cache_rows, W)
        host_sel = chosen & (torch.gather(dev_table, 1, flat).view_as(sel) < 0)   # host pages
        heads = torch.zeros(B, W, dtype=torch.int32, device=self.device)
        heads.scatter_add_(1, flat, host_sel.flatten(1).to(torch.int32))      # heads per page
        wanted = heads > 0
        if self.placement == "offload":
            to_fetch = wanted
        elif step.shape == "subbatch":          # the CPU's sub-batch fetches nothing
            to_fetch = wanted & (slots < 0) & ~step.cpu_rows[:, None]
        else:
            reuse = cache.reuse[layer].index_select(0, step.cache_rows)       # last step's
            to_fetch = self._hybrid_fetch(heads, wanted & (slots < 0), reuse, wanted.sum())
        plan = cache.step(layer, step.cache_rows, slots, wanted, to_fetch)
        ok = plan.slots >= 0
        src = torch.where(ok, step.host_table_dev[plan.rows.clamp_min(0), plan.pages.clamp_min(0)]
                          .to(torch.int64), -1)
        dst = torch.where(ok, self._slot_pages[plan.slots.clamp_min(0)], -1)
        slots = cache.table(layer, step.cache_rows, W)                    # with this step's fetches
        cached = torch.where(slots >= 0, self._slot_pages[slots.clamp_min(0).to(torch.int64)], -1)
        table = torch.where(dev_table >= 0, dev_table, cached.to(dev_table.dtype))
        return table, src, dst, [plan.count, plan.hits, plan.misses, plan.evictions]

    def _hybrid_fetch(self, heads: torch.Tensor, misses: torch.Tensor, reuse: torch.Tensor,
                      wanted: torch.Tensor) -> torch.Tensor:
        """Which misses to fetch. The CPU attends a missing page reading only the heads that
        selected it, every step it is selected; a fetch copies all heads once, and the copy serves
        the following steps too while the page stays selected and cached. So a fetch is charged
        its amortised cost: copy time x (1 - reuse x survival), reuse = the request's measured
        selection reuse (`GpuPageCache.reuse`), survival = min(1, slots / pages wanted this step).
        Both draw on host DRAM at once, so their concurrent rates apply (docs/hardware.md). Pages
        go to the copy in order of heads served per amortised cost, until the copy would end after
        the CPU's remaining work: the two then finish together. All on the device, no sync."""
        survive = (self._cache.num_slots / wanted.clamp_min(1).to(torch.float64)).clamp_max(1.0)
        factor = (1 - reuse.to(torch.float64) * survive).clamp_min(0.05)        # [B]
        counts = torch.where(misses, heads, 0)
        cost = factor[:, None].expand_as(counts).flatten()
        counts = counts.flatten()
        order = torch.argsort(counts / cost, descending=True)
        n = counts[order].to(torch.float64)
        cpu_s = self._head_bytes / self._costs.cpu_attn_bw_concurrent
        copy = torch.cumsum(cost[order], 0) * \
            (self.num_kv_heads * self._head_bytes / self._costs.h2d_bw_concurrent)
        cpu_after = (n.sum() - torch.cumsum(n, 0)) * cpu_s
        ok = ~((copy > cpu_after) & (copy > cpu_after + n * cpu_s)) & (n > 0)
        keep = torch.cumprod(ok.to(torch.int8), 0).bool()                 # up to the first stop
        out = torch.zeros_like(counts, dtype=torch.bool)
        out[order] = keep
        return out.view_as(misses)

    def _copy_pages(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        hk, hv = self.kv.host_pool.k[layer], self.kv.host_pool.v[layer]
        dk, dv = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        if self.device.type == "cuda":
            from ..gpu_kernels.gather_pages import launch_gather_pages
            launch_gather_pages(hk, hv, src, dk, dv, dst)
        else:                           # the torch stand-in (no CUDA): a sync is free here
            keep = src >= 0
            src, dst = src[keep], dst[keep]
            dk.index_copy_(0, dst, hk.index_select(0, src))
            dv.index_copy_(0, dst, hv.index_select(0, src))

    def _cpu_attend(self, layer, q, sel, host_table, lens, ready):
        """On the worker: wait for the front's copies (`ready`, a CUDA event), then attend the
        host part of the selection; (o, lse, page-heads attended), or None when there is none."""
        from .. import cpu_kernels
        if ready is not None:
            ready.synchronize()
        n = int((sel >= 0).sum())
        if n == 0:
            return None
        k_pool, v_pool = self.kv.host_pool.k[layer], self.kv.host_pool.v[layer]
        tok = None if self.head_budgets is None else self.head_budgets.token_heads[layer]
        with (self.trace or NO_TRACE).host(layer, "attend host pages", "cpu"):
            if tok is None:
                o, lse = cpu_kernels.launch_sparse_decode_attention(q, k_pool, v_pool, host_table,
                                                                    lens, sel)
            else:
                o, lse = self._cpu_attend_by_granularity(q, k_pool, v_pool, host_table, lens,
                                                         sel, tok)
        return o, lse, n

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
