"""Sparse paged decode attention in Triton (flash-decoding split over pages), and the dense wrapper.

Contract (docs/architecture.md): a query head attends the tokens of the pages its KV head chose in
`sel`; the result is the state `(o, lse)`. One program handles one (request, KV head) pair and one
contiguous range of `sel` entries (a *split*), for all `Hq // Hkv` query heads of that KV head at
once (GQA: each K/V byte is read once for the whole group). Splits over pages let a batch of one
fill the GPU; a second small kernel (`merge_split_states`) merges the split states exactly.

Shapes (B requests, Hq query heads, Hkv KV heads, D head_dim, P page_size, N physical pages):
    q          [B, Hq, D]        float16 / bfloat16 / float32
    k_pool     [N, Hkv, P, D]    float16 / bfloat16 / float32 (v_pool the same)
    page_table [B, max_pages]    int32 (or int64)   logical -> physical page
    seq_lens   [B]               int32 (or int64)
    sel        [B, Hkv, K]       int32 (or int64)   logical pages, -1 padded, any order
    o          [B, Hq, D]        float32            lse [B, Hq] float32 (natural log; -inf if empty)

Dots: float32 pools use full-precision float32 dots (`input_precision="ieee"`); float16/bfloat16
pools on the GPU use tensor-core dots in the pool dtype with float32 accumulation (q and the
softmax weights are rounded to the pool dtype, relative error ~1e-3). Under the Triton interpreter
(CPU tensors) every dot runs in float32, because the interpreter's bf16 `tl.dot` is wrong
(docs/hardware.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import check_attention_args
from vortex_hybrid.reference import all_pages_sel

from .merge_states import merge_split_states

POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@dataclass(frozen=True)
class LaunchConfig:
    """Tuning knobs of the split kernel (measured in benchmarks/gpu_attention.py).

    The defaults are the best of the H100 sweep recorded in docs/BENCHMARKS.md; the ten best
    settings there lie within ~8% of each other (geomean over six shapes).
    """

    block_t: int = 32
    """Tokens per loop iteration (a power of two >= 16)."""
    num_warps: int = 4
    num_stages: int = 3
    waves: float = 4.0
    """Target programs per launch, in multiples of the GPU's SM count."""
    min_split_tokens: int = 64
    """A split never holds fewer selected tokens than this (unless K is smaller)."""
    prefetch_indices: bool = True
    """Load the next block's page indices (sel, page_table) while the current K/V loads fly."""


DEFAULT_CONFIG = LaunchConfig()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs per pair, so tests exercise the split reduction


