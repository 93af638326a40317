"""`SummaryStore`: every flow summary of every (layer, page) of a `PagedKVCache`, computed once.

    store = SummaryStore(kv, "quest", group=4)            # listens to kv: pages filled, requests freed
    kv.append(rid, k, v)                                  # full pages get summaries, one launch a layer
    table, lens = store.table(rids)                       # once per step: logical page -> summary row
    sel = store.index(layer, q, table, lens, budget, sink, recent)     # per layer: no recomputation
    sel = store.select_pages(layer, q, rids, budget, sink, recent)     # the same, tables built here

Identity: a summary row belongs to (request, logical page) from the moment the page fills until the
request is freed; it does not change when the page moves between the device pool and the host pool,
so a host page and its GPU-cached copy share one row. Rows of all layers share the row number:
`store.layer(l)[name]` is `[R, Hkv, r, c]` with R = device pages + host pages (every full page lives
in at least one pool, so rows never run out).

Location (`location=`): "device" keeps summaries beside the device pool (HBM on a GPU machine),
"host" in (pinned) host memory, "auto" picks the device when the store takes at most
`AUTO_DEVICE_FRACTION` of the free device memory (quest's float32 kmin/kmax are 1/8 of bf16 KV bytes:
68 GB for a 32-layer 8B model at batch 32 x 128K, more than HBM can spare). The indexer runs where
the summaries are: on the CPU kernels for a host store (q goes there, sel comes back). Float summaries are
float32, bfloat16 or float8_e4m3fn (`dtype=`; float8 saturates at +-448); kernels compute in
float32 either way. Coded summaries (a flow's `vflow.Codes`, e.g. lowbit's "codes") are stored
packed whatever `dtype` is: uint8 `[R, Hkv, r, bits * ceil(c / 8)]`, `bits` bits a value
(`vortex_hybrid.packed_codes`); so lowbit (2 bits, page 16, head_dim 128) keeps 512 bytes of codes
plus kmin/kmax (512 bytes in bfloat16) per page and KV head: 1/4 of the page's bf16 keys.
`summary_bytes` and `nbytes_for` count each summary in its own storage dtype.

The cache stage runs on the device of the pool that holds the page (the fused kernel or the
interpreter, resolved once by `bind_flow`); when the store lives elsewhere, the new rows are
computed into a small scratch there and copied over.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional, Sequence, Union

import torch

from ..contracts import SUMMARY_DTYPES, check_counts, write_summary_rows
from ..kv.page_allocator import PageAllocator
from ..kv.paged_kv_cache import NOT_RESIDENT, PagedKVCache, padded_table
from ..transfers import to_device
from .bound_flow import BoundFlow, bind_flow
from .flow import Flow
from .interpreter import Keys
from .registry import load_flow

log = logging.getLogger(__name__)

LOCATIONS = ("auto", "device", "host")
AUTO_DEVICE_FRACTION = 0.25
"""'auto' puts the store on a CUDA device only when it needs at most this share of free memory."""


def summary_bytes(flow: Union[str, Flow], num_layers: int, num_pages: int, num_kv_heads: int,
                  page_size: int, head_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a store of `num_pages` rows takes for this flow and model shape: float summaries in
    `dtype`, coded ones packed (`CompiledFlow.stored`)."""
    compiled = load_flow(flow).compiled(page_size, head_dim, 1)
    per_row = sum(r * c * torch.empty((), dtype=dt).element_size()
                  for (r, c), dt in compiled.stored(dtype).values()) * num_kv_heads
    return num_layers * num_pages * per_row


