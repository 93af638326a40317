"""Token-granularity sparse attention: keep the best `k_tokens` tokens of candidate pages, attend them.

The granularity-budget selector picks this for heads whose attention mass sits on few tokens spread
over many pages. Per (request, KV head), every token of the candidate pages is scored for the group's
query heads; the score of token t is the **max over the group** of the scaled dot product
`sm_scale * q_g . k_t` (a token one query head needs is kept even when the others ignore it; a sum would
let the other heads' logits hide it). The `k_tokens` best tokens (ties toward the lower token position)
are attended by every query head of the group, and the result is a state `(o, lse)` over exactly those
tokens, so it merges (`merge_states`) with page-level states over disjoint tokens.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head_dim, P page_size):
    q [B, Hq, D] any float        k_pool, v_pool [N, Hkv, P, D] bf16 / fp16 / fp32 (CPU, contiguous)
    page_table [B, max_pages] int32   seq_lens [B] int32
    cand [B, Hkv, C] int32: unique logical candidate pages, -1 padded, any order
    returns o float32 [B, Hq, D], lse float32 [B, Hq]; tokens int32 [B, Hkv, k_tokens] (logical token
    positions, ascending, -1 padded) from `select_tokens`
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_attention_args

from .float_bits import f32_to_bits
from .online_softmax import (attend_tile, empty_state, finish_row, new_parts, new_tiles,
                             tile_scores)
from .prefetch import prefetch_range
from .storage_decode import decode_into, float32_of
from .tensor_views import FP16, int32_array, out_tensor, storage_bits
from .threads import kernel_call
from .topk_pages import order_key, radix_threshold, take_top

MIN_CHUNK_TOKENS = 64
"""Fewest tokens per attention work item when a row is split into chunks."""


@njit(nogil=True, cache=True)
def _score_chunk(qs, k_bits, kind, page_size, hkv, h, pt_row, seq_len, cand_row, j0, j1, keys):
    """Keys (uint32 [C * P], 0 = not a token) of the tokens of candidate slots j0..j1 of one row."""
    G, D = qs.shape
    tile = page_size * D
    k_tile = np.empty((page_size, D), np.float32)
    scores = np.empty((G, page_size), np.float32)
    tile_max = np.empty(G, np.float32)
    for j in range(j0, j1):
        p = np.int64(cand_row[j])
        ntok = 0 if p < 0 else min(page_size, seq_len - p * page_size)
        for t in range(max(ntok, 0), page_size):
            keys[j * page_size + t] = 0
        if ntok <= 0:
            continue
        if j + 1 < j1 and cand_row[j + 1] >= 0:
            prefetch_range(k_bits, (np.int64(pt_row[cand_row[j + 1]]) * hkv + h) * tile, tile)
        start = (np.int64(pt_row[p]) * hkv + h) * tile
        if kind == FP16:
            decode_into(k_bits[start:start + ntok * D], kind, k_tile.reshape(tile)[:ntok * D])
            tile_scores(qs, k_tile, ntok, scores, tile_max)
        else:
            tile_scores(qs, k_bits[start:start + tile].reshape(page_size, D), ntok, scores, tile_max)
        for t in range(ntok):
            best = scores[0, t]
            for g in range(1, G):
                if scores[g, t] > best or scores[g, t] != scores[g, t]:
                    best = scores[g, t]
            keys[j * page_size + t] = order_key(f32_to_bits(best))


@njit(nogil=True, cache=True)
def _select_tokens_row(keys, k_tokens, tokens, hist):
    """Ascending slot*P+t indices of the k_tokens largest nonzero keys into tokens (int32 [k_tokens],
    -1 padded); returns how many were selected."""
    n_valid = 0
    for i in range(keys.shape[0]):
        if keys[i] != 0:
            n_valid += 1
    r = min(k_tokens, n_valid)
    j = 0
    if r > 0:
        threshold, need_eq = radix_threshold(keys, r, hist)
        j = take_top(keys, threshold, need_eq, 0, tokens, 0)
    for i in range(j, k_tokens):
        tokens[i] = -1
    return j


@njit(nogil=True, cache=True)
def _token_start(idx, pt_row, cand_row, page_size, hkv, h, D):
    """Offset in the flat pool of the key/value row of candidate token idx (= slot * P + offset)."""
    slot = idx // page_size
    page = np.int64(cand_row[slot])
    return ((np.int64(pt_row[page]) * hkv + h) * page_size + idx - slot * page_size) * D


@njit(nogil=True, cache=True)
def _prefetch_tokens(k_bits, v_bits, pt_row, cand_row, tok_row, i0, i1, page_size, hkv, h, D):
    """Prefetch the key and value rows of selected tokens tok_row[i0:i1] (candidate indices)."""
    for i in range(i0, i1):
        start = _token_start(np.int64(tok_row[i]), pt_row, cand_row, page_size, hkv, h, D)
        prefetch_range(k_bits, start, D)
        prefetch_range(v_bits, start, D)


@njit(parallel=True, nogil=True, cache=True)
def _token_attention_kernel(q, scale, k_bits, v_bits, kind, page_size, page_table, seq_lens, cand,
                            k_tokens, chunk_slots, chunk_tokens, o, lse, tokens):
    """q float32 [B*Hkv, G, D], scale: sm_scale; cand int32 [B, Hkv, C] ascending (-1 last); writes o float32
    [B*Hkv, G, D], lse float32 [B*Hkv, G], tokens int32 [B, Hkv, k_tokens] (logical positions)."""
    rows, G, D = q.shape
    qs = q * np.float32(scale)
    hkv = cand.shape[1]
    C = cand.shape[2]
    keys = np.empty((rows, C * page_size), np.uint32)
    n_slot_chunks = max(1, (C + chunk_slots - 1) // chunk_slots)
    for item in prange(rows * n_slot_chunks):
        row = item // n_slot_chunks
        c = item - row * n_slot_chunks
        b = row // hkv
        h = row - b * hkv
        _score_chunk(qs[row], k_bits, kind, page_size, hkv, h, page_table[b],
                     np.int64(seq_lens[b]), cand[b, h], c * chunk_slots,
                     min(C, (c + 1) * chunk_slots), keys[row])
    n_sel = np.empty(rows, np.int64)
    for row in prange(rows):
        b = row // hkv
        h = row - b * hkv
        hist = np.empty(2048, np.int64)
        n_sel[row] = _select_tokens_row(keys[row], k_tokens, tokens[b, h], hist)
    n_tok_chunks = max(1, (k_tokens + chunk_tokens - 1) // chunk_tokens)
    part_m, part_l, part_acc = new_parts(rows, n_tok_chunks, G, D)
    for item in prange(rows * n_tok_chunks):
        row = item // n_tok_chunks
        c = item - row * n_tok_chunks
        b = row // hkv
        h = row - b * hkv
        k_tile, v_tile, scores, tile_max = new_tiles(G, page_size, D)
        m, l, acc = empty_state(part_m, part_l, part_acc, row, c)
        i = c * chunk_tokens
        stop = min(n_sel[row], (c + 1) * chunk_tokens)
        _prefetch_tokens(k_bits, v_bits, page_table[b], cand[b, h], tokens[b, h], i,
                         min(stop, i + page_size), page_size, hkv, h, D)
        while i < stop:
            n = min(page_size, stop - i)
            _prefetch_tokens(k_bits, v_bits, page_table[b], cand[b, h], tokens[b, h], i + n,
                             min(stop, i + n + page_size), page_size, hkv, h, D)
            for t in range(n):
                idx = np.int64(tokens[b, h, i + t])
                start = _token_start(idx, page_table[b], cand[b, h], page_size, hkv, h, D)
                decode_into(k_bits[start:start + D], kind, k_tile[t])
                decode_into(v_bits[start:start + D], kind, v_tile[t])
                slot = idx // page_size
                tokens[b, h, i + t] = np.int64(cand[b, h, slot]) * page_size + idx - slot * page_size
            attend_tile(qs[row], k_tile, v_tile, n, scores, tile_max, m, l, acc)
            i += n
        if n_tok_chunks == 1:
            finish_row(part_m, part_l, part_acc, row, 1, o, lse)
    if n_tok_chunks > 1:
        for row in prange(rows):
            finish_row(part_m, part_l, part_acc, row, n_tok_chunks, o, lse)


def launch_token_topk_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                             page_table: torch.Tensor, seq_lens: torch.Tensor, cand: torch.Tensor,
                             k_tokens: int, sm_scale: Optional[float] = None,
                             chunk_slots: Optional[int] = None,
                             chunk_tokens: Optional[int] = None,
                             out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unchecked launcher: (o, lse, tokens), shapes in the module docstring. chunk_slots /
    chunk_tokens: candidate slots per scoring item and tokens per attention item (None: sized so
    every thread gets work); any value >= 1 gives the same result up to float32 rounding.
    out: optional (o, lse) to write into."""
    B, hq, d = q.shape
    _, hkv, page_size, _ = k_pool.shape
    group = hq // hkv
    o = out_tensor("out[0]", None if out is None else out[0], (B, hq, d), torch.float32)
    lse = out_tensor("out[1]", None if out is None else out[1], (B, hq), torch.float32)
    tokens = torch.empty(B, hkv, k_tokens, dtype=torch.int32)
    if B == 0:
        return o, lse, tokens
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    qf = float32_of("q", q.detach()).reshape(B * hkv, group, d)
    k_bits, kind = storage_bits("k_pool", k_pool)
    v_bits, _ = storage_bits("v_pool", v_pool)
    big = torch.iinfo(torch.int32).max
    cand_sorted = torch.where(cand >= 0, cand, big).sort(dim=-1).values
    cand_sorted = torch.where(cand_sorted == big, -1, cand_sorted)
    c = int32_array("cand", cand_sorted)
    rows = B * hkv
    with kernel_call() as threads:
        split = max(1, math.ceil(4 * threads / rows)) if rows < 2 * threads else 1
        slots = chunk_slots or max(1, math.ceil(c.shape[2] / split))
        toks = chunk_tokens or max(MIN_CHUNK_TOKENS, math.ceil(k_tokens / split))
        _token_attention_kernel(qf, scale, k_bits, v_bits, kind, page_size,
                                int32_array("page_table", page_table),
                                int32_array("seq_lens", seq_lens), c, k_tokens, slots, toks,
                                o.numpy().reshape(rows, group, d), lse.numpy().reshape(rows, group),
                                tokens.numpy())
    return o, lse, tokens


