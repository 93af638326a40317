"""The checked entry points of the library flows' kernels, made once for each backend.

Both kernel backends implement two unchecked launchers with the same signatures:

    launch_cache(k_pool, pages, rows, a, b, quest: bool, codes=None)         summaries of full pages
    launch_indexer(q, a, b, page_table, seq_lens, budget, sink, recent, page_size, quest: bool,
                   budgets=None, codes=None)

(a, b = kmin, kmax for the cache stage and kmax, kmin for the indexer of quest and lowbit; mean
twice for centroid; `codes`: lowbit's packed codes, uint8 [R, Hkv, P, bits * ceil(D / 8)]
(`vortex_hybrid.packed_codes`), whose width gives the code width). `entry_points` wraps them into
the public, checked functions with the lowering-hook signatures (`vortex_hybrid.vflow.lowering`),
plus the backend's LOWERINGS table, so the two backends cannot drift apart:

    quest_cache(k_pool, pages, summaries, rows=None, *, check=True)
    centroid_cache(...)
    lowbit_cache(...)
    quest_indexer(q, summaries, page_table, seq_lens, budget, sink, recent, *, page_size,
                  check=True, budgets=None)
    centroid_indexer(...)
    lowbit_indexer(...)          (gqa "max": the largest score of the KV head's query heads)

`budgets` (int32 [B, Hkv], each in [sink + recent, budget]) gives every (request, KV head) its own
budget inside the one call: the launchers select at `budget` and `keep_budgets` trims each row to
its own, from the same scores (a step of fixed shape, whose budget groups are data).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .contracts import check_budgets, check_cache_args, check_indexer_args

_CACHE_DOC = """Write summaries{names} at `rows` (default `pages`): the {what} over the keys of each
    listed full page of k_pool [N, Hkv, P, D]; pages, rows int64 [n]; summaries float32, bfloat16
    or float8_e4m3fn [R, Hkv, 1, D]{coded}. check=False skips the argument checks (the runtime
    checks once per step)."""
_INDEXER_DOC = """{flow} selection: sel int32 [B, Hkv, budget] (ascending, -1 padded) from q
    [B, Hq, D] and summaries{names} ([R, Hkv, 1, D]{coded}); page_table int32 [B, max_pages] logical
    page -> summary row (read for full pages only); seq_lens int32 [B] tokens; page_size: tokens per
    page. budgets: int32 [B, Hkv] or None: each (request, KV head)'s own budget (<= budget), the rest
    of its row -1 (what a call at that budget selects). check=False skips the argument checks."""
_CODED = """, and "codes" packed uint8 [R, Hkv, P, bits * ceil(D / 8)] (`packed_codes`)"""


def entry_points(launch_cache: Callable, launch_indexer: Callable) -> SimpleNamespace:
    """quest_cache, centroid_cache, lowbit_cache, quest_indexer, centroid_indexer, lowbit_indexer
    and LOWERINGS of a backend."""

    def cache_fn(quest: bool, names: tuple[str, ...], what: str, codes: Optional[str] = None):
        def fn(k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict[str, torch.Tensor],
               rows: Optional[torch.Tensor] = None, *, check: bool = True) -> None:
            if check:
                check_cache_args(k_pool, pages, summaries, names, rows, codes)
            launch_cache(k_pool, pages, pages if rows is None else rows, summaries[names[0]],
                         summaries[names[-1]], quest,
                         codes=None if codes is None else summaries[codes])
        fn.__doc__ = _CACHE_DOC.format(names=list(names) + ([codes] if codes else []), what=what,
                                       coded=_CODED if codes else "")
        return fn

    def indexer_fn(quest: bool, names: tuple[str, ...], flow: str, codes: Optional[str] = None):
        def fn(q: torch.Tensor, summaries: dict[str, torch.Tensor], page_table: torch.Tensor,
               seq_lens: torch.Tensor, budget: int, sink: int, recent: int, *, page_size: int,
               check: bool = True, budgets: Optional[torch.Tensor] = None) -> torch.Tensor:
            if check:
                check_indexer_args(q, summaries, names, page_table, seq_lens, budget, sink,
                                   recent, page_size, codes)
                if budgets is not None:
                    check_budgets(budgets, q.shape[0], summaries[names[0]].shape[1], budget,
                                  sink, recent, q.device)
            return launch_indexer(q, summaries[names[0]], summaries[names[-1]], page_table,
                                  seq_lens, int(budget), int(sink), int(recent), int(page_size),
                                  quest, budgets=budgets,
                                  codes=None if codes is None else summaries[codes])
        fn.__doc__ = _INDEXER_DOC.format(flow=flow, names=list(names) + ([codes] if codes else []),
                                         coded=_CODED if codes else "")
        return fn

    out = SimpleNamespace(
        quest_cache=cache_fn(True, ("kmin", "kmax"), "elementwise min and max"),
        centroid_cache=cache_fn(False, ("mean",), "mean key (float32 accumulation)"),
        lowbit_cache=cache_fn(True, ("kmin", "kmax"), "elementwise min and max and each key's "
                              "channels coded on that range (`flows.lowbit`)", "codes"),
        quest_indexer=indexer_fn(True, ("kmax", "kmin"), "Quest"),
        centroid_indexer=indexer_fn(False, ("mean",), "Centroid"),
        lowbit_indexer=indexer_fn(True, ("kmax", "kmin"), "Lowbit (gqa max)", "codes"))
    names = ("quest_cache", "centroid_cache", "lowbit_cache", "quest_indexer", "centroid_indexer",
             "lowbit_indexer")
    for name in names:
        fn = getattr(out, name)
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = launch_cache.__module__.rsplit(".", 1)[0]
    out.LOWERINGS = {(name.split("_")[0], name.split("_")[1]): getattr(out, name)
                     for name in names}
    return out


def keep_budgets(sel: torch.Tensor, scores: torch.Tensor, budgets: torch.Tensor,
                 num_pages: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Trim a top-k selection to per-row budgets: sel int32 [B, Hkv, K] (ascending, -1 padded: the
    `topk_pages` selection at K) over scores float32 [B, Hkv, max_pages]; budgets int32 [B, Hkv]
    (each in [sink + recent, K]); num_pages int32 [B]. Returns sel int32 [B, Hkv, K], each row
    exactly `topk_pages` at its own budget (ascending, -1 padded): the sink and recent pages, then
    the best-scoring others (ties toward the lower page index; NaN above +inf, as torch.sort).
    Pure torch, no synchronisation (a CUDA graph captures it)."""
    K = sel.shape[-1]
    if K == 0:
        return sel
    idx = sel.clamp_min(0).to(torch.int64)
    s = torch.gather(scores, -1, idx).float()
    n = num_pages.to(sel.device).view(-1, 1, 1)
    forced = (sel >= 0) & ((sel < sink) | (sel >= n - recent))
    group = torch.where(sel < 0, 0, torch.where(forced, 2, 1))
    # rank: forced pages, then candidates by score (descending; among ties the lower page, which
    # comes first in the ascending selection), then padding: two stable sorts
    by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices
    by_group = torch.sort(torch.gather(group, -1, by_score), dim=-1, descending=True,
                          stable=True).indices
    order = torch.gather(by_score, -1, by_group)                        # positions, best first
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(K, device=sel.device).expand_as(order))
    keep = (rank < budgets.to(sel.device, torch.int64)[..., None]) & (sel >= 0)
    big = torch.iinfo(torch.int32).max
    out = torch.sort(torch.where(keep, sel, big), dim=-1).values
    return torch.where(out == big, -1, out).to(torch.int32)
