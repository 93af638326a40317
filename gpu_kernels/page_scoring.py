"""Indexer-stage kernels of the library flows: page scores from summaries, then top-k (Triton).

    quest:    score[b, h, p] = sum_{j in group(h)} sum_d max(q_jd * kmax_pd, q_jd * kmin_pd)
                             = sum_d (sum_j relu(q_jd)) kmax_pd + (sum_j min(q_jd, 0)) kmin_pd
              (equal because kmax >= kmin elementwise: two multiply-adds per d instead of 3 G)
    centroid: score[b, h, p] = sum_{j in group(h)} q_j . mean_p = (sum_j q_j) . mean_p

The selection is `vortex_hybrid.reference.topk_pages` applied to those scores (first `sink` and last
`recent` pages forced, best others up to `budget`, ties toward the lower page index, all pages when
`budget >= num_pages`), computed by the `topk_pages` kernel. The partly filled last page has no
summary yet: it is scored from whatever its row holds, so callers keep recent >= 1 (select_pages
requires it) to attend it.

Two launches: a scoring grid over (row, block of BLOCK_PAGES pages) writes float32 score rows, so
every SM streams summaries even at B = 1; then the top-k kernel runs one program per row. The score
round trip costs 8 bytes per page against 512-1024 bytes of summaries read. A fused variant (one
program per row scoring into an L2-resident scratch row, then selecting) was measured slower at
every Llama-3-8B shape (docs/BENCHMARKS.md) and removed.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim, N physical pages):
    q [B, Hq, D] float16 / bfloat16 / float32   page_table int32 [B, max_pages]   seq_lens int32 [B]
    summaries[name] float32 [N, Hkv, 1, D]: quest "kmin", "kmax"; centroid "mean"
    returns sel int32 [B, Hkv, budget], ascending, -1 padded
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import FLOAT_DTYPES, INDEX_DTYPES, pages_of

from .topk_pages import launch_topk_pages

BLOCK_PAGES = 32


@triton.jit
def _score_pages(q_row, a_ptr, b_ptr, table_row, h, p_offs, n, stride_qh, stride_sn, stride_sh, D,
                 G: tl.constexpr, QUEST: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores float32 [BLOCK_P] of logical pages p_offs (< n) of one (request, KV head) row."""
    valid = p_offs < n
    phys = tl.load(table_row + p_offs, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m2 = valid[:, None] & dm[None, :]
    rows = phys[:, None] * stride_sn + h * stride_sh + d[None, :]
    a = tl.load(a_ptr + rows, mask=m2, other=0.0)
    q_pos = tl.zeros([BLOCK_D], tl.float32)
    q_neg = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(G):
        qj = tl.load(q_row + j * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
        q_pos += tl.maximum(qj, 0.0)
        q_neg += tl.minimum(qj, 0.0)
    if QUEST:                           # max(q*kmax, q*kmin) = relu(q)*kmax + min(q, 0)*kmin
        b = tl.load(b_ptr + rows, mask=m2, other=0.0)
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
    n = tl.cdiv(tl.load(lens_ptr + b), page_size)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * G) * stride_qh
    s = _score_pages(q_row, a_ptr, b_ptr, table_ptr + b.to(tl.int64) * stride_tb, h, p_offs, n,
                     stride_qh, stride_sn, stride_sh, D, G, QUEST, BLOCK_D)
    out = scores_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(out + p_offs, s, mask=p_offs < n)


def _check_indexer_args(q, summaries, names, page_table, seq_lens, budget, sink, recent,
                        page_size) -> int:
    """Validate an indexer call (ValueError naming the bad argument)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES[:3]:
        got = f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}"
        raise ValueError(f"q must be float16/bfloat16/float32 [B, Hq, D], got {got}")
    B, hq, d = q.shape
    first = None
    for name in names:
        t = summaries.get(name) if isinstance(summaries, dict) else None
        if t is None:
            raise ValueError(f"summaries lacks {name!r}; this indexer reads {list(names)}")
        first = t if first is None else first
        if (t.dim() != 4 or t.shape[2:] != (1, d) or t.shape[:2] != first.shape[:2]
                or t.dtype != torch.float32 or t.device != q.device or t.stride(-1) != 1
                or t.stride(1) != d):
            raise ValueError(f"summaries[{name!r}] is {t.dtype} {tuple(t.shape)} on {t.device}; "
                             f"expected float32 [N, Hkv, 1, {d}] on {q.device}, rows contiguous")
    hkv = first.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size={page_size!r} must be a positive integer: tokens per page of "
                         "the pool the summaries describe")
    for name, v in (("budget", budget), ("sink", sink), ("recent", recent)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer")
    if budget < sink + recent:
        raise ValueError(f"budget={budget} must be >= sink + recent = {sink + recent}")
    for name, t, nd in (("page_table", page_table, 2), ("seq_lens", seq_lens, 1)):
        if (not isinstance(t, torch.Tensor) or t.dim() != nd or t.dtype not in INDEX_DTYPES
                or t.shape[0] != B or t.device != q.device):
            raise ValueError(f"{name} must be an int32 tensor with {B} rows on {q.device}, got "
                             f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if B and int(seq_lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    if B and int(pages_of(seq_lens, page_size).max()) > page_table.shape[1]:
        raise ValueError(f"seq_lens {seq_lens.tolist()} need more pages than page_table's "
                         f"{page_table.shape[1]} columns at page_size={page_size}")


def launch_indexer(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, page_table: torch.Tensor,
                   seq_lens: torch.Tensor, budget: int, sink: int, recent: int, page_size: int,
                   quest: bool, block_pages: int = BLOCK_PAGES, **config) -> torch.Tensor:
    """Unchecked launcher; a, b: float32 summary stores [N, Hkv, 1, D] (kmax, kmin for quest;
    mean twice for centroid). `config` overrides the top-k launch choices (`topk_pages.row_config`).
    Returns sel int32 [B, Hkv, budget]."""
    B, hq, d = q.shape
    hkv = a.shape[1]
    max_pages = page_table.shape[1]
    sel = torch.empty(B, hkv, budget, dtype=torch.int32, device=q.device)
    if B * hkv == 0 or budget == 0:
        return sel
    if q.stride(-1) != 1:
        q = q.contiguous()
    if page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        page_table = page_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32)
    scores = torch.empty(B, hkv, max_pages, dtype=torch.float32, device=q.device)
    _page_scores_kernel[(B * hkv, triton.cdiv(max_pages, block_pages))](
        q, a, b, page_table, lens, scores, hkv, page_size, d, q.stride(0), q.stride(1), a.stride(0),
        a.stride(1), page_table.stride(0), scores.stride(0), scores.stride(1), G=hq // hkv,
        QUEST=quest, BLOCK_P=block_pages, BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return launch_topk_pages(scores, budget, lens, sink, recent, sel, page_size=page_size, **config)


def _indexer(q, summaries, page_table, seq_lens, budget, sink, recent, page_size, quest: bool):
    names = ("kmax", "kmin") if quest else ("mean",)
    _check_indexer_args(q, summaries, names, page_table, seq_lens, budget, sink, recent, page_size)
    return launch_indexer(q, summaries[names[0]], summaries[names[-1]], page_table, seq_lens,
                          budget, sink, recent, page_size, quest=quest)


def quest_indexer(q: torch.Tensor, summaries: dict[str, torch.Tensor], page_table: torch.Tensor,
                  seq_lens: torch.Tensor, budget: int, sink: int, recent: int, *,
                  page_size: int) -> torch.Tensor:
    """Quest selection: sel int32 [B, Hkv, budget] from q [B, Hq, D] and summaries "kmin", "kmax"
    (float32 [N, Hkv, 1, D]); page_table int32 [B, max_pages]; seq_lens int32 [B] tokens;
    page_size: tokens per page of the pool the summaries describe."""
    return _indexer(q, summaries, page_table, seq_lens, budget, sink, recent, page_size, True)


def centroid_indexer(q: torch.Tensor, summaries: dict[str, torch.Tensor], page_table: torch.Tensor,
                     seq_lens: torch.Tensor, budget: int, sink: int, recent: int, *,
                     page_size: int) -> torch.Tensor:
    """Centroid selection: sel int32 [B, Hkv, budget] from q [B, Hq, D] and summaries "mean"
    (float32 [N, Hkv, 1, D]); same arguments as `quest_indexer`."""
    return _indexer(q, summaries, page_table, seq_lens, budget, sink, recent, page_size, False)
