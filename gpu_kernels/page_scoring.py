"""Indexer-stage kernels of the library flows: page scores from summaries, then top-k (Triton).

    quest:    score[b, h, p] = sum_{j in group(h)} sum_d max(q_jd * kmax_pd, q_jd * kmin_pd)
                             = sum_d (sum_j relu(q_jd)) kmax_pd + (sum_j min(q_jd, 0)) kmin_pd
              (equal because kmax >= kmin elementwise: two multiply-adds per d instead of 3 G)
    centroid: score[b, h, p] = sum_{j in group(h)} q_j . mean_p = (sum_j q_j) . mean_p
    lowbit:   score[b, h, p] = max_{j in group(h)} max_t q_j . (kmin_p + c_pt * step_p)
                             = max_j (q_j . kmin_p + max_t sum_d q_jd (c_ptd step_pd)),
              step = (kmax - kmin) / (2**bits - 1), c_pt token t's codes (gqa "max")

The selection is `vortex_hybrid.reference.topk_pages` applied to those scores (first `sink` and last
`recent` pages forced, best others up to `budget`, ties toward the lower page index, all pages when
`budget >= num_pages`), computed by the `topk_pages` kernel. The partly filled last page has no
summary yet: its row is not read (score 0), and the `recent >= 1` forced pages include it.

lowbit scores on tensor cores, one page at a time: a program walks BLOCK_PAGES pages of one
(request, KV head) row; per page and chunk of 32 channels it reads each token's code word of each
bit plane once (32 bits, bit i channel i of the chunk: an int32 load when a plane's bytes are a
multiple of 4, else 4 byte loads), spreads the bits into codes [BLOCK_T, 32] (BLOCK_T: the page's
tokens, at least 16 rows), scales them by the page's steps (khat = c * step) and accumulates
khat @ q^T into [BLOCK_T, 16+] float32 (one column per query head of the group, padded to at least
16) with tf32x3 dots (float32-level products); q_j . kmin is summed on the side. The max over
tokens, plus that, max over the group, gives the score. Measured on an H100 (13 requests x 32K,
Llama-3-8B heads, docs/BENCHMARKS.md): 614 us a layer against 1,196 us for the earlier kernel that
decoded [pages, tokens, D] tiles on CUDA cores, and against 973 us for the same dots over 8 pages'
rows at once (their [pages, tokens] -> rows reshapes cost more than the larger tiles gain). The
bit spreading, not the bytes, bounds it (a bfloat16 dot instead of tf32x3: 426 us).

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
                          BITS: tl.constexpr, BLOCK_PAGES: tl.constexpr, BLOCK_T: tl.constexpr,
                          GP: tl.constexpr, CHUNKS: tl.constexpr, WORDS: tl.constexpr):
    """lowbit scores of BLOCK_PAGES pages of one (request, KV head) row, one page at a time:
    score = max_j (q_j . kmin + max_t sum_d q_jd khat_td), khat_td = c_td * step_d,
    step = (kmax - kmin) / L; 0 for pages at or past the full ones (not written past n).

    Per chunk of 32 channels and bit plane, one 32-bit word per token (WORDS: c_ptr is the int32
    view of the codes, a plane W // 4 words; else W bytes a plane, 4 byte loads a word, bytes past
    W masked), its bits spread over the chunk's channels; acc [BLOCK_T, GP] += khat @ q_chunk^T
    (tf32x3). Channels past D have bounds 0, so step 0 (their code bits count for nothing); query
    heads past G are zero columns, masked at the end; tokens past page_size -inf."""
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
    t = tl.arange(0, BLOCK_T)
    tm = t < page_size
    i = tl.arange(0, 32)
    jc = tl.arange(0, GP)
    for k in range(BLOCK_PAGES):
        p = tl.program_id(1) * BLOCK_PAGES + k
        if p < n_full:
            phys = tl.load(table_row + p).to(tl.int64)
            if WORDS:
                tok = c_ptr + phys * stride_cn + h * stride_ch + t * (BITS * (W // 4))
            else:
                tok = c_ptr + phys * stride_cn + h * stride_ch + t * (BITS * W)
            acc = tl.zeros([BLOCK_T, GP], tl.float32)
            base = tl.zeros([GP], tl.float32)
            for c in tl.static_range(CHUNKS):
                d = c * 32 + i
                dm = d < D
                srow = phys * stride_sn + h * stride_sh + d
                kmax = tl.load(hi_ptr + srow, mask=dm, other=0.0).to(tl.float32)
                kmin = tl.load(lo_ptr + srow, mask=dm, other=0.0).to(tl.float32)
                code = tl.zeros([BLOCK_T, 32], tl.int32)
                for bit in tl.static_range(BITS):
                    if WORDS:
                        word = tl.load(tok + bit * (W // 4) + c, mask=tm, other=0)
                    else:
                        word = tl.zeros([BLOCK_T], tl.int32)
                        for y in tl.static_range(4):                    # byte 4 c + y of the plane
                            ok = tm & ((t * 0 + 4 * c + y) < W)       # a tensor: the interpreter
                            byte = tl.load(tok + bit * W + 4 * c + y,  # mis-types scalar masks
                                           mask=ok, other=0)
                            word |= byte.to(tl.int32) << (8 * y)
                    # bit i is channel 32 c + i (bit 31 sign-extends under >>; & 1 drops it)
                    code += ((word[:, None] >> i[None, :]) & 1) << bit
                khat = code.to(tl.float32) * ((kmax - kmin) / LEVELS)[None, :]
                qc = tl.load(q_row + jc[None, :] * stride_qh + d[:, None],
                             mask=(jc[None, :] < G) & dm[:, None], other=0.0).to(tl.float32)
                acc = tl.dot(khat, qc, acc, input_precision="tf32x3")          # [BLOCK_T, GP]
                base += tl.sum(qc * kmin[:, None], axis=0)
            heads = tl.max(tl.where(tm[:, None], acc, float("-inf")), axis=0) + base
            tl.store(out + p, tl.max(tl.where(jc < G, heads, float("-inf")), axis=0))
        elif p < n:
            tl.store(out + p, 0.0)


def lowbit_config(page_size: int, group: int) -> dict:
    """The lowbit scoring kernel's launch choices, all made here. BLOCK_T: page_size rounded up to
    a power of two, at least 16 (tl.dot's least M). GP: the group's query heads rounded up to a
    power of two, at least 16 (tl.dot's least N). num_warps: one warp up to 64 rows (a page's
    [BLOCK_T, 32] code tile is 16-64 values a thread), more for longer pages (measured at 16
    tokens: one warp 614 us, two 857 us)."""
    block_t = max(16, triton.next_power_of_2(page_size))
    return dict(BLOCK_T=block_t, GP=max(16, triton.next_power_of_2(group)),
                num_warps=max(1, block_t // 64))


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
    if codes is not None:
        cfg = lowbit_config(page_size, hq // hkv)
        words = -(-d // 8) % 4 == 0 and codes.stride(-1) == 1 and codes.stride(-2) % 4 == 0 \
            and codes.stride(0) % 4 == 0 and codes.stride(1) % 4 == 0 \
            and codes.storage_offset() % 4 == 0 and codes.data_ptr() % 4 == 0
        c = codes.view(torch.int32) if words else codes
        stride_cn, stride_ch = (codes.stride(0) // 4, codes.stride(1) // 4) if words else \
            (codes.stride(0), codes.stride(1))
        _lowbit_scores_kernel[(B * hkv, triton.cdiv(max_pages, block_pages))](
            q, a, b, c, page_table, lens, scores, hkv, page_size, d, -(-d // 8), q.stride(0),
            q.stride(1), a.stride(0), a.stride(1), stride_cn, stride_ch,
            page_table.stride(0), scores.stride(0), scores.stride(1), G=hq // hkv,
            BITS=code_bits(codes.shape[-1], d), BLOCK_PAGES=block_pages,
            CHUNKS=triton.cdiv(d, 32), WORDS=words, **cfg)                   # 32: a word
        return scores
    block_d = triton.next_power_of_2(d)
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
