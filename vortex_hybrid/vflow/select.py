"""`select_pages`: a flow's cache stage per full page, then its indexer (docs/architecture.md).

    sel = select_pages("quest", q, k_pool, page_table, seq_lens, budget=64, sink=1, recent=2)

The selection, per (request, KV head): the first `sink` pages, the last `recent` pages (the partly
filled last page among them) and the highest-scoring other pages up to `budget` pages in all (ties
toward the lower page index); every page when `budget >= num_pages`. This is exactly
`vortex_hybrid.reference.topk_pages` applied to the flow's page scores.

`budget < sink + recent` is rejected with `ValueError` (the budget counts the forced pages, so it
cannot be smaller than them); `recent` must be >= 1 because the tail page has no summary yet.

Each stage runs a registered lowering when `lower=True` and one fits: the flow's own for (flow, stage,
device), or that of a flow whose stage graph has the same structure (see `pattern`); otherwise the
reference interpreter. Inputs in float64 always take the interpreter: it
is the ground truth, and lowerings read float32 summaries.
"""

from __future__ import annotations

from typing import Union

import torch

from ..contracts import check_attention_args
from .flow import Flow
from .interpreter import compute_dtype, indexer_scores, run_cache, run_indexer
from .pattern import matching_lowering
from .registry import load_flow


def _check_counts(budget, sink, recent) -> None:
    for name, v in (("budget", budget), ("sink", sink), ("recent", recent)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer")
    if recent < 1:
        raise ValueError(f"recent={recent} must be >= 1: the partly filled last page is always "
                         "attended (it has no summary to be scored by)")
    if budget < sink + recent:
        raise ValueError(f"budget={budget} must be >= sink + recent = {sink + recent}: the budget "
                         "counts the sink and recent pages")


def full_pages(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Physical pages (int64 [n], unique, ascending) that are full in some request."""
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    full = cols[None, :] < (seq_lens.to(page_table.device, torch.int64) // page_size)[:, None]
    return torch.unique(page_table.to(torch.int64)[full])


def new_summaries(summaries: dict[str, tuple[int, int]], num_pages: int, num_kv_heads: int,
                  dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed summary store: name -> [num_pages, num_kv_heads, r, c], rows by physical page."""
    return {name: torch.zeros(num_pages, num_kv_heads, r, c, dtype=dtype, device=device)
            for name, (r, c) in summaries.items()}


def _cache_stage(flow, q, k_pool, page_table, seq_lens, lower: bool):
    """Validate, compile, and run the cache stage: (flow, compiled, summaries, use_lowering)."""
    check_attention_args(q, k_pool, k_pool, page_table, seq_lens)
    flow = load_flow(flow)
    _, hq, d = q.shape
    N, hkv, P, _ = k_pool.shape
    compiled = flow.compiled(P, d, hq // hkv)
    cdt = compute_dtype(q, k_pool)
    use_lowering = lower and cdt == torch.float32
    summaries = new_summaries(compiled.summaries, N, hkv, cdt, k_pool.device)
    if summaries:
        pages = full_pages(page_table, seq_lens, P)
        fn = matching_lowering(flow, compiled, "cache", q.device) if use_lowering else None
        if fn is None:
            run_cache(compiled, k_pool, pages, summaries)
        else:
            fn(k_pool, pages, summaries)
    return flow, compiled, summaries, use_lowering


def select_pages(flow: Union[str, Flow], q: torch.Tensor, k_pool: torch.Tensor,
                 page_table: torch.Tensor, seq_lens: torch.Tensor, budget: int, sink: int,
                 recent: int, *, lower: bool = True) -> torch.Tensor:
    """Pages each (request, KV head) attends, chosen by `flow`.

    flow: a registered name, `path/to/file.py:name`, or a `Flow`.
    q [B, Hq, D] float; k_pool [N, Hkv, P, D] float (P a power of two); page_table int32
    [B, max_pages]; seq_lens int32 [B]; budget, sink, recent: pages (budget >= sink + recent,
    recent >= 1). Returns sel int32 [B, Hkv, budget], unique logical pages padded with -1.
    lower=False forces the reference interpreter even where a lowering is registered.
    """
    _check_counts(budget, sink, recent)
    flow, compiled, summaries, use_lowering = _cache_stage(flow, q, k_pool, page_table, seq_lens,
                                                           lower)
    fn = matching_lowering(flow, compiled, "indexer", q.device) if use_lowering else None
    if fn is None:
        return run_indexer(compiled, q, summaries, k_pool, page_table, seq_lens, budget, sink, recent)
    sel = fn(q, summaries, page_table, seq_lens, budget, sink, recent, page_size=k_pool.shape[2])
    B, hkv = q.shape[0], k_pool.shape[1]
    if tuple(sel.shape) != (B, hkv, budget) or sel.dtype != torch.int32:
        raise RuntimeError(f"lowering {fn!r} for flow {flow.name!r} returned sel of shape "
                           f"{tuple(sel.shape)} {sel.dtype}; expected ({B}, {hkv}, {budget}) int32")
    return sel


def page_scores(flow: Union[str, Flow], q: torch.Tensor, k_pool: torch.Tensor,
                page_table: torch.Tensor, seq_lens: torch.Tensor, *,
                lower: bool = True) -> torch.Tensor:
    """The score the flow's `topk` ranks pages by: float [B, Hkv, max_pages] (float64 for float64
    inputs, else float32), -inf where a page has no score (past the request's pages, or the partial
    tail page of a summary-based flow). For research and for checking fused kernels; the indexer
    always runs in the interpreter here (`lower` applies to the cache stage). Flows ending in
    `ops.union` have several scores: they raise ValueError.
    """
    flow, compiled, summaries, _ = _cache_stage(flow, q, k_pool, page_table, seq_lens, lower)
    parts = indexer_scores(compiled, q, summaries, k_pool, page_table, seq_lens)
    if len(parts) != 1:
        raise ValueError(f"flow {flow!r} combines {len(parts)} scores with ops.union; page_scores "
                         "needs a flow that ends in a single ops.topk")
    return parts[0][0]
