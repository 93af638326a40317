"""Sparse decode attention over selected pages of a host-resident pool (Numba), and dense attention.

Contract of `vortex_hybrid.reference.sparse_decode_attention` (docs/architecture.md). Work items are
(request, KV head, chunk of the selection): one chunk per row when the batch alone gives every thread
work, several when it does not (small batches, long selections); chunk states merge exactly by
log-sum-exp. Each item folds one page's `page_size x head_dim` K and V slice at a time into an
online softmax for the group's query heads, reading bf16 and fp32 storage in place (bits converted
in registers) and fp16 through a float32 scratch tile, while the next selected page is prefetched,
so a KV byte is read from memory once per step.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim, P page_size):
    q [B, Hq, D] any float       k_pool, v_pool [N, Hkv, P, D] bf16 / fp16 / fp32 (CPU, contiguous)
    page_table [B, max_pages] int32   seq_lens [B] int32   sel [B, Hkv, K] int32, -1 padded
    returns o float32 [B, Hq, D], lse float32 [B, Hq]
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_attention_args
from vortex_hybrid.reference import all_pages_sel

from .online_softmax import NEG_INF, attend_tile, empty_state, finish_row, new_parts, new_tiles
from .prefetch import prefetch_range
from .storage_decode import decode_into, float32_of
from .tensor_views import FP16, int32_array, out_tensor, storage_bits
from .threads import kernel_call

MIN_CHUNK_PAGES = 4
"""Fewest selected pages per work item when a row is split into chunks."""


@njit(parallel=True, nogil=True, cache=True)
def _sparse_attention_kernel(q, scale, k_bits, v_bits, kind, page_size, page_table, seq_lens, sel,
                             chunk_slots, order, busy, o, lse):
    """q float32 [B*Hkv, G, D] queries, scale: sm_scale; k_bits, v_bits flat raw storage; sel int32
    [B, Hkv, K]; order int64 [n]: the work items (row * n_chunks + chunk) in the order the loop
    takes them, -1 for none: every item of a row that selects a page, once (`work_order`); busy
    uint8 [B*Hkv]: the rows that select a page (`row_mask`); the others get the empty state
    without a work item. Writes o float32 [B*Hkv, G, D] and lse float32 [B*Hkv, G]."""
    rows, G, D = q.shape
    hkv = sel.shape[1]
    K = sel.shape[2]
    n_chunks = max(1, (K + chunk_slots - 1) // chunk_slots)
    tile = page_size * D
    part_m, part_l, part_acc = new_parts(rows, n_chunks, G, D)
    for it in prange(order.shape[0]):
        item = order[it]
        if item < 0:
            continue
        row = item // n_chunks
        c = item - row * n_chunks
        b = row // hkv
        h = row - b * hkv
        k_tile, v_tile, scores, tile_max = new_tiles(G, page_size, D)
        m, l, acc = empty_state(part_m, part_l, part_acc, row, c)
        qs = q[row] * np.float32(scale)
        seq_len = np.int64(seq_lens[b])
        stop = min(K, (c + 1) * chunk_slots)
        nxt = _next_page(sel[b, h], c * chunk_slots, stop)
        while nxt < stop:
            j = nxt
            p = np.int64(sel[b, h, j])
            ntok = min(page_size, seq_len - p * page_size)
            start = (np.int64(page_table[b, p]) * hkv + h) * tile
            nxt = _next_page(sel[b, h], j + 1, stop)
            if nxt < stop:
                ahead = (np.int64(page_table[b, sel[b, h, nxt]]) * hkv + h) * tile
                prefetch_range(k_bits, ahead, tile)
                prefetch_range(v_bits, ahead, tile)
            if kind == FP16:
                n = ntok * D
                decode_into(k_bits[start:start + n], kind, k_tile.reshape(tile)[:n])
                decode_into(v_bits[start:start + n], kind, v_tile.reshape(tile)[:n])
                attend_tile(qs, k_tile, v_tile, ntok, scores, tile_max, m, l, acc)
            else:
                attend_tile(qs, k_bits[start:start + tile].reshape(page_size, D),
                            v_bits[start:start + tile].reshape(page_size, D), ntok, scores,
                            tile_max, m, l, acc)
        if n_chunks == 1:
            finish_row(part_m, part_l, part_acc, row, 1, o, lse)
    for row in prange(rows):
        if busy[row] == 0:
            o[row] = 0.0
            lse[row] = NEG_INF
        elif n_chunks > 1:
            finish_row(part_m, part_l, part_acc, row, n_chunks, o, lse)


@njit(nogil=True, cache=True)
def _next_page(sel_row, j, stop):
    """First slot >= j (and < stop) holding a page, or stop."""
    while j < stop and sel_row[j] < 0:
        j += 1
    return j


@njit(nogil=True, cache=True)
def chunk_slots_for(rows: int, k: int, threads: int) -> int:
    """Selection slots per work item: the whole row when the rows that select anything (`rows`)
    alone fill `threads` four times over, else enough chunks for about four items per thread, never
    fewer than MIN_CHUNK_PAGES slots."""
    if k <= 0:
        return 1
    if rows >= 4 * threads:
        return k
    want = -(-(4 * threads) // max(rows, 1))
    return max(MIN_CHUNK_PAGES, -(-k // want))


SCHEDULES = ("balanced", "static")

# The launcher's per-call planning below is compiled (serial): in NumPy it took 0.3-0.55 ms a call
# on the H100 machine's CPU, as much as the kernel itself on a layer's ~17 MB host part.


@njit(nogil=True, cache=True)
def row_mask(sel):
    """uint8 [B * Hkv]: 1 for each row (request, KV head) of `sel` int32 [B, Hkv, K] that selects a
    page."""
    B, H, K = sel.shape
    out = np.zeros(B * H, np.uint8)
    for b in range(B):
        for h in range(H):
            for j in range(K):
                if sel[b, h, j] >= 0:
                    out[b * H + h] = 1
                    break
    return out


@njit(nogil=True, cache=True)
def item_pages(sel, chunk_slots):
    """Selected pages of each work item (row * n_chunks + chunk) of the kernel: int64 [items].
    sel int32 [B, Hkv, K]."""
    B, H, K = sel.shape
    n_chunks = max(1, (K + chunk_slots - 1) // chunk_slots)
    work = np.zeros(B * H * n_chunks, np.int64)
    for b in range(B):
        for h in range(H):
            base = (b * H + h) * n_chunks
            for j in range(K):
                if sel[b, h, j] >= 0:
                    work[base + j // chunk_slots] += 1
    return work


@njit(nogil=True, cache=True)
def balanced_order(work, threads):
    """The kernel's work items ordered so that Numba's static split of its loop into `threads`
    equal blocks gives each thread about the same number of selected pages: items sorted by their
    pages (`work`, from `item_pages`; a stable counting sort, most first), dealt to the threads in
    snake order (0..T-1, T-1..0, ...), thread t's items forming block t (padded with -1). Returns
    int64 [T * ceil(items / T)]."""
    n = work.size
    per = (n + threads - 1) // threads
    out = np.full(per * threads, -1, np.int64)
    if n == 0:
        return out
    top = work.max()
    start = np.zeros(top + 2, np.int64)
    for i in range(n):                      # key top - pages: ascending keys, most pages first
        start[top - work[i] + 1] += 1
    for key in range(1, top + 2):
        start[key] += start[key - 1]
    by_work = np.empty(n, np.int64)
    for i in range(n):
        key = top - work[i]
        by_work[start[key]] = i
        start[key] += 1
    for idx in range(n):
        r, c = idx // threads, idx % threads
        if r % 2 == 1:
            c = threads - 1 - c
        out[c * per + r] = by_work[idx]
    return out


@njit(nogil=True, cache=True)
def most_per_thread(work, order, threads) -> int:
    """The most pages one thread gets when Numba splits `order` into `threads` equal blocks
    (sizes as `np.array_split`: the first `n % threads` blocks one item longer)."""
    n = order.size
    size, extra = n // threads, n % threads
    most, pos = 0, 0
    for t in range(threads):
        stop = pos + size + (1 if t < extra else 0)
        pages = 0
        for i in range(pos, stop):
            if order[i] >= 0:
                pages += work[order[i]]
        most = max(most, pages)
        pos = stop
    return most


@njit(nogil=True, cache=True)
def _work_order(sel, busy, chunk_slots, threads, balanced):
    work_all = item_pages(sel, chunk_slots)
    n_chunks = work_all.size // max(1, busy.size)
    # the items of rows that select a page, in row order
    items = np.nonzero(np.repeat(busy, n_chunks))[0].astype(np.int64)
    n = items.size
    if not balanced or threads <= 1:
        return items
    work = work_all[items]
    order = balanced_order(work, threads)
    if most_per_thread(work, order, threads) < most_per_thread(work, np.arange(n), threads):
        out = np.full(order.size, -1, np.int64)
        for i in range(order.size):
            if order[i] >= 0:
                out[i] = items[order[i]]
        return out
    return items


def work_order(sel: np.ndarray, chunk_slots: int, threads: int, schedule: str,
               busy: Optional[np.ndarray] = None) -> np.ndarray:
    """The kernel's loop order over the work items of the rows that select a page (a row's chunks
    without a page included: they give the merge its empty states; rows that select nothing get no
    item, so a small host part costs work for its pages, not for the batch): row order
    ("static"), or for "balanced" `balanced_order` when it gives the busiest thread fewer pages
    than row order does (row order keeps a thread's rows together otherwise). sel int32
    [B, Hkv, K]; busy: its `row_mask` when the caller has it; returns int64 item indices
    (row * n_chunks + chunk), -1 padding."""
    if busy is None:
        busy = row_mask(sel)
    return _work_order(sel, busy, chunk_slots, threads, schedule == "balanced")


def launch_sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                page_table: torch.Tensor, seq_lens: torch.Tensor, sel: torch.Tensor,
                                sm_scale: Optional[float] = None,
                                chunk_slots: Optional[int] = None,
                                out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                                schedule: str = "balanced",
                                timings: Optional[dict] = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_attention` without the value checks (the runtime checks once per step).

    chunk_slots: selection slots per work item (None: `chunk_slots_for` over the rows that select
    a page); any value >= 1 gives the same state up to float32 rounding. out: optional (o, lse) to
    write into. schedule: "balanced" (a host selection is
    often skewed, e.g. a few requests hold every host page, and Numba splits a loop into equal
    blocks of items, one per thread: `work_order` gives each block about the same pages) or
    "static" (items in row order; kept for comparison). A selection with no page returns o = 0,
    lse = -inf without starting the threads. timings: a dict that gets the call's seconds before
    the parallel kernel ("prep": views, work order) and in it ("kernel") added to its keys.
    """
    t0 = time.perf_counter() if timings is not None else 0.0
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    B, hq, d = q.shape
    _, hkv, page_size, _ = k_pool.shape
    group = hq // hkv
    o = out_tensor("out[0]", None if out is None else out[0], (B, hq, d), torch.float32)
    lse = out_tensor("out[1]", None if out is None else out[1], (B, hq), torch.float32)
    if B == 0:
        return o, lse
    s = int32_array("sel", sel)
    busy_mask = row_mask(s)
    busy = int(busy_mask.sum())
    if busy == 0:
        o.numpy().fill(0.0)                 # NumPy: no torch op (an inference tensor may be out)
        lse.numpy().fill(-np.inf)
        return o, lse
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    qf = float32_of("q", q.detach()).reshape(B * hkv, group, d)
    k_bits, kind = storage_bits("k_pool", k_pool)
    v_bits, _ = storage_bits("v_pool", v_pool)
    pt = int32_array("page_table", page_table)
    sl = int32_array("seq_lens", seq_lens)
    with kernel_call() as threads:
        slots = chunk_slots if chunk_slots is not None else chunk_slots_for(busy, s.shape[2], threads)
        slots = max(1, slots)
        order = work_order(s, slots, threads, schedule, busy_mask)
        if timings is not None:
            t1 = time.perf_counter()
            timings["prep"] = timings.get("prep", 0.0) + t1 - t0
        _sparse_attention_kernel(qf, scale, k_bits, v_bits, kind, page_size, pt, sl, s, slots,
                                 order, busy_mask, o.numpy().reshape(B * hkv, group, d),
                                 lse.numpy().reshape(B * hkv, group))
    if timings is not None:
        timings["kernel"] = timings.get("kernel", 0.0) + time.perf_counter() - t1
    return o, lse


def sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_table: torch.Tensor, seq_lens: torch.Tensor, sel: torch.Tensor,
                            sm_scale: Optional[float] = None,
                            out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of each query head over the tokens of its KV head's selected pages.

    q [B, Hq, D] any float; k_pool, v_pool [N, Hkv, P, D] bf16/fp16/fp32 on the CPU; page_table
    [B, max_pages] int32; seq_lens [B] int32; sel [B, Hkv, K] int32 (unique logical pages, -1 padded).
    Returns o float32 [B, Hq, D], lse float32 [B, Hq] (o = 0, lse = -inf for an empty selection),
    written into `out` = (o, lse) when given.
    """
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale)
    return launch_sparse_decode_attention(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale,
                                       out=out)


def dense_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, seq_lens: torch.Tensor,
                           sm_scale: Optional[float] = None,
                           out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over every token of every request: `sparse_decode_attention` with all pages.

    Shapes as `sparse_decode_attention`; returns o float32 [B, Hq, D], lse float32 [B, Hq].
    """
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, None, sm_scale)
    sel = all_pages_sel(seq_lens, k_pool.shape[1], page_table.shape[1], k_pool.shape[2])
    return launch_sparse_decode_attention(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale,
                                       out=out)
