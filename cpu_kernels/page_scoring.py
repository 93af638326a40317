"""Summary-based page scoring on the CPU: the cache and indexer stages of `quest` and `centroid`.

These are the CPU lowerings of the library flows (`vortex_hybrid.vflow.lowering`), over summaries
that live in host memory. Signatures (N physical pages, Hkv KV heads, P page_size, D head_dim,
B requests, Hq query heads, G = Hq // Hkv):

cache:   fn(k_pool [N, Hkv, P, D] bf16/fp16/fp32/fp64, pages int64 [n] (full physical pages),
            summaries {name: float32 [N, Hkv, 1, D]}) -> None; writes rows `pages` in place.
         quest: "kmin", "kmax" (elementwise min / max of the page's keys); centroid: "mean".
indexer: fn(q [B, Hq, D], summaries, page_table int32 [B, max_pages], seq_lens int32 [B],
            budget, sink, recent, page_size=P) -> sel int32 [B, Hkv, budget], ascending, -1 padded.
         `page_size` (keyword, passed by the lowering hook) counts each request's pages; required.
         quest score of page p for KV head h: sum over the group's query heads j of
         sum_d max(q_jd * kmax_pd, q_jd * kmin_pd); centroid score: sum_j q_j . mean_p.
         Selection = `topk_pages` of those scores (the partly filled tail page has no summary; it is
         always among the `recent >= 1` forced pages), exactly `vortex_hybrid.vflow.select_pages`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_topk_args, pages_of

from .online_softmax import FASTMATH, NEG_INF
from .prefetch import prefetch_range
from .storage_decode import decode_into
from .tensor_views import float32_array, int32_array, storage_bits
from .threads import kernel_call
from .topk_pages import run_topk_pages

QUEST, CENTROID = 0, 1
_SUMMARIES = {QUEST: ("kmin", "kmax"), CENTROID: ("mean",)}
MIN_SCORE_CHUNK = 64
"""Fewest pages per scoring work item when rows are split to give every thread work."""


@njit(parallel=True, nogil=True, cache=True)
def _cache_kernel(k_bits, kind, hkv, page_size, head_dim, pages, flow, s0, s1):
    """Summaries of full pages: quest writes s0 = kmin, s1 = kmax; centroid writes s0 = mean.
    s0, s1: float32 [N, Hkv, D]; pages int64 [n]."""
    tile = page_size * head_dim
    inv = np.float32(1.0 / page_size)
    for item in prange(pages.shape[0] * hkv):
        i = item // hkv
        h = item - i * hkv
        page = pages[i]
        keys = np.empty((page_size, head_dim), np.float32)
        start = (page * hkv + h) * tile
        decode_into(k_bits[start:start + tile], kind, keys.reshape(tile))
        if flow == QUEST:
            for d in range(head_dim):
                s0[page, h, d] = keys[0, d]
                s1[page, h, d] = keys[0, d]
            for t in range(1, page_size):
                for d in range(head_dim):
                    s0[page, h, d] = min(s0[page, h, d], keys[t, d])
                    s1[page, h, d] = max(s1[page, h, d], keys[t, d])
        else:
            for d in range(head_dim):
                s0[page, h, d] = 0.0
            for t in range(page_size):
                for d in range(head_dim):
                    s0[page, h, d] += keys[t, d]
            for d in range(head_dim):
                s0[page, h, d] *= inv


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _score_kernel(q, page_table, seq_lens, page_size, flow, s0, s1, chunk, scores):
    """Page scores float32 [B, Hkv, max_pages]: q float32 [B, Hkv, G, D]; s0, s1 float32 [N, Hkv, D]
    (quest: kmin, kmax; centroid: mean, unused). -inf for the unscored tail page and past the end.

    Both scores are linear in the summary once the group is folded: quest's
    sum_j sum_d max(q_jd kmax_d, q_jd kmin_d) = sum_d (pos_d kmax_d + neg_d kmin_d) with
    pos_d = sum_j max(q_jd, 0), neg_d = sum_j min(q_jd, 0) (as kmin <= kmax), and centroid's
    sum_j q_j . mean = (sum_j q_j) . mean; so a page costs 2 D (quest) or D multiply-adds, and the
    kernel streams summary rows, prefetching the rows of the page two ahead."""
    B, hkv, G, D = q.shape
    max_pages = scores.shape[2]
    n_chunks = (max_pages + chunk - 1) // chunk
    for item in prange(B * hkv * n_chunks):
        row = item // n_chunks
        c = item - row * n_chunks
        b = row // hkv
        h = row - b * hkv
        n_full = np.int64(seq_lens[b]) // page_size
        pos = np.zeros(D, np.float32)
        neg = np.zeros(D, np.float32)
        for g in range(G):
            for d in range(D):
                qv = q[b, h, g, d]
                if flow == CENTROID or qv > 0:
                    pos[d] += qv
                else:
                    neg[d] += qv
        p0 = c * chunk
        p1 = min(max_pages, (c + 1) * chunk)
        for p in range(p0, p1):
            if p >= n_full:
                scores[b, h, p] = NEG_INF
                continue
            if p + 2 < min(p1, n_full):
                ahead = np.int64(page_table[b, p + 2])
                prefetch_range(s0[ahead, h], 0, D)
                if flow == QUEST:
                    prefetch_range(s1[ahead, h], 0, D)
            phys = np.int64(page_table[b, p])
            lo = s0[phys, h]
            s = np.float32(0.0)
            if flow == QUEST:
                hi = s1[phys, h]
                for d in range(D):
                    s += pos[d] * hi[d] + neg[d] * lo[d]
            else:
                for d in range(D):
                    s += pos[d] * lo[d]
            scores[b, h, p] = s


def _summary_arrays(flow: int, summaries: dict, hkv: int, head_dim: int) -> tuple:
    names = _SUMMARIES[flow]
    arrays = []
    for name in names:
        if name not in summaries:
            raise ValueError(f"summaries lacks {name!r}; this flow needs {list(names)}")
        t = summaries[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 4 \
                or tuple(t.shape[1:]) != (hkv, 1, head_dim) or not t.is_contiguous():
            raise ValueError(f"summaries[{name!r}] must be a contiguous float32 CPU tensor "
                             f"[N, {hkv}, 1, {head_dim}], got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        arrays.append(float32_array(f"summaries[{name!r}]", t).reshape(t.shape[0], hkv, head_dim))
    return arrays[0], arrays[-1]


def _run_cache(flow: int, k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict) -> None:
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 4:
        raise ValueError(f"k_pool must be a tensor [N, Hkv, P, D], got {getattr(k_pool, 'shape', k_pool)}")
    N, hkv, page_size, head_dim = k_pool.shape
    s0, s1 = _summary_arrays(flow, summaries, hkv, head_dim)
    if not isinstance(pages, torch.Tensor) or pages.dim() != 1:
        raise ValueError(f"pages must be a 1-D int64 tensor of physical pages, got {pages!r}")
    pages64 = pages.to(torch.int64).contiguous()
    if pages64.numel() == 0:
        return
    lo, hi = int(pages64.min()), int(pages64.max())
    if lo < 0 or hi >= N or hi >= s0.shape[0]:
        raise ValueError(f"pages hold {lo if lo < 0 else hi}; the pool and summaries have pages "
                         f"0..{min(N, s0.shape[0]) - 1}")
    k_bits, kind = storage_bits("k_pool", k_pool)
    with kernel_call():
        _cache_kernel(k_bits, kind, hkv, page_size, head_dim, pages64.numpy(), flow, s0, s1)


def _score_chunk(rows: int, max_pages: int, threads: int) -> int:
    if rows >= 2 * threads:
        return max(max_pages, 1)
    return max(MIN_SCORE_CHUNK, -(-max_pages * rows // (4 * threads)))


def _check_indexer_args(q, page_table, seq_lens, budget, sink, recent, page_size) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.device.type != "cpu":
        raise ValueError(f"q must be a CPU tensor [B, Hq, D], got {getattr(q, 'shape', q)!r}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size={page_size!r} must be a positive integer: tokens per page of "
                         "the pool the summaries describe")
    if isinstance(recent, int) and not isinstance(recent, bool) and recent < 1:
        raise ValueError(f"recent={recent} must be >= 1: the partly filled last page is always "
                         "attended (it has no summary to be scored by)")
    B = q.shape[0]
    for name, t, nd in (("page_table", page_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd or t.shape[0] != B \
                or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 tensor with {B} rows, got "
                             f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    n_pages = pages_of(seq_lens, page_size).to(torch.int32)
    check_topk_args(torch.empty(B, 1, page_table.shape[1]), budget, n_pages, sink, recent)


def page_scores(flow: int, q: torch.Tensor, summaries: dict, page_table: torch.Tensor,
                seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Scores float32 [B, Hkv, max_pages] of `flow` (QUEST or CENTROID) for q [B, Hq, D]; -inf for
    pages without a summary (the partly filled tail page, columns past the request's pages)."""
    B, hq, d = q.shape
    first = summaries.get(_SUMMARIES[flow][0]) if isinstance(summaries, dict) else None
    hkv = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 4 else 1
    if hq % hkv:
        raise ValueError(f"num_q_heads={hq} must be a multiple of the summaries' num_kv_heads={hkv}")
    s0, s1 = _summary_arrays(flow, summaries, hkv, d)
    pt = int32_array("page_table", page_table)
    sl = int32_array("seq_lens", seq_lens)
    qf = float32_array("q", q).reshape(B, hkv, hq // hkv, d)
    max_pages = pt.shape[1]
    scores = torch.empty(B, hkv, max_pages, dtype=torch.float32)
    if scores.numel() == 0:
        return scores
    with kernel_call() as threads:
        _score_kernel(qf, pt, sl, page_size, flow, s0, s1,
                      _score_chunk(B * hkv, max_pages, threads), scores.numpy())
    return scores


def _run_indexer(flow: int, q, summaries, page_table, seq_lens, budget, sink, recent,
                 page_size) -> torch.Tensor:
    _check_indexer_args(q, page_table, seq_lens, budget, sink, recent, page_size)
    scores = page_scores(flow, q, summaries, page_table, seq_lens, page_size)
    return run_topk_pages(scores, budget, pages_of(seq_lens, page_size).to(torch.int32), sink,
                          recent)


def quest_cache(k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict) -> None:
    """Quest summaries of full pages: summaries["kmin"], ["kmax"] float32 [N, Hkv, 1, D] rows
    `pages` (int64 [n]) = elementwise min / max over the page's keys of k_pool [N, Hkv, P, D]."""
    _run_cache(QUEST, k_pool, pages, summaries)


def centroid_cache(k_pool: torch.Tensor, pages: torch.Tensor, summaries: dict) -> None:
    """Centroid summaries of full pages: summaries["mean"] float32 [N, Hkv, 1, D] rows `pages`
    (int64 [n]) = the mean key of the page (float32 sum / page_size) of k_pool [N, Hkv, P, D]."""
    _run_cache(CENTROID, k_pool, pages, summaries)


def quest_indexer(q: torch.Tensor, summaries: dict, page_table: torch.Tensor,
                  seq_lens: torch.Tensor, budget: int, sink: int, recent: int,
                  page_size: Optional[int] = None) -> torch.Tensor:
    """Quest selection: sel int32 [B, Hkv, budget] (ascending, -1 padded) from q [B, Hq, D] and
    summaries "kmin", "kmax" (float32 [N, Hkv, 1, D]); page_table int32 [B, max_pages]; seq_lens
    int32 [B] tokens; page_size: tokens per page (needed to count each request's pages)."""
    return _run_indexer(QUEST, q, summaries, page_table, seq_lens, budget, sink, recent, page_size)


def centroid_indexer(q: torch.Tensor, summaries: dict, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, budget: int, sink: int, recent: int,
                     page_size: Optional[int] = None) -> torch.Tensor:
    """Centroid selection: sel int32 [B, Hkv, budget] (ascending, -1 padded) from q [B, Hq, D] and
    summaries "mean" (float32 [N, Hkv, 1, D]); page_table int32 [B, max_pages]; seq_lens int32 [B]
    tokens; page_size: tokens per page (needed to count each request's pages)."""
    return _run_indexer(CENTROID, q, summaries, page_table, seq_lens, budget, sink, recent,
                        page_size)
