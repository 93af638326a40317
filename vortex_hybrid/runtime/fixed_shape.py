"""Whole steps of one fixed shape: what lets a caller capture ONE CUDA graph per batch size and
replay it for every step of that size (SGLang's decode graphs: one per batch-size bucket, the
batch padded with dummy rows).

    shape = FixedShape(batch=8, max_pages=2048)      # rows, page-table width
    key = attn.plan(rids, whole_step=True, fixed=shape)   # len(rids) <= 8; None in rids, and the
                                                          # rows past them: padding
    ...                                              # capture once per key, replay, finish_step()

An ordinary whole step's key follows its page-table width, its budget groups and the page cache's
size, which change as requests grow; a fixed-shape step's does not:
- the tables are `max_pages` wide (a request of the step may hold at most that many pages, its new
  token's included);
- selection runs one indexer pass at the widest budget any request of up to `max_pages` pages has,
  with each (request, KV head) trimmed to its own budget on the device (`budgets=` of the library's
  indexers: `flow_kernels.keep_budgets`), so the budgets are data, not shape;
- the GPU page cache is sized once for every request the device pool's tail pages serve and
  `max_pages` pages, so it is never reallocated (its generation stays);
- `hybrid` with step_shape "auto" runs "split" (the measured choice would change the key).
The key is then ("whole", "fixed", batch, max_pages, selection width, cache generation, step
shape): the same for every step with this `FixedShape` while the step shape stays.

Padding rows (a None in rids, and the rows past rids) attend nothing and write nowhere a
request reads: length 0, no pages, their new token written to a scratch device page that no table
names (`PAD_OWNER`'s, taken on the first fixed-shape step), their summary to the summary store's
scratch row, their page-cache row one that holds nothing; their outputs are zeros. `plan([],
whole_step=True, fixed=...)` plans a step of padding only (a capture's warm-up and capture run
it; it changes no request and is dropped by the next plan() or cancel_step()).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ..transfers import to_device
from .memory_model import HOST_PLACEMENTS
from .step_plan import StepPlan, head_table

if TYPE_CHECKING:
    from .hybrid_attention import HybridAttention

PAD_OWNER = 2**62 + 1
"""Allocator owner of the scratch device page padding rows write to, and the page cache's
request id of their (empty) row."""


@dataclass(frozen=True)
class FixedShape:
    """The shape of every step of a graph bucket: `batch` rows (the step's requests, then padding
    rows) and tables `max_pages` wide (no request of the step may hold more pages, its new token's
    included). max_requests: how many requests the runtime may hold at once while graphs of this
    shape are in use (the page cache is sized for them once; None: the runtime's `max_requests`);
    past it the cache grows and the key changes."""

    batch: int
    max_pages: int
    max_requests: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("batch", "max_pages", "max_requests"):
            v = getattr(self, name)
            if v is None and name == "max_requests":
                continue
            try:
                ok = not isinstance(v, bool) and operator.index(v) >= 1
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"FixedShape.{name}={v!r} must be a positive integer")


def selection_width(attn: "HybridAttention", max_pages: int) -> int:
    """The widest budget of a request of up to `max_pages` pages (budgets grow with pages)."""
    if attn.head_budgets is not None:
        return int(attn.head_budgets.budgets([max_pages]).max())
    return attn.cfg.budget_for(max_pages)


def row_budgets(attn: "HybridAttention", new_lens: list[int], positions: torch.Tensor,
                shape: FixedShape, width: int) -> torch.Tensor:
    """int32 [L, batch, Hkv] on the summary store's device: each (layer, row, KV head)'s budget
    (the one an ordinary step gives it; request i at row positions[i]), padding rows
    sink + recent."""
    P, L, hkv = attn.cfg.page_size, attn.num_layers, attn.num_kv_heads
    floor = attn.cfg.sink_pages + attn.cfg.recent_pages
    out = torch.full((L, shape.batch, hkv), floor, dtype=torch.int32)
    pages = [-(-n // P) for n in new_lens]
    if pages:
        if attn.head_budgets is not None:
            b = torch.as_tensor(attn.head_budgets.budgets(pages))          # [L, Hkv, B]
            out[:, positions] = b.permute(0, 2, 1).to(torch.int32)
        else:
            out[:, positions] = torch.tensor([attn.cfg.budget_for(n) for n in pages],
                                             dtype=torch.int32)[None, :, None]
    return out.clamp(floor, width).to(attn.store.device)


def check_fixed(attn: "HybridAttention", rids: list[int], rows: int, shape,
                whole_step: bool) -> None:
    """Refuse, before anything changes, a fixed-shape plan the runtime cannot make (`rows`: the
    rows the caller's list names, its padding included)."""
    if not isinstance(shape, FixedShape):
        raise ValueError(f"fixed={shape!r} must be a FixedShape(batch, max_pages), or None")
    if not whole_step:
        raise ValueError("plan(fixed=...) is for whole steps: pass whole_step=True too")
    if rows > shape.batch:
        raise ValueError(f"plan(fixed=FixedShape(batch={shape.batch}, ...)) got {rows} "
                         f"rows; at most {shape.batch}")
    P = attn.cfg.page_size
    for rid in rids:
        pages = attn.kv.seq_len(rid) // P + 1            # after the step's token
        if pages > shape.max_pages:
            raise ValueError(f"request {rid} holds {pages} pages after this step's token; "
                             f"FixedShape.max_pages={shape.max_pages} (raise it)")
    store = attn.store
    if store is not None and store.device.type == attn.device.type and \
            store.bound.indexer_kernel is not None and not store.bound.takes_budgets:
        raise ValueError(f"plan(fixed=...): the indexer of flow {attn.cfg.flow!r} takes one "
                         "budget per call (a registered lowering without budgets=); plan without "
                         "fixed=")


def fixed_step(attn: "HybridAttention", step: StepPlan, shape: FixedShape,
               positions: list[int], pad_page: int,
               pad_cache_rows: Optional[torch.Tensor]) -> StepPlan:
    """`step` (the requests' plan, `build_plan`) as a step of `shape`: every table `batch` rows by
    `max_pages` columns, budgets as data (`budgets`), request i at row positions[i], padding rows
    elsewhere."""
    N, W = shape.batch, shape.max_pages
    store = attn.store
    width = selection_width(attn, W) if store is not None else 0
    pos = torch.as_tensor(positions, dtype=torch.int64)

    def pad_rows(t: Optional[torch.Tensor], width: Optional[int], fill):
        """t [n] or [n, w] as [N] or [N, width]: row i at positions[i], `fill` elsewhere."""
        if t is None:
            return None
        out = torch.full((N,) if t.dim() == 1 else (N, width), fill, dtype=t.dtype,
                         device=t.device)
        where = to_device(pos, t.device)
        if t.dim() == 1:
            out[where] = t
        else:
            out[where, :t.shape[1]] = t
        return out

    sum_rows = step.sum_rows
    if sum_rows is not None:
        sum_rows = pad_rows(sum_rows, None, store.scratch_row)
    cache_rows = step.cache_rows
    if cache_rows is not None:
        hkv = attn.num_kv_heads
        rows = pad_cache_rows.view(1, hkv).repeat(N, 1)
        rows[to_device(pos, rows.device)] = cache_rows.view(-1, hkv)
        cache_rows = rows.flatten()
    dev_table = pad_rows(step.dev_table, W, -1)
    host_dev = pad_rows(step.host_table_dev, W, -1)
    lens = pad_rows(step.lens, None, 0)
    out = dataclasses.replace(
        step, dev_table=dev_table, host_table=pad_rows(step.host_table, W, -1), lens=lens,
        lens_cpu=pad_rows(step.lens_cpu, None, 0),
        s_table=pad_rows(step.s_table, W, -1), s_lens=pad_rows(step.s_lens, None, 0),
        groups={}, width=width, write_pages=pad_rows(step.write_pages, None, pad_page),
        write_offs=pad_rows(step.write_offs, None, 0), host_table_dev=host_dev,
        cache_rows=cache_rows, cpu_rows=pad_rows(step.cpu_rows, None, False),
        passes=None, budget_key=b"", nonfinite=pad_rows(step.nonfinite, None, False),
        sum_rows=sum_rows, fixed=shape, positions=list(positions))
    if store is not None:
        out.budgets = row_budgets(attn, [n + 1 for n in step.old_lens], pos, shape, width)
    if attn.placement in HOST_PLACEMENTS:
        out.dev_heads = head_table(dev_table, attn.num_kv_heads)
        out.host_heads = head_table(host_dev, attn.num_kv_heads)
        out.lens_heads = lens.repeat_interleave(attn.num_kv_heads)
    return out


__all__ = ["FixedShape", "PAD_OWNER"]
