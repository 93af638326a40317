"""Indexer-stage kernels of the library flows on the CPU: page scores from summaries, then top-k.

The mirror of `gpu_kernels.page_scoring`, over summaries in host memory:

    quest:    score[b, h, p] = sum_{j in group(h)} sum_d max(q_jd * kmax_pd, q_jd * kmin_pd)
    centroid: score[b, h, p] = sum_{j in group(h)} q_j . mean_p
    lowbit:   score[b, h, p] = max_{j in group(h)} max_t q_j . (kmin_p + c_pt * step_p),
              step = (kmax - kmin) / (2**bits - 1), c_pt token t's codes (gqa "max")

The selection is `topk_pages` of those scores (first `sink` and last `recent` pages forced, best
others up to `budget`, ties toward the lower page index, all pages when `budget >= num_pages`), so
it equals `vortex_hybrid.vflow.select_pages`. The partly filled tail page has no summary: it is not
read, and the `recent >= 1` forced pages include it.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim, R summary rows):
    q [B, Hq, D] float   page_table int32 [B, max_pages] (logical page -> summary row; read for
    full pages only)   seq_lens int32 [B] tokens
    summaries[name] float32, bfloat16 or float8_e4m3fn [R, Hkv, 1, D]: quest and lowbit "kmin",
    "kmax"; centroid "mean"; lowbit "codes" uint8 [R, Hkv, page_size, bits * ceil(D / 8)]
    (`vortex_hybrid.packed_codes`)
    returns sel int32 [B, Hkv, budget], ascending, -1 padded
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import pages_of
from vortex_hybrid.packed_codes import code_bits

from .online_softmax import FASTMATH, NEG_INF
from .prefetch import prefetch_range
from .storage_decode import as_f32, float32_of
from .tensor_views import int32_array, storage_bits
from .threads import kernel_call
from .topk_pages import launch_topk_pages

MIN_SCORE_CHUNK = 64
"""Fewest pages per scoring work item when rows are split to give every thread work."""


@njit(cache=True, inline="always")
def _work_item(item, n_chunks, hkv):
    """A scoring loop's work item as (request, KV head, chunk of pages): items run row-major over
    the (request, KV head) rows, each row's chunks in order."""
    row = item // n_chunks
    c = item - row * n_chunks
    b = row // hkv
    return b, row - b * hkv, c


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _page_scores_kernel(q, page_table, seq_lens, page_size, quest, s0, s1, chunk, scores):
    """Page scores float32 [B, Hkv, max_pages]: q float32 [B, Hkv, G, D]; s0, s1 [R, Hkv, D] float32,
    or bf16 / fp32 raw bits (quest: kmin, kmax; centroid: mean twice). -inf for the unscored tail page and past the end.

    Both scores are linear in the summary once the group is folded: quest's
    sum_j sum_d max(q_jd kmax_d, q_jd kmin_d) = sum_d (pos_d kmax_d + neg_d kmin_d) with
    pos_d = sum_j max(q_jd, 0), neg_d = sum_j min(q_jd, 0) (as kmin <= kmax), and centroid's
    sum_j q_j . mean = (sum_j q_j) . mean; so a page costs 2 D (quest) or D multiply-adds, and the
    kernel streams summary rows, prefetching the rows of the page two ahead."""
    B, hkv, G, D = q.shape
    max_pages = scores.shape[2]
    n_chunks = (max_pages + chunk - 1) // chunk
    for item in prange(B * hkv * n_chunks):
        b, h, c = _work_item(item, n_chunks, hkv)
        n_full = np.int64(seq_lens[b]) // page_size
        pos = np.zeros(D, np.float32)
        neg = np.zeros(D, np.float32)
        for g in range(G):
            for d in range(D):
                qv = q[b, h, g, d]
                if not quest or qv > 0:
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
                if quest:
                    prefetch_range(s1[ahead, h], 0, D)
            phys = np.int64(page_table[b, p])
            lo = s0[phys, h]
            s = np.float32(0.0)
            if quest:
                hi = s1[phys, h]
                for d in range(D):
                    s += pos[d] * as_f32(hi[d]) + neg[d] * as_f32(lo[d])
            else:
                for d in range(D):
                    s += pos[d] * as_f32(lo[d])
            scores[b, h, p] = s


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _lowbit_scores_kernel(q, page_table, seq_lens, page_size, s0, s1, codes, bits, chunk, scores):
    """lowbit page scores float32 [B, Hkv, max_pages] (gqa "max"): q float32 [B, Hkv, G, D]; s0,
    s1 [R, Hkv, D] kmin, kmax (float32, or bf16 / fp32 / fp8 raw bits); codes uint8
    [R, Hkv, P, bits * ceil(D / 8)]. score = max_j (q_j . kmin + max_t sum_d (q_jd step_d) c_td),
    step = (kmax - kmin) / L, L = 2**bits - 1: per page, G D multiply-adds for the scaled queries,
    then each token's codes (decoded from their bit planes) against them. -inf for the unscored
    tail page and past the end."""
    B, hkv, G, D = q.shape
    max_pages = scores.shape[2]
    width = (D + 7) // 8
    levels = np.float32((1 << bits) - 1)
    n_chunks = (max_pages + chunk - 1) // chunk
    for item in prange(B * hkv * n_chunks):
        b, h, c = _work_item(item, n_chunks, hkv)
        n_full = np.int64(seq_lens[b]) // page_size
        scaled = np.zeros((G, 8 * width), np.float32)       # zero past D: padded channels
        base = np.empty(G, np.float32)
        tile = np.empty((page_size, 8 * width), np.float32)  # the page's codes, decoded
        p0 = c * chunk
        p1 = min(max_pages, (c + 1) * chunk)
        for p in range(p0, p1):
            if p >= n_full:
                scores[b, h, p] = NEG_INF
                continue
            phys = np.int64(page_table[b, p])
            lo = s0[phys, h]
            hi = s1[phys, h]
            for g in range(G):
                acc = np.float32(0.0)
                for d in range(D):
                    kmin = as_f32(lo[d])
                    acc += q[b, h, g, d] * kmin
                    scaled[g, d] = q[b, h, g, d] * ((as_f32(hi[d]) - kmin) / levels)
                base[g] = acc
            page_codes = codes[phys, h]
            for t in range(page_size):
                for w in range(width):
                    for j in range(8):
                        tile[t, 8 * w + j] = 0.0
                    for bit in range(bits):
                        byte = page_codes[t, bit * width + w]
                        weight = np.float32(1 << bit)
                        for j in range(8):
                            tile[t, 8 * w + j] += weight * np.float32((byte >> j) & 1)
            best = NEG_INF
            for g in range(G):
                for t in range(page_size):
                    acc = np.float32(0.0)
                    for d in range(8 * width):
                        acc += scaled[g, d] * tile[t, d]
                    best = max(best, base[g] + acc)
            scores[b, h, p] = best


