"""`StepPlan`: what one decode step needs, built once by `HybridAttention.plan` before layer 0.

The batch's page tables (device and host), the summary-row table and budget groups for the
indexer, where each request's new token goes, which pages it fills (and their summary rows), the
page-cache request indices, and the step's counters. Every layer of the step reads these; nothing
here is recomputed per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from ..transfers import to_device
from .memory_model import HOST_PLACEMENTS

if TYPE_CHECKING:
    from .hybrid_attention import HybridAttention


@dataclass
class StepPlan:
    """What `HybridAttention.plan` computed for one decode step: the batch's tables, budgets and
    buffers, on the devices that read them."""

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
    write_pages: torch.Tensor          # int64 [B] device page of the new token (device)
    write_offs: torch.Tensor           # int64 [B] its slot in that page
    filled_pages: torch.Tensor         # int64 [n] device pages the new token fills (device)
    filled_rows: torch.Tensor          # int64 [n] their summary rows (store device)
    host_table_dev: Optional[torch.Tensor]  # host_table on the device (fetch sources; None in
                                            # a `cached` step: `host_tables_on_device`)
    cache_rows: Optional[torch.Tensor]  # int64 [B x Hkv] the page cache's rows (request, KV head)
    resident_pages: int = 0            # page-heads a dense / gpu layer attends
    serial: int = 0                    # counts plans
    next_layer: int = 0
    counters: dict = field(default_factory=dict)   # host-side counts and times
    counts: Optional[torch.Tensor] = None           # device-side counts (HybridAttention.COUNTS)
    shape: str = "split"                            # the step shape (config.STEP_SHAPES)
    shape_key: tuple = ()                           # its situation key for the ShapeChooser
    cpu_rows: Optional[torch.Tensor] = None         # bool [B] (device): "subbatch"'s CPU rows
    t_start: float = 0.0                            # perf_counter at layer 0's run()
    launch_order: tuple = ("cpu", "gpu")            # split layers' hand-offs, first to last
    passes: Optional[list] = None                   # per layer: head_budgets.Pass list (calibrated)
    budget_key: bytes = b""                         # names the calibrated budgets (graph shapes)
    nonfinite: Optional[torch.Tensor] = None        # bool [B] (device): wrote NaN / inf K/V
    checkpoints: list = field(default_factory=list)  # the requests before plan() (its undo)
    offloaded: dict = field(default_factory=dict)    # their offloaded page counts before it
    cache_new: list = field(default_factory=list)    # requests the page cache first saw here
    fronts: int = 0                                  # layers whose front part began (cache undo)
    sum_rows: Optional[torch.Tensor] = None          # int64 [B] (store device): summary row of
                                                     # the page each token fills, else the
                                                     # store's scratch row (whole steps)
    whole: bool = False                              # planned with whole_step=True
    finished: bool = False                           # a whole step's finish_step() ran
    deferred: bool = False                           # finish_step(wait=False): to complete
    failed: Optional[BaseException] = None           # a deferred step's failure, not undone yet
    pending: object = None                           # a whole step's layer begun, not ended
                                                     # (whole_step.PendingLayer)
    static: object = None                            # a whole step's static set (layer_graphs)
    dev_heads: Optional[torch.Tensor] = None         # int32 [B x Hkv, W] head tables of split
    host_heads: Optional[torch.Tensor] = None        # layers (device, host pools as head-pages)
    lens_heads: Optional[torch.Tensor] = None        # int32 [B x Hkv] lens per (request, KV head)
    cached_heads: Optional[torch.Tensor] = None      # int32 [L, B x Hkv, W] a `cached` step's
                                                     # head tables, every layer (plan())
    cached_hits: int = 0                             # page-heads a cached layer reads from slots
    fixed: object = None                             # a fixed-shape step's FixedShape (rows past
                                                     # `rids` are padding: `fixed_shape`)
    budgets: Optional[torch.Tensor] = None           # int32 [L, B, Hkv] (store device): a fixed-
                                                     # shape step's budgets, one indexer pass
    positions: Optional[list] = None                 # a fixed-shape step: the row of each rid

    @property
    def awaiting(self) -> bool:
        """Ended with finish_step(wait=False) and not completed yet."""
        return self.deferred and not self.finished

    @property
    def batch(self) -> int:
        """Rows of the step's tables: its requests, and a fixed-shape step's padding rows."""
        return self.lens.shape[0]


def head_table(table: torch.Tensor, heads: int) -> torch.Tensor:
    """A page table [B, W] as a head table [B x heads, W]: page d's KV head h is head-page
    d x heads + h of a pool viewed as [pages x heads, 1, P, D]; -1 stays -1."""
    h = torch.arange(heads, dtype=table.dtype, device=table.device)[None, :, None]
    t = table[:, None, :]
    return torch.where(t >= 0, t * heads + h, -1).flatten(0, 1)


def host_tables_on_device(attn: "HybridAttention", step: StepPlan) -> None:
    """The host table on the device (`host_table_dev`) and, in the host placements, as a head
    table (`host_heads`): the fetches' sources. Made once a step by `HybridAttention.plan` after
    it decided the step's shape, but not for a `cached` step (it fetches nothing)."""
    step.host_table_dev = to_device(step.host_table, attn.device)
    if attn.placement in HOST_PLACEMENTS:
        step.host_heads = head_table(step.host_table_dev, attn.num_kv_heads)


