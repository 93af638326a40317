"""Top-k page selection per (request, KV head) in linear time (Numba radix select).

Same contract as `vortex_hybrid.reference.topk_pages`: the first `sink` and last `recent` pages are
kept, the `k - sink - recent` best-scoring other pages fill the rest (ties toward the lower page
index), every page when `num_pages <= k`; output ascending, padded with -1. Float32 scores map to
uint32 keys that order like torch's descending sort (NaN above +inf, -0 equal to +0); a three-pass
radix select (11, 11, 10 bits) finds the threshold key T and how many keys equal to T to keep, and one
ordered scan writes the selection, so a row costs O(num_pages) whatever k is.

Rows run in parallel; a batch with fewer rows than twice the threads and long rows (>=
PARALLEL_ROW_MIN pages) instead splits every row into chunks over all threads (per-chunk
histograms, then an offset scan), with the same result.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_topk_args

from .tensor_views import float_bits, int32_array, out_tensor
from .threads import kernel_call

PARALLEL_ROW_MIN = 1 << 14
"""Rows at least this long are split over threads when the batch has few rows."""

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
def take_top(keys, threshold, need_eq, first, out, j):
    """Append first + i to out[j:] for every keys[i] > threshold and for the first need_eq keys equal
    to it (ascending i, so ties go to the lower index); returns the next free position of out."""
    for i in range(keys.shape[0]):
        key = np.int64(keys[i])
        if key > threshold or (key == threshold and need_eq > 0):
            if key == threshold:
                need_eq -= 1
            out[j] = first + i
            j += 1
    return j


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
    for i in range(lo):
        out[i] = i
    j = lo
    if n_free > 0:
        j = take_top(keys[:hi - lo], threshold, need_eq, lo, out, j)
    for i in range(hi, n):
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


@njit(nogil=True, cache=True)
def chunk_bounds(m, n_chunks, c):
    """[lo, hi) of chunk c when m keys are cut into n_chunks near-equal pieces (empty past m)."""
    size = (m + n_chunks - 1) // n_chunks
    return min(m, c * size), min(m, (c + 1) * size)


@njit(parallel=True, nogil=True, cache=True)
def _split_keys(bits, num_pages, sink, recent, n_chunks, keys):
    """keys[row, i] = order_key of candidate page sink + i of row (bits uint32 [B, H, M])."""
    B, H, M = bits.shape
    for item in prange(B * H * n_chunks):
        row = item // n_chunks
        c = item - row * n_chunks
        b = row // H
        lo, hi = chunk_bounds(max(np.int64(0), np.int64(num_pages[b]) - sink - recent), n_chunks, c)
        for i in range(lo, hi):
            keys[row, i] = order_key(bits[b, row - b * H, sink + i])


@njit(parallel=True, nogil=True, cache=True)
def _split_histograms(keys, lengths, n_chunks, mask, prefix, shift, nb, hist):
    """hist[row, c] = digit histogram of chunk c of keys[row, :lengths[row]] under (mask, prefix)."""
    rows = keys.shape[0]
    for item in prange(rows * n_chunks):
        row = item // n_chunks
        c = item - row * n_chunks
        lo, hi = chunk_bounds(lengths[row], n_chunks, c)
        _chunk_histogram(keys[row, lo:hi], mask[row],
                         prefix[row], shift, nb, hist[row, c])


@njit(parallel=True, nogil=True, cache=True)
def _split_counts(keys, lengths, n_chunks, threshold, above, equal):
    rows = keys.shape[0]
    for item in prange(rows * n_chunks):
        row = item // n_chunks
        c = item - row * n_chunks
        lo, hi = chunk_bounds(lengths[row], n_chunks, c)
        a = 0
        e = 0
        for i in range(lo, hi):
            key = np.int64(keys[row, i])
            if key > threshold[row]:
                a += 1
            elif key == threshold[row]:
                e += 1
        above[row, c] = a
        equal[row, c] = e


@njit(parallel=True, nogil=True, cache=True)
def _split_write(keys, lengths, n_chunks, threshold, start, quota, first, H, out):
    rows = keys.shape[0]
    for item in prange(rows * n_chunks):
        row = item // n_chunks
        c = item - row * n_chunks
        b = row // H
        lo, hi = chunk_bounds(lengths[row], n_chunks, c)
        take_top(keys[row, lo:hi], threshold[row], quota[row, c], first + lo,
                 out[b, row - b * H], start[row, c])


@njit(nogil=True, cache=True)
def _topk_split_rows(bits, num_pages, k, sink, recent, out, n_chunks):
    """Every row split into n_chunks pieces over all threads (few, long rows): bits uint32 [B, H, M],
    out int32 [B, H, k]. Same result as select_row on each row."""
    B, H, M = bits.shape
    rows = B * H
    lengths = np.zeros(rows, np.int64)
    need = np.zeros(rows, np.int64)
    for row in range(rows):
        b = row // H
        h = row - b * H
        n = np.int64(num_pages[b])
        if n <= k:
            for i in range(n):
                out[b, h, i] = i
            for i in range(n, k):
                out[b, h, i] = -1
            continue
        for i in range(sink):
            out[b, h, i] = i
        for i in range(recent):
            out[b, h, k - recent + i] = n - recent + i
        need[row] = k - sink - recent
        if need[row] > 0:
            lengths[row] = n - sink - recent
    keys = np.empty((rows, M), np.uint32)
    _split_keys(bits, num_pages, sink, recent, n_chunks, keys)
    hist = np.empty((rows, n_chunks, 2048), np.int64)
    prefix = np.zeros(rows, np.int64)
    mask = np.zeros(rows, np.int64)
    for shift, nb in _DIGITS:
        _split_histograms(keys, lengths, n_chunks, mask, prefix, shift, nb, hist)
        for row in range(rows):
            if need[row] == 0:
                continue
            d = nb - 1
            while True:
                count = np.int64(0)
                for c in range(n_chunks):
                    count += hist[row, c, d]
                if count >= need[row]:
                    break
                need[row] -= count
                d -= 1
            prefix[row] |= np.int64(d) << shift
            mask[row] |= np.int64(nb - 1) << shift
    above = np.zeros((rows, n_chunks), np.int64)
    equal = np.zeros((rows, n_chunks), np.int64)
    _split_counts(keys, lengths, n_chunks, prefix, above, equal)
    start = np.zeros((rows, n_chunks), np.int64)
    quota = np.zeros((rows, n_chunks), np.int64)
    for row in range(rows):
        pos = np.int64(sink)
        r = need[row]
        for c in range(n_chunks):
            quota[row, c] = min(r, equal[row, c])
            r -= quota[row, c]
            start[row, c] = pos
            pos += above[row, c] + quota[row, c]
    _split_write(keys, lengths, n_chunks, prefix, start, quota, sink, H, out)


def launch_topk_pages(scores: torch.Tensor, k: int, num_pages: torch.Tensor, sink: int, recent: int,
                   split: Optional[bool] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`topk_pages` without the value checks. split: True splits every row over the threads, False
    gives each row one thread, None picks (split when rows < 2 x threads and rows are at least
    PARALLEL_ROW_MIN long); the result is the same. out: optional int32 [B, Hkv, k] to write into."""
    B, H, M = scores.shape
    out = out_tensor("out", out, (B, H, k), torch.int32)
    if B * H == 0 or k == 0:
        return out
    bits = float_bits("scores", scores)
    n = int32_array("num_pages", num_pages)
    o = out.numpy()
    with kernel_call() as threads:
        if split is None:
            split = B * H < 2 * threads and M >= PARALLEL_ROW_MIN
        if split:
            _topk_split_rows(bits, n, k, sink, recent, o, -(-4 * threads // (B * H)))
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
    return launch_topk_pages(scores, k, num_pages, sink, recent, out=out)
