"""Exact log-sum-exp merge of attention states, in Triton.

A state `(o, lse)` is the attention output over a set of tokens and the natural log of the sum of
exp of the scaled scores over it (docs/architecture.md). Two states over disjoint token sets merge
exactly into the state over their union:

    lse = log(exp(lse_a) + exp(lse_b))        o = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b)

A side with `lse = -inf` is empty and contributes nothing; both empty gives `o = 0`, `lse = -inf`.

Two entry points share one combine routine (`combine_states`):
  - `merge_states(o_a, lse_a, o_b, lse_b)`: the contract function (two states, e.g. GPU + CPU parts).
  - `merge_split_states(o_part, lse_part, o, lse)`: S states per row at once (the split reduction of
    flash-decoding in `sparse_decode_attention`), unchecked, writes into `o` / `lse`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from vortex_hybrid.contracts import check_merge_args

STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def combine_states(o, lse):
    """Merge S states: o fp32 [BLOCK_S, BLOCK_D], lse fp32 [BLOCK_S] (-inf rows are empty).

    Returns (o fp32 [BLOCK_D], lse fp32 scalar).
    """
    m = tl.max(lse, axis=0)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    w = tl.exp(lse - m_safe)                                  # 0 for empty states
    total = tl.sum(w, axis=0)
    denom = tl.where(empty, 1.0, total)
    out = tl.sum(w[:, None] * o, axis=0) / denom
    out = tl.where(empty, 0.0, out)
    out_lse = tl.where(empty, m, m_safe + tl.log(denom))
    return out, out_lse


@triton.jit
def _merge_pair_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, lse_ptr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per row r of the flattened [R, HEAD_DIM] states (all contiguous)."""
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, 2)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    is_a = offs_s[:, None] == 0
    o_ptrs = tl.where(is_a, oa_ptr, ob_ptr) + r * HEAD_DIM + offs_d[None, :]
    o = tl.load(o_ptrs, mask=d_mask[None, :], other=0.0).to(tl.float32)
    lse = tl.load(tl.where(offs_s == 0, la_ptr, lb_ptr) + r).to(tl.float32)
    out, out_lse = combine_states(o, lse)
    tl.store(o_ptr + r * HEAD_DIM + offs_d, out, mask=d_mask)
    tl.store(lse_ptr + r, out_lse)


@triton.jit
def _merge_split_kernel(op_ptr, lp_ptr, o_ptr, lse_ptr, num_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per row r: merge o_part [R, S, HEAD_DIM], lse_part [R, S] (contiguous)."""
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(lp_ptr + r * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    o = tl.load(op_ptr + (r * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out, out_lse = combine_states(o, lse)
    tl.store(o_ptr + r * HEAD_DIM + offs_d, out, mask=d_mask)
    tl.store(lse_ptr + r, out_lse)


def merge_split_states(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor) -> None:
    """Merge S partial states per row into `o`, `lse` in place (unchecked launcher).

    o_part: float32 [..., S, D] contiguous; lse_part: float32 [..., S] contiguous;
    o: float32 [..., D] contiguous; lse: float32 [...] contiguous (same leading dims).
    """
    num_splits, d = o_part.shape[-2], o_part.shape[-1]
    rows = lse.numel()
    if rows == 0:
        return
    _merge_split_kernel[(rows,)](o_part, lse_part, o, lse, num_splits, HEAD_DIM=d,
                                 BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                                 BLOCK_D=triton.next_power_of_2(d), num_warps=4)


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                 out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two states over disjoint token sets; `-inf` sides are empty.

    o_a, o_b: [B, Hq, D] float16/bfloat16/float32; lse_a, lse_b: [B, Hq] same dtypes.
    Returns (o float32 [B, Hq, D], lse float32 [B, Hq]), written into `out` when given
    (two contiguous float32 tensors of those shapes, on the same device).
    """
    check_merge_args(o_a, lse_a, o_b, lse_b)
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if t.dtype not in STATE_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not in {STATE_DTYPES}; "
                             "use vortex_hybrid.reference.merge_states for float64")
    B, hq, d = o_a.shape
    if out is None:
        o = torch.empty(B, hq, d, dtype=torch.float32, device=o_a.device)
        lse = torch.empty(B, hq, dtype=torch.float32, device=o_a.device)
    else:
        o, lse = out
        if (o.shape != o_a.shape or lse.shape != lse_a.shape or o.dtype != torch.float32
                or lse.dtype != torch.float32 or not o.is_contiguous() or not lse.is_contiguous()
                or o.device != o_a.device or lse.device != o_a.device):
            raise ValueError(f"out must be contiguous float32 tensors of shapes {tuple(o_a.shape)} "
                             f"and {tuple(lse_a.shape)} on {o_a.device}")
    if o.numel() == 0:
        return o, lse
    if o_a.dtype != o_b.dtype:
        o_a, o_b = o_a.float(), o_b.float()
    if lse_a.dtype != lse_b.dtype:
        lse_a, lse_b = lse_a.float(), lse_b.float()
    o_a, lse_a, o_b, lse_b = (t.contiguous() for t in (o_a, lse_a, o_b, lse_b))
    _merge_pair_kernel[(B * hq,)](o_a, lse_a, o_b, lse_b, o, lse, HEAD_DIM=d,
                                  BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return o, lse
