"""`select_pages`: run a flow's cache stage over every full page, then its indexer (stateless).

    sel = select_pages("quest", q, k_pool, page_table, seq_lens, budget=64, sink=1, recent=2)

The selection, per (request, KV head): the first `sink` pages, the last `recent` pages (the partly
filled last page among them) and the highest-scoring other pages up to `budget` pages in all (ties
toward the lower page index); every page when `budget >= num_pages`, padded with -1. This is
exactly `vortex_hybrid.reference.topk_pages` applied to the flow's page scores.

`budget < sink + recent` is rejected with `ValueError` (the budget counts the forced pages; a
request holding fewer pages than the budget simply selects all of them); `recent` must be >= 1
because the tail page has no summary yet.

This path recomputes every summary on each call: it is for research and tests. A runtime keeps
summaries in a `SummaryStore` (computed once when a page fills) and selects through
`SummaryStore.select_pages`, which also works when pages are split between device and host pools.
Each stage runs a registered lowering when `lower=True` and the flow's stage graph has a lowered
structure (`lowering`), otherwise the reference interpreter; float64 inputs always take the
interpreter: it is the ground truth.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch

from ..contracts import check_attention_args, check_counts
from .bound_flow import BoundFlow, bind_flow
from .compiler import stored_layout
from .flow import Flow
from .interpreter import compute_dtype, indexer_scores


def full_pages(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Physical pages (int64 [n], unique, ascending) that are full in some request."""
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    full = cols[None, :] < (seq_lens.to(page_table.device, torch.int64) // page_size)[:, None]
    return torch.unique(page_table.to(torch.int64)[full])


def new_summaries(summaries: dict[str, tuple[int, int]], num_pages: int, num_kv_heads: int,
                  dtype: torch.dtype, device: torch.device,
                  codes: Optional[dict[str, int]] = None) -> dict[str, torch.Tensor]:
    """Zeroed summary store: name -> [num_pages, num_kv_heads, r, c] of `dtype`, rows by physical
    page; the summaries named in `codes` (name -> bits, `CompiledFlow.codes`) packed:
    uint8 [num_pages, num_kv_heads, r, packed_width(c, bits)]."""
    return {name: torch.zeros(num_pages, num_kv_heads, *shape, dtype=dt, device=device)
            for name, (shape, dt) in stored_layout(summaries, codes or {}, dtype).items()}


def _cache_stage(flow, q, k_pool, page_table, seq_lens, lower: bool, summary_dtype=None):
    """Validate, bind, and run the cache stage over every full page: (bound, summaries), stored in
    `summary_dtype` (None: the compute dtype)."""
    check_attention_args(q, k_pool, k_pool, page_table, seq_lens)
    _, hq, d = q.shape
    N, hkv, P, _ = k_pool.shape
    cdt = compute_dtype(q, k_pool)
    bound = bind_flow(flow, P, d, hq // hkv, q.device, lower=lower and cdt == torch.float32)
    summaries = new_summaries(bound.summaries, N, hkv, summary_dtype or cdt, k_pool.device,
                              bound.codes)
    if summaries:
        bound.cache(k_pool, full_pages(page_table, seq_lens, P), summaries)
    return bound, summaries


def select_pages(flow: Union[str, Flow], q: torch.Tensor, k_pool: torch.Tensor,
                 page_table: torch.Tensor, seq_lens: torch.Tensor, budget: int, sink: int,
                 recent: int, *, lower: bool = True,
                 summary_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pages each (request, KV head) attends, chosen by `flow`.

    flow: a registered name, `path/to/file.py:name`, or a `Flow`.
    q [B, Hq, D] float; k_pool [N, Hkv, P, D] float (P a power of two); page_table int32
    [B, max_pages] (every used page resident in k_pool); seq_lens int32 [B]; budget, sink, recent:
    pages, any integral numbers (budget >= sink + recent, recent >= 1). Returns sel int32
    [B, Hkv, budget], unique logical pages padded with -1.
    lower=False forces the reference interpreter even where a lowering is registered.
    summary_dtype: the summaries' storage dtype (one of `contracts.SUMMARY_DTYPES`, rounded as a
    store rounds them, so a reference selects from the values a runtime's store holds; None: the
    compute dtype).
    """
    check_counts(budget, sink, recent)
    budget, sink, recent = (operator.index(x) for x in (budget, sink, recent))
    bound, summaries = _cache_stage(flow, q, k_pool, page_table, seq_lens, lower, summary_dtype)
    return bound.indexer(q, summaries, page_table, seq_lens, budget, sink, recent,
                         num_kv_heads=k_pool.shape[1], keys=(k_pool, page_table))


def page_scores(flow: Union[str, Flow], q: torch.Tensor, k_pool: torch.Tensor,
                page_table: torch.Tensor, seq_lens: torch.Tensor, *,
                lower: bool = True, summary_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The score the flow's `topk` ranks pages by: float [B, Hkv, max_pages] (float64 for float64
    inputs, else float32), -inf where a page has no score (past the request's pages, or the partial
    tail page of a summary-based flow). For research and for checking fused kernels; the indexer
    always runs in the interpreter here (`lower` applies to the cache stage). Flows ending in
    `ops.union` have several scores: they raise ValueError. summary_dtype: the summaries' storage
    dtype (one of `contracts.SUMMARY_DTYPES`, rounded as a store rounds them; None: the compute
    dtype), to measure what a smaller store costs the ranking.
    """
    bound, summaries = _cache_stage(flow, q, k_pool, page_table, seq_lens, lower, summary_dtype)
    parts = indexer_scores(bound.compiled, q, summaries, page_table, seq_lens, k_pool.shape[1],
                           (k_pool, page_table))
    if len(parts) != 1:
        raise ValueError(f"flow {bound.flow!r} combines {len(parts)} scores with ops.union; "
                         "page_scores needs a flow that ends in a single ops.topk")
    return parts[0][0]


__all__ = ["BoundFlow", "full_pages", "new_summaries", "page_scores", "select_pages"]
