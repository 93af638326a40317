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
from .storage_decode import as_f32

FASTMATH = {"reassoc", "contract"}
"""Vectorised dot products without assuming finite values (-inf is a real state here)."""

NEG_INF = np.float32(-np.inf)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _dots4(qs, g, kt, t0, t1, scores):
    """scores[g:g+4, t] = qs[g:g+4] . kt[t] for t in [t0, t1), two tokens per pass over D."""
    D = qs.shape[1]
    t = t0
    while t + 2 <= t1:
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        b0 = np.float32(0.0)
        b1 = np.float32(0.0)
        b2 = np.float32(0.0)
        b3 = np.float32(0.0)
        for d in range(D):
            k0 = as_f32(kt[t, d])
            k1 = as_f32(kt[t + 1, d])
            q0 = qs[g, d]
            q1 = qs[g + 1, d]
            q2 = qs[g + 2, d]
            q3 = qs[g + 3, d]
            a0 += q0 * k0
            a1 += q1 * k0
            a2 += q2 * k0
            a3 += q3 * k0
            b0 += q0 * k1
            b1 += q1 * k1
            b2 += q2 * k1
            b3 += q3 * k1
        scores[g, t] = a0
        scores[g + 1, t] = a1
        scores[g + 2, t] = a2
        scores[g + 3, t] = a3
        scores[g, t + 1] = b0
        scores[g + 1, t + 1] = b1
        scores[g + 2, t + 1] = b2
        scores[g + 3, t + 1] = b3
        t += 2
    if t < t1:
        for h in range(g, g + 4):
            s = np.float32(0.0)
            for d in range(D):
                s += qs[h, d] * as_f32(kt[t, d])
            scores[h, t] = s


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile_scores(qs, kt, ntok, scores, tile_max):
    """scores[g, t] = qs[g] . kt[t] for t < ntok, and tile_max[g] = max over t (-inf if ntok = 0).

    qs float32 [G, D], kt float32 [>= ntok, D], scores float32 [G, >= ntok], tile_max float32 [G].
    Query heads go four at a time (GQA groups are multiples of 4 at the shapes that matter) and
    tokens two at a time, so each loaded key and query element feeds several products."""
    G, D = qs.shape
    g = 0
    while g + 4 <= G:
        _dots4(qs, g, kt, 0, ntok, scores)
        g += 4
    for h in range(g, G):
        for t in range(ntok):
            s = np.float32(0.0)
            for d in range(D):
                s += qs[h, d] * as_f32(kt[t, d])
            scores[h, t] = s
    for h in range(G):
        best = NEG_INF
        for t in range(ntok):
            if scores[h, t] > best or scores[h, t] != scores[h, t]:
                best = scores[h, t]
        tile_max[h] = best


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _accumulate4(p, g, vt, ntok, acc):
    """acc[g:g+4] += p[g:g+4, :ntok] @ vt[:ntok]; four tokens per pass over D."""
    D = acc.shape[1]
    t = 0
    while t + 4 <= ntok:
        p00 = p[g, t]
        p01 = p[g, t + 1]
        p02 = p[g, t + 2]
        p03 = p[g, t + 3]
        p10 = p[g + 1, t]
        p11 = p[g + 1, t + 1]
        p12 = p[g + 1, t + 2]
        p13 = p[g + 1, t + 3]
        p20 = p[g + 2, t]
        p21 = p[g + 2, t + 1]
        p22 = p[g + 2, t + 2]
        p23 = p[g + 2, t + 3]
        p30 = p[g + 3, t]
        p31 = p[g + 3, t + 1]
        p32 = p[g + 3, t + 2]
        p33 = p[g + 3, t + 3]
        for d in range(D):
            v0 = as_f32(vt[t, d])
            v1 = as_f32(vt[t + 1, d])
            v2 = as_f32(vt[t + 2, d])
            v3 = as_f32(vt[t + 3, d])
            acc[g, d] += (p00 * v0 + p01 * v1) + (p02 * v2 + p03 * v3)
            acc[g + 1, d] += (p10 * v0 + p11 * v1) + (p12 * v2 + p13 * v3)
            acc[g + 2, d] += (p20 * v0 + p21 * v1) + (p22 * v2 + p23 * v3)
            acc[g + 3, d] += (p30 * v0 + p31 * v1) + (p32 * v2 + p33 * v3)
        t += 4
    while t < ntok:
        p0 = p[g, t]
        p1 = p[g + 1, t]
        p2 = p[g + 2, t]
        p3 = p[g + 3, t]
        for d in range(D):
            v = as_f32(vt[t, d])
            acc[g, d] += p0 * v
            acc[g + 1, d] += p1 * v
            acc[g + 2, d] += p2 * v
            acc[g + 3, d] += p3 * v
        t += 1


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def accumulate_values(p, vt, ntok, acc):
    """acc[g] += sum over t < ntok of p[g, t] * vt[t] for every g; p float32 [G, >= ntok],
    vt float32 [>= ntok, D], acc float32 [G, D]. Query heads four at a time, as in tile_scores."""
    G, D = acc.shape
    g = 0
    while g + 4 <= G:
        _accumulate4(p, g, vt, ntok, acc)
        g += 4
    for h in range(g, G):
        for t in range(ntok):
            ph = p[h, t]
            for d in range(D):
                acc[h, d] += ph * as_f32(vt[t, d])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def attend_tile(qs, kt, vt, ntok, scores, tile_max, m, l, acc):
    """Fold `ntok` tokens into the running state of one work item.

    qs: float32 [G, D], the group's queries already multiplied by sm_scale. kt, vt: [>= ntok, D]
    keys and values, float32 or raw storage bits (`storage_decode.as_f32`: uint16 bf16, uint32 fp32). scores: float32 scratch [G, >= ntok]; tile_max: float32
    scratch [G]. m, l: float32 [G]; acc: float32 [G, D]; all updated in place. A NaN score makes the
    state NaN (it is never dropped).
    """
    G, D = qs.shape
    tile_scores(qs, kt, ntok, scores, tile_max)
    for g in range(G):
        m_new = tile_max[g] if tile_max[g] > m[g] or tile_max[g] != tile_max[g] else m[g]
        if m_new == NEG_INF:
            for t in range(ntok):
                scores[g, t] = 0.0
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
    accumulate_values(scores, vt, ntok, acc)


@njit(nogil=True, cache=True)
def new_parts(rows, n_chunks, G, D):
    """Chunk states of a launch: part_m, part_l float32 [rows, n_chunks, G], part_acc float32
    [rows, n_chunks, G, D] (each item sets its own with `empty_state`)."""
    return (np.empty((rows, n_chunks, G), np.float32), np.empty((rows, n_chunks, G), np.float32),
            np.empty((rows, n_chunks, G, D), np.float32))


@njit(nogil=True, cache=True)
def new_tiles(G, page_size, D):
    """Scratch of one work item: (k_tile, v_tile) float32 [page_size, D], scores float32
    [G, page_size], tile_max float32 [G]."""
    return (np.empty((page_size, D), np.float32), np.empty((page_size, D), np.float32),
            np.empty((G, page_size), np.float32), np.empty(G, np.float32))


@njit(nogil=True, cache=True)
def empty_state(part_m, part_l, part_acc, row, c):
    """Views (m [G], l [G], acc [G, D]) of chunk c of row, set to the empty state."""
    m = part_m[row, c]
    l = part_l[row, c]
    acc = part_acc[row, c]
    m[:] = NEG_INF
    l[:] = 0.0
    acc[:] = 0.0
    return m, l, acc


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