class SummaryStore:
    """Flow summaries of every full page of every request of `kv`, per layer; see the module doc.

    kv: the paged KV cache (the store registers its page-filled and request-freed listeners and
    summarises pages already full); flow: a registered name, `file.py:name` or a `Flow`; group:
    query heads per KV head; location: one of LOCATIONS; dtype: one of contracts.SUMMARY_DTYPES;
    lower=False runs the reference interpreter for both stages.
    """

    def __init__(self, kv: PagedKVCache, flow: Union[str, Flow], *, group: int,
                 location: str = "auto", dtype: torch.dtype = torch.float32,
                 lower: bool = True, capacity: Optional[int] = None) -> None:
        if not isinstance(kv, PagedKVCache):
            raise ValueError(f"kv must be a PagedKVCache, got {type(kv).__name__}")
        if location not in LOCATIONS:
            raise ValueError(f"location={location!r} must be one of {list(LOCATIONS)}")
        if dtype not in SUMMARY_DTYPES:
            raise ValueError(f"dtype={dtype} must be one of {list(SUMMARY_DTYPES)}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group={group!r} must be a positive integer (query heads per KV head)")
        self.kv, self.group, self.dtype = kv, group, dtype
        self.flow = load_flow(flow)
        P, D, hkv, L = kv.page_size, kv.head_dim, kv.num_kv_heads, kv.num_layers
        self.capacity = kv.device_alloc.num_pages + kv.host_alloc.num_pages
        """Rows: one per page the requests can hold at once (default: every page of both pools;
        a runtime whose device pages are partly cache slots, which hold copies, passes fewer)."""
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int) or \
                    not 0 <= capacity <= self.capacity:
                raise ValueError(f"capacity={capacity!r} must be an integer in [0, "
                                 f"{self.capacity}] (the pages of the two pools)")
            self.capacity = capacity
        self.device = self._place(location)
        self._lower = lower
        self.bound: BoundFlow = bind_flow(self.flow, P, D, group, self.device, lower=lower)
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.scratch_row = self.capacity
        """A row past the allocator's: what a static-shaped summarise writes for a page that is
        not full yet (whole-step CUDA graphs summarise every request's written page each step)."""
        self._tensors = {name: torch.zeros(L, self.capacity + 1, hkv, r, c, dtype=dt,
                                           device=self.device, pin_memory=pin)
                         for name, ((r, c), dt) in self.bound.compiled.stored(dtype).items()}
        self._layers = [{name: t[layer] for name, t in self._tensors.items()} for layer in range(L)]
        self._alloc = PageAllocator(self.capacity, "summary store")
        self._rows: dict[int, list[int]] = {}
        self._row_tensors: dict[int, torch.Tensor] = {}      # request -> int32 rows, cached
        self._done: dict[int, int] = {}                       # request -> pages 0..n-1 have rows
        kv.add_page_filled_listener(self.on_pages_filled, all_layers=self.on_pages_filled_layers)
        kv.add_request_freed_listener(self.free_request)
        kv.add_truncated_listener(self.truncate_request)
        for rid in kv.request_ids:
            self.summarize(rid)

    # ---- placement ---------------------------------------------------------------------------
    def _place(self, location: str) -> torch.device:
        kv_dev = self.kv.device
        if location == "host" or kv_dev.type == "cpu":
            return torch.device("cpu")
        if location == "device":
            return kv_dev
        need = self.nbytes_for(self.capacity)
        free, _ = torch.cuda.mem_get_info(kv_dev)
        if need <= AUTO_DEVICE_FRACTION * free:
            return kv_dev
        log.info("summary store of %.2f GiB exceeds %.0f%% of free device memory (%.2f GiB): host",
                 need / 2**30, 100 * AUTO_DEVICE_FRACTION, free / 2**30)
        return torch.device("cpu")

    def nbytes_for(self, rows: int) -> int:
        """Bytes of a store of `rows` rows for this cache's shape."""
        kv = self.kv
        return summary_bytes(self.flow, kv.num_layers, rows, kv.num_kv_heads, kv.page_size,
                             kv.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    # ---- reading ----------------------------------------------------------------------------
    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Summaries of one layer: name -> [R, Hkv, r, c] (views of the store; coded summaries
        packed: uint8 [R, Hkv, r, packed width])."""
        return self._layers[layer]

    def rows(self, rid: int) -> list[int]:
        """Summary row of each logical page of a request (-1: the page is not full yet)."""
        self.kv.num_pages(rid)                                         # unknown request -> error
        return list(self._rows.get(rid, ()))

    def table(self, rids: Sequence[int], max_pages: Optional[int] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer inputs for a batch, on the store's device: table int32 [B, max_pages] (logical
        page -> summary row, -1 where a page has none) and seq_lens int32 [B]."""
        rows = []
        for rid in rids:
            row = self._row_tensors.get(rid)
            if row is None:                 # built once per change of the request's rows
                row = self._row_tensors[rid] = torch.as_tensor(self._rows.get(rid, []),
                                                               dtype=torch.int32)
            rows.append(row)
        width = max([self.kv.num_pages(rid) for rid in rids], default=0)
        table = padded_table(rows, width if max_pages is None else max_pages)
        lens = torch.as_tensor([self.kv.seq_len(rid) for rid in rids], dtype=torch.int32)
        return to_device(table, self.device), to_device(lens, self.device)

    # ---- writing ----------------------------------------------------------------------------
    def _assign(self, rid: int, pages: list[int]) -> list[int]:
        """Rows of `pages`, allocating rows for pages that have none (all or nothing)."""
        row = self._rows.setdefault(rid, [])
        if len(row) < self.kv.num_pages(rid):
            row.extend([NOT_RESIDENT] * (self.kv.num_pages(rid) - len(row)))
        missing = [p for p in pages if row[p] == NOT_RESIDENT]
        for p, r in zip(missing, self._alloc.alloc(rid, len(missing))):
            row[p] = r
        if missing:
            self._row_tensors.pop(rid, None)
        return [row[p] for p in pages]

    @property
    def summarizes(self) -> bool:
        """Whether the flow keeps per-page summaries (`streaming`, say, has none)."""
        return bool(self._tensors)

    def reserve_rows(self, rid: int, full_pages: int) -> None:
        """Give pages 0..full_pages-1 of a request their rows now (a runtime's plan does this for the
        page the step's new token fills, so the step's table already names its row)."""
        done = self._done.get(rid, 0)
        if self._tensors and full_pages > done:
            self._assign(rid, list(range(done, full_pages)))
            self._done[rid] = full_pages

    def on_pages_filled(self, rid: int, layer: int, pages: list[int], device_pages: list[int]) -> None:
        """Page-filled listener: summarise `pages` of `layer` from the device pool."""
        self.on_pages_filled_layers(rid, range(layer, layer + 1), pages, device_pages)

    def on_pages_filled_layers(self, rid: int, layers: range, pages: list[int],
                               device_pages: list[int]) -> None:
        """Page-filled listener of a write of `layers` at once (every layer: `PagedKVCache.append`):
        the rows assigned and the page and row indices made device tensors once, not per layer."""
        if not self._tensors:
            return
        rows = self._assign(rid, pages)
        pool = self.kv.device_pool.k
        pages_t = to_device(torch.as_tensor(device_pages, dtype=torch.int64), pool.device)
        rows_t = to_device(torch.as_tensor(rows, dtype=torch.int64), self.device)
        for layer in layers:                # one launch a layer, the indices copied once
            self.compute_rows(layer, pool[layer], pages_t, rows_t)

    def summarize(self, rid: int, pages: Optional[Sequence[int]] = None) -> None:
        """Bulk path (prefill written elsewhere, a store attached late): summarise the full `pages`
        (default: all) of a request in every layer from whichever pool holds each page."""
        n_full = self.kv.num_full_pages(rid)
        pages = list(range(n_full)) if pages is None else [operator.index(p) for p in pages]
        bad = [p for p in pages if not 0 <= p < n_full]
        if bad:
            raise ValueError(f"request {rid} has full pages 0..{n_full - 1}; got {bad}")
        if not self._tensors or not pages:
            return
        rows = self._assign(rid, pages)
        where = self.kv.residency(rid)
        on_dev = [(where[p][0], r) for p, r in zip(pages, rows) if where[p][0] != NOT_RESIDENT]
        on_host = [(where[p][1], r) for p, r in zip(pages, rows) if where[p][0] == NOT_RESIDENT]
        for layer in range(self.kv.num_layers):
            for pool, items in ((self.kv.device_pool, on_dev), (self.kv.host_pool, on_host)):
                if items:
                    self.compute_rows(layer, pool.k[layer], [i for i, _ in items], [r for _, r in items])

    def compute_rows(self, layer: int, k_pool: torch.Tensor, pages, rows) -> None:
        """Summaries of full `pages` (ints, or int64 [n]) of one layer's pool `k_pool` into `rows`
        (reserved: by `reserve_rows` for the runtime's per-token path); no checks."""
        dev = k_pool.device
        bound = bind_flow(self.flow, self.kv.page_size, self.kv.head_dim, self.group, dev,
                          lower=self._lower)
        pages_t = torch.as_tensor(pages, dtype=torch.int64).to(dev)
        if dev == self.device:
            bound.cache(k_pool, pages_t, self._layers[layer],
                        torch.as_tensor(rows, dtype=torch.int64).to(dev), check=False)
            return
        n = len(pages_t)
        scratch = {name: torch.empty(n, *t.shape[2:], dtype=t.dtype, device=dev)
                   for name, t in self._tensors.items()}
        bound.cache(k_pool, pages_t, scratch, torch.arange(n, device=dev), check=False)
        idx = torch.as_tensor(rows, dtype=torch.int64).to(self.device)
        for name, t in self._layers[layer].items():
            write_summary_rows(t, idx, scratch[name].to(self.device))

    def free_request(self, rid: int) -> None:
        """Request-freed listener: return the request's rows."""
        row = self._rows.pop(rid, None)
        self._row_tensors.pop(rid, None)
        self._done.pop(rid, None)
        if row:
            self._alloc.free(rid, [r for r in row if r != NOT_RESIDENT])

    def truncate_request(self, rid: int, seq_len: int) -> None:
        """Truncated listener: return the rows of pages that are no longer full (a rolled-back
        step or prefill chunk), so the request's rows match its pages again."""
        full = seq_len // self.kv.page_size
        row = self._rows.get(rid)
        if row is not None and len(row) > full:
            self._alloc.free(rid, [r for r in row[full:] if r != NOT_RESIDENT])
            del row[full:]
            self._row_tensors.pop(rid, None)
        if self._done.get(rid, 0) > full:
            self._done[rid] = full

    @property
    def rows_used(self) -> int:
        return self._alloc.num_used

    # ---- selection --------------------------------------------------------------------------
    def index(self, layer: int, q: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor,
              budget: int, sink: int, recent: int, *, keys: Optional[Keys] = None,
              check: bool = True, budgets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sel int32 [B, Hkv, budget] on q's device from q [B, Hq, D] and the batch's `table`,
        `seq_lens` (from `table`, on the store's device). Runs where the summaries are. keys: only
        for flows that read page keys (see `select_pages`). budgets: int32 [B, Hkv] on the
        store's device, each row's own budget (`BoundFlow.indexer`). check=False skips
        validation."""
        qd = q if q.device == self.device else q.to(self.device)
        sel = self.bound.indexer(qd, self._layers[layer], table, seq_lens, budget, sink, recent,
                                 num_kv_heads=self.kv.num_kv_heads, keys=keys, check=check,
                                 budgets=budgets)
        return sel if sel.device == q.device else sel.to(q.device)

    def select_pages(self, layer: int, q: torch.Tensor, rids: Sequence[int], budget: int,
                     sink: int, recent: int) -> torch.Tensor:
        """Pages each (request, KV head) of `rids` attends in `layer`, chosen by the flow from the
        stored summaries (nothing is recomputed), whether pages sit in the device pool, the host
        pool or both: the same selection as the stateless `vflow.select_pages` over the same KV.
        q [B, Hq, D]; returns sel int32 [B, Hkv, budget] (logical pages, -1 padded) on q's device.
        """
        check_counts(budget, sink, recent)
        budget, sink, recent = (operator.index(x) for x in (budget, sink, recent))
        kv = self.kv
        if not 0 <= layer < kv.num_layers:
            raise ValueError(f"layer={layer!r} outside 0..{kv.num_layers - 1}")
        want = (len(rids), kv.num_kv_heads * self.group, kv.head_dim)
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != want or not q.is_floating_point():
            raise ValueError(f"q must be a float tensor {list(want)} (requests, query heads, "
                             f"head_dim), got {getattr(q, 'dtype', type(q).__name__)} "
                             f"{tuple(getattr(q, 'shape', ()))}")
        table, lens = self.table(rids)
        keys = self.gather_keys(layer, rids, table.shape[1]) if self.bound.reads_keys else None
        return self.index(layer, q, table, lens, budget, sink, recent, keys=keys)

    def gather_keys(self, layer: int, rids: Sequence[int], width: int) -> Keys:
        """(k_pool, key_table) holding the keys of `rids` in `layer`, gathered from both pools onto
        the store's device: for flows that read page keys (a research path, it copies the keys)."""
        kv = self.kv
        P, hkv, D = kv.page_size, kv.num_kv_heads, kv.head_dim
        pool = torch.zeros(max(len(rids) * width, 1), hkv, P, D, dtype=kv.dtype)
        for i, rid in enumerate(rids):
            k, _ = kv.read_pages(rid, layer)                           # [n, Hkv, P, D], CPU
            pool[i * width:i * width + k.shape[0]] = k
        key_table = torch.arange(len(rids) * width, dtype=torch.int32).reshape(len(rids), width)
        return pool.to(self.device), key_table.to(self.device)