def build_plan(attn: "HybridAttention", rids: list[int], old: list[int], serial: int,
               shape: str = "split", shape_key: tuple = (), cpu_requests: int = 0) -> StepPlan:
    """The plan of a step whose requests `rids` (lengths `old` before the step) have already had
    their new token's slot reserved (`extend`) and their full pages offloaded. shape: the step
    shape; "subbatch" gives the first `cpu_requests` requests' host pages to the CPU. Each new
    token's page is checked to belong to its request (`PageOwnershipError`). The page-cache rows
    (`cache_rows`) are the caller's to fill."""
    P = attn.cfg.page_size
    new = [n + 1 for n in old]
    dev_table, lens = attn.kv.page_table(rids, "device")
    host_table, lens_cpu = attn.kv.page_table(rids, "host")
    dev = attn.device
    positions = torch.as_tensor(old, dtype=torch.int64)
    write_pages = torch.as_tensor([attn.kv.residency(rid, n // P, n // P + 1)[0][0]     # (host:
                                   for rid, n in zip(rids, old)], dtype=torch.int64)  # no sync)
    filled = [b for b, n in enumerate(new) if n % P == 0]
    if attn.store is None or not attn.store.summarizes:
        filled = []                                  # nothing to summarise (dense, streaming)
    s_table = s_lens = None
    groups: dict[int, list[int]] = {}
    width = 0
    filled_rows = torch.zeros(0, dtype=torch.int64)
    sum_rows = None
    if attn.store is not None:
        for rid, n in zip(rids, new):
            attn.store.reserve_rows(rid, n // P)
        filled_rows = torch.as_tensor([attn.store.rows(rids[b])[new[b] // P - 1]
                                       for b in filled], dtype=torch.int64)
        if attn.store.summarizes:
            rows = [attn.store.scratch_row] * len(rids)
            for b, r in zip(filled, filled_rows.tolist()):
                rows[b] = r
            sum_rows = torch.as_tensor(rows, dtype=torch.int64)
        s_table, s_lens = attn.store.table(rids)
        for b, n in enumerate(new):
            groups.setdefault(attn.cfg.budget_for(-(-n // P)), []).append(b)
        width = max(groups, default=0)
    passes, budget_key, attended = None, b"", None
    if attn.head_budgets is not None:
        passes, width, budget_key, attended = attn.head_budgets.plan([-(-n // P) for n in new])
    sdev = attn.store.device if attn.store is not None else dev
    for rid, page in zip(rids, write_pages.tolist()):    # the step writes only its own pages
        attn.kv.device_alloc.check_owned(rid, [page])
    step = StepPlan(
        rids, old, dev_table, host_table, lens, lens_cpu, s_table, s_lens,
        {k: to_device(torch.as_tensor(v, dtype=torch.int64), sdev) for k, v in groups.items()},
        width, to_device(write_pages, dev), to_device(positions % P, dev),
        to_device(write_pages[filled], dev), to_device(filled_rows, sdev), None, None)
    step.counts = torch.zeros(5, dtype=torch.int64, device=dev)     # COUNTS, on the device
    if attn.placement in HOST_PLACEMENTS:   # head tables, once a step (`dense` with a given sel:
        step.dev_heads = head_table(dev_table, attn.num_kv_heads)          # SplitStep)
        step.lens_heads = lens.repeat_interleave(attn.num_kv_heads)
    if sum_rows is not None:
        step.sum_rows = to_device(sum_rows, sdev)
    step.nonfinite = torch.zeros(len(rids), dtype=torch.bool, device=dev)
    step.counters = dict.fromkeys(("gpu_pages", "cpu_pages", "fetched_pages", "cache_hits",
                                   "cache_misses", "evictions", "cpu_calls"), 0)
    step.counters.update(gpu_wait_s=0.0, step_host_s=0.0, cpu_kernel_s=0.0)
    step.serial = serial
    step.shape, step.shape_key = shape, shape_key
    step.cpu_rows = to_device(torch.arange(len(rids)) < cpu_requests, dev)
    step.passes, step.budget_key = passes, budget_key
    n_pages = [-(-n // P) for n in new]                     # pages dense / gpu attend, exactly
    step.resident_pages = attended if attended is not None else attn.num_kv_heads * sum(
        n if attn.placement == "dense" else min(n, attn.cfg.budget_for(n)) for n in n_pages)
    return step
