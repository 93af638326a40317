"""Online-softmax building blocks shared by the CPU attention kernels (page- and token-granularity).

A work item (one request, one KV head, one chunk of its selected pages or tokens) keeps, per query
head `g` of the KV head's group, a running max `m[g]`, a running sum `l[g]` of `exp(score - m[g])` and
an unnormalised output `acc[g, :]`. `attend_tile` folds a decoded tile of keys and values into it;
`finish_row` merges a row's chunk states exactly (log-sum-exp) into the contract state `(o, lse)`,
with `o = 0` and `lse = -inf` when the row attended nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .float_bits import exp32

FASTMATH = {"reassoc", "contract"}
"""Vectorised dot products without assuming finite values (-inf is a real state here)."""

NEG_INF = np.float32(-np.inf)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile_scores(qs, kt, ntok, scores, tile_max):
    """scores[g, t] = qs[g] . kt[t] for t < ntok, and tile_max[g] = max over t (-inf if ntok = 0).

    qs float32 [G, D], kt float32 [>= ntok, D], scores float32 [G, >= ntok], tile_max float32 [G].
    Four query heads share each key load (GQA groups are multiples of 4 at the shapes that matter);
    the rest go one by one."""
    G, D = qs.shape
    g = 0
    while g + 4 <= G:
        for t in range(ntok):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for d in range(D):
                k = kt[t, d]
                s0 += qs[g, d] * k
                s1 += qs[g + 1, d] * k
                s2 += qs[g + 2, d] * k
                s3 += qs[g + 3, d] * k
            scores[g, t] = s0
            scores[g + 1, t] = s1
            scores[g + 2, t] = s2
            scores[g + 3, t] = s3
        g += 4
    for h in range(g, G):
        for t in range(ntok):
            s = np.float32(0.0)
            for d in range(D):
                s += qs[h, d] * kt[t, d]
            scores[h, t] = s
    for h in range(G):
        best = NEG_INF
        for t in range(ntok):
            if scores[h, t] > best or scores[h, t] != scores[h, t]:
                best = scores[h, t]
        tile_max[h] = best


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def accumulate_values(p, vt, ntok, acc):
    """acc[:] += sum over t < ntok of p[t] * vt[t]; four tokens per pass over acc (float32 [D])."""
    D = acc.shape[0]
    t = 0
    while t + 4 <= ntok:
        p0 = p[t]
        p1 = p[t + 1]
        p2 = p[t + 2]
        p3 = p[t + 3]
        for d in range(D):
            acc[d] += (p0 * vt[t, d] + p1 * vt[t + 1, d]) + (p2 * vt[t + 2, d] + p3 * vt[t + 3, d])
        t += 4
    while t < ntok:
        p0 = p[t]
        for d in range(D):
            acc[d] += p0 * vt[t, d]
        t += 1


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def attend_tile(qs, kt, vt, ntok, scores, tile_max, m, l, acc):
    """Fold `ntok` tokens into the running state of one work item.

    qs: float32 [G, D], the group's queries already multiplied by sm_scale. kt, vt: float32
    [>= ntok, D], decoded keys and values. scores: float32 scratch [G, >= ntok]; tile_max: float32
    scratch [G]. m, l: float32 [G]; acc: float32 [G, D]; all updated in place. A NaN score makes the
    state NaN (it is never dropped).
    """
    G, D = qs.shape
    tile_scores(qs, kt, ntok, scores, tile_max)
    for g in range(G):
        m_new = tile_max[g] if tile_max[g] > m[g] or tile_max[g] != tile_max[g] else m[g]
        if m_new == NEG_INF:
            continue
        if m_new > m[g]:
            alpha = exp32(m[g] - m_new)
            l[g] *= alpha
            for d in range(D):
                acc[g, d] *= alpha
            m[g] = m_new
        total = np.float32(0.0)
        for t in range(ntok):
            p = exp32(scores[g, t] - m_new)
            scores[g, t] = p
            total += p
        l[g] += total
        accumulate_values(scores[g], vt, ntok, acc[g])


@njit(nogil=True, cache=True)
def finish_row(part_m, part_l, part_acc, row, n_chunks, o, lse):
    """Merge the chunk states of `row` into `o[row]` (float32 [G, D]) and `lse[row]` (float32 [G]).

    part_m, part_l: float32 [rows, C, G]; part_acc: float32 [rows, C, G, D]; chunks >= n_chunks unused.
    """
    G = o.shape[1]
    D = o.shape[2]
    for g in range(G):
        mx = NEG_INF
        for c in range(n_chunks):
            if part_m[row, c, g] > mx:
                mx = part_m[row, c, g]
        if mx == NEG_INF:
            lse[row, g] = NEG_INF
            for d in range(D):
                o[row, g, d] = 0.0
            continue
        total = np.float32(0.0)
        for d in range(D):
            o[row, g, d] = 0.0
        for c in range(n_chunks):
            if part_m[row, c, g] == NEG_INF:
                continue
            w = exp32(part_m[row, c, g] - mx)
            total += w * part_l[row, c, g]
            for d in range(D):
                o[row, g, d] += w * part_acc[row, c, g, d]
        inv = np.float32(1.0) / total
        for d in range(D):
            o[row, g, d] *= inv
        lse[row, g] = mx + np.log(total)
