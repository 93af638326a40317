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


_SPREAD = np.array([sum(((v >> j) & 1) << (8 * j) for j in range(8)) for v in range(256)],
                   dtype=np.uint64)
"""Byte v -> the uint64 whose byte j is bit j of v (0 or 1): one byte of a code plane spread over
the eight channels it holds, in channel order in memory (little-endian)."""


@njit(nogil=True, cache=True)
def _unpack_page(codes, row, h, bits, words):
    """The codes of summary row `row`, KV head h, one uint8 per channel: words uint64 [P, width]
    (a view of a uint8 [P, 8 * width] tile) from codes uint8 [R, Hkv, P, bits * width]
    (`vortex_hybrid.packed_codes`), so that byte 8w + j of token t's row is
    sum_b (bit j of plane b's byte w) << b. Eight channels per uint64: each plane byte spread by
    `_SPREAD`, shifted to its plane's bit and or-ed in (bits=2, the default, in one expression)."""
    P, width = words.shape
    if bits == 2:
        for t in range(P):
            for w in range(width):
                words[t, w] = _SPREAD[codes[row, h, t, w]] | \
                    (_SPREAD[codes[row, h, t, width + w]] << np.uint64(1))
        return
    for t in range(P):
        for w in range(width):
            words[t, w] = _SPREAD[codes[row, h, t, w]]
        for bit in range(1, bits):
            shift = np.uint64(bit)
            o = bit * width
            for w in range(width):
                words[t, w] |= _SPREAD[codes[row, h, t, o + w]] << shift


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _best_code_dot(scaled, base, tile):
    """max over query heads g and tokens t of base[g] + scaled[g] . tile[t]: scaled float32 [G, C],
    base float32 [G], tile uint8 codes [P, C]. Query heads go four at a time and tokens two at a
    time (eight running sums over C, so each loaded code and query element feeds several
    products); the remaining heads one at a time, four tokens a pass."""
    G, C = scaled.shape
    P = tile.shape[0]
    best = NEG_INF
    g = 0
    while g + 4 <= G:
        m0 = NEG_INF
        m1 = NEG_INF
        m2 = NEG_INF
        m3 = NEG_INF
        t = 0
        while t + 2 <= P:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            b0 = np.float32(0.0)
            b1 = np.float32(0.0)
            b2 = np.float32(0.0)
            b3 = np.float32(0.0)
            for d in range(C):
                k0 = np.float32(tile[t, d])
                k1 = np.float32(tile[t + 1, d])
                q0 = scaled[g, d]
                q1 = scaled[g + 1, d]
                q2 = scaled[g + 2, d]
                q3 = scaled[g + 3, d]
                a0 += q0 * k0
                a1 += q1 * k0
                a2 += q2 * k0
                a3 += q3 * k0
                b0 += q0 * k1
                b1 += q1 * k1
                b2 += q2 * k1
                b3 += q3 * k1
            m0 = max(m0, a0, b0)
            m1 = max(m1, a1, b1)
            m2 = max(m2, a2, b2)
            m3 = max(m3, a3, b3)
            t += 2
        if t < P:                                       # an odd page size's last token
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for d in range(C):
                k0 = np.float32(tile[t, d])
                a0 += scaled[g, d] * k0
                a1 += scaled[g + 1, d] * k0
                a2 += scaled[g + 2, d] * k0
                a3 += scaled[g + 3, d] * k0
            m0 = max(m0, a0)
            m1 = max(m1, a1)
            m2 = max(m2, a2)
            m3 = max(m3, a3)
        best = max(best, base[g] + m0, base[g + 1] + m1, base[g + 2] + m2, base[g + 3] + m3)
        g += 4
    for h in range(g, G):
        m = NEG_INF
        t = 0
        while t + 4 <= P:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for d in range(C):
                qv = scaled[h, d]
                a0 += qv * np.float32(tile[t, d])
                a1 += qv * np.float32(tile[t + 1, d])
                a2 += qv * np.float32(tile[t + 2, d])
                a3 += qv * np.float32(tile[t + 3, d])
            m = max(m, a0, a1, a2, a3)
            t += 4
        for u in range(t, P):
            a0 = np.float32(0.0)
            for d in range(C):
                a0 += scaled[h, d] * np.float32(tile[u, d])
            m = max(m, a0)
        best = max(best, base[h] + m)
    return best


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _lowbit_scores_kernel(q, page_table, seq_lens, page_size, s0, s1, codes, bits, chunk, scores):
    """lowbit page scores float32 [B, Hkv, max_pages] (gqa "max"): q float32 [B, Hkv, G, D]; s0,
    s1 [R, Hkv, D] kmin, kmax (float32, or bf16 / fp32 / fp8 raw bits); codes uint8
    [R, Hkv, P, bits * ceil(D / 8)] (each page's rows contiguous). -inf for the unscored tail page
    and past the end.

    score = max_j (q_j . kmin + max_t sum_d (q_jd step_d) c_td), step = (kmax - kmin) / L,
    L = 2**bits - 1. A work item scales its queries by 1 / L once; per page, kmin and
    kmax - kmin are decoded once, the bases q_j . kmin take G D multiply-adds and the scaled
    queries (q_jd / L) (kmax_d - kmin_d) G D products, the codes are unpacked eight channels at a
    time into a uint8 tile (`_unpack_page`), and every token's codes are dotted with every scaled
    query (`_best_code_dot`: G P ceil(D / 8) 8-wide multiply-adds); the summary rows and codes of
    the page two ahead are prefetched. Any code width of `packed_codes` (1-8 bits)."""
    B, hkv, G, D = q.shape
    max_pages = scores.shape[2]
    width = (D + 7) // 8
    page_bytes = page_size * codes.shape[3]
    inv_levels = np.float32(1.0) / np.float32((1 << bits) - 1)
    n_chunks = (max_pages + chunk - 1) // chunk
    for item in prange(B * hkv * n_chunks):
        b, h, c = _work_item(item, n_chunks, hkv)
        n_full = np.int64(seq_lens[b]) // page_size
        qs = np.empty((G, D), np.float32)                   # q / L
        for g in range(G):
            for d in range(D):
                qs[g, d] = q[b, h, g, d] * inv_levels
        scaled = np.zeros((G, 8 * width), np.float32)       # zero past D: padded channels
        base = np.empty(G, np.float32)
        kmin = np.empty(D, np.float32)
        step = np.empty(D, np.float32)                      # kmax - kmin (the 1 / L is in qs)
        tile = np.empty((page_size, 8 * width), np.uint8)   # the page's codes, unpacked
        words = tile.view(np.uint64)
        p0 = c * chunk
        p1 = min(max_pages, (c + 1) * chunk)
        for p in range(p0, p1):
            if p >= n_full:
                scores[b, h, p] = NEG_INF
                continue
            if p + 2 < min(p1, n_full):
                ahead = np.int64(page_table[b, p + 2])
                prefetch_range(s0[ahead, h], 0, D)
                prefetch_range(s1[ahead, h], 0, D)
                # a page's P code rows are contiguous (`contracts.check_codes`): prefetched from
                # its first row on (past that row's slice: a prefetch cannot fault)
                prefetch_range(codes[ahead, h, 0], 0, page_bytes)
            phys = np.int64(page_table[b, p])
            for d in range(D):
                lo = as_f32(s0[phys, h, d])
                kmin[d] = lo
                step[d] = as_f32(s1[phys, h, d]) - lo
            for g in range(G):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[b, h, g, d] * kmin[d]
                    scaled[g, d] = qs[g, d] * step[d]
                base[g] = acc
            _unpack_page(codes, phys, h, bits, words)
            scores[b, h, p] = _best_code_dot(scaled, base, tile)


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
