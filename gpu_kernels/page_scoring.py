"""Indexer-stage kernels of the library flows: page scores from summaries, then top-k (Triton).

    quest:    score[b, h, p] = sum_{j in group(h)} sum_d max(q_jd * kmax_pd, q_jd * kmin_pd)
                             = sum_d (sum_j relu(q_jd)) kmax_pd + (sum_j min(q_jd, 0)) kmin_pd
              (equal because kmax >= kmin elementwise: two multiply-adds per d instead of 3 G)
    centroid: score[b, h, p] = sum_{j in group(h)} q_j . mean_p = (sum_j q_j) . mean_p
    lowbit:   score[b, h, p] = max_{j in group(h)} max_t q_j . (kmin_p + c_pt * step_p)
                             = max_j (q_j . kmin_p + max_t sum_d (q_jd step_pd) c_ptd),
              step = (kmax - kmin) / (2**bits - 1), c_pt token t's codes (gqa "max")

The selection is `vortex_hybrid.reference.topk_pages` applied to those scores (first `sink` and last
`recent` pages forced, best others up to `budget`, ties toward the lower page index, all pages when
`budget >= num_pages`), computed by the `topk_pages` kernel. The partly filled last page has no
summary yet: its row is not read (score 0), and the `recent >= 1` forced pages include it.

lowbit decodes each page's packed codes (`vortex_hybrid.packed_codes`) in registers, LOWBIT_TILE
code elements at a time: per page and key channel it reads page_size * bits / 8 bytes of codes
and the two bounds.

Two launches: a scoring grid over (row, block of BLOCK_PAGES pages) writes float32 score rows, so
every SM streams summaries even at B = 1; then the top-k kernel runs one program per row. The score
round trip costs 8 bytes per page against 512-1024 bytes of summaries read. A fused variant (one
program per row scoring into an L2-resident scratch row, then selecting) was measured slower at
every Llama-3-8B shape (docs/BENCHMARKS.md) and removed.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim, R summary rows):
    q [B, Hq, D] float16 / bfloat16 / float32   seq_lens int32 [B]
    page_table int32 [B, max_pages]: logical page -> summary row (read for full pages only)
    summaries[name] float32, bfloat16 or float8_e4m3fn [R, Hkv, 1, D]: quest and lowbit "kmin",
    "kmax"; centroid "mean"; lowbit "codes" uint8 [R, Hkv, page_size, bits * ceil(D / 8)]
    returns sel int32 [B, Hkv, budget], ascending, -1 padded
The mirror of `cpu_kernels.page_scoring`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


from vortex_hybrid.packed_codes import code_bits

from .topk_pages import launch_topk_pages

BLOCK_PAGES = 32


@triton.jit
def _score_pages(q_row, a_ptr, b_ptr, table_row, h, p_offs, n_full, stride_qh, stride_sn, stride_sh, D,
                 G: tl.constexpr, QUEST: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores float32 [BLOCK_P] of logical pages p_offs of one (request, KV head) row; 0 for pages
    at or past n_full (the partly filled tail page has no summary row)."""
    valid = p_offs < n_full
    phys = tl.load(table_row + p_offs, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m2 = valid[:, None] & dm[None, :]
    rows = phys[:, None] * stride_sn + h * stride_sh + d[None, :]
    a = tl.load(a_ptr + rows, mask=m2, other=0.0).to(tl.float32)
    q_pos = tl.zeros([BLOCK_D], tl.float32)
    q_neg = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(G):
        qj = tl.load(q_row + j * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
        q_pos += tl.maximum(qj, 0.0)
        q_neg += tl.minimum(qj, 0.0)
    if QUEST:                           # max(q*kmax, q*kmin) = relu(q)*kmax + min(q, 0)*kmin
        b = tl.load(b_ptr + rows, mask=m2, other=0.0).to(tl.float32)
        return tl.sum(q_pos[None, :] * a + q_neg[None, :] * b, axis=1)
    else:
        return tl.sum((q_pos + q_neg)[None, :] * a, axis=1)


@triton.jit
def _page_scores_kernel(q_ptr, a_ptr, b_ptr, table_ptr, lens_ptr, scores_ptr, H, page_size, D,
                        stride_qb, stride_qh, stride_sn, stride_sh, stride_tb, stride_ob, stride_oh,
                        G: tl.constexpr, QUEST: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    seq_len = tl.load(lens_ptr + b)
    n = tl.cdiv(seq_len, page_size)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * G) * stride_qh
    s = _score_pages(q_row, a_ptr, b_ptr, table_ptr + b.to(tl.int64) * stride_tb, h, p_offs, seq_len // page_size,
                     stride_qh, stride_sn, stride_sh, D, G, QUEST, BLOCK_D)
    out = scores_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(out + p_offs, s, mask=p_offs < n)


@triton.jit
def _lowbit_scores_kernel(q_ptr, hi_ptr, lo_ptr, c_ptr, table_ptr, lens_ptr, scores_ptr, H,
                          page_size, D, W, stride_qb, stride_qh, stride_sn, stride_sh, stride_cn,
                          stride_ch, stride_tb, stride_ob, stride_oh, G: tl.constexpr,
                          BITS: tl.constexpr, ITERS: tl.constexpr, BLOCK_PP: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """lowbit scores of ITERS x BLOCK_PP pages of one (request, KV head) row, BLOCK_PP at a time:
    score = max_j max_t (q_j . kmin + sum_d (q_jd * step_d) * c_td), step = (kmax - kmin) / L, the
    codes c [BLOCK_PP, page_size, D] decoded from their bit planes (`packed_codes`); 0 for pages at
    or past the full ones."""
    LEVELS: tl.constexpr = 2 ** BITS - 1
    row = tl.program_id(0)
    b = row // H
    h = row % H
    seq_len = tl.load(lens_ptr + b)
    n = tl.cdiv(seq_len, page_size)
    n_full = seq_len // page_size
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * G) * stride_qh
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    out = scores_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    t = tl.arange(0, BLOCK_T)
    tm = t < page_size
    for it in range(ITERS):
        p_offs = (tl.program_id(1) * ITERS + it) * BLOCK_PP + tl.arange(0, BLOCK_PP)
        valid = p_offs < n_full
        phys = tl.load(table_row + p_offs, mask=valid, other=0).to(tl.int64)
        m2 = valid[:, None] & dm[None, :]
        rows = phys[:, None] * stride_sn + h * stride_sh + d[None, :]
        kmax = tl.load(hi_ptr + rows, mask=m2, other=0.0).to(tl.float32)
        kmin = tl.load(lo_ptr + rows, mask=m2, other=0.0).to(tl.float32)
        step = (kmax - kmin) / LEVELS
        m3 = valid[:, None, None] & tm[None, :, None] & dm[None, None, :]
        byte_at = c_ptr + phys[:, None, None] * stride_cn + h * stride_ch \
            + t[None, :, None] * (BITS * W) + (d // 8)[None, None, :]
        code = tl.zeros([BLOCK_PP, BLOCK_T, BLOCK_D], tl.int32)
        for bit in tl.static_range(BITS):
            byte = tl.load(byte_at + bit * W, mask=m3, other=0).to(tl.int32)
            code += ((byte >> (d % 8)[None, None, :]) & 1) << bit
        codes = code.to(tl.float32)
        best = tl.full([BLOCK_PP], float("-inf"), tl.float32)
        for j in tl.static_range(G):
            qj = tl.load(q_row + j * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
            dots = tl.sum((qj[None, :] * step)[:, None, :] * codes, axis=2)       # [PP, T]
            dots = tl.where(tm[None, :], dots, float("-inf"))
            best = tl.maximum(best, tl.sum(qj[None, :] * kmin, axis=1) + tl.max(dots, axis=1))
        tl.store(out + p_offs, tl.where(valid, best, 0.0), mask=p_offs < n)


LOWBIT_TILE = 4096
"""Code elements (pages x page_size x head_dim) a lowbit scoring program decodes at a time."""


def launch_page_scores(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, page_table: torch.Tensor,
                       seq_lens: torch.Tensor, page_size: int, quest: bool,
                       block_pages: int = BLOCK_PAGES,
                       codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unchecked: scores float32 [B, Hkv, max_pages] for q [B, Hq, D]; a, b summary stores
    [R, Hkv, 1, D] (quest, lowbit: kmax, kmin; centroid: mean twice); codes (lowbit): packed
    uint8 [R, Hkv, page_size, bits * ceil(D / 8)]. Columns past a request's pages are not written;
    the partly filled tail page scores 0."""
    B, hq, d = q.shape
    hkv = a.shape[1]
    max_pages = page_table.shape[1]
    scores = torch.empty(B, hkv, max_pages, dtype=torch.float32, device=q.device)
    if scores.numel() == 0:
        return scores
    if q.stride(-1) != 1:
        q = q.contiguous()
    if page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        page_table = page_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32)
    block_d = triton.next_power_of_2(d)
    if codes is not None:
        block_t = triton.next_power_of_2(page_size)
        block_pp = max(1, min(block_pages, LOWBIT_TILE // (block_t * block_d)))
        iters = max(1, block_pages // block_pp)
        _lowbit_scores_kernel[(B * hkv, triton.cdiv(max_pages, block_pp * iters))](
            q, a, b, codes, page_table, lens, scores, hkv, page_size, d, -(-d // 8), q.stride(0),
            q.stride(1), a.stride(0), a.stride(1), codes.stride(0), codes.stride(1),
            page_table.stride(0), scores.stride(0), scores.stride(1), G=hq // hkv,
            BITS=code_bits(codes.shape[-1], d), ITERS=iters, BLOCK_PP=block_pp, BLOCK_T=block_t,
            BLOCK_D=block_d, num_warps=4)
        return scores
    _page_scores_kernel[(B * hkv, triton.cdiv(max_pages, block_pages))](
        q, a, b, page_table, lens, scores, hkv, page_size, d, q.stride(0), q.stride(1), a.stride(0),
        a.stride(1), page_table.stride(0), scores.stride(0), scores.stride(1), G=hq // hkv,
        QUEST=quest, BLOCK_P=block_pages, BLOCK_D=block_d, num_warps=4)
    return scores


def launch_indexer(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, page_table: torch.Tensor,
                   seq_lens: torch.Tensor, budget: int, sink: int, recent: int, page_size: int,
                   quest: bool, budgets: Optional[torch.Tensor] = None,
                   block_pages: int = BLOCK_PAGES, codes: Optional[torch.Tensor] = None,
                   **config) -> torch.Tensor:
    """Unchecked launcher: sel int32 [B, Hkv, budget]; arguments as in `launch_page_scores`;
    budgets int32 [B, Hkv] (or None): each row trimmed to its own (`flow_kernels.keep_budgets`).
    `config` overrides the top-k launch choices (`topk_pages.row_config`)."""
    sel = torch.empty(q.shape[0], a.shape[1], budget, dtype=torch.int32, device=q.device)
    if sel.numel() == 0:
        return sel
    scores = launch_page_scores(q, a, b, page_table, seq_lens, page_size, quest, block_pages,
                                codes)
    sel = launch_topk_pages(scores, budget, seq_lens.to(torch.int32), sink, recent, sel,
                            page_size=page_size, **config)
    if budgets is None:
        return sel
    from vortex_hybrid.flow_kernels import keep_budgets
    num_pages = (seq_lens.to(torch.int32) + page_size - 1) // page_size
    return keep_budgets(sel, scores, budgets, num_pages, sink, recent)
