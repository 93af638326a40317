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
def attend_tile(qs, kt, vt, ntok, scores, m, l, acc):
    """Fold `ntok` tokens into the running state of one work item.

    qs: float32 [G, D], the group's queries already multiplied by sm_scale. kt, vt: float32
    [>= ntok, D], decoded keys and values. scores: float32 scratch [G, >= ntok].
    m, l: float32 [G]; acc: float32 [G, D]; all updated in place.
    """
    G, D = qs.shape
    for g in range(G):
        tile_max = NEG_INF
        for t in range(ntok):
            s = np.float32(0.0)
            for d in range(D):
                s += qs[g, d] * kt[t, d]
            scores[g, t] = s
            if s > tile_max:
                tile_max = s
        m_new = max(m[g], tile_max)
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
        for t in range(ntok):
            p = scores[g, t]
            for d in range(D):
                acc[g, d] += p * vt[t, d]


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
