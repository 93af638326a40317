"""Plain-torch reference of the kernel contracts (docs/architecture.md): every test's ground truth.

Runs on any device and any float dtype. It computes in float64 when `q` (or `scores`) is float64,
otherwise in float32, and returns states in that dtype. Slow and simple on purpose: loops over
requests and KV heads, no fused tricks.

Shapes (B requests, Hq query heads, Hkv KV heads, D head_dim, P page_size, N physical pages):
    q          [B, Hq, D]            k_pool, v_pool [N, Hkv, P, D]
    page_table [B, max_pages] int32  seq_lens [B] int32        sel [B, Hkv, K] int32, -1 padded
    o          [B, Hq, D]            lse [B, Hq]  (natural log; -inf and o = 0 when nothing selected)
"""

from __future__ import annotations

from typing import Optional

import torch

from .contracts import check_attention_args, check_merge_args, check_topk_args, pages_of


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def all_pages_sel(seq_lens: torch.Tensor, num_kv_heads: int, max_pages: int,
                  page_size: int) -> torch.Tensor:
    """`sel` [B, num_kv_heads, max_pages] int32 selecting every page of every request."""
    idx = torch.arange(max_pages, device=seq_lens.device, dtype=torch.int64)
    n = pages_of(seq_lens, page_size)
    row = torch.where(idx[None, :] < n[:, None], idx[None, :], torch.full_like(idx, -1)[None, :])
    return row[:, None, :].expand(-1, num_kv_heads, -1).to(torch.int32).contiguous()


def sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_table: torch.Tensor, seq_lens: torch.Tensor, sel: torch.Tensor,
                            sm_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of each query head over the tokens of its KV head's selected pages.

    Returns the state `(o [B, Hq, D], lse [B, Hq])`; see the module docstring for shapes.
    """
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale)
    B, hq, d = q.shape
    _, hkv, page_size, _ = k_pool.shape
    group = hq // hkv
    cdt = _compute_dtype(q)
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    o = torch.zeros(B, hq, d, dtype=cdt, device=q.device)
    lse = torch.full((B, hq), float("-inf"), dtype=cdt, device=q.device)
    offs = torch.arange(page_size, device=q.device, dtype=torch.int64)
    for b in range(B):
        seq_len = int(seq_lens[b])
        for h in range(hkv):
            pages = sel[b, h].to(torch.int64)
            pages = pages[pages >= 0]
            if pages.numel() == 0:
                continue
            tok = (pages[:, None] * page_size + offs[None, :]).reshape(-1)
            valid = tok < seq_len
            phys = page_table[b].to(torch.int64)[pages]
            keys = k_pool[phys, h].reshape(-1, d)[valid].to(cdt)      # [T, D]
            vals = v_pool[phys, h].reshape(-1, d)[valid].to(cdt)
            if keys.shape[0] == 0:
                continue
            qs = q[b, h * group:(h + 1) * group].to(cdt)              # [G, D]
            s = (qs @ keys.T) * scale                                 # [G, T]
            l = torch.logsumexp(s, dim=-1)
            o[b, h * group:(h + 1) * group] = torch.exp(s - l[:, None]) @ vals
            lse[b, h * group:(h + 1) * group] = l
    return o, lse


def dense_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, seq_lens: torch.Tensor,
                           sm_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over every token of every request: the `dense` baseline."""
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, None, sm_scale)
    sel = all_pages_sel(seq_lens, k_pool.shape[1], page_table.shape[1], k_pool.shape[2])
    return sparse_decode_attention(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale)


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of two states over disjoint token sets; `-inf` sides are empty."""
    check_merge_args(o_a, lse_a, o_b, lse_b)
    cdt = torch.float64 if torch.float64 in (o_a.dtype, lse_a.dtype, o_b.dtype, lse_b.dtype) \
        else torch.float32
    o_a, lse_a, o_b, lse_b = (t.to(cdt) for t in (o_a, lse_a, o_b, lse_b))
    m = torch.maximum(lse_a, lse_b)
    empty = torch.isneginf(m)
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    total = w_a + w_b
    denom = torch.where(empty, torch.ones_like(total), total)
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / denom[..., None]
    o = torch.where(empty[..., None], torch.zeros_like(o), o)
    lse = torch.where(empty, m, m_safe + torch.log(denom))
    return o, lse


def topk_pages(scores: torch.Tensor, k: int, num_pages: torch.Tensor, sink: int,
               recent: int) -> torch.Tensor:
    """Select `k` pages per (request, KV head) row: sink and recent pages, then the best-scoring rest.

    scores: float [B, Hkv, max_pages] (entries at or past `num_pages[b]` are ignored);
    num_pages: int32 [B]. Returns sel int32 [B, Hkv, k], ascending, padded with -1. A row with
    `num_pages <= k` selects all its pages; score ties go to the lower page index.
    """
    check_topk_args(scores, k, num_pages, sink, recent)
    B, hkv, max_pages = scores.shape
    out = torch.full((B, hkv, k), -1, dtype=torch.int32, device=scores.device)
    idx = torch.arange(max_pages, device=scores.device)
    for b in range(B):
        n = int(num_pages[b])
        if n <= k:
            out[b, :, :n] = idx[:n].to(torch.int32)
            continue
        forced = (idx < sink) | ((idx >= n - recent) & (idx < n))
        candidate = (~forced) & (idx < n)
        n_free = k - int(forced.sum())
        for h in range(hkv):
            cand_idx = idx[candidate]
            order = torch.sort(scores[b, h, cand_idx], descending=True, stable=True).indices
            chosen = torch.cat([idx[forced], cand_idx[order[:n_free]]])
            out[b, h] = torch.sort(chosen).values.to(torch.int32)
    return out