def _rows(name: str, t: torch.Tensor) -> np.ndarray:
    """A summary store [R, Hkv, 1, D] as an [R, Hkv, D] array of float32 or bf16 raw bits."""
    bits, _ = storage_bits(name, t)
    return bits.reshape(t.shape[0], t.shape[1], t.shape[3])


def _score_chunk(rows: int, max_pages: int, threads: int) -> int:
    if rows >= 2 * threads:
        return max(max_pages, 1)
    return max(MIN_SCORE_CHUNK, -(-max_pages * rows // (4 * threads)))


def launch_page_scores(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, page_table: torch.Tensor,
                       seq_lens: torch.Tensor, page_size: int, quest: bool,
                       codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unchecked: scores float32 [B, Hkv, max_pages] for q [B, Hq, D]; a, b summary stores
    [R, Hkv, 1, D] (quest, lowbit: kmax, kmin; centroid: mean twice); codes (lowbit): packed uint8
    [R, Hkv, page_size, bits * ceil(D / 8)]; -inf for pages without a summary (the partly filled
    tail page, columns past the request's pages)."""
    B, hq, d = q.shape
    hkv = a.shape[1]
    pt = int32_array("page_table", page_table)
    sl = int32_array("seq_lens", seq_lens)
    qf = float32_of("q", q).reshape(B, hkv, hq // hkv, d)
    max_pages = pt.shape[1]
    scores = torch.empty(B, hkv, max_pages, dtype=torch.float32)
    if scores.numel() == 0:
        return scores
    s0, s1 = _rows("summaries", b), _rows("summaries", a)          # the kernel's (kmin, kmax)
    with kernel_call() as threads:
        chunk = _score_chunk(B * hkv, max_pages, threads)
        if codes is None:
            _page_scores_kernel(qf, pt, sl, page_size, quest, s0, s1, chunk, scores.numpy())
        else:
            _lowbit_scores_kernel(qf, pt, sl, page_size, s0, s1, codes.numpy(),
                                  code_bits(codes.shape[-1], d), chunk, scores.numpy())
    return scores


def launch_indexer(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, page_table: torch.Tensor,
                   seq_lens: torch.Tensor, budget: int, sink: int, recent: int, page_size: int,
                   quest: bool, budgets: Optional[torch.Tensor] = None,
                   codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unchecked launcher: sel int32 [B, Hkv, budget]; arguments as in `launch_page_scores`;
    budgets int32 [B, Hkv] (or None): each row trimmed to its own (`flow_kernels.keep_budgets`)."""
    scores = launch_page_scores(q, a, b, page_table, seq_lens, page_size, quest, codes)
    num_pages = pages_of(seq_lens, page_size).to(torch.int32)
    sel = launch_topk_pages(scores, budget, num_pages, sink, recent)
    if budgets is None:
        return sel
    from vortex_hybrid.flow_kernels import keep_budgets
    return keep_budgets(sel, scores, budgets, num_pages, sink, recent)
