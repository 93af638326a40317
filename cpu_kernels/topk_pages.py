"""Top-k page selection per (request, KV head) in linear time (Numba radix select).

Same contract as `vortex_hybrid.reference.topk_pages`: the first `sink` and last `recent` pages are
kept, the `k - sink - recent` best-scoring other pages fill the rest (ties toward the lower page
index), every page when `num_pages <= k`; output ascending, padded with -1. Float32 scores map to
uint32 keys that order like torch's descending sort (NaN above +inf, -0 equal to +0); a three-pass
radix select (11, 11, 10 bits) finds the threshold key T and how many keys equal to T to keep, and one
ordered scan writes the selection, so a row costs O(num_pages) whatever k is.

Rows run in parallel; a batch with fewer rows than threads and long rows (>= PARALLEL_ROW_MIN
pages) instead splits each row over all threads (per-chunk histograms, then an offset scan).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_topk_args

from .tensor_views import float_bits, int32_array, out_tensor
from .threads import kernel_call

PARALLEL_ROW_MIN = 1 << 16
"""Rows at least this long are split over threads when the batch has fewer rows than threads."""

_DIGITS = ((21, 2048), (10, 2048), (0, 1024))
_ABS = np.uint32(0x7FFFFFFF)
_SIGN = np.uint32(0x80000000)
_EXP = np.uint32(0x7F800000)
_ALL = np.uint32(0xFFFFFFFF)


@njit(nogil=True, cache=True)
def order_key(bits):
    """uint32 key of float32 bits `bits` (uint32): larger key = ranked higher by the contract."""
    a = bits & _ABS
    if a > _EXP:
        return _ALL
    if a == 0:
        return _SIGN
    if (bits & _SIGN) == 0:
        return np.uint32(bits | _SIGN)
    return np.uint32(bits ^ _ALL)


@njit(nogil=True, cache=True)
def radix_threshold(keys, r, hist):
    """The r-th largest of `keys` (uint32 [n], 1 <= r <= n) and how many keys equal to it belong to
    the top r: returns (T, need_eq), with exactly r - need_eq keys > T. hist: int64 scratch [2048]."""
    prefix = np.int64(0)
    mask = np.int64(0)
    for shift, nb in _DIGITS:
        hist[:nb] = 0
        for i in range(keys.shape[0]):
            key = np.int64(keys[i])
            if (key & mask) == prefix:
                hist[(key >> shift) & (nb - 1)] += 1
        d = nb - 1
        while hist[d] < r:
            r -= hist[d]
            d -= 1
        prefix |= np.int64(d) << shift
        mask |= np.int64(nb - 1) << shift
    return prefix, r


@njit(nogil=True, cache=True)
def select_row(bits, n, k, sink, recent, out, keys, hist):
    """Select pages of one row into out (int32 [k], ascending, -1 padded).

    bits: uint32 [>= n] float32 score bits; keys: uint32 scratch [>= n]; hist: int64 scratch [2048].
    """
    if n <= k:
        for i in range(n):
            out[i] = i
        for i in range(n, k):
            out[i] = -1
        return
    lo = sink
    hi = n - recent
    n_free = k - sink - recent
    threshold = np.int64(0)
    need_eq = np.int64(0)
    if n_free > 0:
        for i in range(hi - lo):
            keys[i] = order_key(bits[lo + i])
        threshold, need_eq = radix_threshold(keys[:hi - lo], n_free, hist)
    j = 0
    for i in range(n):
        if i < lo or i >= hi:
            out[j] = i
            j += 1
        elif n_free > 0:
            key = np.int64(keys[i - lo])
            if key > threshold or (key == threshold and need_eq > 0):
                if key == threshold:
                    need_eq -= 1
                out[j] = i
                j += 1
    for i in range(j, k):
        out[i] = -1


@njit(parallel=True, nogil=True, cache=True)
def _topk_rows_kernel(bits, num_pages, k, sink, recent, out):
    """bits uint32 [B, H, M]; num_pages int32 [B]; out int32 [B, H, k]; one row per work item."""
    B, H, M = bits.shape
    for row in prange(B * H):
        b = row // H
        h = row - b * H
        keys = np.empty(M, np.uint32)
        hist = np.empty(2048, np.int64)
        select_row(bits[b, h], np.int64(num_pages[b]), k, sink, recent, out[b, h], keys, hist)


@njit(nogil=True, cache=True)
def _chunk_histogram(keys, mask, prefix, shift, nb, hist):
    """Histogram into hist[:nb] of digit (key >> shift) of the keys matching prefix under mask."""
    hist[:nb] = 0
    for i in range(keys.shape[0]):
        key = np.int64(keys[i])
        if (key & mask) == prefix:
            hist[(key >> shift) & (nb - 1)] += 1


@njit(parallel=True, nogil=True, cache=True)
def _long_row_histograms(keys, size, mask, prefix, shift, nb, hist):
    """Per-chunk histograms: hist int64 [n_chunks, 2048], chunk c = keys[c*size:(c+1)*size]."""
    m = keys.shape[0]
    for c in prange(hist.shape[0]):
        _chunk_histogram(keys[min(m, c * size):min(m, (c + 1) * size)], mask, prefix, shift, nb,
                         hist[c])


@njit(parallel=True, nogil=True, cache=True)
def _long_row_keys(bits, keys, size, n_chunks):
    m = keys.shape[0]
    for c in prange(n_chunks):
        for i in range(c * size, min(m, (c + 1) * size)):
            keys[i] = order_key(bits[i])


@njit(parallel=True, nogil=True, cache=True)
def _long_row_counts(keys, size, threshold, above, equal):
    m = keys.shape[0]
    for c in prange(above.shape[0]):
        a = 0
        e = 0
        for i in range(c * size, min(m, (c + 1) * size)):
            key = np.int64(keys[i])
            if key > threshold:
                a += 1
            elif key == threshold:
                e += 1
        above[c] = a
        equal[c] = e


@njit(parallel=True, nogil=True, cache=True)
def _long_row_write(keys, size, threshold, start, quota, first, out):
    m = keys.shape[0]
    for c in prange(start.shape[0]):
        j = start[c]
        left = quota[c]
        for i in range(c * size, min(m, (c + 1) * size)):
            key = np.int64(keys[i])
            if key > threshold or (key == threshold and left > 0):
                if key == threshold:
                    left -= 1
                out[j] = first + i
                j += 1


@njit(nogil=True, cache=True)
def _topk_long_row(bits, n, k, sink, recent, out, n_chunks):
    """One long row over all threads: bits uint32 [>= n]; out int32 [k]. Same result as select_row."""
    if n <= k:
        for i in range(n):
            out[i] = i
        for i in range(n, k):
            out[i] = -1
        return
    lo = sink
    hi = n - recent
    m = hi - lo
    r = np.int64(k - sink - recent)
    for i in range(lo):
        out[i] = i
    for i in range(recent):
        out[k - recent + i] = hi + i
    if r == 0:
        return
    size = (m + n_chunks - 1) // n_chunks
    keys = np.empty(m, np.uint32)
    _long_row_keys(bits[lo:hi], keys, size, n_chunks)
    hist = np.empty((n_chunks, 2048), np.int64)
    prefix = np.int64(0)
    mask = np.int64(0)
    for shift, nb in _DIGITS:
        _long_row_histograms(keys, size, mask, prefix, shift, nb, hist)
        d = nb - 1
        while True:
            count = np.int64(0)
            for c in range(n_chunks):
                count += hist[c, d]
            if count >= r:
                break
            r -= count
            d -= 1
        prefix |= np.int64(d) << shift
        mask |= np.int64(nb - 1) << shift
    above = np.empty(n_chunks, np.int64)
    equal = np.empty(n_chunks, np.int64)
    _long_row_counts(keys, size, prefix, above, equal)
    start = np.empty(n_chunks, np.int64)
    quota = np.empty(n_chunks, np.int64)
    pos = np.int64(lo)
    for c in range(n_chunks):
        quota[c] = min(r, equal[c])
        r -= quota[c]
        start[c] = pos
        pos += above[c] + quota[c]
    _long_row_write(keys, size, prefix, start, quota, lo, out)


def run_topk_pages(scores: torch.Tensor, k: int, num_pages: torch.Tensor, sink: int, recent: int,
                   parallel_row_min: Optional[int] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`topk_pages` without the value checks. parallel_row_min: override PARALLEL_ROW_MIN; out:
    optional int32 [B, Hkv, k] to write into."""
    B, H, M = scores.shape
    out = out_tensor("out", out, (B, H, k), torch.int32)
    if B * H == 0 or k == 0:
        return out
    bits = float_bits("scores", scores)
    n = int32_array("num_pages", num_pages)
    o = out.numpy()
    row_min = PARALLEL_ROW_MIN if parallel_row_min is None else parallel_row_min
    with kernel_call() as threads:
        if B * H < threads and M >= row_min:
            for b in range(B):
                for h in range(H):
                    _topk_long_row(bits[b, h], int(n[b]), k, sink, recent, o[b, h], 4 * threads)
        else:
            _topk_rows_kernel(bits, n, k, sink, recent, o)
    return out


def topk_pages(scores: torch.Tensor, k: int, num_pages: torch.Tensor, sink: int, recent: int,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Select `k` pages per (request, KV head) row: sink and recent pages, then the best-scoring rest.

    scores: float32 [B, Hkv, max_pages] on the CPU (float64 is rounded to float32; entries at or past
    num_pages[b] are ignored); num_pages: int32 [B]. Returns sel int32 [B, Hkv, k], ascending,
    padded with -1; a row with num_pages <= k selects all its pages; ties go to the lower page index.
    Written into `out` (int32 [B, Hkv, k]) when given.
    """
    check_topk_args(scores, k, num_pages, sink, recent)
    return run_topk_pages(scores, k, num_pages, sink, recent, out=out)
