"""Boundary checks for the kernel contracts of DESIGN.md, shared by every backend.

`vortex_hybrid.reference`, `vortex_hybrid.cpu_kernels` and `vortex_hybrid.gpu_kernels` expose the same
functions; each public entry point calls the matching check here first, so bad input raises a
`ValueError` that names the argument, the bad value and what is allowed, and kernels can assume valid
input. Shape/dtype checks are free; value checks (page indices in range, unique selections) read the
tensors and, on a GPU, synchronise, so a runtime validates its inputs once per step and then calls
the kernels' unchecked launchers (the runtime that does so comes in a later change).
"""

from __future__ import annotations

import torch

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
        s = sel.to(torch.int64)
        valid = s >= 0
        _need(bool((s >= -1).all()), "sel holds values below -1; pad with -1 only")
        bad = valid & (s >= n_pages[:, None, None])
        if bool(bad.any()):
            b, h, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"sel[{b}, {h}, {j}]={int(s[b, h, j])} is not a page of request {b} "
                             f"(it holds {int(n_pages[b])} pages for seq_len {int(sl[b])})")
        srt = torch.sort(s, dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, h, _ = (int(x) for x in dup.nonzero()[0])
            raise ValueError(f"sel[{b}, {h}] lists a page twice: {sel[b, h].tolist()}")
        rows = torch.arange(B, device=q.device)[:, None, None].expand_as(s)
        phys = page_table.to(torch.int64)[rows[valid], s[valid]]
    if phys.numel():
        lo, hi = int(phys.min()), int(phys.max())
        _need(lo >= 0 and hi < n_phys,
              f"page_table maps a used page to physical page {lo if lo < 0 else hi}; "
              f"the pool has pages 0..{n_phys - 1}")


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
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              f"{name}={v!r} must be a non-negative integer")
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