def _check(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens, sm_scale) -> None:
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, cand, sm_scale)
    if not isinstance(k_tokens, int) or isinstance(k_tokens, bool) or k_tokens < 0:
        raise ValueError(f"k_tokens={k_tokens!r} must be a non-negative integer (tokens kept per "
                         "request and KV head)")


def token_topk_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         page_table: torch.Tensor, seq_lens: torch.Tensor, cand: torch.Tensor,
                         k_tokens: int, sm_scale: Optional[float] = None,
                         out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the `k_tokens` best tokens of each (request, KV head)'s candidate pages.

    Shapes in the module docstring; k_tokens >= 0 (all candidate tokens when it exceeds them).
    Returns the state o float32 [B, Hq, D], lse float32 [B, Hq] (o = 0, lse = -inf: no token),
    written into `out` = (o, lse) when given.
    """
    _check(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens, sm_scale)
    o, lse, _ = launch_token_topk_attention(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens,
                                         sm_scale, out=out)
    return o, lse


def select_tokens(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  page_table: torch.Tensor, seq_lens: torch.Tensor, cand: torch.Tensor,
                  k_tokens: int, sm_scale: Optional[float] = None) -> torch.Tensor:
    """The tokens `token_topk_attention` attends: int32 [B, Hkv, k_tokens], logical token positions
    (page * page_size + offset), ascending, -1 padded. For tests and research (it also attends)."""
    _check(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens, sm_scale)
    return launch_token_topk_attention(q, k_pool, v_pool, page_table, seq_lens, cand, k_tokens,
                                    sm_scale)[2]
