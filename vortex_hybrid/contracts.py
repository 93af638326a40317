"""Boundary checks for the kernel contracts of docs/architecture.md, shared by every backend.

`vortex_hybrid.reference`, `vortex_hybrid.cpu_kernels` and `vortex_hybrid.gpu_kernels` expose the same
functions; each public entry point calls the matching check here first, so bad input raises a
`ValueError` that names the argument, the bad value and what is allowed, and kernels can assume valid
input. Shape/dtype checks are free; value checks (page indices in range, unique selections) read the
tensors and, on a GPU, synchronise, so a runtime validates its inputs once per step and then calls
the kernels' unchecked launchers (the runtime that does so comes in a later change).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from .packed_codes import CODE_DTYPE, MAX_CODE_BITS

MAX_PAGE_SIZE = 1024
"""Largest page size (tokens) the kernels take; page sizes are powers of two."""
INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _shape(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} has shape {tuple(t.shape)}; expected {what}")


def pages_of(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages each request holds: ceil(seq_lens / page_size), int64."""
    return (seq_lens.to(torch.int64) + page_size - 1) // page_size


def check_attention_args(q, k_pool, v_pool, page_table, seq_lens, sel=None, sm_scale=None,
                         check_values: bool = True) -> None:
    """Validate the arguments of `sparse_decode_attention` / `dense_decode_attention`."""
    _shape("q", q, 3, "[B, num_q_heads, head_dim]")
    _shape("k_pool", k_pool, 4, "[num_pages, num_kv_heads, page_size, head_dim]")
    _need(v_pool.shape == k_pool.shape,
          f"v_pool shape {tuple(v_pool.shape)} differs from k_pool shape {tuple(k_pool.shape)}")
    _need(v_pool.dtype == k_pool.dtype, f"v_pool dtype {v_pool.dtype} differs from k_pool {k_pool.dtype}")
    _need(k_pool.dtype in FLOAT_DTYPES, f"k_pool dtype {k_pool.dtype} not in {FLOAT_DTYPES}")
    _need(q.dtype in FLOAT_DTYPES, f"q dtype {q.dtype} not in {FLOAT_DTYPES}")
    B, hq, d = q.shape
    n_phys, hkv, page_size, d_kv = k_pool.shape
    _need(d == d_kv, f"q head_dim {d} differs from k_pool head_dim {d_kv}")
    _need(hkv > 0 and hq % hkv == 0,
          f"num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv} (GQA)")
    _shape("page_table", page_table, 2, "[B, max_pages] int32")
    _need(page_table.dtype in INDEX_DTYPES, f"page_table dtype {page_table.dtype}; expected int32")
    _need(page_table.shape[0] == B, f"page_table has {page_table.shape[0]} rows; q has batch {B}")
    _shape("seq_lens", seq_lens, 1, "[B] int32")
    _need(seq_lens.dtype in INDEX_DTYPES, f"seq_lens dtype {seq_lens.dtype}; expected int32")
    _need(seq_lens.shape[0] == B, f"seq_lens has {seq_lens.shape[0]} entries; q has batch {B}")
    if sel is not None:
        _shape("sel", sel, 3, "[B, num_kv_heads, K] int32")
        _need(sel.dtype in INDEX_DTYPES, f"sel dtype {sel.dtype}; expected int32")
        _need(sel.shape[:2] == (B, hkv), f"sel has shape {tuple(sel.shape)}; expected [{B}, {hkv}, K]")
    if sm_scale is not None:
        _need(isinstance(sm_scale, (int, float)) and sm_scale > 0,
              f"sm_scale={sm_scale!r} must be a positive number (default head_dim ** -0.5)")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("page_table", page_table),
                    ("seq_lens", seq_lens)) + ((("sel", sel),) if sel is not None else ()):
        _need(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    if not check_values or B == 0:
        return
    max_pages = page_table.shape[1]
    sl = seq_lens.to(torch.int64)
    _need(bool((sl >= 0).all()), f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    n_pages = pages_of(sl, page_size)
    _need(bool((n_pages <= max_pages).all()),
          f"seq_lens {seq_lens.tolist()} need up to {int(n_pages.max())} pages but page_table "
          f"has {max_pages} columns")
    if sel is None:
        used = torch.arange(max_pages, device=q.device)[None, :] < n_pages[:, None]
        phys = page_table.to(torch.int64)[used]
    else:
        check_sel_values(sel, n_pages)
        s = sel.to(torch.int64)
        valid = s >= 0
        rows = torch.arange(B, device=q.device)[:, None, None].expand_as(s)
        phys = page_table.to(torch.int64)[rows[valid], s[valid]]
    if phys.numel():
        lo, hi = int(phys.min()), int(phys.max())
        _need(lo >= 0 and hi < n_phys,
              f"page_table maps a used page to physical page {lo if lo < 0 else hi}; "
              f"the pool has pages 0..{n_phys - 1}")


def check_sel_values(sel: torch.Tensor, n_pages: torch.Tensor, rids=None) -> None:
    """sel int [B, Hkv, K]: -1 padding or logical pages below n_pages [B] (the pages each request
    holds), unique per row. `rids` names the requests in messages (default: the batch row)."""
    s = sel.to(torch.int64)
    _need(bool((s >= -1).all()), "sel holds values below -1; pad with -1 only")
    n = n_pages.to(s.device, torch.int64)
    bad = (s >= 0) & (s >= n[:, None, None])
    if bool(bad.any()):
        b, h, j = (int(x) for x in bad.nonzero()[0])
        who = b if rids is None else rids[b]
        raise ValueError(f"sel[{b}, {h}, {j}]={int(s[b, h, j])} is not a page of request {who} "
                         f"(it holds {int(n[b])} pages)")
    srt = torch.sort(s, dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        b, h, _ = (int(x) for x in dup.nonzero()[0])
        raise ValueError(f"sel lists a page twice in row [{b}, {h}]: {sel[b, h].tolist()}; pages "
                         "must be unique per row")


def check_merge_args(o_a, lse_a, o_b, lse_b) -> None:
    """Validate the arguments of `merge_states`."""
    _shape("o_a", o_a, 3, "[B, num_q_heads, head_dim]")
    _need(o_b.shape == o_a.shape, f"o_b shape {tuple(o_b.shape)} differs from o_a {tuple(o_a.shape)}")
    _need(lse_a.shape == o_a.shape[:2], f"lse_a shape {tuple(lse_a.shape)}; expected {tuple(o_a.shape[:2])}")
    _need(lse_b.shape == o_a.shape[:2], f"lse_b shape {tuple(lse_b.shape)}; expected {tuple(o_a.shape[:2])}")
    for name, t in (("o_b", o_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        _need(t.device == o_a.device, f"{name} is on {t.device} but o_a is on {o_a.device}")


def check_topk_args(scores, k, num_pages, sink, recent, check_values: bool = True) -> None:
    """Validate the arguments of `topk_pages`."""
    _shape("scores", scores, 3, "[B, num_kv_heads, max_pages] float32")
    _need(scores.dtype in (torch.float32, torch.float64),
          f"scores dtype {scores.dtype}; expected float32 (float64 in the reference)")
    for name, v in (("k", k), ("sink", sink), ("recent", recent)):
        _need(is_count(v), f"{name}={v!r} must be a non-negative integer")
    _need(k >= sink + recent, f"k={k} must be >= sink + recent = {sink + recent} "
          "(k counts the sink and recent pages)")
    _shape("num_pages", num_pages, 1, "[B] int32")
    _need(num_pages.dtype in INDEX_DTYPES, f"num_pages dtype {num_pages.dtype}; expected int32")
    _need(num_pages.shape[0] == scores.shape[0],
          f"num_pages has {num_pages.shape[0]} entries; scores has batch {scores.shape[0]}")
    _need(num_pages.device == scores.device,
          f"num_pages is on {num_pages.device} but scores is on {scores.device}")
    if check_values and num_pages.numel():
        lo, hi = int(num_pages.min()), int(num_pages.max())
        _need(lo >= 0 and hi <= scores.shape[2],
              f"num_pages must lie in [0, {scores.shape[2]}] (scores' last dim), got {num_pages.tolist()}")


SUMMARY_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)
"""Storage dtypes of flow summaries the kernels read and write (they compute in float32).
float8_e4m3fn (one byte a value: a quarter of float32's bytes, half of bfloat16's) rounds to nearest
with 3 mantissa bits and saturates at +-FP8_SUMMARY_MAX (`to_summary_dtype`)."""

FP8_SUMMARY_MAX = 448.0
"""The largest finite float8_e4m3fn value: summaries beyond it are stored as +-448."""


def to_summary_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` rounded to a summary store's `dtype`; float8_e4m3fn saturates at +-FP8_SUMMARY_MAX
    (a plain cast may give NaN out of range), NaN stays NaN."""
    if dtype == torch.float8_e4m3fn:
        value = value.clamp(-FP8_SUMMARY_MAX, FP8_SUMMARY_MAX)
    return value.to(dtype)


def write_summary_rows(store: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
    """store[rows] = value along dim 0 (value already in store's dtype); float8 stores through byte
    views, as torch has no float8 `index_copy_`."""
    if store.dtype == torch.float8_e4m3fn:
        store.view(torch.uint8).index_copy_(0, rows, value.view(torch.uint8))
    else:
        store.index_copy_(0, rows, value)


def _summary_rows(summaries, names: tuple[str, ...], what: str) -> list[torch.Tensor]:
    if not isinstance(summaries, dict):
        raise ValueError(f"summaries must be a dict name -> tensor, got {type(summaries).__name__}")
    out = []
    for name in names:
        t = summaries.get(name)
        if t is None:
            raise ValueError(f"summaries lacks {name!r}; {what} reads {list(names)}")
        out.append(t)
    return out


def check_codes(name: str, t, n_rows: int, hkv: int, page_size: int, d: int, device) -> int:
    """A packed code store (`packed_codes`): uint8 [n_rows, hkv, page_size, bits * ceil(d / 8)]
    on `device`, rows contiguous, bits in [1, MAX_CODE_BITS]. Returns bits."""
    w = -(-d // 8)
    width = t.shape[-1] if isinstance(t, torch.Tensor) and t.dim() == 4 else 0
    _need(isinstance(t, torch.Tensor) and t.dtype == CODE_DTYPE and t.dim() == 4
          and tuple(t.shape[:3]) == (n_rows, hkv, page_size) and width % w == 0
          and 1 <= width // w <= MAX_CODE_BITS and t.device == device and t.stride(-1) == 1
          and t.stride(2) == width,
          f"summaries[{name!r}] is {getattr(t, 'dtype', type(t).__name__)} "
          f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}; expected packed "
          f"codes {CODE_DTYPE} [{n_rows}, {hkv}, {page_size}, bits * {w}] (bits 1-"
          f"{MAX_CODE_BITS}) on {device}, rows contiguous")
    return width // w


def check_cache_args(k_pool, pages, summaries, names: tuple[str, ...], rows=None,
                     codes: Optional[str] = None) -> None:
    """Validate a cache-stage kernel call: k_pool [N, Hkv, P, D]; pages int [n] (full physical
    pages); summaries[name] [R, Hkv, 1, D] of SUMMARY_DTYPES on k_pool's device, rows contiguous;
    rows int [n] (the summary row of each page; None: the page number itself); summaries[codes]
    (when named) packed codes [R, Hkv, P, bits * ceil(D / 8)] (`check_codes`)."""
    _shape("k_pool", k_pool, 4, "[num_pages, num_kv_heads, page_size, head_dim]")
    _need(k_pool.dtype in FLOAT_DTYPES[:3], f"k_pool dtype {k_pool.dtype}; expected one of "
          f"{FLOAT_DTYPES[:3]}")
    for name, t in (("pages", pages),) + ((("rows", rows),) if rows is not None else ()):
        _need(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype in INDEX_DTYPES,
              f"{name} must be an int64 tensor [n], got {getattr(t, 'dtype', type(t).__name__)} "
              f"{tuple(getattr(t, 'shape', ()))}")
        _need(t.device == k_pool.device, f"{name} is on {t.device} but k_pool is on {k_pool.device}")
    if rows is not None:
        _need(rows.shape == pages.shape, f"rows has {rows.numel()} entries; pages has {pages.numel()}")
    N, hkv, _, d = k_pool.shape
    stores = _summary_rows(summaries, names, "this cache stage")
    n_rows = stores[0].shape[0] if stores[0].dim() == 4 else 0
    for name, t in zip(names, stores):
        _need(t.dim() == 4 and tuple(t.shape[1:]) == (hkv, 1, d) and t.shape[0] == n_rows
              and t.dtype in SUMMARY_DTYPES and t.device == k_pool.device,
              f"summaries[{name!r}] is {t.dtype} {tuple(t.shape)} on {t.device}; expected "
              f"{' or '.join(str(x) for x in SUMMARY_DTYPES)} [R, {hkv}, 1, {d}] on {k_pool.device}")
        _need(t.stride(-1) == 1 and t.stride(1) == d,
              f"summaries[{name!r}] must be contiguous per row, strides {t.stride()}")
    if codes is not None:
        check_codes(codes, _summary_rows(summaries, (codes,), "this cache stage")[0], n_rows, hkv,
                    k_pool.shape[2], d, k_pool.device)
    if pages.numel():
        lo, hi = int(pages.min()), int(pages.max())
        _need(lo >= 0 and hi < N, f"pages holds {lo}..{hi}; the pool has pages 0..{N - 1}")
        r = pages if rows is None else rows
        lo, hi = int(r.min()), int(r.max())
        _need(lo >= 0 and hi < n_rows, f"{'pages' if rows is None else 'rows'} holds {lo}..{hi}; "
              f"the summaries have rows 0..{n_rows - 1}")


def check_indexer_args(q, summaries, names: tuple[str, ...], page_table, seq_lens, budget, sink,
                       recent, page_size, codes: Optional[str] = None) -> None:
    """Validate a summary-based indexer call: q [B, Hq, D] float; summaries[name] [R, Hkv, 1, D] of
    SUMMARY_DTYPES on q's device; page_table int32 [B, max_pages] (logical page -> summary row, read
    for full pages only); seq_lens int32 [B]; budget >= sink + recent, recent >= 1; page_size >= 1;
    summaries[codes] (when named) packed codes [R, Hkv, page_size, bits * ceil(D / 8)]."""
    _need(isinstance(q, torch.Tensor) and q.dim() == 3 and q.dtype in FLOAT_DTYPES[:3],
          f"q must be float16/bfloat16/float32 [B, Hq, D], got "
          f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    B, hq, d = q.shape
    stores = _summary_rows(summaries, names, "this indexer")
    first = stores[0]
    for name, t in zip(names, stores):
        _need(t.dim() == 4 and t.shape[2:] == (1, d) and t.shape[:2] == first.shape[:2]
              and t.dtype in SUMMARY_DTYPES and t.device == q.device and t.stride(-1) == 1
              and t.stride(1) == d,
              f"summaries[{name!r}] is {t.dtype} {tuple(t.shape)} on {t.device}; expected "
              f"{' or '.join(str(x) for x in SUMMARY_DTYPES)} [R, Hkv, 1, {d}] on {q.device}, "
              "rows contiguous")
    hkv = first.shape[1]
    _need(hkv > 0 and hq % hkv == 0,
          f"num_q_heads={hq} must be a positive multiple of num_kv_heads={hkv}")
    _need(isinstance(page_size, int) and not isinstance(page_size, bool) and page_size >= 1,
          f"page_size={page_size!r} must be a positive integer: tokens per page of the pool the "
          "summaries describe")
    if codes is not None:
        check_codes(codes, _summary_rows(summaries, (codes,), "this indexer")[0], first.shape[0],
                    hkv, page_size, d, q.device)
    check_counts(budget, sink, recent)
    for name, t, nd in (("page_table", page_table, 2), ("seq_lens", seq_lens, 1)):
        _need(isinstance(t, torch.Tensor) and t.dim() == nd and t.dtype in INDEX_DTYPES
              and t.shape[0] == B and t.device == q.device,
              f"{name} must be an int32 tensor with {B} rows on {q.device}, got "
              f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if B:
        _need(int(seq_lens.min()) >= 0, f"seq_lens must be >= 0, got {seq_lens.tolist()}")
        _need(int(pages_of(seq_lens, page_size).max()) <= page_table.shape[1],
              f"seq_lens {seq_lens.tolist()} need more pages than page_table's "
              f"{page_table.shape[1]} columns at page_size={page_size}")
        full = torch.arange(page_table.shape[1], device=q.device)[None, :] < \
            (seq_lens.to(torch.int64) // page_size)[:, None]
        rows = page_table.to(torch.int64)[full]
        if rows.numel():
            lo, hi = int(rows.min()), int(rows.max())
            _need(lo >= 0 and hi < first.shape[0],
                  f"page_table maps a full page to summary row {lo if lo < 0 else hi}; the "
                  f"summaries have rows 0..{first.shape[0] - 1}")


def check_counts(budget, sink, recent) -> None:
    """budget, sink, recent: integers (any integral type) with recent >= 1, budget >= sink + recent."""
    for name, v in (("budget", budget), ("sink", sink), ("recent", recent)):
        _need(is_count(v), f"{name}={v!r} must be a non-negative integer")
    _need(recent >= 1, f"recent={recent} must be >= 1: the partly filled last page is always "
          "attended (it has no summary to be scored by)")
    _need(budget >= sink + recent, f"budget={budget} must be >= sink + recent = {sink + recent}: "
          "the budget counts the sink and recent pages (a request with fewer pages than the budget "
          "selects all of them)")


def check_budgets(budgets, batch: int, num_kv_heads: int, budget, sink, recent, device) -> None:
    """Per-(request, KV head) budgets of one indexer call: int32 [batch, num_kv_heads] on `device`,
    each in [sink + recent, budget] (synchronises: checked calls only)."""
    _need(isinstance(budgets, torch.Tensor) and budgets.dtype == torch.int32
          and tuple(budgets.shape) == (batch, num_kv_heads) and budgets.device == device,
          f"budgets must be an int32 tensor [{batch}, {num_kv_heads}] on {device}, got "
          f"{getattr(budgets, 'dtype', type(budgets).__name__)} "
          f"{tuple(getattr(budgets, 'shape', ()))}")
    if budgets.numel():
        lo, hi = int(budgets.min()), int(budgets.max())
        _need(lo >= sink + recent and hi <= budget,
              f"budgets span {lo}..{hi}; each must lie in [sink + recent, budget] = "
              f"[{sink + recent}, {budget}]")


def is_count(v) -> bool:
    """A non-negative integral number (int, numpy integer, ...), not a bool."""
    if isinstance(v, bool):
        return False
    try:
        return operator.index(v) >= 0
    except TypeError:
        return False