def plan_splits(batch: int, num_kv_heads: int, num_sel: int, page_size: int, num_sms: int,
                config: LaunchConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """Split count S and `sel` entries per split for a launch: (num_splits, pages_per_split).

    Enough programs for `config.waves` waves over `num_sms` SMs, none with fewer than
    `config.min_split_tokens` tokens and at most MAX_SPLITS per pair; split boundaries fall on
    whole loop blocks.
    """
    if num_sel == 0:
        return 1, 0
    pages_per_block = max(1, config.block_t // page_size)
    min_pages = max(pages_per_block, -(-config.min_split_tokens // page_size))
    want = max(1, math.ceil(config.waves * num_sms / max(1, batch * num_kv_heads)))
    splits = max(1, min(want, -(-num_sel // min_pages), MAX_SPLITS))
    per_split = -(-num_sel // splits)
    per_split = -(-per_split // pages_per_block) * pages_per_block
    return -(-num_sel // per_split), per_split


@triton.jit
def _block_rows(sel_row, pt_row, flat, t_end, seq_len, stride_selk, stride_ptp, PAGE: tl.constexpr):
    """Pool rows of a block of a split's selected tokens.

    flat int32 [BLOCK_T]: positions in the (b, h) selection's token list (slot * PAGE + offset).
    Returns (phys int64 physical page, within int32 token offset in the page, valid bool): valid
    is False past t_end, for -1 padding and for tokens at or past seq_len.
    """
    slot = flat // PAGE
    within = flat % PAGE
    page = tl.load(sel_row + slot * stride_selk, mask=flat < t_end, other=-1).to(tl.int64)
    valid = (page >= 0) & (page * PAGE + within < seq_len)
    phys = tl.load(pt_row + page * stride_ptp, mask=valid, other=0).to(tl.int64)
    return phys, within, valid


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, sl_ptr, sel_ptr, o_ptr, lse_ptr,
                  scale_log2, num_sel, pages_per_split,
                  stride_qb, stride_qh, stride_qd,
                  stride_kn, stride_kh, stride_kp, stride_kd,
                  stride_vn, stride_vh, stride_vp, stride_vd,
                  stride_ptb, stride_ptp, stride_selb, stride_selh, stride_selk,
                  stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
                  NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_T: tl.constexpr, FP32_DOT: tl.constexpr, PREFETCH: tl.constexpr):
    """State of the GROUP query heads of KV head h over sel[b, h, split range]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // NUM_KV_HEADS
    h = pid % NUM_KV_HEADS
    seq_len = tl.load(sl_ptr + b).to(tl.int64)
    j0 = split * pages_per_split
    j1 = tl.minimum(j0 + pages_per_split, num_sel)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = h * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    sel_row = sel_ptr + b * stride_selb + h * stride_selh
    pt_row = pt_ptr + b * stride_ptb
    k_head = k_ptr + h * stride_kh
    v_head = v_ptr + h * stride_vh
    t_end = j1 * PAGE
    if PREFETCH:
        nxt_phys, nxt_within, nxt_valid = _block_rows(sel_row, pt_row, j0 * PAGE + offs_t, t_end,
                                                      seq_len, stride_selk, stride_ptp, PAGE)
    for t0 in range(j0 * PAGE, t_end, BLOCK_T):
        if PREFETCH:
            phys, within, valid = nxt_phys, nxt_within, nxt_valid
        else:
            phys, within, valid = _block_rows(sel_row, pt_row, t0 + offs_t, t_end, seq_len,
                                              stride_selk, stride_ptp, PAGE)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + phys[:, None] * stride_kn + within[:, None] * stride_kp
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_head + phys[:, None] * stride_vn + within[:, None] * stride_vp
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if PREFETCH:                                 # next block's indices fly with this K/V
            nxt_phys, nxt_within, nxt_valid = _block_rows(
                sel_row, pt_row, t0 + BLOCK_T + offs_t, t_end, seq_len, stride_selk, stride_ptp,
                PAGE)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))   # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    filled = l_i > 0.0
    o = acc / tl.where(filled, l_i, 1.0)[:, None]
    lse = tl.where(filled, (m_i + tl.log2(tl.where(filled, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
             + offs_d[None, :] * stride_od,
             o, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


def launch_sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                   page_table: torch.Tensor, seq_lens: torch.Tensor,
                                   sel: torch.Tensor, sm_scale: Optional[float] = None,
                                   out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                                   config: LaunchConfig = DEFAULT_CONFIG,
                                   num_splits: Optional[int] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked launcher of `sparse_decode_attention` (the runtime validates once per step).

    `out`: optional (o float32 [B, Hq, D], lse float32 [B, Hq]), both contiguous, written in
    place. `num_splits` overrides the split plan (tests use it); shapes as in the module docstring.
    """
    B, hq, d = q.shape
    _, hkv, page_size, _ = k_pool.shape
    num_sel = sel.shape[2]
    if out is None:
        o = torch.empty(B, hq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    else:
        o, lse = out
    if B == 0 or hq == 0:
        return o, lse
    if num_splits is None:
        num_splits, per_split = plan_splits(B, hkv, num_sel, page_size, _num_sms(q.device), config)
    else:
        per_split = -(-num_sel // num_splits)
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    if num_splits == 1:
        o_part, lse_part = o.view(B, hq, 1, d), lse.view(B, hq, 1)
    else:
        o_part = torch.empty(B, hq, num_splits, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, hq, num_splits, dtype=torch.float32, device=q.device)
    fp32_dot = k_pool.dtype == torch.float32 or q.device.type != "cuda"
    _split_kernel[(B * hkv, num_splits)](
        q, k_pool, v_pool, page_table, seq_lens, sel, o_part, lse_part,
        scale * LOG2E, num_sel, per_split,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *page_table.stride(), *sel.stride(),
        *o_part.stride(), *lse_part.stride(),
        NUM_KV_HEADS=hkv, GROUP=hq // hkv, PAGE=page_size, HEAD_DIM=d,
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_T=config.block_t, FP32_DOT=fp32_dot, PREFETCH=config.prefetch_indices,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if num_splits > 1:
        merge_split_states(o_part, lse_part, o, lse)
    return o, lse


def _check_gpu_args(q: torch.Tensor, k_pool: torch.Tensor,
                    out: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if k_pool.dtype not in POOL_DTYPES:
        raise ValueError(f"k_pool dtype {k_pool.dtype} not in {POOL_DTYPES} for the Triton kernel; "
                         "use vortex_hybrid.reference for float64")
    if q.dtype not in POOL_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not in {POOL_DTYPES} for the Triton kernel")
    if out is not None:
        o, lse = out
        B, hq, d = q.shape
        if (tuple(o.shape) != (B, hq, d) or tuple(lse.shape) != (B, hq) or o.dtype != torch.float32
                or lse.dtype != torch.float32 or not o.is_contiguous() or not lse.is_contiguous()
                or o.device != q.device or lse.device != q.device):
            raise ValueError(f"out must be contiguous float32 tensors of shapes {(B, hq, d)} and "
                             f"{(B, hq)} on {q.device}")


def sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_table: torch.Tensor, seq_lens: torch.Tensor, sel: torch.Tensor,
                            sm_scale: Optional[float] = None,
                            out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of each query head over its KV head's selected pages (checked).

    Returns the state (o float32 [B, Hq, D], lse float32 [B, Hq]); see the module docstring.
    Validation reads the index tensors (a GPU sync): hot paths call
    `launch_sparse_decode_attention` after validating once per step.
    """
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale)
    _check_gpu_args(q, k_pool, out)
    return launch_sparse_decode_attention(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale,
                                          out)


def dense_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, seq_lens: torch.Tensor,
                           sm_scale: Optional[float] = None,
                           out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over every token (the `dense` baseline): the sparse kernel, all pages.

    Same shapes and dtypes as `sparse_decode_attention`, without `sel`.
    """
    check_attention_args(q, k_pool, v_pool, page_table, seq_lens, None, sm_scale)
    _check_gpu_args(q, k_pool, out)
    sel = all_pages_sel(seq_lens, k_pool.shape[1], page_table.shape[1], k_pool.shape[2])
    return launch_sparse_decode_attention(q, k_pool, v_pool, page_table, seq_lens, sel, sm_scale,
                                          out)
