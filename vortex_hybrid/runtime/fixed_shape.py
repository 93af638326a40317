"""Whole steps of one fixed shape: what lets a caller capture ONE CUDA graph per batch size and
replay it for every step of that size (SGLang's decode graphs: one per batch-size bucket, the
batch padded with dummy rows).

    shape = FixedShape(batch=8, max_pages=2048)      # rows, page-table width
    key = attn.plan(rids, whole_step=True, fixed=shape)   # len(rids) <= 8; rows past them: padding
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

Padding rows (`batch - len(rids)` of them, after the requests) attend nothing and write nowhere a
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

from .memory_model import HOST_PLACEMENTS
from .step_plan import StepPlan, head_table

if TYPE_CHECKING:
    from .hybrid_attention import HybridAttention

PAD_OWNER = 2**62 + 1
"""Allocator owner of the scratch device page padding rows write to, and the page cache's
request id of their (empty) row."""


@dataclass(frozen=True)
class FixedShape:
    """The shape of every step of a graph bucket: `batch` rows (the step's requests first, then
    padding rows) and tables `max_pages` wide (no request of the step may hold more pages, its new
    token's included)."""

    batch: int
    max_pages: int

    def __post_init__(self) -> None:
        for name in ("batch", "max_pages"):
            v = getattr(self, name)
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


def row_budgets(attn: "HybridAttention", new_lens: list[int], shape: FixedShape,
                width: int) -> torch.Tensor:
    """int32 [L, batch, Hkv] on the summary store's device: each (layer, row, KV head)'s budget
    (the one an ordinary step gives it), padding rows sink + recent."""
    P, L, hkv = attn.cfg.page_size, attn.num_layers, attn.num_kv_heads
    floor = attn.cfg.sink_pages + attn.cfg.recent_pages
    out = torch.full((L, shape.batch, hkv), floor, dtype=torch.int32)
    pages = [-(-n // P) for n in new_lens]
    if pages:
        if attn.head_budgets is not None:
            b = torch.as_tensor(attn.head_budgets.budgets(pages))          # [L, Hkv, B]
            out[:, :len(pages)] = b.permute(0, 2, 1).to(torch.int32)
        else:
            out[:, :len(pages)] = torch.tensor([attn.cfg.budget_for(n) for n in pages],
                                               dtype=torch.int32)[None, :, None]
    return out.clamp(floor, width).to(attn.store.device)


def check_fixed(attn: "HybridAttention", rids: list[int], shape, whole_step: bool) -> None:
    """Refuse, before anything changes, a fixed-shape plan the runtime cannot make."""
    if not isinstance(shape, FixedShape):
        raise ValueError(f"fixed={shape!r} must be a FixedShape(batch, max_pages), or None")
    if not whole_step:
        raise ValueError("plan(fixed=...) is for whole steps: pass whole_step=True too")
    if len(rids) > shape.batch:
        raise ValueError(f"plan(fixed=FixedShape(batch={shape.batch}, ...)) got {len(rids)} "
                         f"requests; at most {shape.batch}")
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


def pad_rows(t: Optional[torch.Tensor], rows: int, width: Optional[int], fill) -> \
        Optional[torch.Tensor]:
    """t [n] or [n, w] as [rows] or [rows, width]: t first, `fill` after."""
    if t is None:
        return None
    shape = (rows,) if t.dim() == 1 else (rows, width)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    if t.dim() == 1:
        out[:t.shape[0]] = t
    else:
        out[:t.shape[0], :t.shape[1]] = t
    return out


def fixed_step(attn: "HybridAttention", step: StepPlan, shape: FixedShape, pad_page: int,
               pad_cache_rows: Optional[torch.Tensor]) -> StepPlan:
    """`step` (the requests' plan, `build_plan`) as a step of `shape`: every table `batch` rows by
    `max_pages` columns, budgets as data (`budgets`), padding rows after the requests."""
    N, W = shape.batch, shape.max_pages
    n = len(step.rids)
    store = attn.store
    width = selection_width(attn, W) if store is not None else 0
    sum_rows = step.sum_rows
    if sum_rows is not None:
        sum_rows = pad_rows(sum_rows, N, None, store.scratch_row)
    cache_rows = step.cache_rows
    if cache_rows is not None:
        cache_rows = torch.cat([cache_rows, pad_cache_rows.repeat(N - n)])
    dev_table = pad_rows(step.dev_table, N, W, -1)
    host_dev = pad_rows(step.host_table_dev, N, W, -1)
    lens = pad_rows(step.lens, N, None, 0)
    out = dataclasses.replace(
        step, dev_table=dev_table, host_table=pad_rows(step.host_table, N, W, -1), lens=lens,
        lens_cpu=pad_rows(step.lens_cpu, N, None, 0),
        s_table=pad_rows(step.s_table, N, W, -1), s_lens=pad_rows(step.s_lens, N, None, 0),
        groups={}, width=width, write_pages=pad_rows(step.write_pages, N, None, pad_page),
        write_offs=pad_rows(step.write_offs, N, None, 0), host_table_dev=host_dev,
        cache_rows=cache_rows, cpu_rows=pad_rows(step.cpu_rows, N, None, False),
        passes=None, budget_key=b"", nonfinite=pad_rows(step.nonfinite, N, None, False),
        sum_rows=sum_rows, fixed=shape)
    if store is not None:
        out.budgets = row_budgets(attn, [n_ + 1 for n_ in step.old_lens], shape, width)
    if attn.placement in HOST_PLACEMENTS:
        out.dev_heads = head_table(dev_table, attn.num_kv_heads)
        out.host_heads = head_table(host_dev, attn.num_kv_heads)
        out.lens_heads = lens.repeat_interleave(attn.num_kv_heads)
    return out


__all__ = ["FixedShape", "PAD_OWNER"]
