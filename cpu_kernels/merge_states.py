"""Exact log-sum-exp merge of two attention states over disjoint token sets (Numba).

Same contract as `vortex_hybrid.reference.merge_states`: with m = max(lse_a, lse_b),
w_x = exp(lse_x - m), o = (w_a o_a + w_b o_b) / (w_a + w_b) and lse = m + log(w_a + w_b); a side with
lse = -inf is empty, and two empty sides give o = 0, lse = -inf. Computed and returned in float32.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange

from vortex_hybrid.contracts import check_merge_args

from .float_bits import exp32
from .online_softmax import NEG_INF
from .tensor_views import float32_array, out_tensor
from .threads import kernel_call


@njit(parallel=True, nogil=True, cache=True)
def _merge_kernel(o_a, lse_a, o_b, lse_b, o, lse):
    """o_* float32 [R, D], lse_* float32 [R] (R = B * Hq); writes o [R, D] and lse [R]."""
    R, D = o.shape
    for r in prange(R):
        m = max(lse_a[r], lse_b[r])
        if m == NEG_INF:
            lse[r] = NEG_INF
            for d in range(D):
                o[r, d] = 0.0
            continue
        w_a = exp32(lse_a[r] - m)
        w_b = exp32(lse_b[r] - m)
        total = w_a + w_b
        inv = np.float32(1.0) / total
        w_a *= inv
        w_b *= inv
        for d in range(D):
            o[r, d] = w_a * o_a[r, d] + w_b * o_b[r, d]
        lse[r] = m + np.log(total)


def merge_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                 out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge states `(o_a, lse_a)` and `(o_b, lse_b)` of the same query heads over disjoint tokens.

    o_a, o_b: float [B, Hq, D] on the CPU; lse_a, lse_b: float [B, Hq] (natural log, -inf = empty).
    Returns o float32 [B, Hq, D], lse float32 [B, Hq], written into `out` = (o, lse) when given
    (out may alias o_a / lse_a or o_b / lse_b when those are contiguous float32).
    """
    check_merge_args(o_a, lse_a, o_b, lse_b)
    B, hq, d = o_a.shape
    o = out_tensor("out[0]", None if out is None else out[0], (B, hq, d), torch.float32)
    lse = out_tensor("out[1]", None if out is None else out[1], (B, hq), torch.float32)
    if o.numel() == 0 and lse.numel() == 0:
        return o, lse
    arrays = [float32_array(name, t) for name, t in
              (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b))]
    oa, la, ob, lb = arrays
    with kernel_call():
        _merge_kernel(oa.reshape(B * hq, d), la.reshape(-1), ob.reshape(B * hq, d), lb.reshape(-1),
                      o.numpy().reshape(B * hq, d), lse.numpy().reshape(-1))
    return o, lse
