"""Exact per-row top-k over page scores with forced sink/recent pages (`topk_pages`), in Triton.

One program per (request, KV head) row. Scores become unsigned 32-bit keys whose order is the order
`torch.sort` gives floats (NaN largest, -0.0 == +0.0); a radix search over those keys, DIGIT_BITS
bits per pass from the top, finds the key T of the `n_free`-th best candidate page, where
`n_free = k - sink - recent` (candidates: pages that are neither sink nor recent). The row is then
selected in one ordered pass: forced pages, keys above T, and the first `n_free - count(key > T)`
pages whose key equals T (ties toward the lower page index), written ascending through a prefix sum,
then `-1` padding. The search stops early once a candidate threshold counts exactly `n_free` pages.

Rows of up to MAX_REGISTER_ROW pages are read once and kept in registers; longer rows are streamed
in chunks of CHUNK pages once per pass (from L2 / HBM), and once the keys still undecided fit in
SMALL_STREAMED they are compacted into a per-row scratch tile so the remaining passes skip the row.
Defaults are the fastest of the sweep in benchmarks/gpu_topk.py (docs/BENCHMARKS.md).

Shapes: scores float32 [B, Hkv, max_pages]; num_pages int32 [B]; sel int32 [B, Hkv, k].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import check_topk_args

MAX_REGISTER_ROW = 16384
CHUNK = 8192
SMALL_IN_REGISTERS = 0      # measured: compaction slows rows held in registers (8K: 76 vs 34 us)
SMALL_STREAMED = 4096       # measured: 64K rows 477 us with, 719 us without (docs/BENCHMARKS.md)


@triton.jit
def _page_keys(src, idx, n, sink, recent):
    """Keys of candidate pages `idx` of a row (0 for forced pages and pages past `n`), uint32."""
    cand = (idx < n) & (idx >= sink) & (idx < n - recent)
    x = tl.load(src + idx, mask=cand, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)                      # -0.0 ties with +0.0, as in torch.sort
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, 0x7FFFFFFF, bits)           # NaN sorts above +inf, as in torch.sort
    key = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True)
    return tl.where(cand, key, 0)


@triton.jit
def _count_at_least(keys, src, n, sink, recent, cands, offs,
                    BLOCK: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """counts[j] = number of candidate keys >= cands[j]; cands uint32 [R] -> int32 [R].

    Streamed rows load chunk i + 1 before counting chunk i, so the load latency overlaps the work.
    """
    if IN_REGISTERS:
        if cands.shape[0] == 1:
            counts = tl.zeros(cands.shape, tl.int32) + \
                tl.sum((keys >= tl.max(cands, axis=0)).to(tl.int32), axis=0)
        else:
            counts = tl.sum((keys[None, :] >= cands[:, None]).to(tl.int32), axis=1)
    else:
        counts = tl.zeros(cands.shape, tl.int32)
        nxt = _page_keys(src, offs, n, sink, recent)
        for start in range(0, n, BLOCK):
            kc = nxt
            nxt = _page_keys(src, start + BLOCK + offs, n, sink, recent)
            counts += tl.sum((kc[None, :] >= cands[:, None]).to(tl.int32), axis=1)
    return counts


@triton.jit
def _search_step(counts, digits, T, above, at_T, n_free, shift, RADIX: tl.constexpr):
    """One radix pass from counts[j] = count(key >= T + digits[j] << shift): new T, above, at_T,
    done."""
    best = tl.max(tl.where(counts >= n_free, digits, 0), axis=0)
    T = T + (best << shift.to(tl.uint32))
    at_T = tl.where(best > 0, tl.sum(tl.where(digits == best, counts, 0), axis=0), at_T)
    next_up = tl.sum(tl.where(digits == best + 1, counts, 0), axis=0)
    above = tl.where(best + 1 < RADIX, next_up, above)
    done = (at_T == n_free).to(tl.int32)    # {key >= T} is exactly the answer: stop here
    T = tl.where(done > 0, T - 1, T)
    above = tl.where(done > 0, n_free, above)
    return T, above, at_T, done


@triton.jit
def select_row(src, dst, scratch, n, k, sink, recent, BLOCK: tl.constexpr,
               IN_REGISTERS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               SMALL: tl.constexpr):
    """Top-k of one row: reads scores src[0:n] (float32), writes dst[0:k] (int32, ascending,
    -1 padded).

    IN_REGISTERS needs n <= BLOCK; otherwise the row is streamed in chunks of BLOCK pages. With
    SMALL > 0, once the keys still undecided (those in [T, T + 2**bits_left)) are at most SMALL,
    they are compacted into scratch[0:SMALL] (uint32) and the remaining passes count only them.
    """
    offs = tl.arange(0, BLOCK)
    take_all = n <= k
    n_free = k - sink - recent
    keys = tl.zeros([BLOCK], tl.uint32)
    if IN_REGISTERS:
        keys = _page_keys(src, offs, n, sink, recent)

    # Radix search for T, the n_free-th largest candidate key, DIGIT_BITS bits per pass. Before a
    # pass at `shift`: at_T = count(key >= T) >= n_free and
    # above = count(key >= T + 2**(shift + DIGIT_BITS)) < n_free. A pass counts the keys at or
    # above T + j * 2**shift for digits j >= 1 (one count when DIGIT_BITS == 1; j = 0 is known).
    RADIX: tl.constexpr = 1 << DIGIT_BITS
    N_CANDS: tl.constexpr = RADIX - (DIGIT_BITS == 1)
    digits = (tl.arange(0, N_CANDS) + (RADIX - N_CANDS)).to(tl.uint32)
    T = tl.where(n_free == 0, tl.full([], 0xFFFFFFFF, tl.uint32), tl.full([], 0, tl.uint32))
    above = tl.zeros([], tl.int32)
    at_T = n - sink - recent
    shift = 32 - DIGIT_BITS
    done = (take_all | (n_free == 0)).to(tl.int32)
    while (shift >= 0) & (done == 0) & (at_T - above > SMALL):
        cands = T + (digits << shift.to(tl.uint32))
        counts = _count_at_least(keys, src, n, sink, recent, cands, offs, BLOCK, IN_REGISTERS)
        T, above, at_T, done = _search_step(counts, digits, T, above, at_T, n_free, shift, RADIX)
        shift -= DIGIT_BITS
    if SMALL > 0:
        if (shift >= 0) & (done == 0):     # the undecided keys fit in SMALL: compact, go on there
            span = tl.full([], 0xFFFFFFFF, tl.uint32) >> (32 - shift - DIGIT_BITS).to(tl.uint32)
            small_offs = tl.arange(0, SMALL)
            n_in = tl.zeros([], tl.int32)
            for start in range(0, n, BLOCK):
                if not IN_REGISTERS:
                    keys = _page_keys(src, start + offs, n, sink, recent)
                inb = (keys >= T) & (keys - T <= span) & (keys != 0)
                slot = n_in + tl.cumsum(inb.to(tl.int32), axis=0) - 1
                tl.store(scratch + slot, keys.to(tl.int32, bitcast=True), mask=inb)
                n_in += tl.sum(inb.to(tl.int32), axis=0)
            tl.debug_barrier()
            small = tl.load(scratch + small_offs, mask=small_offs < n_in, other=0)
            small = small.to(tl.uint32, bitcast=True)
            base = above                    # keys above the compacted range: counted once, here
            while (shift >= 0) & (done == 0):
                cands = T + (digits << shift.to(tl.uint32))
                counts = base + _count_at_least(small, src, 0, 0, 0, cands, small_offs, SMALL,
                                                True)
                T, above, at_T, done = _search_step(counts, digits, T, above, at_T, n_free, shift,
                                                    RADIX)
                shift -= DIGIT_BITS
    need_eq = n_free - above                # ties at T still to take, lowest page index first
    n_forced_head = tl.where(take_all, n, sink)   # a row with n <= k keeps every page

    # Ordered selection pass: prefix sums give each selected page its output slot. Ties at T need
    # ranks by page index only when some but not all of them are taken.
    rank_ties = (need_eq > 0) & (need_eq < at_T - above)
    n_sel = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        if not IN_REGISTERS:
            keys = _page_keys(src, idx, n, sink, recent)
        in_row = idx < n
        forced = (idx < n_forced_head) | (idx >= n - recent)
        eq = ((keys == T) & (keys != 0)).to(tl.int32)
        if rank_ties:
            rank_eq = n_eq + tl.cumsum(eq, axis=0)
            n_eq += tl.sum(eq, axis=0)
        else:
            rank_eq = eq
        pick = in_row & (forced | (keys > T) | ((eq > 0) & (rank_eq <= need_eq)))
        slot = n_sel + tl.cumsum(pick.to(tl.int32), axis=0) - 1
        tl.store(dst + slot, idx, mask=pick)
        n_sel += tl.sum(pick.to(tl.int32), axis=0)
    for start in range(0, k, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        tl.store(dst + j, tl.full([BLOCK_K], -1, tl.int32), mask=(j >= n_sel) & (j < k))


@triton.jit
def _topk_pages_kernel(scores_ptr, lens_ptr, out_ptr, scratch_ptr, H, stride_sb, stride_sh,
                       stride_ob, stride_oh, k, sink, recent, page_size,
                       BLOCK: tl.constexpr, IN_REGISTERS: tl.constexpr, DIGIT_BITS: tl.constexpr,
                       BLOCK_K: tl.constexpr, SMALL: tl.constexpr):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    n = tl.cdiv(tl.load(lens_ptr + b), page_size)
    src = scores_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    dst = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    select_row(src, dst, scratch_ptr + row.to(tl.int64) * SMALL, n, k, sink, recent, BLOCK,
               IN_REGISTERS, DIGIT_BITS, BLOCK_K, SMALL)


def row_config(max_pages: int, block: int | None = None, digit_bits: int | None = None,
               num_warps: int | None = None, small: int | None = None) -> dict:
    """Launch choices of `select_row` for rows of up to `max_pages` pages (None: tuned default)."""
    in_registers = max_pages <= MAX_REGISTER_ROW if block is None else block >= max_pages
    if block is None:
        block = max(triton.next_power_of_2(max_pages), 128) if in_registers else CHUNK
    if digit_bits is None:
        digit_bits = 1 if in_registers else 2
    if num_warps is None:
        num_warps = (4 if block <= 8192 else 8) if in_registers else 16
    if small is None:
        small = SMALL_IN_REGISTERS if in_registers else SMALL_STREAMED
    return dict(BLOCK=block, IN_REGISTERS=in_registers, DIGIT_BITS=digit_bits, num_warps=num_warps,
                SMALL=small)


def launch_topk_pages(scores: torch.Tensor, k: int, lens: torch.Tensor, sink: int, recent: int,
                      out: torch.Tensor, page_size: int = 1, **config) -> torch.Tensor:
    """Unchecked launcher: writes `out` int32 [B, Hkv, k] (last dim contiguous) and returns it.

    scores float32 [B, Hkv, max_pages] with a contiguous last dim; lens int32 [B] on the same
    device: pages per request when page_size == 1, else tokens (pages = ceil(lens / page_size)).
    `config` (block, digit_bits, num_warps, small) overrides the tuned choices of `row_config`.
    """
    B, H, max_pages = scores.shape
    if B * H == 0 or k == 0:
        return out
    cfg = row_config(max_pages, **config)
    scratch = torch.empty(B * H * max(cfg["SMALL"], 1), dtype=torch.int32, device=scores.device)
    _topk_pages_kernel[(B * H,)](
        scores, lens, out, scratch, H, scores.stride(0), scores.stride(1), out.stride(0),
        out.stride(1), k, sink, recent, page_size, BLOCK_K=min(triton.next_power_of_2(k), 1024),
        **cfg)
    return out


def topk_pages(scores: torch.Tensor, k: int, num_pages: torch.Tensor, sink: int,
               recent: int) -> torch.Tensor:
    """Select `k` pages per (request, KV head) row: sink and recent pages, then the best others.

    scores: float32 [B, Hkv, max_pages] (entries at or past `num_pages[b]` are ignored);
    num_pages: int32 [B]. Returns sel int32 [B, Hkv, k], ascending, padded with -1. A row with
    `num_pages <= k` selects all its pages; score ties go to the lower page index. Exactly
    `vortex_hybrid.reference.topk_pages`.
    """
    check_topk_args(scores, k, num_pages, sink, recent)
    if scores.dtype != torch.float32:
        raise ValueError(f"scores dtype {scores.dtype}; the GPU top-k takes float32 scores")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    out = torch.empty(scores.shape[0], scores.shape[1], k, dtype=torch.int32, device=scores.device)
    return launch_topk_pages(scores, k, num_pages.to(torch.int32), sink, recent, out)
